"""A stand-in for Apple's Virtualization.framework (as pyobjc presents it), for Linux hosts.

It models the part of the framework the vz backend's bridge calls, the way pyobjc spells it
(``alloc().initWith...``, accessors ``x()`` / ``setX_()``, ``(result, error)`` for an
``NSError **`` argument), and refuses anything else: an accessor its classes do not list
raises AttributeError, as a misspelt selector would. It records how the bridge built each
configuration (``FakeHost.machines``) and behaves like the framework where the backend
relies on it:

* a VM belongs to its dispatch queue: each fake queue is one thread, every VM and socket
  device method checks it runs there (a violation is recorded in ``FakeHost.violations``
  and raised), and completion handlers and the delegate are called there, later;
* the VM holds its delegate weakly;
* ``start`` boots a stand-in guest: the real guest agent as a host process (see
  ``fake_guest.py``: own UTS and mount namespaces, commands chrooted into a scratch busybox
  root), its host name and vsock port read from the kernel command line, its log in the
  console file. ``connectToPort`` on that port gives a connection whose ``fileDescriptor``
  is a unix socket connected to the agent, and fails (ECONNREFUSED) until the agent listens,
  as while a guest boots; other ports fail (ECONNRESET);
* ``pause``/``resume`` are SIGSTOP/SIGCONT of the agent and every process below it;
* the agent exiting on its own (a shutdown through the agent) is the guest powering off:
  ``guestDidStopVirtualMachine_``; :meth:`FakeHost.crash` is the framework stopping a VM
  with an error: ``virtualMachine_didStopWithError_``;
* with macOS 14 (``FakeHost(macos=(14, 0))``), ``saveMachineStateToURL`` (paused VMs only)
  writes a tar of the stand-in guest's root with a header describing the machine, and
  ``restoreMachineStateFromURL`` (a never started VM only) refuses a header that does not
  match its own configuration (CPUs, memory, command line, devices, machine identifier),
  else unpacks the root and leaves the guest paused. This models memory-and-disk state as
  the guest's files only: processes do not survive a save, and the disk image attached to
  the VM is not what the stand-in guest sees. With macOS 13 the VM class has neither
  method, as the real one lacks them there.
"""

# ruff: noqa: N802  # the framework's own method names (pyobjc spells them so)
from __future__ import annotations

import contextlib
import errno
import io
import itertools
import json
import os
import queue
import secrets
import shutil
import signal
import socket
import subprocess
import tarfile
import threading
import time
import types
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from fake_guest import agent_argv, scratch_root
from kelpie.backends.vz._bridge import Framework

STOPPED, RUNNING, PAUSED, ERROR, STARTING = 0, 1, 2, 3, 4
"""VZVirtualMachineState values (the framework's own numbers)."""
DELEGATE_SELECTORS = frozenset({
    "guestDidStopVirtualMachine_", "virtualMachine_didStopWithError_",
    "virtualMachine_networkDevice_attachmentWasDisconnectedWithError_",
})
MIB = 1024 * 1024


class FakeNSError:
    def __init__(self, description: str, *, domain: str = "VZErrorDomain", code: int = 1,
                 reason: str | None = None) -> None:
        self._description, self._domain, self._code, self._reason = (
            description, domain, code, reason)

    def localizedDescription(self) -> str:
        return self._description

    def localizedFailureReason(self) -> str | None:
        return self._reason

    def domain(self) -> str:
        return self._domain

    def code(self) -> int:
        return self._code


def posix_error(number: int) -> FakeNSError:
    return FakeNSError(os.strerror(number), domain="NSPOSIXErrorDomain", code=number)


class FakeURL:
    def __init__(self, path: str) -> None:
        self._path = path

    @classmethod
    def fileURLWithPath_(cls, path: str) -> FakeURL:
        assert isinstance(path, str) and path.startswith("/"), path
        return cls(path)

    def path(self) -> str:
        return self._path


