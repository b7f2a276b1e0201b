"""A guest whose agent is killed gets a new one (its init restarts it); the host says hello
again and the next command works, while commands of the dead agent end with AgentError.

These boot a real QEMU VM and fail instead of skipping when KELPIE_REQUIRE_BACKENDS names
qemu (CI).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kelpie import AgentError, VmConfig, VmCrashed, VmState
from kelpie.backends.qemu._vm import QemuVm
from kelpie.guestkit import GuestKit

pytestmark = [pytest.mark.vm, pytest.mark.asyncio(loop_scope="module")]

FIND_AGENT = (
    "for p in /proc/[0-9]*; do "
    "tr '\\000' ' ' < $p/cmdline 2>/dev/null | grep -q '^python3 .*/agent.pyc --device' "
    "&& echo ${p#/proc/}; done"
)
"""Prints the pid of every guest process running the agent (init starts it with
``--device-from``, restarts it with ``--device``), read from /proc."""


@pytest.fixture(scope="module")
def state_dir() -> Iterator[Path]:
    path = Path(f"/tmp/kelpie-restart-{os.getpid()}")  # short: unix socket paths live here
    path.mkdir(exist_ok=True)
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


async def agent_pids(vm: QemuVm) -> list[int]:
    result = await vm.exec(["sh", "-c", FIND_AGENT])
    return [int(word) for word in result.stdout.split()]


async def test_killed_agent_is_greeted_again_and_its_commands_fail(
    guestkit: GuestKit, state_dir: Path
) -> None:
    vm = QemuVm(VmConfig(), kit=guestkit, workdir=state_dir / "a")
    await vm.start()
    try:
        assert vm.agent_info is not None
        old_pid = vm.agent_info.agent_pid
        assert await agent_pids(vm) == [old_pid]
        async with vm.exec_stream(["sleep", "600"], keep_running=True) as sleeper:
            # The agent dies while running this very command: its exit is never reported.
            with pytest.raises(AgentError, match="restarted") as killed:
                await vm.exec(["kill", "-9", str(old_pid)])
            assert not isinstance(killed.value, VmCrashed)
            with pytest.raises(AgentError, match="restarted"):
                await sleeper.wait()  # ran under the old agent: its outcome is lost
        result = await vm.exec(["echo", "after the restart"])
        assert result.stdout == b"after the restart\n"
        assert vm.state is VmState.RUNNING
        assert vm.agent_info is not None and vm.agent_info.agent_pid != old_pid
        assert await agent_pids(vm) == [vm.agent_info.agent_pid]
        await vm.write_file("/tmp/still", b"files work too\n")
        assert await vm.read_file("/tmp/still") == b"files work too\n"
        assert vm.agent.restarts == 1
    finally:
        await vm.stop()
    assert vm.state is VmState.STOPPED and vm.crash_reason is None
