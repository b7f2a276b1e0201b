"""Every call into Apple's Virtualization.framework, in one module.

The framework is reached through pyobjc (``pyobjc-framework-Virtualization``, the ``vz``
extra, with ``pyobjc-framework-libdispatch``), imported only by :func:`load_framework`, so
that this module imports on any host; tests pass a :class:`Framework` of fakes instead.
What the framework hands back is typed ``Any``.

pyobjc spells the framework's API this way: ``Class.alloc().initWithX_y_(...)``;
properties through their accessors (``setCPUCount_(n)``, ``CPUCount()``); a method with an
``NSError **`` argument takes ``None`` there and returns ``(result, error)``; blocks are
Python callables.

Threading: a ``VZVirtualMachine`` belongs to the serial dispatch queue it was created with,
and every call to it or its socket device must be made on that queue; the framework calls
completion handlers and the delegate on it too. :class:`Machine` submits each call with
``dispatch_async`` and brings the outcome back to its asyncio loop with
``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import os
import platform
import socket
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kelpie.backends.vz._launch import VzLaunch
from kelpie.vm import NetworkMode

MIB = 1024 * 1024
MIN_MACOS = (12, 0)
"""Virtio-fs shares, the generic platform and stopping a VM arrived in macOS 12."""
SAVE_RESTORE_MACOS = (14, 0)
QUEUE_LABEL = b"dev.kelpie.vz.machine"
MODULES = ("Virtualization", "Foundation", "dispatch", "objc")
"""The pyobjc modules :func:`load_framework` imports (Foundation and objc come with
pyobjc-framework-Virtualization; dispatch is pyobjc-framework-libdispatch)."""


class VzError(Exception):
    """The framework refused or failed a request; the message quotes its own words."""


class FrameworkUnavailable(VzError):
    """Virtualization.framework cannot be used on this host (the message says why)."""


class ConfigurationRefused(VzError):
    """The framework refused the VM's configuration (validateWithError and friends)."""


@dataclasses.dataclass(frozen=True)
class Framework:
    """The modules the bridge calls: pyobjc's, or a test's fakes of them."""

    vz: Any
    """``Virtualization``: the VZ* classes."""
    foundation: Any
    """``Foundation``: NSURL, NSObject."""
    dispatch: Any
    """``dispatch`` (libdispatch): dispatch_queue_create, dispatch_async."""
    objc: Any
    """pyobjc's core: protocolNamed."""
    macos: tuple[int, ...]
    """The macOS version, e.g. (14, 5); empty when unknown."""

    @property
    def macos_version(self) -> str:
        return ".".join(str(part) for part in self.macos) or "unknown"


def load_framework() -> Framework:
    """The real framework through pyobjc; :class:`FrameworkUnavailable` says why not."""
    if platform.system() != "Darwin":  # not sys.platform: mypy would skip the rest here
        raise FrameworkUnavailable("Virtualization.framework exists only on macOS")
    modules = []
    for name in MODULES:
        try:
            modules.append(importlib.import_module(name))
        except ImportError as exc:
            raise FrameworkUnavailable(
                f"cannot import pyobjc's {name} module ({exc}); install the vz extra: "
                f"pip install 'kelpie[vz]'"
            ) from exc
    vz, foundation, dispatch, objc = modules
    return Framework(vz, foundation, dispatch, objc, macos_version())


def macos_version() -> tuple[int, ...]:
    """This Mac's version as numbers (empty when unknown, e.g. not macOS)."""
    try:
        return tuple(int(part) for part in platform.mac_ver()[0].split("."))
    except ValueError:
        return ()


def unavailable_reason(fw: Framework) -> str | None:
    """Why VMs cannot run with ``fw`` on this host, or None when they can."""
    if fw.macos < MIN_MACOS:
        return (f"this backend needs macOS {MIN_MACOS[0]} or later (virtio-fs, the generic "
                f"platform, stopping a VM); this is macOS {fw.macos_version}")
    if not fw.vz.VZVirtualMachine.isSupported():
        return ("VZVirtualMachine.isSupported() is false: this Mac (or the VM it runs in) "
                "offers no hardware virtualization")
    return None


def save_restore_problem(fw: Framework) -> str | None:
    """Why VM states cannot be saved and restored with ``fw``, or None when they can."""
    if fw.macos < SAVE_RESTORE_MACOS:
        return (f"saving a VM's state needs macOS {SAVE_RESTORE_MACOS[0]} or later "
                f"(saveMachineStateToURL); this is macOS {fw.macos_version}")
    if not hasattr(fw.vz.VZVirtualMachine, "saveMachineStateToURL_completionHandler_"):
        return ("this Mac's Virtualization.framework has no saveMachineStateToURL (the "
                "framework offers it on Apple silicon only)")
    return None


