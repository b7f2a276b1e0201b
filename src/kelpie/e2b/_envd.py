"""E2B's in-sandbox API (envd), served host-side for every sandbox: the Connect RPC
services, ``/files`` and ``/health``, behind a check of the sandbox's access token. The
guest runs Kelpie's own agent; nothing of E2B's runs in it."""

from __future__ import annotations

import hmac
import posixpath
import shlex
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from connectrpc.request import RequestContext
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from kelpie.e2b._caller import (
    SANDBOX_HEADER,
    Caller,
    access_token,
    caller_of,
    check_user,
    user_of,
)
from kelpie.e2b._filesystem import Complaint, Files, FilesystemService, complaint
from kelpie.e2b._processes import Commands, ProcessService
from kelpie.e2b._proto.filesystem.filesystem_connect import FilesystemASGIApplication
from kelpie.e2b._proto.process.process_connect import ProcessASGIApplication
from kelpie.runtime import Runtime
from kelpie.vm import ExecExit, GuestFileError, KelpieError, VmState

ENVD_PORT = 49983
UPLOAD_SCRIPT = 'mkdir -p -- "$(dirname -- "$1")" && cat > "$1"'
"""Writes stdin to ``$1`` as the calling user (so that the file is theirs, as with envd)."""
_HTTP_STATUSES: dict[Complaint, int] = {"permission": 403, "missing": 400, "no-space": 507,
                                         "other": 400}
"""An upload's status by what the guest's ``mkdir``/``cat`` complained of (envd's)."""


def _caller(ctx: RequestContext[Any, Any]) -> Caller:
    return caller_of(ctx.request_headers)


def envd_error(code: int, message: str) -> JSONResponse:
    return JSONResponse({"code": code, "message": message}, status_code=code)


