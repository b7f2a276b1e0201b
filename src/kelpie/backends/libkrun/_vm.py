"""LibkrunVm: a micro-VM run by libkrun in a child process of its own.

The VM directory holds ``launch.json`` (what the child configures, see :mod:`._launch`),
``libkrun.pid``, ``libkrun.log`` (the child's own output), ``console.log`` (the guest's
console), ``agent.sock`` (libkrun's end of the agent's vsock port), ``rootfs/`` (the VM's
root directory, see :mod:`._root`) and ``config.json`` (for attach and snapshots).

libkrun has no pause, snapshot or restore API (v1.19.0), so a LibkrunVm has neither;
checkpoints (the workspace, through the agent) are taken and restored by booting fresh.
libkrun's default networking (TSI) lets the guest use the host's sockets unfiltered, so
the VM has no network: Kelpie could not enforce its egress rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import ClassVar, Self

from kelpie._paths import vms_dir
from kelpie.agent import (
    AgentClient,
    ProcessVm,
    check_vm_id,
    read_vm_record,
    write_vm_record,
)
from kelpie.backends.libkrun import CAPABILITIES, _root
from kelpie.backends.libkrun._binding import find_library
from kelpie.backends.libkrun._kitroot import kit_root
from kelpie.backends.libkrun._launch import RESERVED_TAGS, Launch, shares_of
from kelpie.guestkit import GuestKit, GuestKitError, build_guestkit
from kelpie.vm import (
    BootError,
    ConfigError,
    NetworkMode,
    SnapshotKind,
    UnsupportedOperation,
    VmConfig,
    VmSnapshot,
    VmState,
    capture_checkpoint,
    checkpoint_config,
    read_checkpoint,
    replay_checkpoint,
)

DEFAULT_BOOT_TIMEOUT = 60.0
"""Seconds from the child's start to the agent's hello."""
SHUTDOWN_TIMEOUT = 5.0
TERM_TIMEOUT = 3.0
ATTACH_TIMEOUT = 30.0
MAX_SOCKET_PATH = 100  # sun_path is 108 bytes including the NUL; keep a margin
LAUNCH = "launch.json"
CHILD_MODULE = "kelpie.backends.libkrun._child"
NO_API = "libkrun has no pause, snapshot or restore API (v1.19.0)"


class LibkrunVm(ProcessVm):
    """A VM run by libkrun: boot, stop, attach and checkpoints; guest work via its agent."""

    backend_name = "libkrun"
    capabilities = CAPABILITIES
    vmm_name: ClassVar[str] = "libkrun"
    vmm_logs: ClassVar[tuple[str, ...]] = ("console.log", "libkrun.log")
    pid_file_name: ClassVar[str] = "libkrun.pid"

    def __init__(
        self,
        config: VmConfig,
        *,
        vm_id: str | None = None,
        workdir: Path | None = None,
        kit: GuestKit | None = None,
        kit_root: Path | None = None,
        library: str | None = None,
        vmm_env: dict[str, str] | None = None,
        boot_timeout: float = DEFAULT_BOOT_TIMEOUT,
    ) -> None:
        """``kit_root``: the guest's own tree (default: the guest kit's, unpacked);
        ``library``: libkrun's path (default :func:`find_library`); ``vmm_env``: extra
        environment of the child process."""
        super().__init__(config, vm_id=vm_id, workdir=workdir, boot_timeout=boot_timeout)
        if config.network is not NetworkMode.NONE:
            raise ConfigError([
                f"backend libkrun runs VMs without a network (network none): its networking "
                f"(TSI) gives the guest the host's sockets, which Kelpie cannot filter; "
                f"network {config.network.value} needs another backend (qemu)"
            ])
        self._kit = kit
        self._kit_root = kit_root
        self._library = library
        self._vmm_env = dict(vmm_env or {})

    # ---- paths --------------------------------------------------------------------------
    @property
    def agent_socket(self) -> Path:
        return self.workdir / "agent.sock"

    @property
    def launch_file(self) -> Path:
        return self.workdir / LAUNCH

    async def _connect_agent(self, timeout: float) -> AgentClient:
        return await AgentClient.connect_unix(str(self.agent_socket), timeout=timeout)

    def _require_capability(self, present: bool, operation: str, capability: str) -> None:
        try:
            super()._require_capability(present, operation, capability)
        except UnsupportedOperation as exc:
            raise UnsupportedOperation(self.backend_name, f"{operation} ({NO_API})",
                                       exc.supported_by) from None

    # ---- start --------------------------------------------------------------------------
    async def _do_start(self) -> None:
        await self._boot(await self._prepare_launch(self.config))

    async def _prepare_launch(self, config: VmConfig) -> Launch:
        """Check ``config`` here, find libkrun, prepare both roots; write ``launch.json``."""
        problems = config.host_problems()
        if len(str(self.agent_socket)) > MAX_SOCKET_PATH:
            problems.append(f"VM directory {self.workdir} is too long for unix sockets (at "
                            f"most {MAX_SOCKET_PATH - 11} characters); set KELPIE_STATE_DIR "
                            f"shorter")
        problems += [f"mount tag {config.mount_tag(i)!r} is reserved by the libkrun backend; "
                     f"give the mount another tag" for i in range(len(config.mounts))
                     if config.mount_tag(i) in RESERVED_TAGS]
        if problems:
            raise ConfigError(problems)
        library = self._library or find_library()
        guest_tree = self._kit_root or await self._unpacked_kit()
        source = _root.root_source(config.root_disk, guest_tree)
        self.workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for name in ("agent.sock", "console.log", "libkrun.log", self.pid_file_name):
            (self.workdir / name).unlink(missing_ok=True)
        launch = Launch(
            library=library, vcpus=config.vcpus, memory_mib=config.memory_mib,
            kit_root=str(guest_tree), vm_root=str(await _root.prepare_root(source, self.workdir)),
            agent_socket=str(self.agent_socket), console=str(self.workdir / "console.log"),
            hostname=config.hostname or f"kelpie-{self.id[:8]}",
            shares=shares_of(config),
            guest_env=dict(config.env), vmm_env=self._vmm_env,
        )
        self.launch_file.write_text(launch.to_json())
        write_vm_record(self.workdir, self.id, self.backend_name, config,
                        {"library": library, "kit_root": str(guest_tree),
                         "hostname": launch.hostname})
        return launch

    async def _unpacked_kit(self) -> Path:
        if self._kit is None:
            try:
                self._kit = await asyncio.to_thread(build_guestkit)
            except GuestKitError as exc:
                raise BootError(f"cannot prepare the guest kit: {exc}") from exc
        return await asyncio.to_thread(kit_root, self._kit.initrd)

    async def _boot(self, launch: Launch) -> None:
        """Start the child process, connect to the agent, hello, name the guest."""
        command = [sys.executable, "-m", CHILD_MODULE, str(self.launch_file)]
        self._spawn(command, self.workdir / "libkrun.log")
        deadline = time.monotonic() + self.boot_timeout
        await self._before_exit(self.agent.connect(self.boot_timeout), "the agent socket",
                                deadline)
        await self._before_exit(self.agent.hello(), "the guest agent's hello", deadline)
        # libkrun has no call to name the guest: its agent does, once it answers
        assert self.agent.client is not None
        await self._before_exit(self.agent.client.resync(hostname=launch.hostname),
                                "naming the guest", deadline)

    # ---- stop ---------------------------------------------------------------------------
    async def _do_stop(self, *, force: bool, grace: float | None = None) -> None:
        """The agent's shutdown (the guest powers off, which ends the child), else SIGTERM,
        else SIGKILL of the child's group; then the socket goes."""
        asks: list[tuple[Callable[[], Awaitable[object]], float]] = []
        if not force and self.agent.ready and self._state is VmState.RUNNING:
            asks.append((self._agent_poweroff, SHUTDOWN_TIMEOUT if grace is None else grace))
        asks.append((self._terminate, TERM_TIMEOUT))
        self._stopping = True
        try:
            await self._end_vmm(asks)
        finally:
            self._stopping = False
        self.agent_socket.unlink(missing_ok=True)

    async def _terminate(self) -> None:
        process = self._process or self._unwatched_vmm()
        if process is not None and not process.has_exited():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGTERM)

    # ---- re-attach ----------------------------------------------------------------------
    @classmethod
    async def attach(
        cls, vm_id: str, *, workdir: Path | None = None, timeout: float = ATTACH_TIMEOUT
    ) -> Self:
        """Reconnect to a VM an earlier process started, from its VM directory: RUNNING
        with its agent's held execs, or CRASHED (``crash_reason`` says why) when its
        child is gone. :class:`VmError` when the directory holds no libkrun VM."""
        check_vm_id(vm_id)
        directory = workdir or vms_dir() / vm_id
        vm = cls(read_vm_record(directory, vm_id, cls.backend_name), vm_id=vm_id,
                 workdir=directory)
        await vm._reattach(timeout)
        return vm

    def _is_own_vmm(self, pid: int) -> bool:
        """Whether ``pid`` is a libkrun child started with this VM's ``launch.json``."""
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return CHILD_MODULE.encode() in argv and os.fsencode(self.launch_file) in argv

    async def _reconnect(self, timeout: float) -> tuple[VmState, str]:
        deadline = time.monotonic() + timeout
        await self._before_exit(self.agent.connect(timeout), "the agent socket", deadline,
                                timeout)
        await self._before_exit(self.agent.hello(),
                                "the agent's hello (is another process attached?)", deadline,
                                timeout)
        return VmState.RUNNING, "libkrun VMs are never paused"

    # ---- checkpoints (see kelpie.vm._checkpoint) ----------------------------------------
    async def _do_snapshot(self, dest: Path, kind: SnapshotKind) -> VmSnapshot:
        return await capture_checkpoint(self, dest)  # the only kind in CAPABILITIES

    async def _do_restore(self, snapshot: VmSnapshot, *, paused: bool) -> None:
        """Boot fresh from this VM's configuration (its root copied anew from its source),
        then write the checkpoint's workspace back; the old root returns if that fails."""
        if paused:
            raise UnsupportedOperation(self.backend_name, f"a restore left paused ({NO_API})")
        content = read_checkpoint(snapshot, self)
        config = checkpoint_config(self._config, content)
        old_config = self._config
        kept = await asyncio.to_thread(_root.set_aside, self.workdir)
        try:
            self._config = config
            await self._boot(await self._prepare_launch(config))
            await replay_checkpoint(self, content)
        except BaseException:
            with contextlib.suppress(Exception):
                await self._do_stop(force=True)
            self._config = old_config
            with contextlib.suppress(OSError):
                await asyncio.to_thread(_root.put_back, self.workdir, kept)
            raise
        if kept is not None:
            await asyncio.to_thread(shutil.rmtree, kept, True)

