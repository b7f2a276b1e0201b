"""A client for the Kelpie daemon's REST API (httpx; the exec stream over a WebSocket).

:class:`DaemonClient` talks to a local daemon over its unix socket (the default) or to a
remote one over HTTP(S) with a bearer token. It implements the sandbox service
(:class:`kelpie.service.SandboxService`), as the in-process runtime does.

An error the daemon reports is raised as the class it was raised as in the daemon: the
error body names the class and its ancestors (``types``), and the client raises a
subclass of both :class:`RemoteError` and the most specific Kelpie class it knows from that
list, so ``except SandboxNotFound`` works against a daemon as in-process, and
``RemoteError.is_a(name)`` keeps working for names this client does not know.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import functools
import hashlib
import json
import tempfile
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import quote

import httpx
from pydantic import BaseModel
from websockets.asyncio.client import ClientConnection, connect, unix_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from kelpie._address import DaemonAddress, token_from_env
from kelpie._exceptions import PeerUnreachable
from kelpie.api import (
    CHANNEL_STDOUT,
    CHUNK_SHA256_HEADER,
    NDJSON,
    BuildEvent,
    BuildOptions,
    CommitBody,
    DashboardLogin,
    ErrorBody,
    Event,
    ExecBody,
    ExecDetached,
    ExecExitMessage,
    ExecStart,
    FileEntry,
    FleetView,
    ForkBody,
    HostFacts,
    Image,
    ImageDetails,
    MainExit,
    NetworkChange,
    ProcessList,
    PullBody,
    PushBody,
    PushOutcome,
    RenameBody,
    RestoreBody,
    Sandbox,
    SandboxCreate,
    SandboxStats,
    Snapshot,
    SnapshotCreate,
    TeleportAccepted,
    TeleportBody,
    TeleportLive,
    TeleportMode,
    TeleportOffer,
    TeleportProgress,
    TeleportReport,
    TeleportState,
    TeleportSwitch,
    TemplateCreate,
    TimeoutChange,
    VersionInfo,
    b64,
    error_attributes,
    error_status,
    unb64,
)
from kelpie.vm import (
    ExecEvent,
    ExecExit,
    ExecOutput,
    ExecProcess,
    ExecRequest,
    ExecResult,
    FileInfo,
    KelpieError,
    StreamName,
)

if TYPE_CHECKING:
    from kelpie.images import BlobProgress

REQUEST_TIMEOUT = httpx.Timeout(30.0, read=None)
CONNECT_TIMEOUT = 10.0
WS_MAX_MESSAGE = 4 << 20


class RemoteError(KelpieError):
    """An error the daemon reported: ``type`` and ``types`` name the daemon-side class.

    What the client raises is a subclass of this and of that class (see
    :func:`remote_error`), with that class's public attributes (``code``, ``ref``,
    ``stdout``...) as the daemon-side error had them; ``status`` is the HTTP status.
    It pickles (to its body), so it can cross a process boundary again.
    """

    def __init__(self, status: int, body: ErrorBody) -> None:
        # Not super().__init__: the daemon-side class's own constructor takes other
        # arguments (a sandbox ref, a problem list...); the message is already made, and
        # the attributes that constructor would set come in the body's details.
        Exception.__init__(self, body.message)
        for name, value in error_attributes(body.details).items():
            with contextlib.suppress(AttributeError):  # a read-only property of the class
                setattr(self, name, value)
        self.body = body
        self.message = body.message
        self.status = status
        self.type = body.type
        self.types = tuple(body.types)
        self.problems = tuple(body.problems)
        self.retriable = body.retriable
        self.requires_recreate = body.requires_recreate

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Callable[[int, dict[str, Any]], RemoteError],
                                  tuple[int, dict[str, Any]]]:
        # the class is made at run time (see remote_error) and cannot be found by name
        return _unpickle_remote_error, (self.status, self.body.model_dump(mode="json"))

    def is_a(self, name: str) -> bool:
        """Whether the daemon-side error was a ``name`` (the class or an ancestor)."""
        return name in self.types


_ERROR_MODULES = ("kelpie.vm", "kelpie.runtime", "kelpie.images", "kelpie._exceptions")
"""The packages whose public error classes a daemon's error can be rebuilt as."""
_typed_errors: dict[type[KelpieError], type[RemoteError]] = {}


@functools.cache
def _known_errors() -> dict[str, type[KelpieError]]:
    import importlib

    known: dict[str, type[KelpieError]] = {}
    for module_name in _ERROR_MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            value = getattr(module, name)
            if isinstance(value, type) and issubclass(value, KelpieError):
                known.setdefault(name, value)
    return known