class FakeObject:
    """An Objective-C object: ``alloc().init()``, and accessors for its class's properties
    (``PROPERTIES``; those in ``READONLY`` have no setter)."""

    PROPERTIES: ClassVar[tuple[str, ...]] = ()
    READONLY: ClassVar[tuple[str, ...]] = ()
    _values: dict[str, Any]

    @classmethod
    def alloc(cls) -> Any:
        instance = cls.__new__(cls)
        instance._values = {}
        return instance

    def init(self) -> Any:
        return self

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name.startswith("set") and name.endswith("_"):
            wanted = name[3:-1]
            for prop in self.PROPERTIES:
                if prop[0].upper() + prop[1:] == wanted and prop not in self.READONLY:
                    return lambda value: self._values.__setitem__(prop, value)
        elif name in self.PROPERTIES:
            return lambda: self._values.get(name)
        raise AttributeError(f"{type(self).__name__} has no {name!r} (this fake models the "
                             f"framework's real API: a misspelt selector?)")


# ---- configuration objects --------------------------------------------------------------


class VZLinuxBootLoader(FakeObject):
    PROPERTIES = ("kernelURL", "initialRamdiskURL", "commandLine")

    def initWithKernelURL_(self, url: FakeURL) -> Any:
        self._values["kernelURL"] = url
        return self


class VZGenericMachineIdentifier(FakeObject):
    def init(self) -> Any:
        self._data = secrets.token_bytes(16)
        return self

    def initWithDataRepresentation_(self, data: bytes) -> Any:
        if not isinstance(data, bytes) or len(data) != 16:
            return None
        self._data = data
        return self

    def dataRepresentation(self) -> bytes:
        return self._data


class VZGenericPlatformConfiguration(FakeObject):
    PROPERTIES = ("machineIdentifier",)

    def init(self) -> Any:
        self._values["machineIdentifier"] = VZGenericMachineIdentifier.alloc().init()
        return self


class VZDiskImageStorageDeviceAttachment(FakeObject):
    PROPERTIES = ("URL", "readOnly")
    READONLY = PROPERTIES

    def initWithURL_readOnly_error_(self, url: FakeURL, read_only: bool,
                                    error: None) -> tuple[Any, Any]:
        assert error is None
        if not os.path.isfile(url.path()):
            return None, posix_error(errno.ENOENT)
        self._values.update(URL=url, readOnly=bool(read_only))
        return self, None


class VZVirtioBlockDeviceConfiguration(FakeObject):
    PROPERTIES = ("attachment",)
    READONLY = PROPERTIES

    def initWithAttachment_(self, attachment: Any) -> Any:
        self._values["attachment"] = attachment
        return self


class VZSharedDirectory(FakeObject):
    PROPERTIES = ("URL", "readOnly")

    def initWithURL_readOnly_(self, url: FakeURL, read_only: bool) -> Any:
        self._values.update(URL=url, readOnly=bool(read_only))
        return self


class VZSingleDirectoryShare(FakeObject):
    PROPERTIES = ("directory",)
    READONLY = PROPERTIES

    def initWithDirectory_(self, directory: Any) -> Any:
        self._values["directory"] = directory
        return self


class VZVirtioFileSystemDeviceConfiguration(FakeObject):
    PROPERTIES = ("tag", "share")

    def initWithTag_(self, tag: str) -> Any:
        self._values["tag"] = tag
        return self

    @classmethod
    def validateTag_error_(cls, tag: str, error: None) -> tuple[bool, Any]:
        if not tag or len(tag.encode()) > 36:
            return False, FakeNSError(f"invalid tag {tag!r}", code=2)
        return True, None


class VZVirtioSocketDeviceConfiguration(FakeObject):
    pass


class VZFileSerialPortAttachment(FakeObject):
    PROPERTIES = ("URL", "append")
    READONLY = PROPERTIES

    def initWithURL_append_error_(self, url: FakeURL, append: bool,
                                  error: None) -> tuple[Any, Any]:
        try:  # the framework opens the file now
            with open(url.path(), "a" if append else "w"):
                pass
        except OSError as exc:
            return None, posix_error(exc.errno or errno.EIO)
        self._values.update(URL=url, append=bool(append))
        return self, None