def describe(error: Any) -> str:
    """An NSError in words: its description, and its domain and code to look up."""
    if error is None:
        return "no reason given"
    text = str(error.localizedDescription())
    reason = error.localizedFailureReason()
    if reason and str(reason) not in text:
        text += f": {reason}"
    return f"{text} ({error.domain()} {error.code()})"


# ---- the configuration ------------------------------------------------------------------


def build_configuration(fw: Framework, launch: VzLaunch) -> Any:
    """The validated ``VZVirtualMachineConfiguration`` of ``launch``.

    :class:`ConfigurationRefused` quotes the framework when it refuses a part or the whole
    (a CPU count or memory size out of its range, an unreadable disk...).
    """
    vz = fw.vz
    config = vz.VZVirtualMachineConfiguration.alloc().init()
    config.setBootLoader_(_boot_loader(fw, launch))
    config.setCPUCount_(launch.config.vcpus)
    config.setMemorySize_(launch.config.memory_mib * MIB)
    config.setPlatform_(_platform(fw, launch.machine_id))
    config.setStorageDevices_(_storage(fw, launch.disk))
    config.setDirectorySharingDevices_(_shares(fw, launch))
    config.setSocketDevices_([vz.VZVirtioSocketDeviceConfiguration.alloc().init()])
    config.setSerialPorts_([_console(fw, launch.console_log)])
    config.setNetworkDevices_(_network(fw, launch))
    config.setEntropyDevices_([vz.VZVirtioEntropyDeviceConfiguration.alloc().init()])
    ok, error = config.validateWithError_(None)
    if not ok:
        raise ConfigurationRefused(
            f"Virtualization.framework refused the VM's configuration: {describe(error)}"
        )
    return config


def file_url(fw: Framework, path: Path) -> Any:
    return fw.foundation.NSURL.fileURLWithPath_(str(path))


def _boot_loader(fw: Framework, launch: VzLaunch) -> Any:
    loader = fw.vz.VZLinuxBootLoader.alloc().initWithKernelURL_(file_url(fw, launch.kernel))
    loader.setInitialRamdiskURL_(file_url(fw, launch.initrd))
    loader.setCommandLine_(launch.kernel_command_line())
    return loader


def _platform(fw: Framework, machine_id: bytes | None) -> Any:
    """The generic platform, with the machine identifier a saved state needs again."""
    vz = fw.vz
    configuration = vz.VZGenericPlatformConfiguration.alloc().init()
    if machine_id is not None:
        identifier = vz.VZGenericMachineIdentifier.alloc().initWithDataRepresentation_(
            machine_id
        )
        if identifier is None:
            raise ConfigurationRefused(
                "the recorded machine identifier is not one this framework reads (a "
                "snapshot from another macOS version?)"
            )
        configuration.setMachineIdentifier_(identifier)
    return configuration


def _storage(fw: Framework, disk: Path | None) -> list[Any]:
    if disk is None:
        return []
    attachment, error = fw.vz.VZDiskImageStorageDeviceAttachment.alloc() \
        .initWithURL_readOnly_error_(file_url(fw, disk), False, None)
    if attachment is None:
        raise ConfigurationRefused(f"Virtualization.framework cannot attach the root disk "
                                   f"{disk}: {describe(error)}")
    return [fw.vz.VZVirtioBlockDeviceConfiguration.alloc().initWithAttachment_(attachment)]


def _shares(fw: Framework, launch: VzLaunch) -> list[Any]:
    """One virtio-fs device per mount, its tag the mount's, read-only as the mount says."""
    vz = fw.vz
    devices = []
    for index, mount in enumerate(launch.config.mounts):
        tag = launch.config.mount_tag(index)
        ok, error = vz.VZVirtioFileSystemDeviceConfiguration.validateTag_error_(tag, None)
        if not ok:
            raise ConfigurationRefused(f"share tag {tag!r} of {mount.host_path}: "
                                       f"{describe(error)}")
        directory = vz.VZSharedDirectory.alloc().initWithURL_readOnly_(
            file_url(fw, mount.host_path), mount.read_only
        )
        device = vz.VZVirtioFileSystemDeviceConfiguration.alloc().initWithTag_(tag)
        device.setShare_(vz.VZSingleDirectoryShare.alloc().initWithDirectory_(directory))
        devices.append(device)
    return devices


def _console(fw: Framework, log: Path) -> Any:
    """A virtio console (the guest's hvc0) writing to ``log``."""
    attachment, error = fw.vz.VZFileSerialPortAttachment.alloc().initWithURL_append_error_(
        file_url(fw, log), False, None
    )
    if attachment is None:
        raise ConfigurationRefused(f"cannot write the console to {log}: {describe(error)}")
    port = fw.vz.VZVirtioConsoleDeviceSerialPortConfiguration.alloc().init()
    port.setAttachment_(attachment)
    return port