def remote_error(status: int, body: ErrorBody) -> RemoteError:
    """The exception for an error the daemon reported: a :class:`RemoteError` that is also
    the first class in ``body.types`` (most specific first) this client knows, so an
    unknown newer class falls back to its nearest known ancestor."""
    known = _known_errors()
    for name in body.types:
        base = known.get(name)
        if base is None or base is KelpieError:
            continue
        typed = _typed_errors.get(base)
        if typed is None:
            try:
                typed = type(base.__name__, (RemoteError, base),
                             {"__module__": __name__, "__qualname__": base.__qualname__})
            except TypeError:  # pragma: no cover - a base that cannot be mixed in
                continue
            _typed_errors[base] = typed
        return typed(status, body)
    return RemoteError(status, body)


def _unpickle_remote_error(status: int, body: dict[str, Any]) -> RemoteError:
    return remote_error(status, ErrorBody.model_validate(body))


class DaemonUnreachable(KelpieError):
    """No daemon answers at the address."""

    retriable = True


def error_from_payload(status: int | None, payload: Any) -> RemoteError:
    """The error in a response body (``status`` None: an error line inside a stream)."""
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        with contextlib.suppress(ValueError):
            body = ErrorBody.model_validate(payload["error"])
            return remote_error(status or error_status(body.types), body)
    status = status or 500
    if isinstance(payload, dict) and "detail" in payload:  # FastAPI's request validation
        detail = payload["detail"]
        problems = [f"{'.'.join(str(p) for p in d.get('loc', ()))}: {d.get('msg')}"
                    for d in detail] if isinstance(detail, list) else [str(detail)]
        return remote_error(status, ErrorBody(
            type="ConfigError", types=["ConfigError", "KelpieError"],
            message="invalid request:\n" + "\n".join(f"  - {p}" for p in problems),
            problems=problems))
    return RemoteError(status, ErrorBody(type="KelpieError", types=["KelpieError"],
                                         message=f"daemon answered HTTP {status}: {payload}"))


