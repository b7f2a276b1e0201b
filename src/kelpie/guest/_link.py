"""The connection to the current host: frames in, frames out, never blocking the loop."""

from __future__ import annotations

import os
import select
import time

from ._common import FT, HIGH_WATER, log, protocol
from ._lean import deque, partial

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, Final

    from ._channel import Channel
    from ._common import Watches

#: Stop reading the host channel while this many bytes wait to go out.
OUT_HARD_LIMIT: Final = 8 * HIGH_WATER
#: Bytes read from the host channel per loop turn at most (one largest frame).
READ_BUDGET: Final = protocol.MAX_FRAME_PAYLOAD + protocol.HEADER_SIZE


class HostLink:
    """Decodes the frames the current host sends and writes queued frames to it.

    Outgoing frames queue in memory and are written with O_NONBLOCK; ``queued``
    (bytes not yet written) is what the rest of the agent throttles on. Frames
    for a host that is not connected are dropped. ``on_frame`` receives every
    decoded frame; ``on_lost`` is told when a host goes away (after the reason is logged).
    """

    def __init__(
        self,
        channel: Channel,
        on_frame: Callable[[protocol.Frame], None],
        on_lost: Callable[[], None],
    ) -> None:
        self.channel = channel
        self.on_frame = on_frame
        self.on_lost = on_lost
        self.decoder = protocol.FrameDecoder()
        # Reused for every read of the host channel (see read).
        self.read_buf = memoryview(bytearray(READ_BUDGET))
        self.out: deque[bytes] = deque()
        self.out_sent = 0  # bytes of out[0] already written
        self.queued = 0  # bytes queued and not yet written
        self.garbage_reason: str | None = None

    @property
    def connected(self) -> bool:
        """True while a host is connected."""
        return self.channel.conn_fd is not None

    # -- connections ---------------------------------------------------------

    def check(self, now: float) -> None:
        """Let the channel notice a host that connected (the virtio-serial port)."""
        if self.channel.check(now):
            self.on_connect()

    def timeout(self, now: float) -> float | None:
        """Seconds until the channel wants to be checked again, or None."""
        return self.channel.timeout(now)

    def on_channel_ready(self, fd: int, events: int) -> None:
        """The listener has a connection waiting."""
        old = self.channel.conn_fd
        if self.channel.on_ready(fd):
            if old is not None:
                self.on_disconnect("replaced by a new connection")
            self.on_connect()

    def on_connect(self) -> None:
        """A host connected: start from a clean stream."""
        log("host connected")
        self.reset_stream()

    def on_disconnect(self, reason: str) -> None:
        """The host went away: forget its stream and tell the session."""
        log(f"host disconnected ({reason})")
        self.reset_stream()
        self.on_lost()

    def drop(self, reason: str) -> None:
        """Close the current connection (the device stays open)."""
        self.channel.disconnect()
        self.on_disconnect(reason)

    def reset_stream(self) -> None:
        """Forget partial input and undelivered output of a previous connection."""
        self.decoder.reset()
        self.out.clear()
        self.out_sent = 0
        self.queued = 0
        self.garbage_reason = None

    def close(self) -> None:
        """Release the channel."""
        self.channel.close()

    # -- polling -------------------------------------------------------------

    def register(self, watches: Watches, accept_input: bool) -> None:
        """Put the connection (readable unless throttled, writable while frames wait)
        and the channel's listener into the poll set."""
        conn = self.channel.conn_fd
        if conn is not None:  # before the listener: an accept may replace it
            events = 0
            if accept_input and self.queued < OUT_HARD_LIMIT:
                events |= select.POLLIN
            if self.out:
                events |= select.POLLOUT
            watches[conn] = (events, partial(self.on_conn_event, conn))
        for fd in self.channel.poll_fds():
            watches[fd] = (select.POLLIN, partial(self.on_channel_ready, fd))

    def on_conn_event(self, fd: int, events: int) -> None:
        """Readable, writable or hung-up host connection."""
        if fd != self.channel.conn_fd:
            return
        if events & select.POLLOUT:
            self.flush()
            if self.channel.conn_fd != fd:
                return  # the write failed and dropped the connection
        if events & (select.POLLIN | select.POLLHUP):
            self.read(events)
        elif events & (select.POLLERR | select.POLLNVAL):
            self.drop("connection error")

    # -- input ---------------------------------------------------------------

    def read(self, events: int) -> None:
        """Read and dispatch what the host sent.

        A virtio-serial port returns at most one 4 KiB guest buffer per
        read(): read until the channel is empty or READ_BUDGET bytes arrived,
        so one loop turn handles a whole upload frame, not one page of it.
        The buffer is preallocated (os.read would allocate READ_BUDGET bytes
        per call to return a few).
        """
        fd = self.channel.conn_fd
        assert fd is not None
        buf = self.read_buf
        filled = 0
        ended: str | None = None
        while filled < READ_BUDGET:
            try:
                count = os.readv(fd, [buf[filled:]])
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                ended = f"read failed: {exc.strerror}"
                break
            if count == 0:
                ended = "end of stream"
                break
            filled += count
        if filled:
            self.decoder.feed(buf[:filled])
            for item in self.decoder.frames():
                self.on_item(item)
                if self.channel.conn_fd != fd:  # a frame made us drop the connection
                    return
        elif ended is None and events & select.POLLHUP:
            ended = "hang-up"
        if ended is not None:
            self.drop(ended)

    def on_item(self, item: protocol.Frame | protocol.Garbage) -> None:
        """Hand a decoded frame on, or report skipped garbage."""
        if isinstance(item, protocol.Garbage):
            # Report each run of corrupt input once, not every read of it.
            if item.reason != self.garbage_reason:
                self.garbage_reason = item.reason
                self.send_error(
                    0, "EPROTO", f"corrupt input ({item.reason}); skipping to the next frame marker"
                )
            return
        self.garbage_reason = None
        self.on_frame(item)

    # -- output --------------------------------------------------------------

    def send(self, frame: bytes) -> None:
        """Queue a frame for the host (dropped when no host is connected)."""
        if self.channel.conn_fd is None:
            return
        self.out.append(frame)
        self.queued += len(frame)
        if len(self.out) == 1:
            self.flush()

    def send_json(self, ftype: int, request_id: int, message: dict[str, Any]) -> None:
        """Queue a JSON frame."""
        try:
            frame = protocol.encode_json(ftype, request_id, message)
        except ValueError as exc:  # an oversized reply: report instead of dying
            frame = protocol.encode_json(
                FT.ERROR, request_id, {"code": "E2BIG", "message": str(exc)}
            )
        self.send(frame)

    def send_error(self, request_id: int, code: str, message: str) -> None:
        """Queue an ERROR frame."""
        self.send_json(FT.ERROR, request_id, {"code": code, "message": message})

    def flush(self) -> None:
        """Write queued frames until the channel would block."""
        fd = self.channel.conn_fd
        while self.out and fd is not None:
            head = self.out[0]
            try:
                written = os.write(fd, memoryview(head)[self.out_sent :])
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.drop(f"write failed: {exc.strerror}")
                return
            self.out_sent += written
            self.queued -= written
            if self.out_sent == len(head):
                self.out.popleft()
                self.out_sent = 0

    def discard_queued(self) -> None:
        """Drop the frames queued for an earlier session; a frame already partly
        written must still be completed to keep the framing."""
        while len(self.out) > 1:
            self.queued -= len(self.out.pop())
        if self.out and self.out_sent == 0:
            self.queued -= len(self.out.pop())

    def deliver_queued(self, seconds: float) -> None:
        """Wait up to ``seconds`` for the queued frames to reach the host."""
        deadline = time.monotonic() + seconds
        while self.out and self.channel.conn_fd is not None and time.monotonic() < deadline:
            self.flush()
            if self.out and self.channel.conn_fd is not None:
                poller = select.poll()
                poller.register(self.channel.conn_fd, select.POLLOUT)
                poller.poll(50)
