"""FirecrackerMachine: one Firecracker process of a VM: its launch, API, pause, resume, stop.

Each VM owns one directory (see DESIGN.md): ``api.sock`` (Firecracker's API),
``vsock.sock`` (the host end of the guest's vsock: hybrid vsock, ``CONNECT``/``OK``),
``rootfs.ext4`` (the VM's writable root disk: a copy of the image's ext4, sparse and
reflinked where the filesystem can), ``firecracker.log`` (the serial console and
Firecracker's own log), ``firecracker.pid``, ``config.json`` and, after a restore that left
the guest paused, ``pending-resync.json``.

Firecracker runs with the VM directory as its working directory and is given the disk and
the vsock socket by *relative* path. A snapshot records the paths it was given, and
Firecracker cannot be told other drive paths when it loads one; relative paths make the
snapshot of one VM directory load in any other (what the jailer's chroot does for jailed
VMs).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, ClassVar

from kelpie import _fsutil as fsutil
from kelpie.agent import (
    AgentClient,
    ProcessVm,
    launch_record,
    write_vm_record,
)
from kelpie.backends.firecracker import CAPABILITIES
from kelpie.backends.firecracker._api import FirecrackerApi, FirecrackerApiError
from kelpie.backends.firecracker._host import (
    BOOT_ARGS,
    find_binary,
    firecracker_version,
)
from kelpie.guestkit import GuestKit, GuestKitError, build_guestkit, kernel_cmdline
from kelpie.vm import BootError, ConfigError, HostInfo, NetworkMode, VmConfig, VmError, VmState

_log = logging.getLogger(__name__)

AGENT_PORT = 1024
"""The guest's vsock port the agent listens on (``kelpie.vsock=``)."""
DEFAULT_BOOT_TIMEOUT = 60.0
SHUTDOWN_TIMEOUT = 5.0
QUIT_TIMEOUT = 3.0
ATTACH_TIMEOUT = 30.0
MAX_SOCKET_PATH = 100  # sun_path is 108 bytes including the NUL; keep a margin
DISK = "rootfs.ext4"
VSOCK = "vsock.sock"
PENDING_RESYNC = "pending-resync.json"
STATES = {"Running": VmState.RUNNING, "Paused": VmState.PAUSED}
"""Firecracker's ``GET /`` states of a guest that exists (``Not started`` is not one)."""