def _network(fw: Framework, launch: VzLaunch) -> list[Any]:
    if launch.config.network is NetworkMode.NONE:
        return []
    device = fw.vz.VZVirtioNetworkDeviceConfiguration.alloc().init()
    device.setAttachment_(fw.vz.VZNATNetworkDeviceAttachment.alloc().init())
    if launch.mac_address is not None:  # a restored guest keeps the address it had
        address = fw.vz.VZMACAddress.alloc().initWithString_(launch.mac_address)
        if address is None:
            raise ConfigurationRefused(f"the recorded MAC address {launch.mac_address!r} "
                                       f"is not one")
        device.setMACAddress_(address)
    return [device]


def machine_identity(configuration: Any) -> tuple[bytes, str | None]:
    """What a saved state must find again in the machine it is restored into: the machine
    identifier's data and the NIC's MAC address (None without a NIC)."""
    identifier = configuration.platform().machineIdentifier()
    networks = configuration.networkDevices()
    mac = str(networks[0].MACAddress().string()) if networks else None
    return bytes(identifier.dataRepresentation()), mac


# ---- the delegate -----------------------------------------------------------------------

_DELEGATE_CLASSES: dict[int, tuple[Any, Any]] = {}
"""Per Foundation module: the delegate class made for it (an Objective-C class is made once
per process) and the module, kept so that its id is not reused."""
DELEGATE_CLASS_NAME = "KelpieVzMachineDelegate"


def _guest_did_stop(self: Any, machine: Any) -> None:
    self.kelpie_on_stop("the guest powered itself off")


def _did_stop_with_error(self: Any, machine: Any, error: Any) -> None:
    self.kelpie_on_stop(f"Virtualization.framework stopped the VM: {describe(error)}")


def _delegate_class(fw: Framework) -> Any:
    known = _DELEGATE_CLASSES.get(id(fw.foundation))
    if known is not None:
        return known[1]

    def body(namespace: dict[str, Any]) -> None:
        namespace["guestDidStopVirtualMachine_"] = _guest_did_stop
        namespace["virtualMachine_didStopWithError_"] = _did_stop_with_error

    protocol = fw.objc.protocolNamed("VZVirtualMachineDelegate")
    cls = types.new_class(DELEGATE_CLASS_NAME, (fw.foundation.NSObject,),
                          {"protocols": [protocol]}, body)
    _DELEGATE_CLASSES[id(fw.foundation)] = (fw.foundation, cls)
    return cls


# ---- the machine ------------------------------------------------------------------------


