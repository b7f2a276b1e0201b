"""VzVm: a micro-VM run by Apple's Virtualization.framework, inside this process.

The guest's commands and files go through the guest agent (:class:`kelpie.agent.AgentVm`),
reached over the VM's virtio socket device (vsock port :data:`AGENT_VSOCK_PORT`). The
framework's VM lives in this process: it dies with it, so there is no attach. Every call
into the framework is in :mod:`._bridge`; full snapshots and restores are in
:mod:`._snapshots`.

The VM directory (``vms_dir() / id`` unless given) holds ``disk.img`` (the VM's own copy of
its root disk, see :mod:`._disk`) and ``console.log`` (the guest's hvc0).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

from kelpie._paths import vms_dir
from kelpie.agent import AgentClient, AgentClientError, AgentConnectError, AgentVm, log_tail
from kelpie.backends.vz import CAPABILITIES
from kelpie.backends.vz._bridge import (
    ConfigurationRefused,
    Framework,
    FrameworkUnavailable,
    Machine,
    VzError,
    build_configuration,
    load_framework,
    save_restore_problem,
    unavailable_reason,
)
from kelpie.backends.vz._disk import DISK_NAME, writable_copy
from kelpie.backends.vz._launch import VzLaunch, refusals
from kelpie.backends.vz._snapshots import VzSnapshots
from kelpie.guestkit import GuestKit, GuestKitError, build_guestkit
from kelpie.vm import (
    BootError,
    ConfigError,
    HostInfo,
    SnapshotKind,
    UnsupportedOperation,
    VmConfig,
    VmCrashed,
    VmError,
    VmSnapshot,
    VmState,
)

DEFAULT_BOOT_TIMEOUT = 60.0
"""Seconds from the framework's start to the agent's hello."""
SHUTDOWN_TIMEOUT = 5.0
"""Seconds a graceful stop gives the guest to power off after the agent was asked."""
HANDSHAKE_TIMEOUT = 30.0
"""Seconds for reaching the agent of a guest that ran before (a resume after a restore)."""
CONNECT_RETRY = 0.1
"""Seconds between attempts to reach the agent's vsock port while the guest boots."""
STREAM_LIMIT = 256 * 1024
"""The stream reader's buffer limit: the agent client reads 256 KiB at a time."""
CONSOLE_LOG = "console.log"


