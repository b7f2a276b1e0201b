"""Stopping every process a build step left behind (Docker ends a RUN's container; a
Kelpie build keeps the stage's VM, so the agent clears it instead)."""

from __future__ import annotations

# contextlib is outside the guest's import budget: keep try/except/pass.
# ruff: noqa: SIM105
import os

from ._common import OpError
from ._lean import signal
from ._usage import guest_pids

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Final

#: Rounds of stop-then-kill before the agent reports what is left.
SWEEP_ROUNDS: Final = 50


def op_sweep(rid: int, f: dict[str, Any], *, allowed: bool) -> dict[str, Any]:
    """SIGSTOP then SIGKILL every process but init, the agent, kernel threads and
    ``keep``, round after round: stopped processes cannot fork, so a fork bomb ends.
    Only an agent that is a VM's own (``allowed``) does it: anywhere else it would kill
    every process of the machine it runs on."""
    if not allowed:
        raise OpError("EPERM", "sweep runs only in a VM's own agent (it kills every "
                               "process but the agent)")
    spared = {1, os.getpid(), *f["keep"]}
    killed = 0
    left: list[int] = []
    for _ in range(SWEEP_ROUNDS):
        left = [pid for pid in guest_pids() if pid not in spared and _user_process(pid)]
        if not left:
            break
        for signum in (signal.SIGSTOP, signal.SIGKILL):
            for pid in left:
                try:
                    os.kill(pid, signum)
                except OSError:
                    pass  # gone already
        killed += len(left)
    return {"killed": killed, "left": len(left)}


def _user_process(pid: int) -> bool:
    """Whether ``pid`` is a live user-space process (not a kernel thread, not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return False
    if len(fields) < 2 or fields[0] in ("Z", "X"):
        return False
    return pid != 2 and fields[1] != "2"  # kthreadd and its children: the kernel's