class Machine:
    """One ``VZVirtualMachine`` on its own dispatch queue, driven from an asyncio loop.

    ``on_stop(reason)`` is called on the loop when the VM stops by itself (the guest
    powered off, or the framework stopped it with an error), not when :meth:`stop` stops
    it. Create it from a coroutine, then ``await create()``.
    """

    def __init__(self, fw: Framework, configuration: Any,
                 on_stop: Callable[[str], None]) -> None:
        self._fw = fw
        self.configuration = configuration
        self._loop = asyncio.get_running_loop()
        self._queue = fw.dispatch.dispatch_queue_create(QUEUE_LABEL, None)
        self._on_stop = on_stop
        # The VM holds its delegate weakly: this object keeps it alive.
        self._delegate = _delegate_class(fw).alloc().init()
        self._delegate.kelpie_on_stop = self._stopped_on_queue
        self._vm: Any = None
        self._started = False
        self.stop_reason: str | None = None
        """Why the VM stopped (None while it has not)."""
        self._stopped = asyncio.Event()

    @property
    def running(self) -> bool:
        """Whether the VM was created and has not stopped (running, paused or starting)."""
        return self._vm is not None and self.stop_reason is None

    async def create(self) -> None:
        """Make the VZVirtualMachine (on its queue) with this object as its delegate."""
        def make() -> Any:
            vm = self._fw.vz.VZVirtualMachine.alloc().initWithConfiguration_queue_(
                self.configuration, self._queue)
            vm.setDelegate_(self._delegate)
            return vm

        self._vm = await self._on_queue(make, "create the VM")

    async def start(self) -> None:
        await self._call("start", lambda vm, done: vm.startWithCompletionHandler_(done))
        self._started = True

    async def pause(self) -> None:
        await self._call("pause", lambda vm, done: vm.pauseWithCompletionHandler_(done))

    async def resume(self) -> None:
        await self._call("resume", lambda vm, done: vm.resumeWithCompletionHandler_(done))

    async def stop(self) -> None:
        """Stop the VM at once (the guest is not asked; see the agent's poweroff)."""
        if self.running and self._started:  # the framework refuses to stop an unstarted VM
            await self._call("stop", lambda vm, done: vm.stopWithCompletionHandler_(done))
        self._mark_stopped("stopped by Kelpie", notify=False)

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def save(self, path: Path) -> None:
        """Write the paused VM's state (memory and devices) to the new file ``path``."""
        validate = getattr(self.configuration, "validateSaveRestoreSupportWithError_", None)
        if validate is not None:
            ok, error = validate(None)
            if not ok:
                raise VzError(f"this VM's configuration cannot be saved: {describe(error)}")
        url = file_url(self._fw, path)
        await self._call("save the VM's state",
                         lambda vm, done: vm.saveMachineStateToURL_completionHandler_(url, done))

    async def restore(self, path: Path) -> None:
        """Load a saved state into this created, never started VM; it is then paused."""
        url = file_url(self._fw, path)
        await self._call(
            "restore the VM's state",
            lambda vm, done: vm.restoreMachineStateFromURL_completionHandler_(url, done))
        self._started = True

    async def connect(self, port: int) -> socket.socket:
        """A stream to the guest's vsock ``port`` (VzError while nothing listens there)."""
        self._created("connect")
        future: asyncio.Future[int] = self._loop.create_future()

        def done(connection: Any, error: Any) -> None:  # on the VM's queue
            if connection is None:
                self._settle(future, error=VzError(f"vsock port {port}: {describe(error)}"))
                return
            try:
                # The connection owns its descriptor and closes it with itself: keep a dup.
                fd = os.dup(connection.fileDescriptor())
            except OSError as exc:
                self._settle(future, error=VzError(f"vsock port {port}: {exc}"))
                return
            finally:
                connection.close()
            self._settle(future, fd, discard=os.close)

        def submit() -> None:
            devices = self._vm.socketDevices()
            if not devices:
                raise VzError("the VM has no socket device")
            devices[0].connectToPort_completionHandler_(port, done)

        self._submit(future, submit, f"connect to vsock port {port}")
        return stream_socket(await future)

    # ---- queue plumbing -----------------------------------------------------------------
    def _submit(self, future: asyncio.Future[Any], call: Callable[[], None], what: str) -> None:
        def run() -> None:  # on the VM's queue
            try:
                call()
            except Exception as exc:
                self._settle(future, error=exc if isinstance(exc, VzError)
                             else VzError(f"{what}: {exc!r}"))

        self._fw.dispatch.dispatch_async(self._queue, run)

    def _created(self, what: str) -> None:
        if self._vm is None:
            raise VzError(f"{what}: the VM was not created (call create() first)")

    async def _on_queue(self, call: Callable[[], Any], what: str) -> Any:
        future: asyncio.Future[Any] = self._loop.create_future()
        self._submit(future, lambda: self._settle(future, call()), what)
        return await future

    async def _call(self, what: str, invoke: Callable[[Any, Callable[[Any], None]], None]) -> None:
        """``invoke(vm, done)`` on the queue; the framework calls ``done(error)`` there."""
        self._created(what)
        future: asyncio.Future[None] = self._loop.create_future()

        def done(error: Any) -> None:
            if error is None:
                self._settle(future, None)
            else:
                self._settle(future, error=VzError(f"{what}: {describe(error)}"))

        self._submit(future, lambda: invoke(self._vm, done), what)
        await future

    def _settle(self, future: asyncio.Future[Any], result: Any = None,
                error: BaseException | None = None,
                discard: Callable[[Any], None] | None = None) -> None:
        """From the queue: hand ``result`` (or ``error``) to ``future`` on the loop;
        ``discard(result)`` releases a result nobody waits for any more."""
        try:
            self._loop.call_soon_threadsafe(_resolve, future, result, error, discard)
        except RuntimeError:  # the loop closed
            if discard is not None and error is None:
                discard(result)

    def _stopped_on_queue(self, reason: str) -> None:
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._mark_stopped, reason)

    def _mark_stopped(self, reason: str, *, notify: bool = True) -> None:
        if self.stop_reason is not None:
            return
        self.stop_reason = reason
        self._stopped.set()
        if notify:
            self._on_stop(reason)


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None,
             discard: Callable[[Any], None] | None) -> None:
    if future.done():  # its waiter gave up (cancelled)
        if discard is not None and error is None:
            discard(result)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def stream_socket(fd: int) -> socket.socket:
    """A socket object owning ``fd``, a connected stream socket (a vsock connection)."""
    try:
        return socket.socket(fileno=fd)
    except OSError:
        # Its address family could not be read back: the family matters to no call asyncio
        # makes on a connected stream, only the descriptor does.
        return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fileno=fd)