class VZVirtioConsoleDeviceSerialPortConfiguration(FakeObject):
    PROPERTIES = ("attachment",)


class VZMACAddress(FakeObject):
    def initWithString_(self, text: str) -> Any:
        parts = text.split(":")
        if len(parts) != 6 or not all(len(p) == 2 for p in parts):
            return None
        self._text = text.lower()
        return self

    def string(self) -> str:
        return self._text


class VZNATNetworkDeviceAttachment(FakeObject):
    pass


class VZVirtioNetworkDeviceConfiguration(FakeObject):
    PROPERTIES = ("attachment", "MACAddress")

    def init(self) -> Any:
        octets = [0x02, *secrets.token_bytes(5)]  # random, locally administered
        self._values["MACAddress"] = VZMACAddress.alloc().initWithString_(
            ":".join(f"{o:02x}" for o in octets))
        return self


class VZVirtioEntropyDeviceConfiguration(FakeObject):
    pass


class VZVirtualMachineConfiguration(FakeObject):
    PROPERTIES = ("bootLoader", "CPUCount", "memorySize", "platform", "storageDevices",
                  "directorySharingDevices", "socketDevices", "serialPorts", "networkDevices",
                  "entropyDevices")
    host: ClassVar[FakeHost]

    def init(self) -> Any:
        for name in self.PROPERTIES[4:]:
            self._values[name] = []
        self._values.update(CPUCount=1, memorySize=512 * MIB)
        return self

    def validateWithError_(self, error: None) -> tuple[bool, Any]:
        problem = self.problem()
        return (False, FakeNSError(problem, code=2)) if problem else (True, None)

    def problem(self) -> str | None:
        v = self._values
        if v.get("bootLoader") is None:
            return "A boot loader is required"
        if not 1 <= v["CPUCount"] <= self.host.max_cpus:
            return f"The CPU count {v['CPUCount']} is out of range (1..{self.host.max_cpus})"
        if not 128 * MIB <= v["memorySize"] <= self.host.max_memory_mib * MIB:
            return "The memory size is out of range"
        if len(v["socketDevices"]) > 1:
            return "At most one socket device is supported"
        kinds = {"storageDevices": VZVirtioBlockDeviceConfiguration,
                 "directorySharingDevices": VZVirtioFileSystemDeviceConfiguration,
                 "socketDevices": VZVirtioSocketDeviceConfiguration,
                 "serialPorts": VZVirtioConsoleDeviceSerialPortConfiguration,
                 "networkDevices": VZVirtioNetworkDeviceConfiguration,
                 "entropyDevices": VZVirtioEntropyDeviceConfiguration}
        for name, kind in kinds.items():
            if not all(isinstance(d, kind) for d in v[name]):
                return f"{name} holds something that is not a {kind.__name__}"
        tags = [d.tag() for d in v["directorySharingDevices"]]
        if len(set(tags)) != len(tags):
            return "Directory sharing tags must be unique"
        return None

    # What the fake's saved state records and a restore compares.
    def signature(self) -> dict[str, Any]:
        v = self._values
        return {
            "cpus": v["CPUCount"], "memory": v["memorySize"],
            "command_line": v["bootLoader"].commandLine(),
            "machine": v["platform"].machineIdentifier().dataRepresentation().hex(),
            "disks": [d.attachment().readOnly() for d in v["storageDevices"]],
            "shares": [(d.tag(), d.share().directory().readOnly())
                       for d in v["directorySharingDevices"]],
            "sockets": len(v["socketDevices"]),
            "macs": [d.MACAddress().string() for d in v["networkDevices"]],
        }


class VZVirtualMachineConfiguration14(VZVirtualMachineConfiguration):
    def validateSaveRestoreSupportWithError_(self, error: None) -> tuple[bool, Any]:
        return True, None


# ---- Foundation, objc and libdispatch ---------------------------------------------------


