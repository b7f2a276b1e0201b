"""NDJSON answers: a long operation's progress lines then its result or error; and a
followed value, sent again at every change."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel

from kelpie._changes import Changes
from kelpie.api import StreamError, error_body, model_json

Emit = Callable[[Any], None]
T = TypeVar("T")

FOLLOW_INTERVAL = 0.25
"""Seconds between two lines of a followed value at least: a burst of changes, one line."""


async def streamed(request: Request,
                   work: Callable[[Emit], Coroutine[Any, Any, BaseModel]],
                   ) -> AsyncIterator[bytes]:
    """Run ``work`` in its own task (a client that goes away does not cancel it half way);
    every model it emits is a line, then its result or the error."""
    queue: asyncio.Queue[BaseModel] = asyncio.Queue()
    task = in_background(request, work(queue.put_nowait))
    while not task.done():
        getter = asyncio.ensure_future(queue.get())
        await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
        if getter.done():
            yield _line(getter.result())
        else:
            getter.cancel()
    while not queue.empty():
        yield _line(queue.get_nowait())
    exc = task.exception()
    yield _line(StreamError(error=error_body(exc)) if exc is not None else task.result())


def in_background(request: Request, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """``work`` as a task of the app's, kept until it ends whoever waits for it."""
    task = asyncio.create_task(work)
    background: set[asyncio.Task[Any]] = request.app.state.background
    background.add(task)
    task.add_done_callback(background.discard)
    return task


def _line(model: BaseModel) -> bytes:
    return json.dumps(model_json(model)).encode() + b"\n"


async def followed(changes: Changes, now: Callable[[], Any]) -> AsyncIterator[bytes]:
    """``now()`` (JSON-ready) as a line, then again after every change, at most four lines
    a second; until the client goes away."""
    version = changes.version
    while True:
        yield json.dumps(now()).encode() + b"\n"
        version = await changes.wait(version)
        await asyncio.sleep(FOLLOW_INTERVAL)
