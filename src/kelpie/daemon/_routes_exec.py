"""Commands: ``POST /v1/sandboxes/{ref}/exec`` (to completion, or streamed as JSON lines),
signals to a streamed one, and the exec WebSocket."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from fastapi import APIRouter, Request, Response, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError

from kelpie.api import (
    CHANNEL_STDERR,
    CHANNEL_STDOUT,
    NDJSON,
    ErrorResponse,
    ExecBody,
    ExecDetached,
    ExecExitMessage,
    ExecOutcome,
    ExecOutputLine,
    ExecSignal,
    ExecStart,
    ExecStarted,
    StreamControl,
    StreamError,
    b64,
    error_body,
    model_json,
    unb64,
)
from kelpie.daemon._routes_sandboxes import Ref
from kelpie.daemon._routes_system import runtime_of
from kelpie.runtime import ExecNotFound, Runtime
from kelpie.vm import ConfigError, ExecExit, ExecOutput, ExecProcess, KelpieError, StreamName

log = logging.getLogger("kelpie.daemon")
router = APIRouter(tags=["exec"])

SIGKILL = 9


@router.post("/sandboxes/{ref}/exec", response_model=ExecOutcome, responses={
    200: {"content": {NDJSON: {}}, "description": "How the command ended; or, when the "
          "request accepts application/x-ndjson, an ExecStarted line, ExecOutputLine lines "
          "as output comes, then an ExecExitMessage or StreamError line."},
    504: {"model": ErrorResponse,
          "description": "The command ran past its timeout and was killed."}})
async def exec_command(request: Request, ref: Ref, body: ExecBody) -> Response | ExecOutcome:
    """Run a command to completion; its output comes back base64-encoded.

    A command past its ``timeout`` is killed and answered 504 (ExecTimeout); streamed, it
    ends with an exit line whose ``timed_out`` is true.
    """
    runtime = runtime_of(request)
    stdin = unb64(body.stdin, "stdin")
    if NDJSON in request.headers.get("accept", ""):
        stream = _ExecStream(request, runtime, ref, body, stdin)
        await stream.started()  # an unknown sandbox or one at rest: an HTTP error status
        return StreamingResponse(stream.lines(), media_type=NDJSON)
    result = await runtime.exec(
        ref, body.argv, env=body.env, cwd=body.cwd, user=body.user,
        stdin=stdin, timeout=body.timeout,
    )
    return ExecOutcome.from_result(result)


@router.post("/sandboxes/{ref}/exec/detached", status_code=202)
async def exec_detached(request: Request, ref: Ref, body: ExecBody) -> ExecDetached:
    """Start a command and leave it running, its output dropped (``docker exec -d``)."""
    if body.stdin or body.timeout is not None:
        raise ConfigError(["a detached command takes no stdin and no timeout"],
                          what="exec request")
    exec_id = await runtime_of(request).exec_detached(ref, body.argv, env=body.env,
                                                      cwd=body.cwd, user=body.user)
    return ExecDetached(exec_id=exec_id)


@router.post("/sandboxes/{ref}/exec/{exec_id}/signal", status_code=204)
async def signal_exec(request: Request, ref: Ref, exec_id: str, body: ExecSignal) -> Response:
    """Send a signal to a command streamed by ``POST .../exec`` (NDJSON) while it runs."""
    sandbox = await runtime_of(request).inspect(ref)
    streams: dict[str, _ExecStream] = request.app.state.exec_streams
    stream = streams.get(exec_id)
    if stream is None or stream.sandbox_id != sandbox.id or stream.process is None:
        raise ExecNotFound(ref, exec_id)
    await stream.process.send_signal(body.signal)
    return Response(status_code=204)


class _ExecStream:
    """One streamed exec: a task owns the command (so a client that hangs up at any point,
    even before the body is read, kills it) and queues its lines for the response."""

    def __init__(self, request: Request, runtime: Runtime, ref: str, body: ExecBody,
                 stdin: bytes) -> None:
        self.exec_id = secrets.token_hex(8)
        self.sandbox_id = ""
        self.process: ExecProcess | None = None
        self._request = request
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._up: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._run(runtime, ref, body, stdin),
                                         name=f"kelpie-exec-stream-{self.exec_id}")

    async def started(self) -> None:
        """Wait until the command runs; raise what stopped it from starting."""
        try:
            await asyncio.shield(self._up)
        except asyncio.CancelledError:
            self._task.cancel()
            raise

    async def lines(self) -> AsyncIterator[bytes]:
        try:
            while (line := await self._queue.get()) is not None:
                yield line
        finally:  # the response ended or could not be sent: the command must not outlive it
            self._task.cancel()

    async def _run(self, runtime: Runtime, ref: str, body: ExecBody, stdin: bytes) -> None:
        streams: dict[str, _ExecStream] = self._request.app.state.exec_streams
        try:
            self.sandbox_id = (await runtime.inspect(ref)).id
            async with runtime.exec_stream(ref, body.argv, env=body.env, cwd=body.cwd,
                                           user=body.user, timeout=body.timeout,
                                           stdin=stdin) as process:
                self.process = process
                streams[self.exec_id] = self
                self._up.set_result(None)
                self._put(ExecStarted(exec_id=self.exec_id))
                await _until_disconnect(self._request, self._pump(runtime, process))
        except Exception as exc:
            if not self._up.done():
                self._up.set_exception(exc)
                return
            if not isinstance(exc, KelpieError):
                log.error("internal error in exec of sandbox %s", ref, exc_info=exc)
            self._put(StreamError(error=error_body(exc)))
        finally:
            streams.pop(self.exec_id, None)
            self._queue.put_nowait(None)

    async def _pump(self, runtime: Runtime, process: ExecProcess) -> None:
        async for event in process:
            if isinstance(event, ExecOutput):
                self._put(ExecOutputLine(stream=event.stream.value, data=b64(event.data)))
            elif isinstance(event, ExecExit):
                self._put(await _exit_message(runtime, self.sandbox_id, event))

    def _put(self, model: BaseModel) -> None:
        self._queue.put_nowait(json.dumps(model_json(model)).encode() + b"\n")


async def _exit_message(runtime: Runtime, ref: str, end: ExecExit) -> ExecExitMessage:
    """How a command ended; a failed one says so when the sandbox's disk is full."""
    warning = None if end.exit_code == 0 else await runtime.disk_full(ref)
    return ExecExitMessage(exit_code=end.exit_code, signal=end.signal, timed_out=end.timed_out,
                           duration=end.duration, warning=warning)