class FakeNSObject:
    """NSObject for Python subclasses: a delegate class names its protocol."""

    protocols: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, protocols: Any = (), **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.protocols = tuple(p.name for p in protocols)
        for name in vars(cls):
            if name.endswith("_") and not name.startswith("_"):
                assert name in DELEGATE_SELECTORS, f"{name} is no VZVirtualMachineDelegate method"

    @classmethod
    def alloc(cls) -> Any:
        return cls.__new__(cls)

    def init(self) -> Any:
        return self


class FakeProtocol:
    def __init__(self, name: str) -> None:
        assert name == "VZVirtualMachineDelegate", name
        self.name = name


class FakeQueue:
    """A serial dispatch queue: one thread running blocks in order, for the process's life
    (a stand-in guest started from it dies with its thread, like a guest with its VMM)."""

    def __init__(self, label: bytes, host: FakeHost) -> None:
        self.label = label
        self._blocks: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._host = host
        self.thread = threading.Thread(target=self._run, name=f"dispatch {label!r}",
                                       daemon=True)
        self.thread.start()

    def submit(self, block: Callable[[], None]) -> None:
        self._blocks.put(block)

    def _run(self) -> None:
        while True:
            block = self._blocks.get()
            try:
                block()
            except BaseException as exc:  # libdispatch would crash the process: record it
                self._host.violations.append(f"a block raised {exc!r}")


class FakeDispatch:
    def __init__(self, host: FakeHost) -> None:
        self._host = host

    def dispatch_queue_create(self, label: bytes, attributes: None) -> FakeQueue:
        assert isinstance(label, bytes) and attributes is None
        return FakeQueue(label, self._host)

    def dispatch_async(self, target: FakeQueue, block: Callable[[], None]) -> None:
        target.submit(block)


# ---- the machine ------------------------------------------------------------------------


class VZVirtioSocketConnection:
    def __init__(self, sock: socket.socket, host: FakeHost) -> None:
        self._sock = sock
        self._host = host
        host.open_connections += 1

    def fileDescriptor(self) -> int:
        assert self._sock.fileno() >= 0, "the connection was closed"
        return self._sock.fileno()

    def close(self) -> None:
        if self._sock.fileno() >= 0:
            self._host.open_connections -= 1
        self._sock.close()


class VZVirtioSocketDevice:
    def __init__(self, machine: VZVirtualMachine) -> None:
        self._machine = machine

    def connectToPort_completionHandler_(self, port: int,
                                         handler: Callable[[Any, Any], None]) -> None:
        machine = self._machine
        machine.on_its_queue("connectToPort")
        guest = machine.guest
        if machine.vm_state != RUNNING or guest is None:
            result: tuple[Any, Any] = (None, FakeNSError("The virtual machine is not running",
                                                         code=3))
        elif port != guest.port:
            result = (None, posix_error(errno.ECONNRESET))  # nothing listens on that port
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(guest.socket_path))
                result = (VZVirtioSocketConnection(sock, machine.host), None)
            except OSError as exc:
                sock.close()
                result = (None, posix_error(exc.errno or errno.ECONNREFUSED))
        machine.queue.submit(lambda: handler(*result))


class FakeGuest:
    """The stand-in guest of one machine: the real agent, confined (see fake_guest.py)."""

    def __init__(self, machine: VZVirtualMachine) -> None:
        config = machine.configuration
        loader = config.bootLoader()
        self.args = dict(word.split("=", 1) for word in loader.commandLine().split()
                         if "=" in word)
        self.port = int(self.args["kelpie.vsock"])
        self.directory = machine.directory
        self.root = scratch_root(self.directory)
        self.socket_path = self.directory / "agent.sock"
        self.console = Path(config.serialPorts()[0].attachment().URL().path())
        self.process: subprocess.Popen[bytes] | None = None

    def boot(self) -> subprocess.Popen[bytes]:
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        with self.console.open("ab") as console:
            console.write(f"fake guest: booting with {self.args}\n".encode())
            self.process = subprocess.Popen(
                agent_argv(self.socket_path, self.root, self.args.get("kelpie.hostname")),
                stdin=subprocess.DEVNULL, stdout=console, stderr=console)
        return self.process

    def signal_tree(self, signum: int) -> list[int]:
        """Send ``signum`` to the agent and every process below it; their pids."""
        if self.process is None:
            return []
        done: list[int] = []
        while True:  # again until no new descendant appears (one may be forking)
            fresh = [p for p in _tree(self.process.pid) if p not in done]
            if not fresh:
                return done
            for pid in fresh:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signum)
            done += fresh

    def kill(self) -> None:
        if self.process is None:
            return
        pids = self.signal_tree(signal.SIGSTOP)  # freeze the tree, then end all of it
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait()


