"""Running the daemon: listeners, the runtime, readiness, shutdown.

The unix socket is created by us, not by uvicorn, so that it never exists with a wider
mode than 0600 (it is bound under umask 0177, inside a 0700 directory). A TCP listener is
opened only with a token; every TCP request must then carry it (:class:`TokenAuth`).

The runtime (and with it the data directory's lock) is opened before the listeners, so a
second daemon on the same data directory fails at once with the first one's pid. VMs run
detached: shutting down (SIGTERM, SIGINT, ``POST /v1/shutdown``) closes the runtime and
leaves every sandbox running, unless asked to stop them; a later daemon re-attaches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import uvicorn

from kelpie._paths import SOCKET_NAME, runtime_dir
from kelpie.daemon._app import TokenAuth, create_app
from kelpie.daemon._dashboard import DashboardSessions
from kelpie.runtime import Runtime
from kelpie.teleport import TeleportHost
from kelpie.vm import ConfigError, KelpieError

log = logging.getLogger("kelpie.daemon")

PID_FILE = "daemon.pid"
LOG_FILE = "daemon.log"
MAX_UNIX_PATH = 107  # sun_path is 108 bytes with its terminating NUL
READY = b"ready\n"


class DaemonError(KelpieError):
    """The daemon could not start, or cannot be reached."""


@dataclass(frozen=True)
class E2bOptions:
    """E2B's API on its own listener (see :mod:`kelpie.e2b`): ``template`` is what E2B's
    default template ``base`` starts, ``domain`` the one sandboxes are addressed under
    (``PORT-ID.DOMAIN``), ``tls`` a certificate and key to speak HTTPS with."""

    listener: tuple[str, int]
    template: str | None = None
    domain: str | None = None
    tls: tuple[Path, Path] | None = None


@dataclass(frozen=True)
class DaemonOptions:
    """Where the daemon listens and keeps its state.

    ``tcp`` is ``(host, port)`` for an additional TCP listener; it needs ``token``.
    ``ready_fd`` is a pipe the daemon writes ``ready`` to once it accepts connections.
    """

    run_dir: Path
    data_dir: Path | None = None
    tcp: tuple[str, int] | None = None
    token: str | None = None
    ready_fd: int | None = None
    e2b: E2bOptions | None = None

    @property
    def socket_path(self) -> Path:
        return self.run_dir / SOCKET_NAME


def default_options() -> DaemonOptions:
    """The daemon's default places (``KELPIE_RUNTIME_DIR``/``KELPIE_STATE_DIR`` apply)."""
    return DaemonOptions(run_dir=runtime_dir())


def unix_listener(path: Path) -> socket.socket:
    """A listening unix socket at ``path``, mode 0600, in a 0700 directory.

    A socket left behind by a dead daemon is replaced; a live one is an error.
    """
    if len(os.fsencode(path)) > MAX_UNIX_PATH:
        raise ConfigError([f"socket path {path} is over {MAX_UNIX_PATH} bytes; set "
                           "KELPIE_RUNTIME_DIR to a shorter directory"], what="daemon socket")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise DaemonError(f"{path} exists and is not a socket; remove it")
        if _answers(path):
            raise DaemonError(f"a daemon is already listening on {path}")
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(128)
    return sock


def tcp_listener(host: str, port: int) -> socket.socket:
    """A listening TCP socket (IPv4 or IPv6 host)."""
    try:
        return socket.create_server((host, port), family=_family(host), backlog=128)
    except OSError as exc:
        raise DaemonError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


