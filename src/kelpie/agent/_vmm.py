"""A VMM process on the host: started detached in its own session, watched through a pidfd."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
from pathlib import Path


class ProcessWatch:
    """Learns when one process exits, through a pidfd, whether or not it is our child.

    ``exited`` resolves to the exit status (``-N`` when signal N killed it) when the process
    is our child; to None when another process started it, since only the parent can
    collect the status. The pidfd also makes signals race-free: it names this process
    only, even after its pid is reused.
    """

    def __init__(self, pid: int, *, child: bool) -> None:
        self.pid = pid
        self.child = child
        self._loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[int | None] = self._loop.create_future()
        self._fd: int | None = os.pidfd_open(pid)  # ProcessLookupError once it is reaped
        try:
            self._loop.add_reader(self._fd, self._on_exit)
        except BaseException:
            os.close(self._fd)
            raise

    @property
    def running(self) -> bool:
        """Whether the process has not exited yet (as far as the event loop has seen)."""
        return not self.exited.done()

    def has_exited(self) -> bool:
        """Ask the pidfd now, without waiting for the event loop to deliver its event."""
        if self._fd is None:
            return True
        readable, _, _ = select.select([self._fd], [], [], 0)
        return bool(readable)

    async def wait(self) -> int | None:
        """Wait for the exit; cancelling the caller does not stop the watch."""
        return await asyncio.shield(self.exited)

    def kill_group(self) -> None:
        """SIGKILL the process's group (a VMM leads its own session) and the process itself."""
        if self._fd is None or self.has_exited():
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self._fd, signal.SIGKILL)

    def close(self) -> None:
        """Stop watching; ``exited`` is cancelled if the process still ran."""
        self._release()
        self.exited.cancel()

    def _on_exit(self) -> None:
        self._release()
        if not self.exited.done():
            self.exited.set_result(self._reap())

    def _release(self) -> None:
        if self._fd is not None:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None

    def _reap(self) -> int | None:
        if not self.child:
            return None
        try:
            _, status = os.waitpid(self.pid, 0)  # returns at once: the pidfd says it exited
        except ChildProcessError:
            return None
        return os.waitstatus_to_exitcode(status)


def spawn_in_new_session(command: list[str], log: Path) -> int:
    """Start ``command`` in its own session, output appended to ``log``; return its pid.

    ``posix_spawn`` rather than an asyncio subprocess: asyncio kills a child whose transport
    is garbage-collected, and a VM must outlive the objects (and the process) that started it.
    """
    with log.open("ab") as out:
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, out.fileno(), 1),
            (os.POSIX_SPAWN_DUP2, out.fileno(), 2),
        ]
        return os.posix_spawnp(
            command[0], command, dict(os.environ), file_actions=actions, setsid=True,
            setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),  # Python ignores them; a VMM must not
        )