def _tree(pid: int) -> list[int]:
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{current}/task"):
                text = Path(f"/proc/{current}/task/{task}/children").read_text()
                pending += [int(child) for child in text.split()]
    return found


class VZVirtualMachine:
    """VZVirtualMachine up to macOS 13: no saved states."""

    host: ClassVar[FakeHost]

    @classmethod
    def isSupported(cls) -> bool:
        return cls.host.supported

    @classmethod
    def alloc(cls) -> Any:
        return cls.__new__(cls)

    def initWithConfiguration_queue_(self, configuration: Any, dispatch_queue: FakeQueue) -> Any:
        problem = configuration.problem()
        if problem is not None:  # the framework raises NSInvalidArgumentException
            raise ValueError(f"invalid configuration: {problem}")
        self.configuration = configuration
        self.queue = dispatch_queue
        self.vm_state = STOPPED
        self.used = False
        self.directory = self.host.next_directory()
        self.guest: FakeGuest | None = None
        self._delegate: Callable[[], Any] = lambda: None
        self._socket_device = VZVirtioSocketDevice(self)
        self.host.machines.append(self)
        return self

    def on_its_queue(self, what: str) -> None:
        if threading.current_thread() is not self.queue.thread:
            message = f"{what} called off the VM's queue, on {threading.current_thread().name}"
            self.host.violations.append(message)
            raise AssertionError(message)

    # ---- accessors
    def setDelegate_(self, delegate: Any) -> None:
        self.on_its_queue("setDelegate")
        self._delegate = weakref.ref(delegate)  # the framework holds its delegate weakly

    def delegate(self) -> Any:
        return self._delegate()

    def state(self) -> int:
        self.on_its_queue("state")
        return self.vm_state

    def socketDevices(self) -> list[Any]:
        self.on_its_queue("socketDevices")
        return [self._socket_device] if self.configuration.socketDevices() else []

    def console_path(self) -> Path:
        return Path(self.configuration.serialPorts()[0].attachment().URL().path())

    # ---- lifecycle
    def _later(self, handler: Callable[[Any], None], error: Any = None) -> None:
        self.queue.submit(lambda: handler(error))

    def _refuse(self, handler: Callable[[Any], None], what: str) -> None:
        self._later(handler, FakeNSError(f"Invalid virtual machine state for {what}", code=1))

    def startWithCompletionHandler_(self, handler: Callable[[Any], None]) -> None:
        self.on_its_queue("start")
        if self.vm_state != STOPPED or self.used:
            self._refuse(handler, "start")
            return
        self.used = True
        self.vm_state = STARTING
        loader = self.configuration.bootLoader()
        for url in (loader.kernelURL(), loader.initialRamdiskURL()):
            if url is None or not os.path.isfile(url.path()):
                self.vm_state = STOPPED
                self._later(handler, posix_error(errno.ENOENT))
                return
        self._boot_guest()
        self.vm_state = RUNNING
        self._later(handler)

    def _boot_guest(self) -> None:
        self.guest = FakeGuest(self)
        process = self.guest.boot()
        threading.Thread(target=self._watch, args=(process,), daemon=True).start()

    def _watch(self, process: subprocess.Popen[bytes]) -> None:
        process.wait()
        self.queue.submit(lambda: self._guest_exited(process))

    def _guest_exited(self, process: subprocess.Popen[bytes]) -> None:
        if self.guest is None or self.guest.process is not process:
            return
        if self.vm_state in (RUNNING, PAUSED):  # it powered off (not our stop or crash)
            self.vm_state = STOPPED
            delegate = self.delegate()
            if delegate is not None:
                delegate.guestDidStopVirtualMachine_(self)

    def pauseWithCompletionHandler_(self, handler: Callable[[Any], None]) -> None:
        self.on_its_queue("pause")
        if self.vm_state != RUNNING or self.guest is None:
            self._refuse(handler, "pause")
            return
        self.guest.signal_tree(signal.SIGSTOP)
        self.vm_state = PAUSED
        self._later(handler)

    def resumeWithCompletionHandler_(self, handler: Callable[[Any], None]) -> None:
        self.on_its_queue("resume")
        if self.vm_state != PAUSED or self.guest is None:
            self._refuse(handler, "resume")
            return
        self.guest.signal_tree(signal.SIGCONT)
        self.vm_state = RUNNING
        self._later(handler)

    def stopWithCompletionHandler_(self, handler: Callable[[Any], None]) -> None:
        self.on_its_queue("stop")
        if self.vm_state not in (RUNNING, PAUSED, ERROR):
            self._refuse(handler, "stop")
            return
        self.vm_state = STOPPED  # first: the guest's exit is not a power-off
        if self.guest is not None:
            self.guest.kill()
        self._later(handler)

    def requestStopWithError_(self, error: None) -> tuple[bool, Any]:
        self.on_its_queue("requestStop")
        # The guest kit's init does not handle the power button: nothing happens.
        return self.vm_state == RUNNING, None

    def crash(self, message: str) -> None:
        """On the queue: the framework stops the VM with an error."""
        self.on_its_queue("crash")
        self.vm_state = ERROR
        if self.guest is not None:
            self.guest.kill()
        delegate = self.delegate()
        if delegate is not None:
            delegate.virtualMachine_didStopWithError_(self, FakeNSError(message, code=1))