class DaemonClient:
    """Async client of one daemon.

    ``url``: ``unix:///path/to/kelpie.sock`` or ``http(s)://host:port``; default
    ``$KELPIE_HOST``, else the local daemon's socket. ``token``: the bearer token for a TCP
    daemon; default ``$KELPIE_TOKEN``.
    """

    def __init__(self, url: str | None = None, *, token: str | None = None) -> None:
        address = DaemonAddress.parse(url)
        self.url = address.url
        self.token = token_from_env(token)
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self.socket_path = address.socket_path
        if address.socket_path is not None:
            transport = httpx.AsyncHTTPTransport(uds=str(address.socket_path))
            base = "http://kelpie"
        else:
            assert address.base is not None
            transport = httpx.AsyncHTTPTransport()
            base = address.base
        self._base = base
        self._headers = headers
        self._http = httpx.AsyncClient(transport=transport, base_url=f"{base}/v1",
                                       headers=headers, timeout=REQUEST_TIMEOUT)

    async def close(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    # ---- plumbing -----------------------------------------------------------------------
    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._http.request(method, path, **kwargs)
        except (httpx.ConnectError, FileNotFoundError, ConnectionRefusedError) as exc:
            raise DaemonUnreachable(f"no Kelpie daemon answers at {self.url}: {exc}") from None
        if response.status_code >= 400:
            raise error_from_payload(response.status_code, _json_or_text(response))
        return response

    @contextlib.asynccontextmanager
    async def _stream(self, method: str, path: str, **kwargs: Any,
                      ) -> AsyncIterator[httpx.Response]:
        try:
            async with self._http.stream(method, path, **kwargs) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise error_from_payload(response.status_code, _json_or_text(response))
                yield response
        except (httpx.ConnectError, FileNotFoundError, ConnectionRefusedError) as exc:
            raise DaemonUnreachable(f"no Kelpie daemon answers at {self.url}: {exc}") from None

    # ---- the daemon ---------------------------------------------------------------------
    async def version(self) -> VersionInfo:
        """The daemon's version and pid; raises :class:`DaemonUnreachable` if none answers."""
        return VersionInfo.model_validate((await self._request("GET", "/version")).json())

    async def shutdown(self, *, stop_sandboxes: bool = False) -> None:
        """Ask the daemon to exit (sandboxes keep running unless ``stop_sandboxes``)."""
        await self._request("POST", "/shutdown", params={"stop_sandboxes": stop_sandboxes})

    # ---- teleport -----------------------------------------------------------------------
    @property
    def teleport_target(self) -> TeleportTarget:
        """This daemon as the target of another daemon's teleport."""
        return TeleportTarget(self)

    async def host_facts(self) -> HostFacts:
        """What the daemon's host offers (arch, backends, free resources, images, kits)."""
        return HostFacts.model_validate((await self._request("GET", "/host")).json())

    async def teleport(self, ref: str, to: str, *, token: str | None = None,
                       mode: str = "auto", without_volumes: bool = False,
                       progress: Callable[[TeleportProgress], None] | None = None,
                       converge_timeout: float = 60.0,
                       arch: str | None = None) -> TeleportReport:
        """Move a sandbox from this daemon to the daemon at ``to`` (see
        :class:`kelpie.api.TeleportBody`); ``progress`` hears each phase and byte count."""
        body = TeleportBody(to=to, token=token, mode=TeleportMode(mode),
                            without_volumes=without_volumes, converge_timeout=converge_timeout,
                            arch=arch)
        async with self._stream("POST", f"{_sb(ref)}/teleport", json=_wire(body),
                                headers={"Accept": NDJSON},
                                timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT),
                                ) as response:
            async for line in response.aiter_lines():
                if not line.strip():
                    continue
                message = json.loads(line)
                if message.get("type") == "progress":
                    if progress is not None:
                        progress(TeleportProgress.model_validate(message))
                elif message.get("type") == "result":
                    return TeleportReport.model_validate(message["report"])
                elif message.get("type") == "error":
                    raise error_from_payload(None, message)
        raise RemoteError(502, ErrorBody(type="KelpieError", types=["KelpieError"],
                                         message="the daemon ended the teleport stream early"))

    # ---- sandboxes ----------------------------------------------------------------------
    async def create(self, request: SandboxCreate, /, *,
                     progress: Callable[[str], None] | None = None) -> Sandbox:
        """Create and start a sandbox; ``progress`` hears each step."""
        payload = _wire(request)
        if progress is None:
            reply = await self._request("POST", "/sandboxes", json=payload)
            return Sandbox.model_validate(reply.json())
        async with self._stream("POST", "/sandboxes", json=payload,
                                headers={"Accept": NDJSON}) as response:
            async for line in response.aiter_lines():
                if not line.strip():
                    continue
                message = json.loads(line)
                if message.get("type") == "progress":
                    progress(str(message.get("message", "")))
                elif message.get("type") == "result":
                    return Sandbox.model_validate(message["sandbox"])
                elif message.get("type") == "error":
                    raise error_from_payload(None, message)
        raise RemoteError(502, ErrorBody(type="KelpieError", types=["KelpieError"],
                                         message="the daemon ended the create stream early"))

    async def list_sandboxes(self, *, all: bool = False) -> builtins.list[Sandbox]:
        """Running and paused sandboxes (``all``: every one)."""
        reply = await self._request("GET", "/sandboxes", params={"all": all})
        return [Sandbox.model_validate(s) for s in reply.json()]

    async def inspect(self, ref: str) -> Sandbox:
        """One sandbox by name, id or unique id prefix."""
        return Sandbox.model_validate((await self._request("GET", _sb(ref))).json())

    async def events(self, ref: str) -> builtins.list[Event]:
        """The sandbox's recorded state changes, oldest first."""
        reply = await self._request("GET", f"{_sb(ref)}/events")
        return [Event.model_validate(e) for e in reply.json()]

    async def watch_events(self, *, since: float | None = None, until: float | None = None,
                           sandboxes: Sequence[str] = (), kinds: Sequence[str] = (),
                           states: Sequence[str] = ()) -> AsyncIterator[Event]:
        """Every sandbox's events as the daemon records them (see ``GET /v1/events``)."""
        params: dict[str, Any] = {"sandbox": list(sandboxes), "kind": list(kinds),
                                  "state": list(states)}
        if since is not None:
            params["since"] = since
        if until is not None:
            params["until"] = until
        async with self._stream("GET", "/events", params=params) as response:
            async for line in response.aiter_lines():
                if line:
                    yield Event.model_validate_json(line)

    async def stats(self, ref: str) -> SandboxStats:
        """A sample of what the sandbox uses (see :meth:`kelpie.Runtime.stats`)."""
        return SandboxStats.model_validate((await self._request(
            "GET", f"{_sb(ref)}/stats")).json())

    async def stats_all(self) -> builtins.list[SandboxStats]:
        """A sample of every running or paused sandbox."""
        return [SandboxStats.model_validate(s)
                for s in (await self._request("GET", "/stats")).json()]

    async def processes(self, ref: str) -> ProcessList:
        """The processes in the sandbox's guest."""
        return ProcessList.model_validate((await self._request(
            "GET", f"{_sb(ref)}/processes")).json())

    async def _lifecycle(self, ref: str, action: str, **params: Any) -> Sandbox:
        reply = await self._request("POST", f"{_sb(ref)}/{action}",
                                    params={k: v for k, v in params.items() if v is not None})
        return Sandbox.model_validate(reply.json())

    async def start(self, ref: str) -> Sandbox:
        """Start a stopped or crashed sandbox."""
        return await self._lifecycle(ref, "start")

    async def stop(self, ref: str, *, timeout: float | None = None) -> Sandbox:
        """Stop a sandbox (``timeout=0``: kill it at once)."""
        return await self._lifecycle(ref, "stop", timeout=timeout)

    async def kill(self, ref: str, *, signal: int | str | None = None) -> Sandbox:
        """Stop a sandbox at once; with ``signal``, send that to its main command."""
        return await self._lifecycle(ref, "kill", signal=signal)

    async def pause(self, ref: str) -> Sandbox:
        """Freeze a running sandbox."""
        return await self._lifecycle(ref, "pause")

    async def commit(self, ref: str, reference: str, *, message: str | None = None) -> Image:
        """Have the daemon commit a sandbox's changes as a new image."""
        reply = await self._request("POST", f"{_sb(ref)}/commit",
                                    json=_wire(CommitBody(reference=reference, message=message)))
        return Image.model_validate(reply.json())

    async def rename(self, ref: str, name: str) -> Sandbox:
        """Give a sandbox another name."""
        reply = await self._request("POST", f"{_sb(ref)}/rename",
                                    json=_wire(RenameBody(name=name)))
        return Sandbox.model_validate(reply.json())

    async def wait_main(self, ref: str) -> int | None:
        """Wait for the sandbox's main command to end; its exit code."""
        reply = await self._request("POST", f"{_sb(ref)}/wait")
        return MainExit.model_validate(reply.json()).exit_code

    async def fork(self, ref: str, count: int, *, name_prefix: str | None = None,
                   names: Sequence[str] | None = None,
                   disk_mib: int | None = None) -> list[Sandbox]:
        """``count`` children of a running sandbox, each a copy of it now (see
        :class:`kelpie.api.ForkBody`)."""
        body = ForkBody(count=count, name_prefix=name_prefix,
                        names=None if names is None else list(names), disk_mib=disk_mib)
        reply = await self._request("POST", f"{_sb(ref)}/fork", json=_wire(body))
        return [Sandbox.model_validate(item) for item in reply.json()]

    async def set_network(self, ref: str, *, allow: Sequence[str] = (),
                          deny: Sequence[str] = (), network: str | None = None) -> Sandbox:
        """Replace a sandbox's egress rules (and switch between nat and policy)."""
        body = NetworkChange(network=network, allow=list(allow),
                             deny=list(deny))
        reply = await self._request("PUT", f"{_sb(ref)}/network",
                                    json=body.model_dump(mode="json"))
        return Sandbox.model_validate(reply.json())

    async def set_timeout(self, ref: str, seconds: float | None, *,
                          on_timeout: str | None = None) -> Sandbox:
        """Give a sandbox a timeout ``seconds`` from now (see :class:`TimeoutChange`)."""
        body = TimeoutChange(timeout=seconds, on_timeout=on_timeout)
        reply = await self._request("POST", f"{_sb(ref)}/timeout",
                                    json=body.model_dump(mode="json"))
        return Sandbox.model_validate(reply.json())

    async def resume(self, ref: str) -> Sandbox:
        """Resume a paused sandbox."""
        return await self._lifecycle(ref, "resume")

    async def remove(self, ref: str, *, force: bool = False) -> None:
        """Remove a sandbox (``force``: even a running one)."""
        await self._request("DELETE", _sb(ref), params={"force": force})

    async def read_logs(self, ref: str, *, tail: int | None = None,
                        console: bool = False) -> bytes:
        """The sandbox's logs so far (main command's output, else the console)."""
        params: dict[str, Any] = {"console": console}
        if tail is not None:
            params["tail"] = tail
        return (await self._request("GET", f"{_sb(ref)}/logs", params=params)).content

    async def follow_logs(self, ref: str, *, tail: int | None = None,
                          console: bool = False) -> AsyncIterator[bytes]:
        """The sandbox's logs in chunks, until the sandbox is at rest."""
        params: dict[str, Any] = {"follow": True, "console": console}
        if tail is not None:
            params["tail"] = tail
        async with self._stream("GET", f"{_sb(ref)}/logs", params=params) as response:
            async for chunk in response.aiter_raw():
                yield chunk

    # ---- commands -----------------------------------------------------------------------
    async def exec(self, ref: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                   cwd: str | None = None, user: str | None = None, stdin: bytes | None = None,
                   timeout: float | None = None) -> ExecResult:
        """Run a command to completion; :class:`RemoteError` (ExecTimeout) past ``timeout``."""
        body = {"argv": list(argv), "env": dict(env or {}), "cwd": cwd, "user": user,
                "stdin": b64(stdin) if stdin else None, "timeout": timeout}
        reply = (await self._request("POST", f"{_sb(ref)}/exec", json=body)).json()
        return ExecResult(reply["exit_code"], unb64(reply["stdout"], "stdout"),
                          unb64(reply["stderr"], "stderr"), reply["duration"], reply["signal"])

    async def exec_detached(
        self, ref: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
        cwd: str | None = None, user: str | None = None,
    ) -> str | None:
        """Start a command and leave it running, its output dropped; its exec id."""
        body = ExecBody(argv=list(argv), env=dict(env or {}), cwd=cwd, user=user)
        reply = await self._request("POST", f"{_sb(ref)}/exec/detached", json=_wire(body))
        return ExecDetached.model_validate(reply.json()).exec_id

    @contextlib.asynccontextmanager
    async def exec_stream(
        self, ref: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
        cwd: str | None = None, user: str | None = None, timeout: float | None = None,
        pty: bool = False, rows: int = 24, cols: int = 80,
    ) -> AsyncIterator[RemoteProcess]:
        """Start a command over the exec WebSocket (``pty``: in a terminal of ``rows`` x
        ``cols``); leaving the block early kills it."""
        start = ExecStart(argv=list(argv), env=dict(env or {}), cwd=cwd, user=user,
                          timeout=timeout, tty=pty, rows=rows, cols=cols)
        request = ExecRequest(tuple(argv), dict(env or {}), cwd, user, timeout, pty)
        async with self._websocket(f"{_sb(ref)}/exec/ws") as ws:
            await ws.send(start.model_dump_json())
            first = await _receive(ws)
            if isinstance(first, dict) and first.get("type") == "error":
                raise error_from_payload(None, first)
            yield RemoteProcess(request, ws)

    @contextlib.asynccontextmanager
    async def _websocket(self, path: str) -> AsyncIterator[ClientConnection]:
        headers = self._headers or None
        try:
            if self.socket_path is not None:
                ws_cm = unix_connect(str(self.socket_path), f"ws://kelpie/v1{path}",
                                     additional_headers=headers, max_size=WS_MAX_MESSAGE,
                                     compression=None, proxy=None)
            else:
                scheme = "wss" if self._base.startswith("https") else "ws"
                uri = f"{scheme}{self._base[self._base.index(':'):]}/v1{path}"
                ws_cm = connect(uri, additional_headers=headers, max_size=WS_MAX_MESSAGE,
                                compression=None, proxy=None)
            async with ws_cm as ws:
                yield ws
        except InvalidStatus as exc:
            status = exc.response.status_code
            raise RemoteError(status, ErrorBody(
                type="KelpieError", types=["KelpieError"],
                message=f"the daemon refused the exec stream (HTTP {status}); "
                        "check the token")) from None
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise DaemonUnreachable(f"no Kelpie daemon answers at {self.url}: {exc}") from None

    async def show_fleet(self, view: FleetView) -> None:
        """Tell the daemon what its fleet looks like (what a fleet controller does)."""
        await self._request("PUT", "/fleet", json=_wire(view))

    async def fleet_view(self) -> FleetView:
        """The fleet this daemon's host belongs to, as its controller last sent it
        (an error naming why when it is in none: HTTP 404)."""
        return FleetView.model_validate((await self._request("GET", "/fleet")).json())

    async def dashboard_login(self) -> DashboardLogin:
        """A one-time link to the dashboard (see ``kelpie dashboard``)."""
        reply = await self._request("POST", "/dashboard/logins")
        return DashboardLogin.model_validate(reply.json())

    # ---- images -------------------------------------------------------------------------
    async def list_images(self) -> builtins.list[Image]:
        """The images in the daemon's store."""
        return [Image.model_validate(i) for i in (await self._request("GET", "/images")).json()]

    async def inspect_image(self, ref: str) -> ImageDetails:
        """One image of the daemon's store: manifest digest, config, layers."""
        reply = await self._request("GET", f"/images/{quote(ref, safe='')}")
        return ImageDetails.model_validate(reply.json())

    async def remove_image(self, ref: str, *, force: bool = False) -> builtins.list[str]:
        """Untag or delete an image; the digests deleted."""
        reply = await self._request("DELETE", f"/images/{quote(ref, safe='')}",
                                    params={"force": force})
        removed: builtins.list[str] = reply.json()
        return removed

    async def pull_image(self, reference: str, *, platform: str | None = None,
                         insecure: bool = False, progress: BlobProgress | None = None,
                         ) -> Image:
        """Have the daemon pull an image; ``progress(digest, done, total)`` per blob."""
        body = PullBody(reference=reference, platform=platform, insecure=insecure)
        result = await self._blob_stream("/image-pulls", _wire(body), progress, "pull")
        return Image.model_validate(result["image"])

    async def push_image(self, image: str, reference: str | None = None, *,
                         insecure: bool = False, progress: BlobProgress | None = None,
                         ) -> PushOutcome:
        """Have the daemon push one of its images; ``progress(digest, done, total)``."""
        body = PushBody(image=image, reference=reference, insecure=insecure)
        result = await self._blob_stream("/image-pushes", _wire(body), progress, "push")
        return PushOutcome.model_validate(result["push"])

    async def build(self, context: Path | str, options: BuildOptions | None = None, /, *,
                    progress: Callable[[BuildEvent], None] | None = None, **fields: Any,
                    ) -> Image:
        """Have the daemon build the Dockerfile in the local directory ``context``: the
        context goes up as a tar (without what its ``.dockerignore`` leaves out)."""
        from kelpie.runtime._build_copy import pack_context  # the CLI's start stays light

        request = BuildOptions.of(options, fields, "build")
        params = {k: v for k, v in request.model_dump(mode="json").items()
                  if v is not None and v != []}
        with tempfile.TemporaryFile() as upload:
            await asyncio.to_thread(pack_context, Path(context), request.file, upload)

            async def body() -> AsyncIterator[bytes]:
                upload.seek(0)
                while chunk := await asyncio.to_thread(upload.read, 1 << 20):
                    yield chunk

            async with self._stream("POST", "/builds", params=params, content=body(),
                                    headers={"Accept": NDJSON,
                                             "Content-Type": "application/x-tar"},
                                    timeout=None) as response:
                async for line in response.aiter_lines():
                    if not line.strip():
                        continue
                    message = json.loads(line)
                    if message.get("type") == "build" and progress is not None:
                        progress(BuildEvent.model_validate(message))
                    elif message.get("type") == "result":
                        return Image.model_validate(message["image"])
                    elif message.get("type") == "error":
                        raise error_from_payload(None, message)
        raise RemoteError(502, ErrorBody(type="KelpieError", types=["KelpieError"],
                                         message="the daemon ended the build stream early"))

    async def _blob_stream(self, path: str, payload: Any, progress: BlobProgress | None,
                           what: str) -> dict[str, Any]:
        """POST ``payload`` for an NDJSON stream of per-blob progress; its result line."""
        async with self._stream("POST", path, json=payload,
                                headers={"Accept": NDJSON}) as response:
            async for line in response.aiter_lines():
                if not line.strip():
                    continue
                message = json.loads(line)
                if message.get("type") == "progress" and progress is not None:
                    progress(message["digest"], message["done"], message["total"])
                elif message.get("type") == "result":
                    return dict(message)
                elif message.get("type") == "error":
                    raise error_from_payload(None, message)
        raise RemoteError(502, ErrorBody(type="KelpieError", types=["KelpieError"],
                                         message=f"the daemon ended the {what} stream early"))

    # ---- snapshots and templates --------------------------------------------------------
    async def snapshot(self, ref: str, *, name: str | None = None, kind: str = "full",
                       leave_paused: bool = False, workspace: str | None = None) -> Snapshot:
        """Snapshot a sandbox (kind full, disk or checkpoint)."""
        body = SnapshotCreate(sandbox=ref, name=name, kind=kind,
                              leave_paused=leave_paused, workspace=workspace)
        reply = await self._request("POST", "/snapshots", json=_wire(body))
        return Snapshot.model_validate(reply.json())

    async def list_snapshots(self, *, templates: bool | None = None,
                             ) -> builtins.list[Snapshot]:
        """Snapshots (``templates``: only templates, or only plain ones)."""
        params = {} if templates is None else {"templates": templates}
        reply = await self._request("GET", "/snapshots", params=params)
        return [Snapshot.model_validate(s) for s in reply.json()]

    async def inspect_snapshot(self, ref: str) -> Snapshot:
        """One snapshot by name, id or unique id prefix."""
        reply = await self._request("GET", f"/snapshots/{quote(ref, safe='')}")
        return Snapshot.model_validate(reply.json())

    async def delete_snapshot(self, ref: str, *, template: bool = False) -> None:
        """Delete a snapshot or template (``template``: only a template)."""
        collection = "templates" if template else "snapshots"
        await self._request("DELETE", f"/{collection}/{quote(ref, safe='')}")

    async def restore(self, ref: str, *, name: str | None = None, paused: bool = False,
                      env: Mapping[str, str] | None = None,
                      labels: Mapping[str, str] | None = None) -> Sandbox:
        """Create a sandbox from a snapshot, as it was when captured."""
        body = RestoreBody(name=name, paused=paused, env=dict(env or {}),
                           labels=dict(labels or {}))
        return await self._restore(ref, body)

    async def restore_into(self, sandbox: str, snapshot: str, *, paused: bool = False,
                           ) -> Sandbox:
        """Roll a stopped sandbox back to one of its own snapshots."""
        return await self._restore(snapshot, RestoreBody(into=sandbox, paused=paused))

    async def _restore(self, ref: str, body: RestoreBody) -> Sandbox:
        reply = await self._request("POST", f"/snapshots/{quote(ref, safe='')}/restore",
                                    json=_wire(body))
        return Sandbox.model_validate(reply.json())

    async def export_snapshot(self, ref: str, *, compress: bool = False,
                              ) -> AsyncIterator[bytes]:
        """The snapshot's archive, in chunks."""
        async with self._stream("GET", f"/snapshots/{quote(ref, safe='')}/export",
                                params={"compress": compress}) as response:
            async for chunk in response.aiter_bytes():
                yield chunk

    async def import_snapshot(self, data: bytes | AsyncIterable[bytes], *,
                              name: str | None = None) -> Snapshot:
        """Add a snapshot from an archive (bytes or a stream of chunks)."""
        params = {} if name is None else {"name": name}
        reply = await self._request("POST", "/snapshot-imports", params=params, content=data,
                                    headers={"Content-Type": "application/octet-stream"})
        return Snapshot.model_validate(reply.json())

    async def create_template(self, request: TemplateCreate, /) -> Snapshot:
        """Boot a sandbox once and keep its snapshot as a template."""
        reply = await self._request("POST", "/templates", json=_wire(request))
        return Snapshot.model_validate(reply.json())

    # ---- files --------------------------------------------------------------------------
    async def read_file_stream(self, ref: str, path: str) -> AsyncIterator[bytes]:
        """A file's bytes in chunks."""
        async with self._stream("GET", f"{_sb(ref)}/files", params={"path": path}) as response:
            async for chunk in response.aiter_bytes():
                yield chunk

    async def read_file(self, ref: str, path: str) -> bytes:
        """A whole file."""
        return (await self._request("GET", f"{_sb(ref)}/files", params={"path": path})).content

    async def write_file(self, ref: str, path: str, data: bytes | AsyncIterable[bytes], *,
                         mode: int = 0o644) -> None:
        """Write a file atomically (bytes, or streamed from an async iterable)."""
        await self._request("PUT", f"{_sb(ref)}/files", params={"path": path, "mode": mode},
                            content=data,
                            headers={"Content-Type": "application/octet-stream"})

    async def list_dir(self, ref: str, path: str) -> builtins.list[FileInfo]:
        """A directory's entries."""
        reply = await self._request("GET", f"{_sb(ref)}/dir", params={"path": path})
        return [FileInfo(e.name, e.type, e.size, e.mode)
                for e in (FileEntry.model_validate(x) for x in reply.json())]

    async def mkdir(self, ref: str, path: str, *, mode: int = 0o755) -> None:
        """Create a directory and its missing parents."""
        await self._request("POST", f"{_sb(ref)}/dir", params={"path": path, "mode": mode})

    async def remove_path(self, ref: str, path: str, *, recursive: bool = False) -> None:
        """Remove a file (``recursive``: a directory tree)."""
        await self._request("DELETE", f"{_sb(ref)}/files",
                            params={"path": path, "recursive": recursive})