async def _until_disconnect(request: Request, work: Coroutine[Any, Any, None]) -> None:
    """Run ``work``; stop it if the client hangs up first (the request body was read, so
    the next ASGI message is the disconnect)."""
    task = asyncio.ensure_future(work)
    hangup = asyncio.ensure_future(request.receive())
    try:
        await asyncio.wait({task, hangup}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        hangup.cancel()
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@router.websocket("/sandboxes/{ref}/exec/ws")
async def exec_websocket(websocket: WebSocket, ref: str) -> None:
    """Run a command interactively: stdin, output, signals, terminal size (see kelpie.api)."""
    runtime: Runtime = websocket.app.state.runtime
    await websocket.accept()
    try:
        start = await _receive_start(websocket)
        await _serve_exec(websocket, runtime, ref, start)
    except WebSocketDisconnect:
        return  # the client went away; leaving exec_stream killed the command
    except KelpieError as exc:
        await _send_error(websocket, exc)
    except Exception as exc:
        log.error("internal error in exec of sandbox %s", ref, exc_info=exc)
        await _send_error(websocket, exc)
    with contextlib.suppress(Exception):
        await websocket.close()


async def _receive_start(websocket: WebSocket) -> ExecStart:
    """The client's first message: a text frame holding an ExecStart."""
    message = await websocket.receive()
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    if message.get("text") is None:
        raise ConfigError(["the first message must be a text frame holding the exec start "
                           "(JSON)"], what="exec start message")
    return _parse_start(message["text"])


def _parse_start(text: str) -> ExecStart:
    try:
        return ExecStart.model_validate_json(text)
    except ValidationError as exc:
        problems = [f"{'.'.join(str(p) for p in e['loc']) or 'message'}: {e['msg']}"
                    for e in exc.errors()]
        raise ConfigError(problems, what="exec start message") from None


async def _serve_exec(websocket: WebSocket, runtime: Runtime, ref: str, start: ExecStart) -> None:
    async with runtime.exec_stream(ref, start.argv, env=start.env, cwd=start.cwd,
                                   user=start.user, timeout=start.timeout,
                                   pty=start.tty) as process:
        if start.tty and (start.rows, start.cols) != (24, 80):
            await process.resize(start.rows, start.cols)
        await websocket.send_json({"type": "started"})
        feeder = asyncio.create_task(_feed(websocket, process))
        try:
            async for event in process:
                if isinstance(event, ExecOutput):
                    channel = CHANNEL_STDOUT if event.stream is StreamName.STDOUT \
                        else CHANNEL_STDERR
                    await websocket.send_bytes(bytes([channel]) + event.data)
                elif isinstance(event, ExecExit):
                    await websocket.send_json(model_json(
                        await _exit_message(runtime, ref, event)))
        finally:
            feeder.cancel()
            with contextlib.suppress(BaseException):
                await feeder


async def _feed(websocket: WebSocket, process: ExecProcess) -> None:
    """Client -> command: stdin bytes and control messages; a hang-up kills the command."""
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                raise WebSocketDisconnect(message.get("code", 1000))
            if message.get("bytes") is not None:
                await process.write_stdin(message["bytes"])
            elif message.get("text") is not None:
                await _control(process, message["text"])
    except WebSocketDisconnect:
        with contextlib.suppress(KelpieError):
            await process.send_signal(SIGKILL)
    except (KelpieError, ValidationError) as exc:
        with contextlib.suppress(Exception):
            await _send_error(websocket, exc)
        with contextlib.suppress(KelpieError):
            await process.send_signal(SIGKILL)


async def _control(process: ExecProcess, text: str) -> None:
    control = StreamControl.model_validate_json(text)
    if control.type == "stdin_eof":
        await process.close_stdin()
    elif control.type == "resize":
        if control.rows is None or control.cols is None:
            raise ConfigError(["resize needs rows and cols"], what="exec control message")
        await process.resize(control.rows, control.cols)
    elif control.type == "signal":
        if control.signal is None:
            raise ConfigError(["signal needs a signal number"], what="exec control message")
        await process.send_signal(control.signal)


async def _send_error(websocket: WebSocket, exc: BaseException) -> None:
    with contextlib.suppress(Exception):
        await websocket.send_json(model_json(StreamError(error=error_body(exc))))
