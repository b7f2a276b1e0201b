"""The agent's commands: exec requests start them, the loop pumps and reaps them."""

from __future__ import annotations

import os
import select
import time

from ._common import DEFAULT_PATH, FT, HIGH_WATER, OpError, log, protocol
from ._exec import Exec
from ._lean import partial
from ._rootfs import AGENT_UID, lookup_user
from ._spawn import OutputPipes, SpawnPlan, set_winsize, spawn

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Final

    from ._common import Handler, Watches
    from ._files import Download, Upload
    from ._link import HostLink
    from ._rootfs import RootFS

#: How long an exec's ``started`` event may wait to go out with its first output or its
#: exit: a command that ends or writes sooner costs the channel one write and the host one
#: wakeup less (a write is ~0.2 ms of agent time under TCG).
STARTED_HOLD: Final = 0.01
#: After the main process exits, how long to wait for its pipes to reach EOF
#: (background processes may hold them open) before finishing the exec.
DRAIN_GRACE: Final = 0.2
#: How often the exits of commands without a pidfd are polled (see watch_exit).
UNWATCHED_POLL: Final = 0.05
#: Upper bound on the final, non-blocking drain of a finished exec's pipe.
FINAL_DRAIN_LIMIT: Final = 1024 * 1024
#: Finished execs kept for a host to collect, beyond which the oldest go.
KEEP_FINISHED_DETACHED: Final = 64
READ_CHUNK: Final = protocol.DATA_CHUNK
#: The most recent output an exec may keep for an attach to replay (``replay``).
REPLAY_LIMIT: Final = 1024 * 1024


