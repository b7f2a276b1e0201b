"""Where host connections come from: a virtio-serial port, or a unix or vsock listener."""

from __future__ import annotations

import os
import select
import stat
import time

from ._common import log

TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket
    from typing import Final

#: While no host is connected to the virtio-serial port, check this often.
RECHECK_INTERVAL: Final = 0.1


class Channel:
    """Where host connections come from. Subclasses: device and listener."""

    #: The fd of the current connection, or None while no host is connected.
    conn_fd: int | None = None

    def poll_fds(self) -> list[int]:
        """Fds (besides the connection) the loop should poll for POLLIN."""
        return []

    def on_ready(self, fd: int) -> bool:
        """An fd from poll_fds() is readable; return True if a new host connected."""
        return False

    def check(self, now: float) -> bool:
        """Called every loop turn; return True if a new host connected."""
        return False

    def timeout(self, now: float) -> float | None:
        """Seconds until check() wants to run again, or None."""
        return None

    def disconnect(self) -> None:
        """The current host went away (EOF, error or hang-up)."""
        self.conn_fd = None

    def close(self) -> None:
        """Release everything."""


class DeviceChannel(Channel):
    """A virtio-serial port: the fd stays open, the host comes and goes.

    The port reports POLLHUP while no host is connected (and read() returns
    0); it is then left out of the poll set and re-checked periodically.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = self._open(path)
        self.next_check = 0.0

    @staticmethod
    def _open(path: str) -> int:
        logged = 0.0
        while True:
            try:
                return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
            except FileNotFoundError:
                now = time.monotonic()
                if now - logged > 10:
                    log(f"waiting for {path} to appear")
                    logged = now
                time.sleep(0.05)

    def _host_connected(self) -> bool:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        return not any(ev & select.POLLHUP for _, ev in poller.poll(0))

    def check(self, now: float) -> bool:
        if self.conn_fd is not None or now < self.next_check:
            return False
        self.next_check = now + RECHECK_INTERVAL
        if self._host_connected():
            self.conn_fd = self.fd
            return True
        return False

    def timeout(self, now: float) -> float | None:
        if self.conn_fd is not None:
            return None
        return max(0.0, self.next_check - now)

    def disconnect(self) -> None:
        self.conn_fd = None
        self.next_check = time.monotonic() + RECHECK_INTERVAL

    def close(self) -> None:
        os.close(self.fd)


class ListenChannel(Channel):
    """A listening socket (unix or vsock); one host at a time, newest wins."""

    def __init__(self, sock: socket.socket) -> None:
        self.listener = sock
        self.listener.setblocking(False)
        self.conn: socket.socket | None = None

    @classmethod
    def unix(cls, path: str) -> ListenChannel:
        """Listen on a unix socket path (replacing a stale socket file)."""
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
        except FileNotFoundError:
            pass
        import socket  # here: its import is ~40 ms of a guest agent's start under TCG

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(4)
        return cls(sock)

    @classmethod
    def vsock(cls, port: int) -> ListenChannel:
        """Listen on a vsock port for connections from the host."""
        import socket

        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        sock.bind((socket.VMADDR_CID_ANY, port))
        sock.listen(4)
        return cls(sock)

    def poll_fds(self) -> list[int]:
        return [self.listener.fileno()]

    def on_ready(self, fd: int) -> bool:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return False
        self.disconnect()
        conn.setblocking(False)
        self.conn = conn
        self.conn_fd = conn.fileno()
        return True

    def disconnect(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.conn = None
        self.conn_fd = None

    def close(self) -> None:
        self.disconnect()
        self.listener.close()