class TeleportTarget:
    """A daemon as the target of a teleport: the steps another daemon drives on it
    (``/v1/teleports``). Any request that gets no answer raises :class:`PeerUnreachable`
    (it may have been carried out), never a plain transport error."""

    def __init__(self, client: DaemonClient) -> None:
        self._client = client

    async def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """A daemon-to-daemon request: no answer is :class:`PeerUnreachable` (it may have
        been carried out), never a plain transport error."""
        try:
            return await self._client._request(method, path, **kwargs)
        except DaemonUnreachable as exc:
            raise PeerUnreachable(str(exc)) from None
        except httpx.TransportError as exc:
            raise PeerUnreachable(f"the daemon at {self._client.url} did not answer {method} "
                                  f"{path}: {type(exc).__name__}: {exc}") from None

    async def prepare(self, offer: TeleportOffer) -> TeleportAccepted:
        """Offer a sandbox to this (target) daemon; it reserves and says what it lacks."""
        reply = await self._call("POST", "/teleports", json=_wire(offer))
        return TeleportAccepted.model_validate(reply.json())

    async def received(self, teleport_id: str, name: str) -> int:
        """How many bytes of a teleport's blob this (target) daemon holds."""
        reply = await self._call("GET", f"/teleports/{teleport_id}/blobs/{name}")
        return int(reply.json()["received"])

    async def put_chunk(self, teleport_id: str, name: str, offset: int, data: bytes,
                                 *, size: int, sha256: str) -> int:
        """Send one chunk of a blob (its sha256 goes along and is checked on arrival)."""
        reply = await self._call(
            "PUT", f"/teleports/{teleport_id}/blobs/{name}", content=data,
            params={"offset": offset, "size": size, "sha256": sha256},
            headers={"Content-Type": "application/octet-stream",
                     CHUNK_SHA256_HEADER: hashlib.sha256(data).hexdigest()})
        return int(reply.json()["received"])

    async def step(self, teleport_id: str, step: str,
                            body: TeleportSwitch | TeleportLive | None = None) -> TeleportState:
        """``live`` (start the waiting VM), ``switch``, ``commit`` or ``abort`` a teleport
        on this (target) daemon."""
        reply = await self._call("POST", f"/teleports/{teleport_id}/{step}",
                                 json=None if body is None else _wire(body),
                                 timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT))
        return TeleportState.model_validate(reply.json())

    @contextlib.asynccontextmanager
    async def channel(self, teleport_id: str,
                               name: str) -> AsyncIterator[ClientConnection]:
        """A byte channel (binary WebSocket messages) to this (target) daemon's side of a
        live teleport: ``nbd`` or ``migration``."""
        try:
            async with self._client._websocket(f"/teleports/{teleport_id}/live/{name}") as ws:
                yield ws
        except DaemonUnreachable as exc:
            raise PeerUnreachable(str(exc)) from None
        except OSError as exc:
            raise PeerUnreachable(f"the daemon at {self._client.url} did not answer the {name} "
                                  f"channel: {exc}") from None

    async def state(self, teleport_id: str) -> TeleportState:
        """Where a teleport stands on this (target) daemon."""
        reply = await self._call("GET", f"/teleports/{teleport_id}")
        return TeleportState.model_validate(reply.json())


