"""Commands: ``POST /v1/sandboxes/{ref}/exec`` (to completion) and the exec WebSocket."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from fastapi import APIRouter, Request, WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from kelpie.api import (
    CHANNEL_STDERR,
    CHANNEL_STDOUT,
    ErrorResponse,
    ExecBody,
    ExecExitMessage,
    ExecOutcome,
    ExecStart,
    StreamControl,
    StreamError,
    error_body,
    model_json,
    unb64,
)
from kelpie.daemon._routes_sandboxes import Ref
from kelpie.daemon._routes_system import runtime_of
from kelpie.runtime import Runtime
from kelpie.vm import ConfigError, ExecExit, ExecOutput, ExecProcess, KelpieError, StreamName

log = logging.getLogger("kelpie.daemon")
router = APIRouter(tags=["exec"])

SIGKILL = 9


@router.post("/sandboxes/{ref}/exec", responses={504: {
    "model": ErrorResponse, "description": "The command ran past its timeout and was killed."}})
async def exec_command(request: Request, ref: Ref, body: ExecBody) -> ExecOutcome:
    """Run a command to completion; its output comes back base64-encoded.

    A command past its ``timeout`` is killed and answered 504 (ExecTimeout).
    """
    result = await runtime_of(request).exec(
        ref, body.argv, env=body.env, cwd=body.cwd, user=body.user,
        stdin=unb64(body.stdin, "stdin"), timeout=body.timeout,
    )
    return ExecOutcome.from_result(result)


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
                    await websocket.send_json(model_json(ExecExitMessage(
                        exit_code=event.exit_code, signal=event.signal,
                        timed_out=event.timed_out, duration=event.duration)))
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
