"""One command the agent started: its process, its descriptors and its outcome."""

from __future__ import annotations

# contextlib is outside the guest's import budget: keep try/except/pass.
# ruff: noqa: SIM105
import os
import termios

from ._lean import deque, signal

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class Exec:
    """A command started by the agent, attached to a request or detached."""

    # Immutable starting values live on the class: an exec starts for every request, and
    # under TCG each assignment in __init__ costs.
    stdin_fd: int | None = None
    out_fd: int | None = None  # stdout, or the PTY master
    err_fd: int | None = None
    exit_fd: int | None = None  # a pidfd, readable once the process has exited
    stdin_eof = False
    status: int | None = None  # raw wait status once reaped
    timed_out = False
    deadline: float | None = None
    drain_deadline: float | None = None
    request_id: int | None = None
    started = b""  # its request's ``started`` event while held back (see attach)
    started_until = 0.0
    exited_at = 0.0
    produced = 0  # bytes of output forwarded so far (stdout and stderr)
    keep = 0  # bytes of recent output kept for an attach to replay
    kept_bytes = 0

    def __init__(self, exec_id: int, pid: int, argv: list[str], pty: bool) -> None:
        self.exec_id = exec_id
        self.pid = pid
        self.argv = argv
        self.pty = pty
        self.stdin_buf = bytearray()
        self.kept: deque[tuple[int, bytes]] = deque()  # (frame type, data), oldest first

    def forwarded(self, ftype: int, data: bytes) -> None:
        """Count output on its way to the host; keep the last ``keep`` bytes of it, since
        frames in flight are lost when the host changes (a restarted daemon, a VM moved
        live to another host)."""
        self.produced += len(data)
        if not self.keep:
            return
        self.kept.append((ftype, data))
        self.kept_bytes += len(data)
        while self.kept_bytes - len(self.kept[0][1]) >= self.keep:
            self.kept_bytes -= len(self.kept.popleft()[1])

    def since(self, offset: int) -> tuple[int, list[tuple[int, bytes]]]:
        """The output after the first ``offset`` bytes, as far as it is kept: where it
        starts (above ``offset`` if some was not kept) and its chunks."""
        start = self.produced - self.kept_bytes
        if offset >= self.produced:
            return self.produced, []
        chunks, position = [], start
        for ftype, data in self.kept:
            end = position + len(data)
            if end > offset:
                chunks.append((ftype, data[max(0, offset - position):]))
            position = end
        return max(offset, start), chunks

    def take_started(self) -> bytes:
        """The held ``started`` event, to go out before anything else of its request
        (empty once sent)."""
        frame, self.started = self.started, b""
        return frame

    def info(self) -> dict[str, Any]:
        """Summary listed in the hello reply."""
        argv = [arg[:256] for arg in self.argv[:16]]
        return {
            "exec_id": self.exec_id,
            "pid": self.pid,
            "argv": argv,
            "pty": self.pty,
            "running": self.status is None,
        }

    def result(self) -> dict[str, Any]:
        """The terminal REPLY message."""
        assert self.status is not None
        code = os.waitstatus_to_exitcode(self.status)
        return {
            "exec_id": self.exec_id,
            "exit_code": code if code >= 0 else None,
            "signal": -code if code < 0 else None,
            "timed_out": self.timed_out,
        }

    def kill_group(self, signum: int = signal.SIGKILL) -> None:
        """Signal the process group (and the leader, should it have left it).

        Only while the leader is unreaped: after that its pid may be reused.
        """
        if self.status is not None:
            return
        for kill, target in ((os.killpg, self.pid), (os.kill, self.pid)):
            try:
                kill(target, signum)
            except OSError:
                pass

    def close_stdin_fd(self) -> None:
        """Give the child EOF on stdin (for a PTY: the VEOF character)."""
        fd, self.stdin_fd = self.stdin_fd, None
        self.stdin_buf.clear()
        if fd is None:
            return
        if self.pty:
            try:
                os.write(fd, bytes([termios.tcgetattr(fd)[6][termios.VEOF][0]]))
            except (OSError, termios.error, IndexError, TypeError):
                pass
        os.close(fd)

    def close_exit_fd(self) -> None:
        """Stop watching for the exit (it has been collected, or nobody waits for it)."""
        fd, self.exit_fd = self.exit_fd, None
        if fd is not None:
            os.close(fd)

    def close_fds(self) -> None:
        """Release every descriptor the agent holds for this exec."""
        self.close_stdin_fd()
        self.close_exit_fd()
        for name in ("out_fd", "err_fd"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)