class RemoteProcess(ExecProcess):
    """A command running in a sandbox, driven over the daemon's exec WebSocket."""

    def __init__(self, request: ExecRequest, ws: ClientConnection) -> None:
        super().__init__(request)
        self._ws = ws

    async def write_stdin(self, data: bytes) -> None:
        if data:
            await self._send(data)

    async def close_stdin(self) -> None:
        await self._send(json.dumps({"type": "stdin_eof"}))

    async def send_signal(self, signum: int) -> None:
        await self._send(json.dumps({"type": "signal", "signal": signum}))

    async def resize(self, rows: int, cols: int) -> None:
        await self._send(json.dumps({"type": "resize", "rows": rows, "cols": cols}))

    async def _send(self, message: bytes | str) -> None:
        with contextlib.suppress(ConnectionClosed):  # the command ended meanwhile
            await self._ws.send(message)

    async def _events(self) -> AsyncIterator[ExecEvent]:
        while True:
            message = await _receive(self._ws)
            if message is None:
                raise KelpieError("the daemon closed the exec stream before the command ended")
            if isinstance(message, bytes):
                stream = StreamName.STDOUT if message[:1] == bytes([CHANNEL_STDOUT]) \
                    else StreamName.STDERR
                yield ExecOutput(stream, message[1:])
            elif message.get("type") == "exit":
                end = ExecExitMessage.model_validate(message)
                yield ExecExit(end.exit_code, end.duration, end.signal, end.timed_out,
                               end.warning)
                return
            elif message.get("type") == "error":
                raise error_from_payload(None, message)


async def _receive(ws: ClientConnection) -> bytes | dict[str, Any] | None:
    """The next message: bytes, a decoded JSON object, or None when the socket closed."""
    try:
        message = await ws.recv()
    except ConnectionClosed:
        return None
    if isinstance(message, bytes):
        return message
    decoded: dict[str, Any] = json.loads(message)
    return decoded


def _wire(body: BaseModel) -> dict[str, Any]:
    """A request body with only the fields that differ from their defaults, so that a
    daemon that predates a field still serves requests that do not use it."""
    return body.model_dump(mode="json", exclude_defaults=True)


def _sb(ref: str) -> str:
    return f"/sandboxes/{quote(ref, safe='')}"


def _json_or_text(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text.strip()[:500]