KEEP_ALIVE_S = 65


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _answers(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


async def serve(options: DaemonOptions, runtime: Runtime | None = None) -> None:
    """Serve until shut down; the runtime is opened first and closed last."""
    if options.tcp is not None and not options.token:
        raise ConfigError(["a TCP listener needs a token (--token-file); without one the "
                           "daemon listens on its unix socket only"], what="daemon listener")
    if options.e2b is not None and not options.token:
        raise ConfigError(["the E2B listener needs a token (--token-file): E2B's SDK sends "
                           "it as its API key"], what="daemon listener")
    runtime = runtime or Runtime(data_dir=options.data_dir)
    await runtime.open()
    teleports = TeleportHost(runtime)
    sockets: list[socket.socket] = []
    pid_file = options.run_dir / PID_FILE
    try:
        await teleports.open()  # finish or roll back teleports a crash interrupted
        sockets.append(unix_listener(options.socket_path))
        if options.tcp is not None:
            sockets.append(tcp_listener(*options.tcp))
        dashboard = _DashboardListener(sockets[1] if options.tcp is not None else None)
        server = _server(options, runtime, teleports, dashboard)
        e2b = None if options.e2b is None else _E2bListener(options.e2b, runtime,
                                                             options.token or "")
        pid_file.write_text(f"{os.getpid()}\n")
        _signal_ready(options.ready_fd)
        log.info("listening on %s%s", options.socket_path,
                 f" and tcp {options.tcp[0]}:{options.tcp[1]}" if options.tcp else "")
        try:
            if e2b is not None:
                await e2b.open()
            await server.serve(sockets=sockets)
        finally:
            await dashboard.close()
            if e2b is not None:
                await e2b.close()
    finally:
        for sock in sockets:
            sock.close()
        with contextlib.suppress(FileNotFoundError):
            if pid_file.read_text().strip() == str(os.getpid()):
                pid_file.unlink()
        with contextlib.suppress(FileNotFoundError):
            if sockets:
                options.socket_path.unlink()
        await teleports.close()
        await runtime.close()


class _Server(uvicorn.Server):
    """uvicorn's server, minus re-raising SIGTERM/SIGINT once it has shut down.

    uvicorn re-raises a captured signal when its ``serve`` returns, with the default
    handler back in place: that kills the process before :func:`serve` removes the socket
    and pid file and closes the runtime. A signal here means a graceful shutdown, done
    when :func:`serve` returns.
    """

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: stop waiting for open connections
        else:
            self.should_exit = True


class _SecondServer(uvicorn.Server):
    """A server beside the main one: signals are the main server's to handle (a second
    ``capture_signals`` would take them over)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class _DashboardListener:
    """Where browsers reach the dashboard: the daemon's TCP listener if it has one, else a
    loopback listener opened on first use (a second server over the same app, where only a
    dashboard session gets in)."""

    def __init__(self, tcp: socket.socket | None) -> None:
        self._socket = tcp
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._opening = asyncio.Lock()
        self.config: uvicorn.Config | None = None

    async def address(self) -> str:
        async with self._opening:  # two first callers open one listener
            if self._socket is None:
                assert self.config is not None
                self._socket = tcp_listener("127.0.0.1", 0)
                self._server = _SecondServer(self.config)
                self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]))
                log.info("dashboard listening on 127.0.0.1:%d",
                         self._socket.getsockname()[1])
        host, port = self._socket.getsockname()[:2]
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    async def close(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            with contextlib.suppress(Exception):
                await self._task
            assert self._socket is not None
            self._socket.close()


class _E2bListener:
    """E2B's API (:mod:`kelpie.e2b`) served on a listener of its own beside the daemon's."""

    def __init__(self, options: E2bOptions, runtime: Runtime, token: str) -> None:
        from kelpie.e2b import E2bApi  # only daemons that serve it need its libraries

        self._options = options
        app = E2bApi(runtime, api_key=token, base=options.template, domain=options.domain)
        cert, key = options.tls if options.tls is not None else (None, None)
        self._server = _SecondServer(uvicorn.Config(
            app, log_level="warning", access_log=False, lifespan="off",
            timeout_graceful_shutdown=5, timeout_keep_alive=KEEP_ALIVE_S,
            ssl_certfile=cert, ssl_keyfile=key))
        self._socket: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None

    async def open(self) -> None:
        self._socket = tcp_listener(*self._options.listener)
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]),
                                         name="kelpie-e2b-listener")
        host, port = self._socket.getsockname()[:2]
        log.info("E2B API listening on %s:%d%s", host, port,
                 " (TLS)" if self._options.tls else "")

    async def close(self) -> None:
        if self._task is not None:
            self._server.should_exit = True
            with contextlib.suppress(Exception):
                await self._task
        if self._socket is not None:
            self._socket.close()


def _server(options: DaemonOptions, runtime: Runtime, teleports: TeleportHost,
            dashboard: _DashboardListener) -> uvicorn.Server:
    holder: list[uvicorn.Server] = []

    def shutdown(stop_sandboxes: bool) -> None:
        holder[0].should_exit = True

    sessions = DashboardSessions(time.time, token=options.token)
    app = TokenAuth(create_app(runtime, on_shutdown=shutdown, teleports=teleports,
                               dashboard=sessions, dashboard_address=dashboard.address),
                    token=options.token, unix_path=str(options.socket_path),
                    sessions=sessions)
    # Idle keep-alive connections outlive the client's (httpx drops its own after 5 s): a
    # server that closed first races a client reusing the connection, which then sees a
    # reset (httpx.ReadError) on a request the daemon never read.
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            ws="websockets-sansio", timeout_graceful_shutdown=5,
                            timeout_keep_alive=KEEP_ALIVE_S)
    dashboard.config = config
    server = _Server(config)
    holder.append(server)
    return server


def _signal_ready(fd: int | None) -> None:
    if fd is None:
        return
    try:
        os.write(fd, READY)
    finally:
        os.close(fd)
