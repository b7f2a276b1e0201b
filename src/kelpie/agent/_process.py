"""A command running in the guest, as :class:`kelpie.vm.ExecProcess`, driven through the agent."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager

from kelpie.agent._handle import ExecHandle
from kelpie.agent._types import ExitStatus
from kelpie.vm import (
    ExecError,
    ExecEvent,
    ExecExit,
    ExecOutput,
    ExecProcess,
    ExecRequest,
    StreamName,
    VmError,
)

ErrorScope = Callable[[], AbstractContextManager[None]]
"""The VM's translation of agent client errors into Kelpie's tree (``AgentVm._agent_errors``)."""


class AgentProcess(ExecProcess):
    """A command running in the guest: its agent exec handle, with errors in Kelpie's tree."""

    def __init__(self, request: ExecRequest, handle: ExecHandle, errors: ErrorScope) -> None:
        super().__init__(request)
        self._handle = handle
        self._agent_errors = errors
        self._started = time.monotonic()
        self._interrupted: str | None = None
        self.exec_id = str(handle.exec_id)
        self.pid = handle.pid

    def interrupt(self, reason: str) -> None:
        """End this command's stream with ``reason`` (its VM was restored under it)."""
        self._interrupted = reason

    @contextlib.contextmanager
    def _errors(self, *, request: bool = True) -> Iterator[None]:
        """Kelpie errors for agent failures; an interrupted command says why it ended.

        An interrupted command sends no more ``request``: its connection is gone, and its
        request id may name another command of the restored VM's new session.
        """
        if request and self._interrupted is not None:
            raise ExecError(self._interrupted)
        try:
            with self._agent_errors():
                yield
        except VmError as exc:
            if self._interrupted is not None:
                raise ExecError(self._interrupted) from exc
            raise

    async def write_stdin(self, data: bytes) -> None:
        with self._errors():
            await self._handle.write_stdin(data)

    async def close_stdin(self) -> None:
        with self._errors():
            await self._handle.close_stdin()

    async def send_signal(self, signum: int) -> None:
        with self._errors():
            await self._handle.send_signal(signum, group=True)

    async def resize(self, rows: int, cols: int) -> None:
        with self._errors():
            await self._handle.resize(rows, cols)

    async def _events(self) -> AsyncIterator[ExecEvent]:
        with self._errors(request=False):  # output received before the stop comes first
            async for kind, payload in self._handle:
                if kind == "exit":
                    assert isinstance(payload, ExitStatus)
                    sig = payload.signal
                    code = payload.exit_code if payload.exit_code is not None else 128 + (sig or 0)
                    duration = time.monotonic() - self._started
                    yield ExecExit(code, duration, sig, payload.timed_out)
                    return
                assert isinstance(payload, bytes)
                yield ExecOutput(StreamName(kind), payload)


class FinishedProcess(ExecProcess):
    """A command that could not start (e.g. not found): reported like a shell would."""

    def __init__(self, request: ExecRequest, code: int, message: str) -> None:
        super().__init__(request)
        self._code = code
        self._message = message

    async def write_stdin(self, data: bytes) -> None:
        return None

    async def close_stdin(self) -> None:
        return None

    async def send_signal(self, signum: int) -> None:
        return None

    async def _events(self) -> AsyncIterator[ExecEvent]:
        yield ExecOutput(StreamName.STDERR, self._message.encode() + b"\n")
        yield ExecExit(self._code, 0.0)