class ExecManager:
    """Starts commands, moves their stdin and output, reaps them and enforces timeouts.

    An exec is attached to the request that started (or re-attached to) it
    while that request's session lasts; afterwards it is detached: it keeps
    running, its output waits in the kernel pipe, until a host attaches to it
    or, finished, it is evicted. ``requests`` is the session's table of
    requests in flight, shared with the session and the file service.
    """

    def __init__(
        self, rootfs: RootFS, link: HostLink, requests: dict[int, Exec | Upload | Download]
    ) -> None:
        self.rootfs = rootfs
        self.link = link
        self.requests = requests
        self.execs: dict[int, Exec] = {}
        #: Running commands with no pidfd: their exits are polled (see watch_exit).
        self.unwatched: dict[int, Exec] = {}
        #: Ended outputs, closed by ``tidy`` once the replies that were waiting are out.
        self.ended: list[int] = []
        self.next_exec_id = 1

    def handlers(self) -> dict[str, Handler]:
        """The ops this manager serves."""
        return {
            "exec": self.op_exec,
            "attach": self.op_attach,
            "signal": self.op_signal,
            "resize": self.op_resize,
        }

    # -- ops -------------------------------------------------------------------

    def op_exec(self, rid: int, f: dict[str, Any]) -> None:
        """Start a command; output and the exit status follow on ``rid``."""
        # The groups matter only to a command that runs as another user.
        user = lookup_user(self.rootfs, f["user"], groups=f["user"] is not None)
        env = {"PATH": DEFAULT_PATH, "HOME": user.home, "USER": user.name, "LOGNAME": user.name}
        if f["pty"]:
            env["TERM"] = "xterm-256color"
        env.update(f["env"])
        switch = f["user"] is not None and user.uid != AGENT_UID
        plan = SpawnPlan(
            argv=f["argv"],
            env=env,
            cwd=f["cwd"],
            root=self.rootfs.root,
            user=user if switch else None,
            pty=f["pty"],
        )
        ex = spawn(plan, self.next_exec_id, f["stdin"], f["rows"], f["cols"])
        self.next_exec_id += 1
        ex.keep = min(f["replay"], REPLAY_LIMIT)
        if f["timeout"] is not None:
            ex.deadline = time.monotonic() + max(0.0, float(f["timeout"]))
        self.execs[ex.exec_id] = ex
        self.watch_exit(ex)
        self.attach(ex, rid)

    def op_attach(self, rid: int, f: dict[str, Any]) -> None:
        """Re-attach to an exec started on an earlier connection."""
        ex = self.execs.get(f["exec_id"])
        if ex is None:
            raise OpError("ESRCH", f"no exec {f['exec_id']} (finished and collected, or never)")
        if ex.request_id is not None:
            raise OpError("EBUSY", f"exec {ex.exec_id} is attached to request {ex.request_id}")
        self.attach(ex, rid, f["offset"])

    def attach(self, ex: Exec, rid: int, offset: int | None = None) -> None:
        """Bind an exec's output and exit status to request ``rid``; replay what it kept
        after ``offset`` (the output bytes the host already has). The ``started`` event
        is held (see STARTED_HOLD) unless output is replayed at once."""
        ex.request_id = rid
        self.requests[rid] = ex
        start, replay = ex.since(ex.produced if offset is None else offset)
        ex.started = protocol.encode_json(FT.EVENT, rid, {
            "event": "started", "exec_id": ex.exec_id, "pid": ex.pid, "offset": start})
        now = time.monotonic()
        ex.started_until = now + STARTED_HOLD
        for ftype, data in replay:  # each no bigger than the read it came from
            self.link.send(ex.take_started() + protocol.encode_frame(ftype, rid, data))
        if ex.status is not None:
            ex.drain_deadline = now + DRAIN_GRACE

    def op_signal(self, rid: int, f: dict[str, Any]) -> dict[str, Any]:
        """Send a signal to an exec's process (or its whole process group)."""
        ex = self.target(f["target"])
        if ex.status is not None:
            raise OpError("ESRCH", f"exec {ex.exec_id} has already exited")
        try:
            (os.killpg if f["group"] else os.kill)(ex.pid, f["signum"])
        except OSError as exc:
            raise OpError.from_os(exc, f"cannot send signal {f['signum']}") from None
        return {}

    def op_resize(self, rid: int, f: dict[str, Any]) -> dict[str, Any]:
        """Change the window size of an exec's PTY."""
        ex = self.target(f["target"])
        if not ex.pty or ex.out_fd is None:
            raise OpError("EINVAL", f"exec {ex.exec_id} has no terminal to resize")
        set_winsize(ex.out_fd, f["rows"], f["cols"])
        return {}

    def target(self, target: int) -> Exec:
        """The exec attached to request ``target`` in this session."""
        req = self.requests.get(target)
        if not isinstance(req, Exec):
            raise OpError("ESRCH", f"request {target} is not a running exec of this session")
        return req

    def infos(self) -> list[dict[str, Any]]:
        """Every exec the agent knows, oldest first (for the hello reply)."""
        return [ex.info() for ex in sorted(self.execs.values(), key=lambda e: e.exec_id)]

    # -- stdin and output ----------------------------------------------------------

    def on_stdin(self, frame: protocol.Frame) -> None:
        """Queue stdin for an exec; an empty frame is EOF."""
        ex = self.requests.get(frame.request_id)
        if not isinstance(ex, Exec) or ex.stdin_fd is None or ex.stdin_eof:
            return  # finished, or stdin not requested: drop silently
        if frame.payload:
            ex.stdin_buf += frame.payload
        else:
            ex.stdin_eof = True
        self.flush_stdin(ex)

    def stdin_backlog(self) -> int:
        """Bytes received from the host still waiting for children to read."""
        return sum(len(ex.stdin_buf) for ex in self.execs.values())

    def register(self, watches: Watches) -> None:
        """Poll the pidfds of running commands, stdin pipes with data waiting and, unless
        the host is behind, outputs.

        Outputs before the pidfd: poll reports events in the order registered, so a
        command's end of output is handled before its exit in the same turn, and the exit
        can be answered there and then (see collect).
        """
        reading = self.link.queued < HIGH_WATER
        for ex in self.execs.values():
            if ex.stdin_fd is not None and ex.stdin_buf:
                watches[ex.stdin_fd] = (select.POLLOUT, partial(self.on_stdin_writable, ex))
            if reading and ex.request_id is not None:
                for out_fd, ftype in ((ex.out_fd, FT.STDOUT), (ex.err_fd, FT.STDERR)):
                    if out_fd is not None:
                        watches[out_fd] = (select.POLLIN,
                                           partial(self.on_output_readable, ex, ftype))
            if ex.exit_fd is not None:
                watches[ex.exit_fd] = (select.POLLIN, partial(self.on_exit, ex))

    def on_stdin_writable(self, ex: Exec, events: int) -> None:
        """An exec's stdin pipe has room (or the child closed it)."""
        self.flush_stdin(ex)

    def on_output_readable(self, ex: Exec, ftype: int, events: int) -> None:
        """An exec's stdout/stderr has data or reached its end."""
        if events == select.POLLHUP and not ex.pty:
            # A pipe with no writer left and nothing in it (else POLLIN too): its end,
            # without a read to learn it.
            self.end_output(ex, ftype)
        else:
            self.read_output(ex, ftype)

    def flush_stdin(self, ex: Exec) -> None:
        """Write queued stdin without blocking; close it after EOF."""
        while ex.stdin_fd is not None and ex.stdin_buf:
            try:
                written = os.write(ex.stdin_fd, ex.stdin_buf[:READ_CHUNK])
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # EPIPE: the child closed its stdin
                ex.close_stdin_fd()
                return
            del ex.stdin_buf[:written]
        if ex.stdin_eof and ex.stdin_fd is not None:
            ex.close_stdin_fd()

    def read_output(self, ex: Exec, ftype: int) -> None:
        """Forward one chunk of an exec's output, or note its end."""
        fd = ex.out_fd if ftype == FT.STDOUT else ex.err_fd
        if fd is None or ex.request_id is None:
            return
        try:
            data = os.read(fd, READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # EIO: every PTY slave is closed
            data = b""
        if data:
            ex.forwarded(ftype, data)
            self.link.send(ex.take_started() + protocol.encode_frame(ftype, ex.request_id, data))
            return
        self.end_output(ex, ftype)

    def end_output(self, ex: Exec, ftype: int) -> None:
        """Stop reading an exec's stdout or stderr, which has ended; its descriptor is
        closed by ``tidy``, after the exit status may have gone out."""
        if ftype == FT.STDOUT:
            fd, ex.out_fd = ex.out_fd, None
        else:
            fd, ex.err_fd = ex.err_fd, None
        if fd is not None:
            self.ended.append(fd)

    # -- exit, timeouts and eviction -----------------------------------------------

    def watch_exit(self, ex: Exec) -> None:
        """Learn of the command's exit from a pidfd the loop polls.

        A pidfd, not SIGCHLD: a signal per exit costs the agent a signal frame, a
        Python-level handler, a write and a read of the wakeup pipe and a waitpid
        that fails with ECHILD once the last child is collected (~0.2 ms per exec under
        TCG). Without a pidfd (a kernel before 5.3, no descriptor left) the exit is
        polled instead.
        """
        try:
            ex.exit_fd = os.pidfd_open(ex.pid)
        except OSError:
            self.unwatched[ex.exec_id] = ex

    def on_exit(self, ex: Exec, events: int) -> None:
        """A command's pidfd is readable: it has exited."""
        self.collect(ex)

    def reap_unwatched(self) -> None:
        """Collect the exits of commands that have no pidfd."""
        for ex in list(self.unwatched.values()):
            self.collect(ex)

    def collect(self, ex: Exec) -> None:
        """Take the command's exit status if it has exited; answer at once if its output
        has ended and the host keeps up, else start the drain of its output."""
        try:
            pid, status = os.waitpid(ex.pid, os.WNOHANG)
        except ChildProcessError:  # collected by someone else: it exited, status unknown
            log(f"exec {ex.exec_id} (pid {ex.pid}) was reaped elsewhere")
            pid, status = ex.pid, 255 << 8
        if pid == 0:
            return
        ex.status = status
        ex.exited_at = time.monotonic()
        self.unwatched.pop(ex.exec_id, None)
        if ex.request_id is None:
            ex.close_exit_fd()
            self.evict_finished()
        elif ex.out_fd is None and ex.err_fd is None and self.link.queued < HIGH_WATER:
            self.finish(ex)
        else:
            ex.close_exit_fd()
            ex.drain_deadline = ex.exited_at + DRAIN_GRACE

    def tidy(self) -> None:
        """Work that can wait until the agent has nothing more urgent: close ended
        outputs, make the pipes of the next command."""
        while self.ended:
            os.close(self.ended.pop())
        OutputPipes.prepare()

    def run_timers(self, now: float) -> None:
        """Kill the process group of every exec past its deadline; send the ``started``
        events held for long enough."""
        for ex in self.execs.values():
            expired = ex.deadline is not None and now >= ex.deadline
            if expired and ex.status is None and not ex.timed_out:
                ex.timed_out = True
                ex.kill_group()
            if ex.started and now >= ex.started_until:
                self.link.send(ex.take_started())

    def timers(self, now: float) -> list[float]:
        """Seconds until each exec deadline, drain deadline and held started event the loop
        must wake for."""
        timers = [UNWATCHED_POLL] if self.unwatched else []
        draining = self.link.queued < HIGH_WATER  # else POLLOUT wakes the loop first
        for ex in self.execs.values():
            if ex.deadline is not None and ex.status is None and not ex.timed_out:
                timers.append(ex.deadline - now)
            if ex.started:
                timers.append(ex.started_until - now)
            if ex.drain_deadline is not None and draining:
                timers.append(ex.drain_deadline - now)
        return timers

    def finish_exited(self, now: float) -> None:
        """Send the exit status of attached execs that exited and are drained."""
        if self.link.queued >= HIGH_WATER:
            return  # output still to forward; the grace period waits for it
        for ex in list(self.execs.values()):
            if ex.request_id is None or ex.status is None:
                continue
            drained = ex.out_fd is None and ex.err_fd is None
            if not drained and ex.drain_deadline is not None and now >= ex.drain_deadline:
                self.final_drain(ex)
                drained = True
            if drained:
                self.finish(ex)

    def finish(self, ex: Exec) -> None:
        """Send an exited, drained exec's status to its request; then let it go (the
        reply first: the descriptors' closing need not delay it)."""
        rid = ex.request_id
        assert rid is not None
        # One write for both when the started event is still held.
        self.link.send(ex.take_started() + protocol.encode_json(FT.REPLY, rid, ex.result()))
        ex.close_exit_fd()
        if ex.request_id == rid:  # else the host vanished meanwhile: keep it
            self.forget(ex)

    def final_drain(self, ex: Exec) -> None:
        """Forward what the exited command left in its pipes, then stop reading.

        Background processes that still hold the pipes get EPIPE/SIGPIPE
        from here on: a command that started a daemon must not hang forever.
        """
        for ftype in (FT.STDOUT, FT.STDERR):
            budget = FINAL_DRAIN_LIMIT
            while budget > 0 and (ex.out_fd if ftype == FT.STDOUT else ex.err_fd) is not None:
                before = self.link.queued
                self.read_output(ex, ftype)
                if self.link.queued == before:
                    break  # EAGAIN or EOF
                budget -= self.link.queued - before
        ex.close_fds()

    @staticmethod
    def detach(ex: Exec) -> None:
        """The session of the exec's request ended: the exec runs on, unattached."""
        ex.request_id = None
        ex.drain_deadline = None
        ex.started = b""

    def evict_finished(self) -> None:
        """Forget the oldest finished detached execs beyond the keep limit."""
        done = [ex for ex in self.execs.values() if ex.status is not None and ex.request_id is None]
        done.sort(key=lambda ex: ex.exited_at)
        for ex in done[: max(0, len(done) - KEEP_FINISHED_DETACHED)]:
            self.forget(ex)

    def forget(self, ex: Exec) -> None:
        """Drop an exec's record and descriptors."""
        ex.close_fds()
        self.execs.pop(ex.exec_id, None)
        self.unwatched.pop(ex.exec_id, None)
        if ex.request_id is not None:
            self.requests.pop(ex.request_id, None)

    def kill_all(self) -> None:
        """Stop every command and release its descriptors (the agent is exiting)."""
        for ex in list(self.execs.values()):
            ex.kill_group()
            ex.close_fds()
