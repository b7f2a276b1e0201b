"""``kelpie exec`` without ``-i``/``-t``: one streamed request and few imports.

Agents shell out ``kelpie exec BOX -- CMD`` once per command, so what this path costs is
mostly start-up. It speaks the daemon's streamed exec (``POST .../exec`` answered as JSON
lines, see :mod:`kelpie.api`) with h11, the HTTP/1.1 state machine under httpx and uvicorn,
on a plain socket: the async client (httpx, the pydantic models, websockets) costs ~0.25 s
of imports, more than the exec itself (``python benchmarks/cli.py``). Errors are turned
into the same exceptions as the client's, importing it only then. Output is written as
it comes; SIGINT and SIGTERM are forwarded to the command, as on the WebSocket path.
"""

from __future__ import annotations

import atexit
import binascii  # base64's own import is 2 ms more here, for nothing this path uses
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import FrameType
from typing import Any, NoReturn
from urllib.parse import quote, urlsplit

import h11

from kelpie._address import DaemonAddress, token_from_env
from kelpie._exceptions import ExecTimeout, KelpieError
from kelpie.cli._target import Target

CONNECT_TIMEOUT = 10.0
READ_SIZE = 64 * 1024


class _Connection:
    """One HTTP/1.1 exchange with the daemon over a unix or TCP (TLS) socket."""

    def __init__(self, address: DaemonAddress) -> None:
        if address.socket_path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(address.socket_path))
            except OSError:
                sock.close()
                raise
            self.host = "kelpie"
        else:
            assert address.base is not None
            parts = urlsplit(address.base)
            host = parts.hostname or "localhost"
            port = parts.port or (443 if parts.scheme == "https" else 80)
            sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
            sock.settimeout(None)
            if parts.scheme == "https":
                import ssl

                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
            self.host = parts.netloc
        self._sock = sock
        self._http = h11.Connection(h11.CLIENT)

    def close(self) -> None:
        self._sock.close()

    def request(self, method: str, path: str, body: bytes,
                headers: Mapping[str, str]) -> int:
        """Send a request with a JSON body; the response's status."""
        fields = [("Host", self.host), ("Content-Type", "application/json"),
                  ("Content-Length", str(len(body))), *headers.items()]
        events = (h11.Request(method=method, target=path, headers=fields),
                  h11.Data(data=body), h11.EndOfMessage())
        self._sock.sendall(b"".join(self._http.send(event) or b"" for event in events))
        while True:
            event = self._next()
            if isinstance(event, h11.Response):
                return int(event.status_code)

    def body(self) -> Iterator[bytes]:
        """The response body, in the pieces it arrives in."""
        while not isinstance(event := self._next(), h11.EndOfMessage):
            if isinstance(event, h11.Data):
                yield bytes(event.data)

    def lines(self) -> Iterator[bytes]:
        """The response body, one line at a time."""
        pending = b""
        for piece in self.body():
            pending += piece
            *complete, pending = pending.split(b"\n")
            yield from complete
        if pending:
            yield pending

    def _next(self) -> Any:
        while (event := self._http.next_event()) is h11.NEED_DATA:
            data = self._sock.recv(READ_SIZE)
            self._http.receive_data(data)
            if not data and self._http.their_state is not h11.DONE:
                raise KelpieError("the daemon closed the connection in the middle of the "
                                  "exec stream (did it stop or restart?)")
        if isinstance(event, h11.ConnectionClosed):
            raise KelpieError("the daemon closed the connection before answering")
        return event


def exec_lines(target: Target, ref: str, argv: Sequence[str], *, env: Mapping[str, str],
               cwd: str | None, user: str | None, timeout: float | None) -> int | None:
    """Run ``argv`` in sandbox ``ref`` with its output on ours; its exit code. None when no
    daemon listens on the local socket (the caller's client then starts one)."""
    address = DaemonAddress.parse(target.host)
    token = token_from_env(target.token)
    headers = {"Accept": "application/x-ndjson"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    fields = {"argv": list(argv), "env": dict(env), "cwd": cwd, "user": user,
              "timeout": timeout}
    body = json.dumps({k: v for k, v in fields.items() if v not in (None, {})}).encode()
    path = f"/v1/sandboxes/{quote(ref, safe='')}/exec"
    try:
        connection = _Connection(address)
    except (FileNotFoundError, ConnectionRefusedError):
        if target.local:
            return None
        raise
    try:
        status = connection.request("POST", path, body, headers)
        if status >= 400:
            raise _error(status, b"".join(connection.body()))
        lines = connection.lines()
        started = json.loads(next(lines))
        if started.get("type") != "started":
            raise _error(None, json.dumps(started).encode())
        forward = _signal_sender(address, headers, f"{path}/{started['exec_id']}/signal")
        with _forwarding(forward):
            for line in lines:
                message = json.loads(line)
                kind = message.get("type")
                if kind == "output":
                    out = sys.stdout if message["stream"] == "stdout" else sys.stderr
                    out.buffer.write(binascii.a2b_base64(message["data"]))
                    out.flush()
                elif kind == "exit":
                    if message.get("warning"):
                        sys.stderr.write(f"kelpie: warning: {message['warning']}\n")
                    if message.get("timed_out"):
                        raise ExecTimeout(tuple(argv), timeout or 0.0, b"", b"")
                    return int(message["exit_code"])
                elif kind == "error":
                    raise _error(None, line)
        raise KelpieError("the daemon ended the exec stream before the command ended")
    finally:
        connection.close()


def end_process(code: int) -> NoReturn:
    """Exit with ``code`` now, our output flushed, without the interpreter's teardown.

    The teardown frees every module and object one by one, ~15 ms of a ``kelpie exec``
    here (``python benchmarks/cli.py``) for memory the OS takes back at once, and this
    path leaves it nothing else to do: its socket is closed and it started no thread.
    What was registered to run at exit (by a ``sitecustomize``, coverage...) still runs.
    """
    atexit._run_exitfuncs()  # what exit would run first; nothing of ours (no logging here)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a reader gone: nothing to tell it
            stream.flush()
    os._exit(code)


def _signal_sender(address: DaemonAddress, headers: Mapping[str, str],
                   path: str) -> Callable[[int], None]:
    def send(signum: int) -> None:
        connection = _Connection(address)
        try:
            connection.request("POST", path, json.dumps({"signal": signum}).encode(),
                               {k: v for k, v in headers.items() if k != "Accept"})
        finally:
            connection.close()
    return send


@contextlib.contextmanager
def _forwarding(send: Callable[[int], None]) -> Iterator[None]:
    """SIGINT and SIGTERM go to the command (which decides whether to end) meanwhile."""
    def handler(signum: int, frame: FrameType | None) -> None:
        with contextlib.suppress(OSError, KelpieError, h11.ProtocolError):
            send(signum)  # the command may have ended meanwhile: nothing to forward to

    saved: dict[signal.Signals, Any] = {}
    with contextlib.suppress(ValueError):  # only the main thread may set handlers (the CLI
        for signum in (signal.SIGINT, signal.SIGTERM):  # called from a library's thread)
            saved[signum] = signal.signal(signum, handler)
    try:
        yield
    finally:
        for forwarded, previous in saved.items():
            signal.signal(forwarded, previous)


def _error(status: int | None, raw: bytes) -> Exception:
    from kelpie.client import error_from_payload

    try:
        payload: Any = json.loads(raw)
    except ValueError:
        payload = raw.decode(errors="replace")
    return error_from_payload(status, payload)