class VZVirtualMachine14(VZVirtualMachine):
    """VZVirtualMachine of macOS 14 on Apple silicon: saved states."""

    def saveMachineStateToURL_completionHandler_(self, url: FakeURL,
                                                 handler: Callable[[Any], None]) -> None:
        self.on_its_queue("saveMachineState")
        if self.vm_state != PAUSED or self.guest is None:
            self._refuse(handler, "save")
            return
        header = json.dumps(self.configuration.signature()).encode()
        with tarfile.open(url.path(), "w") as tar:
            info = tarfile.TarInfo("header.json")
            info.size = len(header)
            tar.addfile(info, io.BytesIO(header))
            tar.add(self.guest.root, arcname="root")
        self._later(handler)

    def restoreMachineStateFromURL_completionHandler_(self, url: FakeURL,
                                                      handler: Callable[[Any], None]) -> None:
        self.on_its_queue("restoreMachineState")
        if self.vm_state != STOPPED or self.used:
            self._refuse(handler, "restore")
            return
        try:
            with tarfile.open(url.path()) as tar:
                header_file = tar.extractfile("header.json")
                assert header_file is not None
                saved = json.loads(header_file.read())
                if saved != json.loads(json.dumps(self.configuration.signature())):
                    self._later(handler, FakeNSError(
                        "The save file is incompatible with the current configuration",
                        code=12, reason=f"saved {saved}"))
                    return
                self.used = True
                guest = FakeGuest(self)
                shutil.rmtree(guest.root)
                tar.extractall(guest.root.parent, members=[
                    m for m in tar.getmembers() if m.name.startswith("root")], filter="tar")
        except (OSError, tarfile.TarError, ValueError, KeyError) as exc:
            self._later(handler, FakeNSError(f"The save file cannot be read: {exc}", code=12))
            return
        self._boot_guest()
        assert self.guest is not None
        self.guest.signal_tree(signal.SIGSTOP)  # a restored VM is paused
        self.vm_state = PAUSED
        self._later(handler)


