"""The host side of one VM's network, as a backend uses it: :class:`SandboxNetwork`.

``up()`` before the VMM starts (the namespace and its rules, then the helper with the DNS
forwarder and the port relays, ready before the VMM may use them), ``change()`` on a running
sandbox (the rules at once, the forwarder on its next query), ``down()`` once the VMM has
exited. A backend launches its VMM with :attr:`SandboxNetns.exec_prefix` and forwards the
published ports from :attr:`SandboxNetns.address`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

from kelpie.hostnet import _netns
from kelpie.hostnet._helper import READY_FD, read_pinned, write_settings
from kelpie.hostnet._netns import HostNetworkError, SandboxNetns
from kelpie.vm import EgressPolicy, NetworkMode, VmConfig

HELPER_PID = "net.pid"
HELPER_LOG = "net.log"
READY_TIMEOUT = 30.0


class SandboxNetwork:
    """The namespace, rules, DNS forwarder and port relays of the VM in ``vm_dir``."""

    def __init__(self, vm_dir: Path) -> None:
        self.vm_dir = vm_dir
        self.netns: SandboxNetns | None = None

    @staticmethod
    def needed(config: VmConfig) -> bool:
        """Whether the VM gets a namespace: it may reach a network (nat or policy)."""
        return config.network is not NetworkMode.NONE

    async def up(self, config: VmConfig) -> SandboxNetns:
        """Make (or find again) the namespace with its rules; start the helper unless it
        runs. Raises :class:`HostNetworkError` saying what failed."""
        netns = await asyncio.to_thread(_netns.create, self.vm_dir, config.network,
                                        config.egress, read_pinned(self.vm_dir))
        self.netns = netns
        write_settings(self.vm_dir, netns, config.network, config.egress, config.ports)
        if self._helper_pid() is None:
            try:
                await self._start_helper()
            except BaseException:
                await self.down()
                raise
        return netns

    async def change(self, mode: NetworkMode, policy: EgressPolicy, config: VmConfig) -> None:
        """Apply new rules to the running sandbox (the next packet obeys them)."""
        netns = self.netns or _netns.find(_netns.key_of(self.vm_dir))
        if netns is None:
            raise HostNetworkError(f"the VM in {self.vm_dir} has no network namespace")
        await asyncio.to_thread(netns.apply, mode, policy, read_pinned(self.vm_dir))
        write_settings(self.vm_dir, netns, mode, policy, config.ports)
        pid = self._helper_pid()
        if pid is not None:
            os.kill(pid, signal.SIGHUP)

    async def down(self) -> None:
        """Stop the helper and remove the namespace (after the VMM has exited)."""
        recorded = self._recorded_pid()
        if recorded is not None:
            if self._helper_pid() is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(recorded, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):  # ours (not a restarted daemon's)
                await asyncio.to_thread(os.waitpid, recorded, 0)
        with contextlib.suppress(FileNotFoundError):
            (self.vm_dir / HELPER_PID).unlink()
        await asyncio.to_thread(_netns.destroy, self.vm_dir)
        self.netns = None

    def _recorded_pid(self) -> int | None:
        """The pid the helper's pid file names (running or not)."""
        try:
            return int((self.vm_dir / HELPER_PID).read_text())
        except (OSError, ValueError):
            return None

    def _helper_pid(self) -> int | None:
        """The pid of this VM's helper, if it runs."""
        pid = self._recorded_pid()
        if pid is None:
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        return pid if str(self.vm_dir).encode() in cmdline else None

    async def _start_helper(self) -> None:
        died = self._recorded_pid()
        if died is not None:  # a helper of ours that died: reap it
            _reap(died)
        read_end, write_end = os.pipe()
        log = self.vm_dir / HELPER_LOG
        try:
            pid = _spawn_helper(self.vm_dir, log, write_end)
        finally:
            os.close(write_end)
        (self.vm_dir / HELPER_PID).write_text(str(pid))
        loop = asyncio.get_running_loop()
        readable = loop.create_future()
        loop.add_reader(read_end, _settle, readable)
        try:  # "ready", or the end of the pipe when the helper exits
            await asyncio.wait_for(readable, READY_TIMEOUT)
            said = os.read(read_end, 64)
        except TimeoutError:
            said = b""
        finally:
            loop.remove_reader(read_end)
            os.close(read_end)
        if said.strip() != b"ready":
            tail = log.read_text(errors="replace").strip().splitlines()[-5:]
            raise HostNetworkError("the sandbox's network helper did not start (DNS "
                                   "forwarder and published ports): " + " | ".join(tail))


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _spawn_helper(vm_dir: Path, log: Path, ready: int) -> int:
    """Start the helper in its own session (it outlives this process, like the VMM), its
    output in ``log``, ``ready`` as its file descriptor 3."""
    with log.open("ab") as out:
        return os.posix_spawn(
            sys.executable, [sys.executable, "-m", "kelpie.hostnet", str(vm_dir)],
            dict(os.environ), setsid=True, file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, out.fileno(), 1),
                (os.POSIX_SPAWN_DUP2, out.fileno(), 2),
                (os.POSIX_SPAWN_DUP2, ready, READY_FD),
            ])


def _reap(pid: int) -> None:
    """Collect ``pid`` if it is a child of this process that has exited (else nothing)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