class FirecrackerMachine(ProcessVm):
    """A VM run by one Firecracker process: boot, pause/resume, stop, attach (no snapshots)."""

    backend_name = "firecracker"
    capabilities = CAPABILITIES
    vmm_name: ClassVar[str] = "Firecracker"
    vmm_logs: ClassVar[tuple[str, ...]] = ("firecracker.log",)
    vmm_errors: ClassVar[tuple[type[Exception], ...]] = (VmError, OSError)
    pid_file_name: ClassVar[str] = "firecracker.pid"

    def __init__(
        self,
        config: VmConfig,
        *,
        vm_id: str | None = None,
        workdir: Path | None = None,
        kit: GuestKit | None = None,
        boot_timeout: float = DEFAULT_BOOT_TIMEOUT,
        firecracker: str | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(config, vm_id=vm_id, workdir=workdir, boot_timeout=boot_timeout)
        if len(str(self.workdir / "api.sock")) > MAX_SOCKET_PATH:
            raise ConfigError([
                f"VM directory {self.workdir} is too long for unix sockets "
                f"(at most {MAX_SOCKET_PATH - 9} characters); set KELPIE_STATE_DIR shorter"
            ])
        self._kit = kit
        self._binary = firecracker
        self._progress = progress or logging.getLogger("kelpie.guestkit").info
        self._api: FirecrackerApi | None = None
        self._kit_digest: str | None = kit.digest if kit is not None else None

    # ---- paths and host -----------------------------------------------------------------
    @property
    def api_socket(self) -> Path:
        return self.workdir / "api.sock"

    @property
    def disk(self) -> Path:
        return self.workdir / DISK

    @property
    def api(self) -> FirecrackerApi:
        """The API of the Firecracker process running now (:class:`VmCrashed` if none)."""
        if self._api is None:
            raise self._vmm_gone_error("an API request")
        return self._api

    def firecracker_binary(self) -> str:
        found = find_binary(self._binary)
        if found is None:
            raise BootError(
                "firecracker not found: set KELPIE_FIRECRACKER_BIN or put it on PATH "
                "(releases: https://github.com/firecracker-microvm/firecracker/releases)"
                + (f"; {self._binary} is not executable" if self._binary else ""))
        return found

    def host_info(self) -> HostInfo:
        binary = find_binary(self._binary)
        return HostInfo(
            arch=HostInfo.current_arch(), backend=self.backend_name,
            backend_version=firecracker_version(binary) if binary else "unknown",
            cpu_model="host", machine="firecracker", guestkit_digest=self._kit_digest,
        )

    async def _connect_agent(self, timeout: float) -> AgentClient:
        return await AgentClient.connect_hybrid_vsock(str(self.workdir / VSOCK), AGENT_PORT,
                                                      timeout=timeout)

    def _is_own_vmm(self, pid: int) -> bool:
        """Whether ``pid`` is a Firecracker serving this VM's API socket."""
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        own = str(self.api_socket).encode()
        return any(a == b"--api-sock" and b == own for a, b in itertools.pairwise(argv))

    # ---- start --------------------------------------------------------------------------
    async def _do_start(self) -> None:
        config = await self._prepare(self.config)
        self._prepare_workdir(config)
        await self._prepare_disk(config)
        await self._boot(config)

    async def _prepare(self, config: VmConfig) -> VmConfig:
        """Check ``config`` on this host and get the guest kit: no VM yet."""
        problems = config.host_problems()
        if config.network is not NetworkMode.NONE or config.ports:
            problems.append(
                f"network {config.network.value} (and published ports) is not supported by "
                f"the firecracker backend yet: it needs a tap device in the sandbox's network "
                f"namespace; use network none, or the qemu backend")
        if config.mounts:
            problems.append(
                "Firecracker has no shared directories (no virtio-fs or 9p): remove the "
                "mounts, copy files in with write_file, or use the qemu backend")
        if problems:
            raise ConfigError(problems)
        self.firecracker_binary()
        if self._kit is None:
            try:
                self._kit = await asyncio.to_thread(build_guestkit, progress=self._progress)
            except GuestKitError as exc:
                raise BootError(f"cannot prepare the guest kit: {exc}") from exc
        self._kit_digest = self._kit.digest if config.initrd is None else None
        return config

    def _hostname(self, config: VmConfig) -> str:
        return config.hostname or f"kelpie-{self.id[:8]}"

    def _prepare_workdir(self, config: VmConfig) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for name in ("api.sock", VSOCK, "firecracker.log", self.pid_file_name, PENDING_RESYNC):
            with contextlib.suppress(FileNotFoundError):
                (self.workdir / name).unlink()
        self._write_record(config)

    def _write_record(self, config: VmConfig) -> None:
        write_vm_record(self.workdir, self.id, self.backend_name, config, {
            "hostname": self._hostname(config), "guestkit_digest": self._kit_digest})

    def _launch_record(self) -> dict[str, Any]:
        return launch_record(self.workdir)

    async def _prepare_disk(self, config: VmConfig) -> None:
        """The VM's own writable copy of the image's ext4 (kept across stop and start, like
        a real disk)."""
        base = config.root_disk
        if base is None or self.disk.exists():
            return
        if not base.is_file():
            raise BootError(f"root disk {base} does not exist or is not a file")
        await copy_sparse(base, self.disk)

    async def _spawn_firecracker(self) -> FirecrackerApi:
        """Start Firecracker in the VM directory and wait for its API to answer."""
        binary = self.firecracker_binary()
        command = ["env", "-C", str(self.workdir), binary, "--api-sock", str(self.api_socket),
                   "--id", self.id]
        self._spawn(command, self.workdir / "firecracker.log")
        deadline = time.monotonic() + self.boot_timeout
        self._api = FirecrackerApi(self.api_socket)
        await self._before_exit(self._wait_for_api(self._api), "the API socket", deadline)
        return self._api

    @staticmethod
    async def _wait_for_api(api: FirecrackerApi) -> None:
        while True:
            try:
                await api.describe()
                return
            except FirecrackerApiError:
                raise
            except VmError:
                await asyncio.sleep(0.01)  # Firecracker has not created the socket yet

    async def _configure(self, api: FirecrackerApi, config: VmConfig) -> None:
        """Everything Firecracker needs before InstanceStart."""
        assert self._kit is not None
        try:
            boot_args = kernel_cmdline(
                hostname=self._hostname(config),
                root_device="/dev/vda" if config.root_disk is not None else None,
                agent_vsock_port=AGENT_PORT, extra=(*BOOT_ARGS, *config.kernel_args))
        except ValueError as exc:
            raise ConfigError([f"cannot pass this configuration to the guest: {exc}"]) from exc
        await api.set_machine(vcpus=config.vcpus, memory_mib=config.memory_mib)
        await api.set_boot_source(config.kernel or self._kit.kernel,
                                  initrd=config.initrd or self._kit.initrd, boot_args=boot_args)
        if config.root_disk is not None:
            await api.add_drive("rootfs", Path(DISK))  # relative: see the module's docstring
        await api.set_vsock(Path(VSOCK))

    async def _boot(self, config: VmConfig) -> None:
        """Start Firecracker, configure and start the guest, wait for the agent's hello."""
        api = await self._spawn_firecracker()
        deadline = time.monotonic() + self.boot_timeout
        await self._before_exit(self._configure(api, config), "configuring the VM", deadline)
        await self._before_exit(api.start(), "InstanceStart", deadline)
        await self._before_exit(self.agent.connect(self.boot_timeout),
                                f"the agent on vsock port {AGENT_PORT}", deadline)
        await self._before_exit(self.agent.hello(), "the guest agent's hello", deadline)

    # ---- stop ---------------------------------------------------------------------------
    async def _do_stop(self, *, force: bool, grace: float | None = None) -> None:
        self._stopping = True
        try:
            asks: list[tuple[Callable[[], Awaitable[object]], float]] = []
            if not force and self.agent.ready and self._state is VmState.RUNNING:
                asks.append((self._agent_poweroff, SHUTDOWN_TIMEOUT if grace is None else grace))
            api = self._api
            if api is not None and self._state is VmState.RUNNING:
                asks.append((api.ctrl_alt_del, QUIT_TIMEOUT))  # reboot=k: Firecracker exits
            await self._end_vmm(asks)
            for name in ("api.sock", VSOCK):
                with contextlib.suppress(FileNotFoundError):
                    (self.workdir / name).unlink()
        finally:
            self._stopping = False

    async def _release(self, *, keep_vmm: bool) -> None:
        api, self._api = self._api, None
        await super()._release(keep_vmm=keep_vmm)
        if api is not None:
            await api.close()

    # ---- pause / resume -----------------------------------------------------------------
    async def _do_pause(self) -> None:
        await self._unless_gone(self.api.pause(), "pause")

    async def _do_resume(self) -> None:
        await self._unless_gone(self.api.resume(), "resume")
        await self._finish_handshake(ATTACH_TIMEOUT)
        await self._resync_pending(self.workdir / PENDING_RESYNC)

    # ---- re-attach ----------------------------------------------------------------------
    async def _reconnect(self, timeout: float) -> tuple[VmState, str]:
        """Connect the API, read the guest's state, connect the agent (hello if it runs)."""
        deadline = time.monotonic() + timeout
        self._api = FirecrackerApi(self.api_socket)
        info = await self._before_exit(self._api.describe(), "Firecracker's API", deadline,
                                       timeout)
        state = STATES.get(str(info.get("state")), VmState.CRASHED)
        await self._before_exit(self.agent.connect(timeout), "the agent's vsock port",
                                deadline, timeout)
        if state is VmState.RUNNING:
            await self._before_exit(
                self.agent.hello(), "the agent's hello (is another process attached?)",
                deadline, timeout)
        return state, f"Firecracker reports the guest {info.get('state')!r}"

    def _vmm_gone_cleanup(self) -> None:
        for name in ("api.sock", VSOCK):
            with contextlib.suppress(FileNotFoundError):
                (self.workdir / name).unlink()


async def copy_sparse(source: Path, target: Path) -> None:
    """Copy a disk image, holes kept and blocks shared where the filesystem can (reflink)."""
    try:
        await asyncio.to_thread(fsutil.copy_sparse, source, target)
    except OSError as exc:
        raise BootError(str(exc)) from exc
