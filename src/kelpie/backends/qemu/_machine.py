"""QemuMachine: one QEMU process of a VM: its launch, its QMP channel, pause, resume, stop.

Each VM owns one directory (see DESIGN.md): ``qmp.sock``, ``agent.sock`` (QEMU's end of the
virtio-serial agent port), ``console.log``, ``qemu.log`` (QEMU's own stderr), ``qemu.pid``,
``config.json`` (the config, and the accelerator, host name and guest kit it booted with)
and, with a root disk, ``overlay.qcow2`` on top of the read-only base; after a restore
that left the guest paused, ``pending-resync.json`` until it first runs again; while a full
snapshot is taken, ``snapshot-in-progress.json``; while it is sent live,
``live-send-in-progress.json``, and while it receives one, ``nbd.sock`` and
``migration.sock`` (see ``_live``). QEMU runs in its own session (see
:class:`kelpie.agent.ProcessVm`), so it does not die with the process that started it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, ClassVar

from qemu.qmp import QMPClient, QMPError

from kelpie.agent import (
    AgentClient,
    BootTimedOut,
    ProcessVm,
    launch_record,
    write_vm_record,
)
from kelpie.backends.qemu import CAPABILITIES, _snapshot
from kelpie.backends.qemu._accel import AccelChoice, choose_accel
from kelpie.backends.qemu._cmdline import (
    MACHINES,
    ROOT_DRIVE,
    QemuLaunch,
    build_command,
    cpu_model,
)
from kelpie.backends.qemu._host import (
    is_qemu_of,
    qemu_version,
    start_failure_reason,
)
from kelpie.backends.qemu._migration import UNLIMITED_BANDWIDTH
from kelpie.guestkit import GuestKit, GuestKitError, build_guestkit, guest_arch, host_arch
from kelpie.hostnet import HostNetworkError, SandboxNetwork
from kelpie.vm import BootError, ConfigError, HostInfo, VmConfig, VmError, VmState

_log = logging.getLogger(__name__)

DEFAULT_BOOT_TIMEOUT = 120.0
"""Seconds from QEMU start to the agent's hello; generous because TCG on a loaded host is slow."""
BOOT_ATTEMPTS = 2
"""A start whose guest never answers within the boot timeout is tried once more."""
SHUTDOWN_TIMEOUT = 5.0
QUIT_TIMEOUT = 3.0
MAX_SOCKET_PATH = 100  # sun_path is 108 bytes including the NUL; keep a margin
ATTACH_TIMEOUT = 30.0
"""Seconds for re-attaching: QMP greeting, query-status and the agent's hello."""
PENDING_RESYNC = "pending-resync.json"
"""In a VM directory: a restore left the guest paused; resync it when it resumes."""
SNAPSHOT_MARKER = "snapshot-in-progress.json"
"""In a VM directory: a full snapshot is (or was, if its process died) being taken."""
OVERLAY = "overlay.qcow2"
SHM = Path("/dev/shm")
SHM_MARGIN = 2
"""/dev/shm must have this many times a guest's memory free for its RAM to be a file
there (other guests' files grow too)."""


