"""Main commands: a sandbox's own command, run whenever it starts, its output kept as logs,
started again when it ends as its restart policy says."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator
from typing import IO

from kelpie.runtime._arguments import label
from kelpie.runtime._context import RuntimeContext, logger
from kelpie.runtime._errors import MainCommandNotRunning
from kelpie.runtime._info import SandboxInfo
from kelpie.runtime._restart import RestartPolicy
from kelpie.vm import (
    ExecExit,
    ExecOutput,
    ExecProcess,
    KelpieError,
    StorageError,
    VmInstance,
    VmState,
)

EXIT_CANNOT_RUN = 127
SAVE_EVERY = 0.5
"""Seconds between records of how much of a main command's output its log holds."""


def _opened() -> asyncio.Event:
    gate = asyncio.Event()
    gate.set()
    return gate


class MainCommands:
    """Runs each sandbox's main command in the background and records how it ended."""

    def __init__(self, ctx: RuntimeContext) -> None:
        self._ctx = ctx
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._running: dict[str, ExecProcess] = {}
        """The main command running now in each sandbox (to signal it)."""
        self._positions: dict[str, int | None] = {}
        """How much of each main command's output its log holds (None: unknown)."""
        self._open: dict[str, asyncio.Event] = {}
        """Set while a sandbox's log may grow; cleared by :meth:`hold_output`."""
        self._unsaved: dict[str, asyncio.TimerHandle] = {}
        """The record of a log's growth that waits for SAVE_EVERY to pass."""
        self._saved_at: dict[str, float] = {}

    def start(self, info: SandboxInfo, vm: VmInstance, *, follow: bool = False,
              restart: str | None = None) -> None:
        """Run the sandbox's main command in the background, its output into the log
        (``follow``: take over the one an earlier runtime started, by its exec id;
        ``restart``: why the restart policy starts it, counted as a restart)."""
        if not follow:
            self._ctx.db.main_started(info.id, self._ctx.clock(), restart=restart)
        task = asyncio.create_task(self._run(info, vm, follow=follow),
                                   name=f"kelpie-main-{info.id}")
        self._tasks[info.id] = task
        task.add_done_callback(lambda t: self._tasks.pop(info.id, None)
                               if self._tasks.get(info.id) is t else None)

    def follow(self, sandbox_id: str, vm: VmInstance) -> None:
        """Take over the output of a main command an earlier runtime started (if running)."""
        info = self._ctx.info(sandbox_id)
        if info.command is not None and info.main_exec_id is not None \
                and vm.state is VmState.RUNNING and sandbox_id not in self._tasks:
            self.start(info, vm, follow=True)

    async def _run(self, info: SandboxInfo, vm: VmInstance, *, follow: bool) -> None:
        """Run (or follow) the main command until it ends and its restart policy says it
        is done; record each end.

        Cancelled when the sandbox stops or the runtime closes: the command itself is left
        running in the guest (``keep_running``), and its exec id is recorded so that the
        next runtime (e.g. a restarted daemon) takes its output over where it stopped.
        """
        ctx = self._ctx
        delay: float | None = None
        while True:
            started = ctx.clock()
            exit_code = await self._run_once(info, vm, follow=follow)
            if ctx.open_db is None or ctx.vms.get(info.id) is not vm:
                return  # no longer this runtime's VM: nothing to record, nothing to restart
            ctx.db.main_exited(info.id, exit_code, ctx.clock())
            info = ctx.info(info.id)
            if vm.state is not VmState.RUNNING \
                    or not info.restart.should_restart(exit_code, info.restart_count):
                return
            delay = RestartPolicy.delay(delay, ctx.clock() - started)
            await ctx.sleep(delay)
            if ctx.open_db is None or ctx.vms.get(info.id) is not vm \
                    or vm.state is not VmState.RUNNING:
                return
            ctx.db.main_started(info.id, ctx.clock(), restart=(
                f"exit code {exit_code}; restart {info.restart_count + 1} "
                f"({info.restart}) after {delay:g} s"))
            info = ctx.info(info.id)
            follow = False

    async def _run_once(self, info: SandboxInfo, vm: VmInstance, *,
                        follow: bool) -> int | None:
        """Pump the main command's output into the sandbox's output log; its exit code."""
        assert info.command is not None
        ctx = self._ctx
        path = ctx.output_log(info.id)
        try:
            ctx.storage.mkdir(path.parent)
            with ctx.storage.open_append(path) as log:
                return await self._pump(info, vm, follow, log)
        except (StorageError, OSError) as exc:  # this task is never awaited: record, not raise
            logger.warning("main command of sandbox %s: its log %s failed: %s", info.id, path,
                           exc)
            return None  # unknown: its output (and exit) could not be collected

    async def _pump(self, info: SandboxInfo, vm: VmInstance, follow: bool,
                    log: IO[bytes]) -> int | None:
        """Copy the command's output into ``log``; its exit code (None: unknown)."""
        exit_code: int | None = EXIT_CANNOT_RUN
        gate = self._open.setdefault(info.id, _opened())
        try:
            async with self._process(info, vm, follow) as process:
                if process.exec_id is not None and not follow:
                    self._ctx.db.set_main_exec(info.id, process.exec_id)
                await process.close_stdin()
                self._running[info.id] = process
                position = process.output_offset
                if follow and position is not None and info.main_output_offset is not None \
                        and position > info.main_output_offset:
                    log.write(f"kelpie: {position - info.main_output_offset} bytes of the main "
                              "command's output were lost (more than the guest keeps "
                              "to replay)\n".encode())
                self._positions[info.id] = position
                try:
                    async for event in process:
                        if isinstance(event, ExecOutput):
                            await gate.wait()
                            log.write(event.data)
                            if position is not None:
                                position += len(event.data)
                                self._positions[info.id] = position
                                self._position_moved(info.id)
                        elif isinstance(event, ExecExit):
                            exit_code = event.exit_code
                finally:
                    if self._running.get(info.id) is process:
                        del self._running[info.id]
                        self._save_position(info.id)
        except KelpieError as exc:
            what = "following" if follow else "the main command"
            log.write(f"kelpie: {what} failed: {exc}\n".encode())
            if follow:
                exit_code = None  # unknown: its output could not be taken over
        return exit_code

    def _position_moved(self, sandbox_id: str) -> None:
        """The log grew: record how much it holds now, or (after a recent record) soon.

        A daemon killed in between leaves an older offset: the next one gets the output
        since then again (at most SAVE_EVERY seconds of it), never less.
        """
        if sandbox_id in self._unsaved:
            return
        now = asyncio.get_running_loop().time()
        wait = self._saved_at.get(sandbox_id, -math.inf) + SAVE_EVERY - now
        if wait <= 0:
            self._save_position(sandbox_id)
        else:
            self._unsaved[sandbox_id] = asyncio.get_running_loop().call_later(
                wait, self._save_position, sandbox_id)

    def _save_position(self, sandbox_id: str) -> None:
        """Record how much output the log holds, for whoever follows the command next."""
        pending = self._unsaved.pop(sandbox_id, None)
        if pending is not None:
            pending.cancel()
        if sandbox_id in self._positions and self._ctx.open_db is not None:
            self._ctx.db.set_main_output_offset(sandbox_id, self._positions[sandbox_id])
            self._saved_at[sandbox_id] = asyncio.get_running_loop().time()

    def hold_output(self, sandbox_id: str) -> None:
        """Stop writing the sandbox's main command output to its log (its guest is paused
        to move): the log is complete, and how much output it holds is recorded, so that
        the host the sandbox moves to follows on from there. :meth:`release_output` undoes
        it."""
        self._open.setdefault(sandbox_id, _opened()).clear()
        self._save_position(sandbox_id)

    def release_output(self, sandbox_id: str) -> None:
        """Let the log grow again after :meth:`hold_output` (a move was undone)."""
        gate = self._open.get(sandbox_id)
        if gate is not None:
            gate.set()

    @contextlib.asynccontextmanager
    async def _process(
        self, info: SandboxInfo, vm: VmInstance, follow: bool,
    ) -> AsyncIterator[ExecProcess]:
        assert info.command is not None
        if follow:
            assert info.main_exec_id is not None
            yield await vm.reattach_exec(info.main_exec_id, offset=info.main_output_offset)
            return
        async with vm.exec_stream(info.command, cwd=info.workdir, user=info.user,
                                  keep_running=True) as process:
            yield process

    async def signal(self, info: SandboxInfo, signum: int) -> None:
        """Send ``signum`` to the sandbox's main command (its process group)."""
        process = self._running.get(info.id)
        if process is None:
            ended = "" if info.main_exit_code is None else \
                f" (it ended with exit code {info.main_exit_code})"
            raise MainCommandNotRunning(label(info), "has no main command"
                                        if info.command is None else
                                        f"has no main command running{ended}")
        await process.send_signal(signum)

    async def wait(self, sandbox_id: str) -> int | None:
        """Wait for the sandbox's main command to end; its exit code (see Runtime)."""
        task = self._tasks.get(sandbox_id)
        if task is not None:
            await asyncio.shield(task)
        return self._ctx.info(sandbox_id).main_exit_code

    def stop(self, sandbox_id: str) -> None:
        """Stop following the main command (it keeps running in the guest, if it does)."""
        self._open.pop(sandbox_id, None)
        self._positions.pop(sandbox_id, None)
        self._saved_at.pop(sandbox_id, None)
        pending = self._unsaved.pop(sandbox_id, None)
        if pending is not None:
            pending.cancel()
        task = self._tasks.pop(sandbox_id, None)
        if task is not None:
            task.cancel()

    async def stop_all(self) -> None:
        """Stop following every main command and wait until they let go."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()  # the main commands keep running in the guests
        await asyncio.gather(*tasks, return_exceptions=True)

    def cancel_all(self) -> None:
        for task in self._tasks.values():
            task.cancel()  # the command keeps running in the guest (see _run)
        self._tasks.clear()
        for pending in self._unsaved.values():
            pending.cancel()
        self._unsaved.clear()
