"""The agent: one thread, one poll loop over the host link, the commands and timers."""

from __future__ import annotations

import os
import select
import time

from ._common import HIGH_WATER, log
from ._execs import ExecManager
from ._files import FileService
from ._grow import op_grow_fs
from ._lean import partial, signal
from ._link import HostLink
from ._rootfs import RootFS
from ._session import Session
from ._sweep import op_sweep
from ._system import op_resync
from ._usage import op_processes, op_usage
from ._walk import op_walk

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, Final

    from ._channel import Channel
    from ._common import Watches, protocol
    from ._exec import Exec
    from ._files import Download, Upload

#: Stop reading the host channel while this much stdin waits for children.
STDIN_HIGH_WATER: Final = 1024 * 1024


class Agent:
    """Waits for the next event (host frames, child output, exits, timers) and hands
    it to the part that owns it: the host link, the session, the execs or the files.

    Nothing in the loop blocks on the host: output queues in the link, and while
    more than HIGH_WATER bytes wait, child pipes and downloads are not read, so a
    slow host slows the children down instead of growing the agent without bound.
    The agent outlives host connections; its execs keep running between them.
    """

    def __init__(self, channel: Channel, root: str = "/", in_guest: bool = False) -> None:
        # Only an agent in a guest powers it off and sets its clock (not one run on a host).
        self.rootfs = RootFS(root)
        self.power_off_allowed = in_guest
        self.link = HostLink(channel, on_frame=self.on_frame, on_lost=self.on_host_lost)
        requests: dict[int, Exec | Upload | Download] = {}
        self.execs = ExecManager(self.rootfs, self.link, requests)
        self.files = FileService(self.rootfs, self.link, requests)
        handlers: dict[str, Callable[[int, dict[str, Any]], dict[str, Any] | None]] = {
            **self.execs.handlers(),
            **self.files.handlers(),
            "resync": partial(op_resync, set_clock=in_guest),
            "usage": partial(op_usage, self.rootfs.root),
            "processes": op_processes,
            "grow_fs": partial(op_grow_fs, self.rootfs.root),
            "walk": partial(op_walk, self.rootfs, self.link),
            "sweep": partial(op_sweep, allowed=in_guest),
            "shutdown": self.op_shutdown,
        }
        self.session = Session(
            self.link, requests, self.execs, self.files, self.rootfs.root, handlers
        )
        self.stopping = False
        self.power_off_requested = False
        self.wakeup_r, self.wakeup_w = os.pipe()

    # -- lifecycle ----------------------------------------------------------

    def install_signals(self) -> None:
        """Wake the poll loop on SIGTERM; ignore hang-ups of the console. Exits are
        watched through pidfds: SIGCHLD keeps its default (not ignored, whatever the
        agent inherited: an ignored SIGCHLD would have the kernel discard exit statuses)."""
        for fd in (self.wakeup_r, self.wakeup_w):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self.wakeup_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, self.on_sigterm)

    def on_sigterm(self, signum: int, frame: object) -> None:
        """Stop like a shutdown request without power-off: execs are killed."""
        self.stopping = True

    def op_shutdown(self, rid: int, f: dict[str, Any]) -> dict[str, Any]:
        """Stop serving; power the VM off if asked and allowed."""
        self.stopping = True
        self.power_off_requested = bool(f["poweroff"]) and self.power_off_allowed
        return {"poweroff": self.power_off_requested}

    def run(self) -> None:
        """Serve until a shutdown request."""
        self.install_signals()
        while not self.stopping:
            try:
                self.turn()
            except Exception as exc:  # keep serving: the guest has no other way in
                log(f"internal error: {exc!r}")
                time.sleep(0.01)
        self.finish()

    def finish(self) -> None:
        """After shutdown: deliver the last replies, stop every command."""
        self.link.deliver_queued(2.0)
        self.execs.kill_all()
        self.link.close()

    # -- the loop ------------------------------------------------------------

    def turn(self) -> None:
        """One loop iteration: timers, pumps, then poll and dispatch."""
        now = time.monotonic()
        self.link.check(now)
        if self.execs.unwatched:
            self.execs.reap_unwatched()
        self.execs.run_timers(now)
        self.execs.finish_exited(now)
        downloading = self.files.pump_downloads()
        if self.link.out:
            self.link.flush()
        self.execs.tidy()
        watches: Watches = {self.wakeup_r: (select.POLLIN, self.drain_wakeup)}
        self.link.register(watches, accept_input=self.execs.stdin_backlog() < STDIN_HIGH_WATER)
        self.execs.register(watches)
        poller = select.poll()
        for fd, (events, _) in watches.items():
            poller.register(fd, events)
        timeout = self.poll_timeout(time.monotonic(), downloading)
        for fd, events in poller.poll(None if timeout is None else int(timeout * 1000) + 1):
            watch = watches.get(fd)
            if watch is not None:
                watch[1](events)

    def poll_timeout(self, now: float, downloading: bool) -> float | None:
        """Seconds until the next timer, 0 if work is pending, None for none."""
        if self.stopping or (downloading and self.link.queued < HIGH_WATER):
            return 0.0
        timers = self.execs.timers(now)
        link_timer = self.link.timeout(now)
        if link_timer is not None:
            timers.append(link_timer)
        return max(0.0, min(timers)) if timers else None

    def drain_wakeup(self, events: int = 0) -> None:
        """Empty the signal wakeup pipe (a signal's handler runs in the loop's next turn)."""
        try:
            while len(os.read(self.wakeup_r, 512)) == 512:  # a short read emptied the pipe
                pass
        except BlockingIOError:
            pass

    # -- the host ------------------------------------------------------------

    def on_frame(self, frame: protocol.Frame) -> None:
        """A frame from the host: the session routes it."""
        self.session.on_frame(frame)

    def on_host_lost(self) -> None:
        """The host went away: its session ends, the execs run on."""
        self.session.end()