class QemuMachine(ProcessVm):
    """A VM run by one QEMU process: boot, QMP, pause/resume and stop (no snapshots)."""

    backend_name = "qemu"
    capabilities = CAPABILITIES
    vmm_name: ClassVar[str] = "QEMU"
    vmm_logs: ClassVar[tuple[str, ...]] = ("console.log", "qemu.log")
    vmm_errors: ClassVar[tuple[type[Exception], ...]] = (QMPError, OSError)
    pid_file_name: ClassVar[str] = "qemu.pid"

    def __init__(
        self,
        config: VmConfig,
        *,
        vm_id: str | None = None,
        workdir: Path | None = None,
        kit: GuestKit | None = None,
        boot_timeout: float = DEFAULT_BOOT_TIMEOUT,
        qemu: str | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(config, vm_id=vm_id, workdir=workdir, boot_timeout=boot_timeout)
        if len(str(self.workdir / "agent.sock")) > MAX_SOCKET_PATH:
            raise ConfigError([
                f"VM directory {self.workdir} is too long for unix sockets "
                f"(at most {MAX_SOCKET_PATH - 11} characters); set KELPIE_STATE_DIR shorter"
            ])
        self._kit = kit
        self._qemu = qemu
        self._progress = progress or logging.getLogger("kelpie.guestkit").info
        self.accel: AccelChoice | None = None
        self._qmp: QMPClient | None = None
        self._kit_digest: str | None = kit.digest if kit is not None else None
        """The guest kit this VM booted (known after start, or from its record on attach)."""
        self.snapshot_bandwidth = UNLIMITED_BANDWIDTH
        """Bytes per second QEMU may write a full snapshot at (lower it to watch one)."""
        self.recovered_snapshot: str | None = None
        """Set by ``attach`` when it undid a full snapshot whose process had died: where
        that snapshot was going (it was never published)."""
        self._network: SandboxNetwork | None = None
        self.arch = config.arch or host_arch()
        """The guest's architecture (of the configuration it last started or restored)."""

    # ---- paths and host -----------------------------------------------------------------
    @property
    def network(self) -> SandboxNetwork:
        """The host side of the guest's network (nat and policy: its own namespace)."""
        if self._network is None or self._network.vm_dir != self.workdir:
            self._network = SandboxNetwork(self.workdir)
        return self._network

    @property
    def qmp_socket(self) -> Path:
        return self.workdir / "qmp.sock"

    @property
    def agent_socket(self) -> Path:
        return self.workdir / "agent.sock"

    @property
    def ram_file(self) -> Path:
        """Where a booted guest's RAM lives when it is a file (in /dev/shm, shared with
        QEMU: a capture for clones copies it)."""
        return SHM / f"kelpie-{self.id}.ram"

    def _ram_for(self, config: VmConfig) -> Path | None:
        """The RAM file for a guest of ``config``, or None (anonymous memory, no sharing
        for its clones) where /dev/shm is missing or too small to hold it: a guest whose
        file-backed RAM cannot grow would die of SIGBUS."""
        try:
            free = shutil.disk_usage(SHM).free
        except OSError:
            return None
        return self.ram_file if free >= config.memory_mib * SHM_MARGIN * (1 << 20) else None

    def owns_ram_file(self) -> bool:
        """Whether the running guest's RAM is its own shared file (not anonymous memory,
        nor a copy-on-write mapping of a snapshot's)."""
        return self._launch_record().get("ram") == "shared" and self.ram_file.exists()

    def host_info(self) -> HostInfo:
        return HostInfo(
            arch=self.arch,
            backend=self.backend_name,
            backend_version=qemu_version(self._qemu_binary()),
            cpu_model=cpu_model(self.arch, self.accel.accel if self.accel else "tcg"),
            machine=MACHINES[self.arch],
            guestkit_digest=self._kit_digest,
        )

    def _qemu_binary(self) -> str:
        name = f"qemu-system-{self.arch}"
        found = self._qemu or shutil.which(name)
        if found is None:
            package = {"x86_64": "qemu-system-x86", "aarch64": "qemu-system-arm"}[self.arch]
            raise BootError(f"{name} not found; install it (Debian: apt-get install {package})")
        return found

    def _start_failure_reason(self) -> str | None:
        return start_failure_reason(self.workdir)

    async def _connect_agent(self, timeout: float) -> AgentClient:
        return await AgentClient.connect_unix(str(self.agent_socket), timeout=timeout)

    # ---- start --------------------------------------------------------------------------
    async def _do_start(self) -> None:
        launch = await self._prepare_launch(self.config)
        self._prepare_workdir(launch)
        await self._boot_retrying(dataclasses.replace(launch,
                                                      overlay=await self._prepare_overlay()))

    async def _prepare_launch(self, config: VmConfig, *, incoming: bool = False) -> QemuLaunch:
        """Check ``config`` on this host, get the guest kit and accelerator: no VM yet."""
        problems = config.host_problems()
        if problems:
            raise ConfigError(problems)
        self.arch = guest_arch(config.arch).name
        qemu = self._qemu_binary()
        if self._kit is not None and self._kit.arch != self.arch:
            self._kit = None  # the kit given is another architecture's: this one's is built
        if self._kit is None:
            try:
                self._kit = await asyncio.to_thread(build_guestkit, progress=self._progress,
                                                    arch=self.arch)
            except GuestKitError as exc:
                raise BootError(f"cannot prepare the guest kit: {exc}") from exc
        kit = self._kit
        kernel = config.kernel or kit.kernel
        initrd = config.initrd or kit.initrd
        if self.arch == host_arch():
            self.accel = await asyncio.to_thread(choose_accel, qemu, kernel, initrd, kit.digest)
        else:
            self.accel = AccelChoice("tcg", f"emulated: an {self.arch} guest on an "
                                            f"{host_arch()} host")
        # The agent comes from the kit's initrd; a VM booted from another initrd has no
        # kit whose version a restore could check.
        self._kit_digest = kit.digest if config.initrd is None else None
        return QemuLaunch(
            qemu=qemu, config=config, kernel=kernel, initrd=initrd, workdir=self.workdir,
            accel=self.accel.accel, hostname=config.hostname or f"kelpie-{self.id[:8]}",
            incoming=incoming, arch=self.arch, ram=self._ram_for(config),
        )

    async def _boot_retrying(self, launch: QemuLaunch) -> None:
        """:meth:`_boot` in a prepared VM directory, once more if the guest never answered.

        A guest that never reaches its agent (seen rarely under TCG on a loaded host: the
        kernel stalls early in boot) gets a second boot; a QEMU that exits or refuses its
        arguments does not. The disk overlay stays as it is between the two.
        """
        for attempt in range(1, BOOT_ATTEMPTS + 1):
            try:
                await self._boot(launch)
                return
            except BootTimedOut as exc:
                if attempt == BOOT_ATTEMPTS:
                    raise
                _log.warning("%s\n(booting it again)", exc)
                await self._do_stop(force=True)
                self._prepare_workdir(launch)

    async def _boot(self, launch: QemuLaunch) -> None:
        """Start QEMU and wait for the guest agent's hello."""
        await self._spawn_qemu(launch)
        deadline = time.monotonic() + self.boot_timeout
        self._qmp = await self._before_exit(self._connect_qmp(), "the QMP socket", deadline)
        await self._before_exit(
            self.agent.connect(self.boot_timeout), "the agent socket", deadline
        )
        await self._before_exit(self.agent.hello(), "the guest agent's hello", deadline)

    async def _spawn_qemu(self, launch: QemuLaunch) -> None:
        """Start QEMU; with network nat or policy in the sandbox's own namespace, whose
        rules, DNS forwarder and port relays are up before it."""
        if SandboxNetwork.needed(launch.config):
            self.workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
            try:
                netns = await self.network.up(launch.config)
            except HostNetworkError as exc:
                raise BootError(f"VM {self.id}: {exc}") from exc
            launch = dataclasses.replace(launch, prefix=tuple(netns.exec_prefix()),
                                         forward_from=str(netns.address))
        self._spawn(build_command(launch), self.workdir / "qemu.log")

    async def change_network(self, config: VmConfig) -> None:
        """Apply ``config``'s network mode and rules to the running VM (and to its record,
        which an attach and a snapshot read)."""
        await self.network.change(config.network, config.egress, config)
        self._config = config
        write_vm_record(self.workdir, self.id, self.backend_name, config,
                        self._launch_record())

    async def _do_grow_disk(self, disk_mib: int) -> None:
        """Grow the overlay's virtual size (QMP ``block_resize``: the guest sees a bigger
        disk), then the guest's file system; the record follows, for attach and snapshots.
        The base image keeps its size: the overlay's new blocks read as zeros."""
        await self._qmp_execute("block_resize", device=ROOT_DRIVE, size=disk_mib << 20)
        await self._grow_guest_fs(disk_mib << 20)
        write_vm_record(self.workdir, self.id, self.backend_name,
                        self._config.evolve(disk_mib=disk_mib), self._launch_record())

    def _prepare_workdir(self, launch: QemuLaunch) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for name in ("qmp.sock", "agent.sock", "console.log", "qemu.log", "qemu.pid",
                     PENDING_RESYNC, SNAPSHOT_MARKER):
            with contextlib.suppress(FileNotFoundError):
                (self.workdir / name).unlink()
        self._drop_ram_file()  # a crashed QEMU's: a new guest must not start on old memory
        self._write_record(launch)

    def _write_record(self, launch: QemuLaunch) -> None:
        """``config.json``: the VM's config and how it was launched (for attach, snapshots)."""
        ram = None if launch.ram is None else "shared" if launch.ram_shared else "private"
        write_vm_record(self.workdir, self.id, self.backend_name, launch.config, {
            "accel": launch.accel, "hostname": launch.hostname,
            "guestkit_digest": self._kit_digest, "ram": ram,
        })

    def _launch_record(self) -> dict[str, Any]:
        """The ``launch`` part of ``config.json`` (empty when absent or unreadable)."""
        return launch_record(self.workdir)

    async def _prepare_overlay(self) -> Path | None:
        base = self.config.root_disk
        if base is None:
            return None
        if not base.is_file():
            raise BootError(f"root disk {base} does not exist or is not a file")
        overlay = self.workdir / OVERLAY
        if overlay.exists():
            return overlay  # the disk persists across stop/start, like a real disk
        fmt = _snapshot.image_format(base)
        size: list[str] = []  # none: the base's size
        if self.config.disk_mib is not None:
            base_mib = -(-base.stat().st_size // (1 << 20))
            if base_mib > self.config.disk_mib:
                raise BootError(f"root disk {base} is {base_mib} MiB, larger than the disk of "
                                f"{self.config.disk_mib} MiB asked for (disk_mib)")
            size = [f"{self.config.disk_mib}M"]
        # The overlay never grows past its virtual size (plus qcow2's metadata): a guest
        # that fills its disk gets ENOSPC, the host's disk is not touched.
        process = await asyncio.create_subprocess_exec(
            "qemu-img", "create", "-q", "-f", "qcow2", "-F", fmt, "-b", str(base.resolve()),
            str(overlay), *size, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await process.communicate()
        if process.returncode != 0:
            raise BootError(f"cannot create the disk overlay: {err.decode().strip()}")
        return overlay

    async def _connect_qmp(self) -> QMPClient:
        client = QMPClient(f"kelpie-{self.id}")
        while True:
            try:
                await client.connect(str(self.qmp_socket))
                return client
            except QMPError:
                await asyncio.sleep(0.01)  # QEMU has not created the socket yet

    # ---- stop ---------------------------------------------------------------------------
    async def _do_stop(self, *, force: bool, grace: float | None = None) -> None:
        self._stopping = True
        try:
            await self._shut_down(force, SHUTDOWN_TIMEOUT if grace is None else grace)
        finally:
            self._stopping = False

    async def _shut_down(self, force: bool, grace: float = SHUTDOWN_TIMEOUT) -> None:
        """Agent poweroff (``grace`` seconds), else QMP quit, else SIGKILL of QEMU's group;
        then clean up."""
        asks: list[tuple[Callable[[], Awaitable[object]], float]] = []
        if not force and self.agent.ready and self._state is VmState.RUNNING:
            asks.append((self._agent_poweroff, grace))
        qmp = self._qmp
        if qmp is not None:
            asks.append((lambda: qmp.execute("quit"), QUIT_TIMEOUT))
        await self._end_vmm(asks)
        for name in ("qmp.sock", "agent.sock"):
            with contextlib.suppress(FileNotFoundError):
                (self.workdir / name).unlink()

    def _is_own_vmm(self, pid: int) -> bool:
        return is_qemu_of(pid, self.qmp_socket)

    async def _release(self, *, keep_vmm: bool) -> None:
        qmp, self._qmp = self._qmp, None
        await super()._release(keep_vmm=keep_vmm)
        if qmp is not None:
            # disconnect() re-raises what ended the connection (EOFError once QEMU is gone)
            with contextlib.suppress(QMPError, OSError, EOFError):
                await qmp.disconnect()
        if not keep_vmm and (self._process is None or not self._process.running):
            await self.network.down()  # QEMU is gone: its namespace and helper go too
            self._drop_ram_file()

    def _drop_ram_file(self) -> None:
        with contextlib.suppress(OSError):
            self.ram_file.unlink()

    # ---- pause / resume -----------------------------------------------------------------
    async def _qmp_execute(self, command: str, **arguments: Any) -> object:
        if self._qmp is None:
            raise self._vmm_gone_error(f"QMP {command}")
        try:
            return await self._qmp.execute(command, arguments or None)
        except QMPError as exc:
            if not self._vmm_running():
                raise self._vmm_gone_error(f"QMP {command}") from exc
            raise VmError(f"VM {self.id}: QMP {command} failed: {exc}") from exc

    async def _do_pause(self) -> None:
        await self._qmp_execute("stop")

    async def _do_resume(self) -> None:
        await self._qmp_execute("cont")
        await self._finish_handshake(ATTACH_TIMEOUT)