class Envd:
    """Every sandbox's envd: ``route`` takes a request once the sandbox is known."""

    def __init__(self, runtime: Runtime, *, api_key: str) -> None:
        self.runtime = runtime
        self.api_key = api_key
        self.commands = Commands(runtime)
        self.files = Files(runtime)
        self.filesystem = FilesystemService(self.files, _caller)
        self._process_app = ProcessASGIApplication(ProcessService(self.commands, _caller))
        self._filesystem_app = FilesystemASGIApplication(self.filesystem)
        self._http = Starlette(routes=[
            Route("/health", self._health, methods=["GET"]),
            Route("/files", self._download, methods=["GET"]),
            Route("/files", self._upload, methods=["POST"]),
        ])

    def forget(self, sandbox_id: str) -> None:
        """The sandbox is gone: stop its commands' followers and its watchers."""
        self.commands.forget_sandbox(sandbox_id)
        self.filesystem.forget_sandbox(sandbox_id)

    async def route(self, scope: Scope, receive: Receive, send: Send,
                    headers: dict[str, str], sandbox_id: str, port: int) -> None:
        """Serve one request (``headers``: its headers, names in lower case) to ``port``
        of sandbox ``sandbox_id``."""
        refusal = await self._refusal(headers, sandbox_id, port)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        scope = dict(scope)
        scope["headers"] = [(k, v) for k, v in scope.get("headers", [])
                            if k.lower() != SANDBOX_HEADER.encode()]
        scope["headers"].append((SANDBOX_HEADER.encode(), sandbox_id.encode()))
        app: ASGIApp = self._http
        if scope["path"].startswith(self._process_app.path + "/"):
            app = self._process_app
        elif scope["path"].startswith(self._filesystem_app.path + "/"):
            app = self._filesystem_app
        await app(scope, receive, send)

    async def _refusal(self, headers: dict[str, str], sandbox_id: str,
                       port: int) -> Response | None:
        """Why the request may not go on (E2B's proxy and envd errors), or None."""
        try:
            info = await self.runtime.inspect(sandbox_id)
        except LookupError:  # none, or a prefix of several: E2B ids are whole ids
            info = None
        if info is None or info.id != sandbox_id:
            return envd_error(502, f"The sandbox {sandbox_id} was not found")
        if port != ENVD_PORT:
            return envd_error(502, f"The sandbox {sandbox_id} is running but port {port} is "
                                   "not open (Kelpie serves only envd's port, 49983)")
        token = headers.get("x-access-token", "")
        if not hmac.compare_digest(token.encode(),
                                   access_token(self.api_key, sandbox_id).encode()):
            return envd_error(401, "missing or wrong X-Access-Token for this sandbox (the "
                                   "envdAccessToken create or connect answered)")
        if info.state is not VmState.RUNNING:
            return envd_error(502, f"The sandbox {sandbox_id} was not found (it is "
                                   f"{info.state.value}: connect resumes a paused one)")
        try:
            user_of(headers.get("authorization"))
        except ValueError as exc:
            return envd_error(401, str(exc))
        return None

    # ---- HTTP ---------------------------------------------------------------------------
    async def _health(self, request: Request) -> Response:
        return Response(status_code=204)

    def _http_caller(self, request: Request) -> Caller:
        """The caller of a /files request: ``username`` names the user (as envd)."""
        caller = caller_of(request.headers)
        user = request.query_params.get("username")
        return Caller(caller.sandbox_id, check_user(user)) if user else caller

    async def _download(self, request: Request) -> Response:
        try:
            caller = self._http_caller(request)
        except ValueError as exc:
            return envd_error(400, str(exc))
        path = caller.path(request.query_params.get("path", ""))
        chunks = aiter(self.runtime.read_file_stream(caller.sandbox_id, path))
        assert isinstance(chunks, AsyncGenerator)
        try:
            first = await anext(chunks, b"")
        except GuestFileError as exc:
            await chunks.aclose()
            if exc.code == "ENOENT":
                return envd_error(404, f"path '{path}' does not exist")
            return envd_error(400, f"cannot read {path}: {exc}")

        async def body() -> AsyncIterator[bytes]:
            try:
                yield first
                async for chunk in chunks:
                    yield chunk
            finally:
                await chunks.aclose()
        return StreamingResponse(body(), media_type="application/octet-stream")

    async def _upload(self, request: Request) -> Response:
        try:
            caller = self._http_caller(request)
        except ValueError as exc:
            return envd_error(400, str(exc))
        written = []
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form(max_files=1000)
            parts = [p for p in form.getlist("file") if isinstance(p, UploadFile)]
            if not parts:
                return envd_error(400, "the multipart upload has no 'file' part")
            single = request.query_params.get("path") if len(parts) == 1 else None
            for part in parts:
                path = caller.path(single or part.filename or "")
                failed = await self._write(caller, path, _upload_chunks(part))
                if failed is not None:
                    return failed
                written.append(path)
        else:
            given = request.query_params.get("path")
            if not given:
                return envd_error(400, "give the file's path (?path=)")
            path = caller.path(given)
            failed = await self._write(caller, path, request.stream())
            if failed is not None:
                return failed
            written.append(path)
        return JSONResponse([{"name": posixpath.basename(p), "type": "file", "path": p}
                             for p in written])

    async def _write(self, caller: Caller, path: str,
                     chunks: AsyncIterator[bytes]) -> Response | None:
        """Write ``chunks`` to ``path`` as the caller; an error response if it failed."""
        try:
            async with self.runtime.exec_stream(
                    caller.sandbox_id, ["sh", "-c", UPLOAD_SCRIPT, "sh", path],
                    user=caller.user, cwd="/") as process:
                async for chunk in chunks:
                    if chunk:
                        await process.write_stdin(chunk)
                await process.close_stdin()
                errors = b""
                code = 0
                async for event in process:
                    if isinstance(event, ExecExit):
                        code = event.exit_code
                    elif event.stream.value == "stderr":
                        errors += event.data
        except KelpieError as exc:
            return envd_error(500, f"cannot write {path}: {exc}")
        if code == 0:
            return None
        kind, message = complaint(errors, code)
        return envd_error(_HTTP_STATUSES[kind], f"cannot write {shlex.quote(path)}: {message}")


async def _upload_chunks(part: UploadFile) -> AsyncIterator[bytes]:
    while chunk := await part.read(1 << 16):
        yield chunk