# ---- the host ---------------------------------------------------------------------------


class FakeHost:
    """One fake Mac: its framework (:meth:`framework`) and what happened on it."""

    def __init__(self, where: Path, *, macos: tuple[int, ...] = (14, 5),
                 supported: bool = True, max_cpus: int = 8, max_memory_mib: int = 8192) -> None:
        self.where = where
        self.macos = macos
        self.supported = supported
        self.max_cpus = max_cpus
        self.max_memory_mib = max_memory_mib
        self.machines: list[VZVirtualMachine] = []
        self.violations: list[str] = []
        """Framework rules the bridge broke (a call off a VM's queue, a block that raised)."""
        self.open_connections = 0
        self._numbers = itertools.count()
        self._framework: Framework | None = None
        save = macos >= (14, 0)
        namespace = {"host": self}
        vm_class = type("VZVirtualMachine", (VZVirtualMachine14 if save else VZVirtualMachine,),
                        namespace)
        config_class = type(
            "VZVirtualMachineConfiguration",
            (VZVirtualMachineConfiguration14 if save else VZVirtualMachineConfiguration,),
            namespace)
        self.vz = types.SimpleNamespace(
            VZVirtualMachine=vm_class, VZVirtualMachineConfiguration=config_class,
            **{cls.__name__: cls for cls in (
                VZLinuxBootLoader, VZGenericPlatformConfiguration, VZGenericMachineIdentifier,
                VZDiskImageStorageDeviceAttachment, VZVirtioBlockDeviceConfiguration,
                VZSharedDirectory, VZSingleDirectoryShare, VZVirtioFileSystemDeviceConfiguration,
                VZVirtioSocketDeviceConfiguration, VZFileSerialPortAttachment,
                VZVirtioConsoleDeviceSerialPortConfiguration, VZMACAddress,
                VZNATNetworkDeviceAttachment, VZVirtioNetworkDeviceConfiguration,
                VZVirtioEntropyDeviceConfiguration)},
        )

    def framework(self) -> Framework:
        """The framework of this fake Mac (one object: the bridge makes its delegate class
        once per Foundation, as Objective-C classes are made once per process)."""
        if self._framework is None:
            self._framework = self._make_framework()
        return self._framework

    def _make_framework(self) -> Framework:
        return Framework(
            vz=self.vz,
            foundation=types.SimpleNamespace(NSURL=FakeURL, NSObject=FakeNSObject),
            dispatch=FakeDispatch(self),
            objc=types.SimpleNamespace(protocolNamed=FakeProtocol),
            macos=self.macos,
        )

    def next_directory(self) -> Path:
        directory = self.where / f"vm{next(self._numbers)}"
        directory.mkdir(parents=True)
        return directory

    def machine_of(self, workdir: Path) -> VZVirtualMachine:
        """The newest machine whose console writes into ``workdir`` (a VzVm's directory)."""
        for machine in reversed(self.machines):
            if machine.console_path().parent == workdir:
                return machine
        raise LookupError(f"no fake machine writes its console into {workdir}")

    def crash(self, machine: VZVirtualMachine, message: str = "Internal Virtualization error.") \
            -> None:
        """Make the framework stop ``machine`` with an error (through its queue)."""
        machine.queue.submit(lambda: machine.crash(message))

    def wait_idle(self, timeout: float = 5.0) -> None:
        """Wait until every machine's queue ran what was submitted so far."""
        for machine in self.machines:
            done = threading.Event()
            machine.queue.submit(done.set)
            assert done.wait(timeout), "a fake dispatch queue is stuck"

    def shutdown(self) -> None:
        """Kill every stand-in guest (the end of a test)."""
        for machine in self.machines:
            if machine.guest is not None and machine.guest.process is not None \
                    and machine.guest.process.poll() is None:
                machine.guest.kill()
        deadline = time.monotonic() + 5
        while self.open_connections and time.monotonic() < deadline:
            time.sleep(0.01)
