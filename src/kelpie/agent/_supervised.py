"""ProcessVm: an :class:`AgentVm` whose VMM is one host process living in a VM directory.

The VMM is started detached (its own session, :func:`spawn_in_new_session`), so it does not
die with the process that started it, and its exit is learnt through a pidfd
(:class:`ProcessWatch`), the same way whether this process started it or only attached to
it. :meth:`ProcessVm._reattach` is the skeleton of re-attaching from the VM directory
(after a daemon restart, say): the backend finds its VMM (``_find_vmm``) and reconnects to
it (``_reconnect``); this class settles the VM's state and undoes a failed attempt.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from kelpie._paths import vms_dir
from kelpie.agent._errors import AgentClientError
from kelpie.agent._tasks import cancel_and_wait
from kelpie.agent._vm import AgentVm
from kelpie.agent._vmdir import log_tail
from kelpie.agent._vmm import ProcessWatch, spawn_in_new_session
from kelpie.vm import BootError, HostUsage, VmConfig, VmCrashed, VmState

T = TypeVar("T")


class BootTimedOut(BootError):
    """A boot (or attach) step did not finish in time while the VMM kept running."""


class VmmGone(Exception):
    """The VM directory names no live VMM of this VM (the message says why)."""


class ProcessVm(AgentVm):
    """An AgentVm whose VMM is a detached host process: spawned, watched, re-attached."""

    vmm_name: ClassVar[str] = "the VMM"
    """How errors name the VMM process (``QEMU``...)."""
    vmm_logs: ClassVar[Sequence[str]] = ("console.log",)
    """The VM directory's log files whose tails errors quote."""
    vmm_errors: ClassVar[tuple[type[Exception], ...]] = (OSError,)
    """What a failed boot step of the VMM's own control channel raises."""
    pid_file_name: ClassVar[str] = "vmm.pid"
    """The VM directory's file holding the VMM's pid (written by :meth:`_spawn`)."""

    def __init__(
        self, config: VmConfig, *, vm_id: str | None = None, workdir: Path | None,
        boot_timeout: float,
    ) -> None:
        super().__init__(config, vm_id=vm_id)
        self.workdir = workdir or vms_dir() / self.id
        """The VM directory (default: ``vms_dir() / id``)."""
        self.boot_timeout = boot_timeout
        self._process: ProcessWatch | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.exit_status: int | None = None
        self._stopping = False

    @property
    def pid(self) -> int | None:
        """The VMM's process id while it runs."""
        process = self._process
        return process.pid if process is not None and process.running else None

    def _vmm_running(self) -> bool:
        return self._process is not None and self._process.running

    def host_usage(self) -> HostUsage | None:
        """The VMM process's CPU time and resident memory, the VM directory's bytes."""
        pid = self.pid
        return None if pid is None else HostUsage.of_process(pid, self.workdir)

    def _log_tail(self) -> str:
        return log_tail(self.workdir, self.vmm_logs)

    def _vmm_gone_error(self, doing: str) -> VmCrashed:
        status = self.exit_status
        how = f"exited with status {status}" if status is not None else "is not running"
        return VmCrashed(f"VM {self.id}: {self.vmm_name} {how} during {doing}")

    # ---- the VMM process ----------------------------------------------------------------
    @property
    def pid_file(self) -> Path:
        return self.workdir / self.pid_file_name

    def _spawn(self, command: list[str], log: Path) -> None:
        """Start the VMM detached, write its pid file, and watch it."""
        try:
            pid = spawn_in_new_session(command, log)
        except OSError as exc:
            raise BootError(f"VM {self.id}: cannot run {command[0]}: {exc}") from exc
        self.pid_file.write_text(f"{pid}\n")
        self._track(ProcessWatch(pid, child=True))

    def _is_own_vmm(self, pid: int) -> bool:
        """Whether process ``pid`` is this VM's VMM (a pid file can outlive its pid): the
        backend reads its command line."""
        return False

    async def _end_vmm(
        self, asks: Sequence[tuple[Callable[[], Awaitable[object]], float]]
    ) -> None:
        """End the VMM: each of ``asks`` in turn (a request, then up to its seconds for the
        exit), then SIGKILL of its group; then its watcher's end and :meth:`_release`.

        Also a VMM this object does not watch (an attach that failed, e.g. while another
        process held its control socket): stopping must not leave it running.
        """
        process = self._process or self._unwatched_vmm()
        if process is not None and process.running:
            for ask, timeout in asks:
                if process.exited.done():
                    break
                with contextlib.suppress(AgentClientError, TimeoutError, *self.vmm_errors):
                    async with asyncio.timeout(timeout):
                        await ask()
                        await process.wait()
            if process.running:
                process.kill_group()
                await process.wait()
        watcher = self._watcher
        if watcher is not None:
            # It ends now that the VMM has exited. asyncio.wait, not suppress(CancelledError)
            # around 'await watcher', which would also swallow a cancellation of this stop.
            await asyncio.wait({watcher})
            if not watcher.cancelled():
                watcher.result()  # its own error, if any, is this stop's
        await self._release(keep_vmm=False)
        self.pid_file.unlink(missing_ok=True)
        self._process = None

    def _unwatched_vmm(self) -> ProcessWatch | None:
        """This VM's VMM as named by its pid file, when it runs; else None."""
        with contextlib.suppress(VmmGone):
            return self._find_vmm()
        return None

    def _track(self, process: ProcessWatch) -> None:
        """Watch the VMM from now on: its exit while RUNNING or PAUSED marks the VM CRASHED."""
        self._process = process
        self._watcher = asyncio.create_task(self._watch(process))

    async def _watch(self, process: ProcessWatch) -> None:
        await self._on_vmm_exit(await process.wait())

    async def _on_vmm_exit(self, status: int | None) -> None:
        self.exit_status = status
        if self._state in (VmState.RUNNING, VmState.PAUSED) and not self._stopping:
            self.mark_crashed(f"{self._exit_description()}\n{self._log_tail()}")
            await self._release(keep_vmm=False)

    def _exit_description(self) -> str:
        if self.exit_status is not None:
            return f"{self.vmm_name} exited unexpectedly with status {self.exit_status}"
        pid = self._process.pid if self._process else "?"
        return (
            f"{self.vmm_name} (pid {pid}) exited unexpectedly; its exit status is unknown "
            f"because another process started it"
        )

    def _start_failure_reason(self) -> str | None:
        """Why the VMM refused to start, in plain words, when its log says so; else None."""
        return None

    async def _before_exit(
        self, step: Awaitable[T], what: str, deadline: float, budget: float | None = None
    ) -> T:
        """Run a boot (or attach) step unless the VMM exits or the deadline passes first.

        ``budget`` is the whole operation's time limit, for the error message
        (default: :attr:`boot_timeout`).
        """
        assert self._process is not None
        exited = self._process.exited
        task = asyncio.ensure_future(step)
        remaining = max(deadline - time.monotonic(), 0.1)
        waiters: set[asyncio.Future[Any]] = {task, exited}
        try:
            done, _ = await asyncio.wait(
                waiters, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
        except BaseException:
            task.cancel()
            raise
        if task in done:
            failures: tuple[type[Exception], ...] = (AgentClientError, *self.vmm_errors)
            try:
                return task.result()
            except failures as exc:
                # The VMM's control socket may close a moment before its exit is seen: if
                # it is exiting, that is the cause to report.
                if isinstance(exc, AgentClientError) or not await _ends_soon(exited):
                    raise BootError(
                        f"VM {self.id}: {what} failed: {exc}\n{self._log_tail()}") from exc
        await cancel_and_wait(task)
        if exited.done():
            status = exited.result()
            how = "exited" if status is None else f"exited with status {status}"
            reason = self._start_failure_reason()
            raise BootError(
                f"VM {self.id}: {reason + '; ' if reason else ''}{self.vmm_name} {how} while "
                f"waiting for {what}\n{self._log_tail()}"
            )
        raise BootTimedOut(
            f"VM {self.id}: timed out after {budget or self.boot_timeout:g}s waiting for "
            f"{what}\n{self._log_tail()}"
        )

    async def _unless_gone(self, step: Awaitable[T], doing: str) -> T:
        """Run ``step`` unless the VMM exits first (then :class:`VmCrashed`).

        Cancelled, ``step`` is cancelled and awaited, so its clean-up (e.g. cancelling a
        migration in QEMU) is over before the cancellation propagates.
        """
        process = self._process
        if process is None or not process.running:
            raise self._vmm_gone_error(doing)
        task = asyncio.ensure_future(step)
        waiters: set[asyncio.Future[Any]] = {task, process.exited}
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            await cancel_and_wait(task)
            raise
        if task.done():
            return task.result()
        await cancel_and_wait(task)
        raise self._vmm_gone_error(doing)

    async def _release(self, *, keep_vmm: bool) -> None:
        """Close the connections to the VM (the agent here; backends add theirs).

        ``keep_vmm``: the VMM keeps running (a detach, an attach given up): stop watching
        it too. Else it has exited (or is being stopped) and its watcher ends by itself.
        """
        await self.agent.close()
        if not keep_vmm:
            return
        if self._watcher is not None:
            await cancel_and_wait(self._watcher)
        if self._process is not None:
            self._process.close()
        self._process = self._watcher = None

    async def _do_detach(self) -> None:
        await self._release(keep_vmm=True)

    # ---- re-attach ----------------------------------------------------------------------
    def _find_vmm(self) -> ProcessWatch:
        """A watch on this VM's live VMM, as named by its pid file; else :class:`VmmGone`."""
        name, pid_file = self.vmm_name, self.pid_file
        try:
            text = pid_file.read_text().strip()
        except FileNotFoundError:
            raise VmmGone(f"{name} is not running: {pid_file} is missing") from None
        if not text.isdigit() or int(text) <= 0:
            raise VmmGone(f"{name} is not running: {pid_file} holds {text!r}, not a pid")
        pid = int(text)
        try:
            process = ProcessWatch(pid, child=False)
        except ProcessLookupError:
            raise VmmGone(f"{name} (pid {pid}) is no longer running") from None
        gone = VmmGone(f"{name} (pid {pid}) is no longer running")
        ours = not process.has_exited() and self._is_own_vmm(pid)
        # The pidfd names one process: alive after the command line was read, it proves the
        # command line was that process's and not a later holder of the same pid.
        if process.has_exited():
            process.close()
            raise gone
        if not ours:
            process.close()
            raise VmmGone(f"{name} is not running: {pid_file.name} names pid {pid}, which is "
                          f"not this VM's {name} (the pid was reused after it exited)")
        return process

    @abc.abstractmethod
    async def _reconnect(self, timeout: float) -> tuple[VmState, str]:
        """Reconnect to the VMM found and to the agent: the state the guest is in, and why
        it will not run again when that is CRASHED."""

    def _vmm_gone_cleanup(self) -> None:
        """Tidy the VM directory of a VM whose VMM is gone (attach found it dead)."""

    async def _reattach(self, timeout: float) -> None:
        """Attach to the VMM of this VM directory: RUNNING or PAUSED as it is, CRASHED when
        it is gone; raise (leaving the VMM running) when it does not answer."""
        self._set_state(VmState.STARTING)  # attaching, like booting, ends RUNNING/PAUSED/CRASHED
        try:
            self._track(self._find_vmm())
        except VmmGone as gone:
            with contextlib.suppress(OSError):
                self._vmm_gone_cleanup()
            self._settle_attached(VmState.CRASHED, f"VM {self.id}: {gone}")
            return
        try:
            state, why = await self._reconnect(timeout)
        except BaseException as exc:
            died = self._process is not None and not self._process.running
            if isinstance(exc, Exception) and died:
                self._settle_attached(VmState.CRASHED, str(exc))  # died as we attached
                await self._release(keep_vmm=False)
                return
            # No answer, or cancelled: undo the attach, leaving the VMM running as it was.
            await self._release(keep_vmm=True)
            self._set_state(VmState.STOPPED)
            raise
        self._settle_attached(state, f"VM {self.id}: {why}")
        if self._process is not None and not self._process.running:
            await self._on_vmm_exit(None)  # exited before RUNNING: the watcher had skipped it

    def _settle_attached(self, state: VmState, reason: str) -> None:
        """Give a re-attached VM the state its VMM is in (from STARTING, legally).

        ``reason`` becomes ``crash_reason`` when the state is CRASHED, log tail added.
        """
        if state is VmState.CRASHED:
            self.mark_crashed(f"{reason}\n{self._log_tail()}")
        else:
            self._set_state(state)


EXIT_GRACE = 1.0
"""Seconds a failed control step waits to see whether the VMM is exiting."""


async def _ends_soon(exited: asyncio.Future[Any]) -> bool:
    """Whether ``exited`` completes within :data:`EXIT_GRACE` (it is not cancelled)."""
    done, _ = await asyncio.wait({exited}, timeout=EXIT_GRACE)
    return bool(done)