class VzVm(AgentVm):
    """A micro-VM run by Virtualization.framework (macOS); guest work through its agent."""

    backend_name = "vz"
    capabilities = CAPABILITIES

    def __init__(
        self,
        config: VmConfig,
        *,
        vm_id: str | None = None,
        workdir: Path | None = None,
        kit: GuestKit | None = None,
        framework: Framework | None = None,
        boot_timeout: float = DEFAULT_BOOT_TIMEOUT,
    ) -> None:
        problems = refusals(config)
        if problems:
            raise ConfigError(problems)
        super().__init__(config, vm_id=vm_id)
        self.workdir = workdir or vms_dir() / self.id
        """The VM directory (default: ``vms_dir() / id``)."""
        self.boot_timeout = boot_timeout
        self._kit = kit
        self._kit_digest: str | None = kit.digest if kit is not None else None
        self._framework = framework
        self._machine: Machine | None = None
        self.launch: VzLaunch | None = None
        """What the running machine was built from (None before the first start)."""
        self._stopping = False
        self._closing: asyncio.Task[None] | None = None

    @functools.cached_property
    def _snapshots(self) -> VzSnapshots:
        return VzSnapshots(self)

    # ---- the framework and the host -----------------------------------------------------
    def framework(self) -> Framework:
        """The framework this VM runs on (pyobjc's, loaded on first use, or the one given)."""
        if self._framework is None:
            try:
                self._framework = load_framework()
            except FrameworkUnavailable as exc:
                raise BootError(f"VM {self.id}: {exc}") from exc
        return self._framework

    def host_info(self) -> HostInfo:
        try:
            version = self.framework().macos_version
        except BootError:
            version = "unavailable"
        return HostInfo(arch=HostInfo.current_arch(), backend=self.backend_name,
                        backend_version=version, cpu_model="host", machine="vz-generic",
                        guestkit_digest=self._kit_digest)

    def save_restore_refusal(self, operation: str) -> UnsupportedOperation | None:
        """The error for ``operation`` (a full snapshot or its restore) when this host's
        framework cannot save or restore a VM's state; None when it can."""
        problem = save_restore_problem(self.framework())
        if problem is None:
            return None
        return UnsupportedOperation(self.backend_name, f"{operation} here: {problem}")

    def log_tail(self) -> str:
        return log_tail(self.workdir, (CONSOLE_LOG,))

    # ---- start --------------------------------------------------------------------------
    async def _do_start(self) -> None:
        await self.boot(await self.prepare_launch(self.config))

    async def guest_kit(self) -> GuestKit:
        """The guest kit (built on first use when none was given)."""
        if self._kit is None:
            try:
                self._kit = await asyncio.to_thread(build_guestkit)
            except GuestKitError as exc:
                raise BootError(f"cannot prepare the guest kit: {exc}") from exc
        return self._kit

    async def prepare_launch(self, config: VmConfig) -> VzLaunch:
        """Check ``config`` on this host, get the guest kit and the writable disk."""
        problems = config.host_problems()
        if problems:
            raise ConfigError(problems)
        kit = await self.guest_kit()
        # The agent comes from the kit's initrd; another initrd has no kit to check against.
        self._kit_digest = kit.digest if config.initrd is None else None
        self.workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        disk = None
        if config.root_disk is not None:
            disk = await writable_copy(config.root_disk, self.workdir)
        return VzLaunch(
            config=config, kernel=config.kernel or kit.kernel,
            initrd=config.initrd or kit.initrd,
            hostname=config.hostname or f"kelpie-{self.id[:8]}",
            console_log=self.workdir / CONSOLE_LOG, disk=disk,
        )

    async def create_machine(self, launch: VzLaunch) -> Machine:
        """The framework's VM for ``launch``, created (not started) and watched."""
        fw = self.framework()
        reason = unavailable_reason(fw)
        if reason is not None:
            raise BootError(f"VM {self.id}: {reason}")
        try:
            configuration = build_configuration(fw, launch)
        except ConfigurationRefused as exc:
            raise ConfigError([str(exc)]) from exc
        machine = Machine(fw, configuration, self._on_machine_stop)
        self._machine, self.launch = machine, launch
        try:
            await machine.create()
        except VzError as exc:
            raise BootError(f"VM {self.id}: {exc}") from exc
        return machine

    async def boot(self, launch: VzLaunch) -> None:
        """Start a new machine for ``launch`` and wait for the guest agent's hello."""
        machine = await self.create_machine(launch)
        try:
            await machine.start()
        except VzError as exc:
            raise BootError(f"VM {self.id}: Virtualization.framework could not start it: "
                            f"{exc}\n{self.log_tail()}") from exc
        await self.greet(self.boot_timeout, "boot")

    async def greet(self, timeout: float, doing: str) -> None:
        """Connect to the guest agent and say hello, within ``timeout`` seconds."""
        try:
            async with asyncio.timeout(timeout):
                await self.agent.connect(timeout)
                await self.agent.hello()
        except (AgentClientError, TimeoutError) as exc:
            machine = self._machine
            if machine is not None and machine.stop_reason is not None:
                raise BootError(f"VM {self.id} stopped during {doing}: {machine.stop_reason}"
                                f"\n{self.log_tail()}") from exc
            raise BootError(f"VM {self.id}: the guest agent did not answer within "
                            f"{timeout:g}s of {doing}: {exc}\n{self.log_tail()}") from exc

    async def _connect_agent(self, timeout: float) -> AgentClient:
        """A stream to the agent's vsock port, tried again while the guest boots (the
        framework refuses the connection until something listens on the port)."""
        machine, launch = self._machine, self.launch
        if machine is None or launch is None:
            raise AgentConnectError(f"VM {self.id} has no running machine to connect to")
        port = launch.agent_port
        deadline = time.monotonic() + timeout
        while True:
            if not machine.running:
                raise AgentConnectError(f"VM {self.id} stopped: {machine.stop_reason}")
            remaining = deadline - time.monotonic()
            try:
                async with asyncio.timeout(max(remaining, 0.001)):
                    sock = await machine.connect(port)
            except (VzError, TimeoutError) as exc:
                if time.monotonic() + CONNECT_RETRY >= deadline:
                    raise AgentConnectError(
                        f"could not reach the guest agent on vsock port {port} within "
                        f"{timeout:g}s: {exc}; is the guest booting? (see "
                        f"{self.workdir / CONSOLE_LOG})"
                    ) from exc
                await asyncio.sleep(CONNECT_RETRY)
                continue
            reader, writer = await asyncio.open_connection(sock=sock, limit=STREAM_LIMIT)
            return AgentClient.from_streams(reader, writer)

    # ---- the machine's own stop ---------------------------------------------------------
    def _vmm_running(self) -> bool:
        return self._machine is not None and self._machine.running

    def _vmm_gone_error(self, doing: str) -> VmCrashed:
        machine = self._machine
        why = machine.stop_reason if machine is not None else None
        return VmCrashed(f"VM {self.id}: its Virtualization.framework VM is not running "
                         f"during {doing} ({why or 'it was never started'})")

    def _on_machine_stop(self, reason: str) -> None:
        """The framework says the VM stopped by itself (called on the loop)."""
        if self._stopping or self._state not in (VmState.RUNNING, VmState.PAUSED):
            return  # a stop of ours, or a boot, which sees it itself
        self.mark_crashed(f"VM {self.id}: {reason}\n{self.log_tail()}")
        # Requests in flight end now (AgentDisconnected -> VmCrashed), whatever the
        # framework does with the connection's descriptor.
        self._closing = asyncio.get_running_loop().create_task(self.agent.close())

    # ---- stop ---------------------------------------------------------------------------
    async def _do_stop(self, *, force: bool, grace: float | None = None) -> None:
        """Agent poweroff (``grace`` seconds), then the framework's stop; then clean up."""
        machine = self._machine
        self._stopping = True
        try:
            if machine is not None and machine.running:
                if not force and self.agent.ready and self._state is VmState.RUNNING:
                    await self._ask_guest_to_power_off(
                        machine, SHUTDOWN_TIMEOUT if grace is None else grace)
                try:
                    await machine.stop()  # a no-op when the guest powered off
                except VzError as exc:
                    raise VmError(f"VM {self.id}: Virtualization.framework could not stop "
                                  f"it: {exc}") from exc
        finally:
            await self.agent.close()
            self._machine = None
            self._snapshots.forget()
            self._stopping = False

    async def _ask_guest_to_power_off(self, machine: Machine, grace: float) -> None:
        """Ask the agent to power the guest off and wait for it; give up quietly."""
        with contextlib.suppress(AgentClientError, TimeoutError):
            async with asyncio.timeout(grace):
                await self._agent_poweroff()
                await machine.wait_stopped()

    # ---- pause / resume -----------------------------------------------------------------
    async def machine_call(self, step: Callable[[Machine], Awaitable[None]], doing: str) -> None:
        """``step`` on the running machine; its failure as VmCrashed or VmError."""
        machine = self._machine
        if machine is None or not machine.running:
            raise self._vmm_gone_error(doing)
        try:
            await step(machine)
        except VzError as exc:
            if not machine.running:
                raise self._vmm_gone_error(doing) from exc
            raise VmError(f"VM {self.id}: {doing} failed: {exc}") from exc

    async def _do_pause(self) -> None:
        await self.machine_call(lambda machine: machine.pause(), "pause")

    async def _do_resume(self) -> None:
        await self.machine_call(lambda machine: machine.resume(), "resume")
        await self._snapshots.finish_restore()

    # ---- snapshots ----------------------------------------------------------------------
    async def snapshot(
        self, dest: Path, *, kind: SnapshotKind = SnapshotKind.FULL, leave_paused: bool = False,
        shareable: bool = False,
    ) -> VmSnapshot:
        """Write a snapshot of this VM to the new directory ``dest`` (see the base class).

        Full snapshots need macOS 14 (on Apple silicon): elsewhere they raise
        :class:`UnsupportedOperation` saying so, before the guest is paused.
        """
        if kind is SnapshotKind.FULL and self._state in (VmState.RUNNING, VmState.PAUSED):
            refusal = self.save_restore_refusal("full snapshots")
            if refusal is not None:
                raise refusal
        return await super().snapshot(dest, kind=kind, leave_paused=leave_paused,
                                      shareable=shareable)

    async def restore(self, snapshot: VmSnapshot, *, paused: bool = False,
                      verify: bool = True) -> None:
        """Bring this VM to the snapshot's state (see the base class); restoring a full
        snapshot needs macOS 14 (on Apple silicon), like taking one."""
        if snapshot.manifest.kind is SnapshotKind.FULL \
                and self._state in (VmState.CREATED, VmState.STOPPED):
            refusal = self.save_restore_refusal("restoring full snapshots")
            if refusal is not None:
                raise refusal
        await super().restore(snapshot, paused=paused, verify=verify)

    async def _do_snapshot(self, dest: Path, kind: SnapshotKind) -> VmSnapshot:
        return await self._snapshots.take(dest, kind)

    async def _do_restore(self, snapshot: VmSnapshot, *, paused: bool) -> None:
        await self._snapshots.restore(snapshot, paused=paused)

    @contextlib.contextmanager
    def disk_set_aside(self) -> Iterator[None]:
        """Move this VM's disk (and config) aside for the block; put them back if it fails,
        drop them if it succeeds (a restore brings its own disk, or a fresh copy)."""
        disk = self.workdir / DISK_NAME
        kept = self.workdir / f".{DISK_NAME}.before-restore"
        config = self._config
        if disk.exists():
            disk.replace(kept)
        try:
            yield
        except BaseException:
            with contextlib.suppress(OSError):
                if kept.exists():
                    kept.replace(disk)
                else:
                    disk.unlink(missing_ok=True)
            self._config = config
            raise
        kept.unlink(missing_ok=True)

    def use_config(self, config: VmConfig) -> None:
        """Run with ``config`` from now on (a restore's)."""
        self._config = config

    def machine(self) -> Machine | None:
        """The framework's VM while it runs (None before start and after stop)."""
        return self._machine
