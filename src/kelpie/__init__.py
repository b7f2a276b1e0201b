"""Kelpie: run untrusted code in hardware-isolated micro-VMs behind one Python API.

Start with :class:`Sandbox` (blocking) or :class:`AsyncSandbox`; :class:`Runtime` owns
sandboxes in-process, :class:`DaemonClient` talks to the daemon (both are a
:class:`SandboxService`), :class:`VmInstance` and
:class:`VmFactory` are the VM layer underneath.
"""

import importlib as _importlib
from typing import TYPE_CHECKING
from typing import Any as _Any

from kelpie._version import __version__

if TYPE_CHECKING:
    from kelpie._exceptions import (
        PeerUnreachable,
        TeleportAborted,
        TeleportError,
        TeleportInDoubt,
        TeleportRefused,
    )
    from kelpie.api import HostFacts, TeleportReport
    from kelpie.backends.mock import MockVm
    from kelpie.client import DaemonClient, DaemonUnreachable, RemoteError
    from kelpie.fleet import AsyncFleet, Fleet
    from kelpie.runtime import (
        BuildError,
        Runtime,
        SandboxInfo,
        SandboxNameInUse,
        SandboxNotFound,
    )
    from kelpie.sdk import AsyncSandbox, Sandbox
    from kelpie.service import SandboxService
    from kelpie.vm import (
        AgentError,
        BackendRegistry,
        BackendSpec,
        BackendUnavailable,
        BootError,
        Capabilities,
        ConfigError,
        ExecError,
        ExecExit,
        ExecOutput,
        ExecProcess,
        ExecResult,
        ExecTimeout,
        FileInfo,
        GuestFileError,
        HostInfo,
        InvalidStateError,
        KelpieError,
        Mount,
        NetworkError,
        NetworkMode,
        PortMapping,
        ProbeResult,
        SnapshotCorrupted,
        SnapshotError,
        SnapshotIncompatible,
        SnapshotKind,
        SnapshotManifest,
        SnapshotTooLarge,
        StorageError,
        UnsupportedOperation,
        VmConfig,
        VmConfigBuilder,
        VmCrashed,
        VmError,
        VmFactory,
        VmInstance,
        VmSnapshot,
        VmState,
    )

del TYPE_CHECKING

# Where each public name lives. Importing ``kelpie`` stays cheap (the CLI imports only what
# a command needs); the first public name used loads its module.
_HOMES = {
    "MockVm": "kelpie.backends.mock",
    "DaemonClient": "kelpie.client",
    "DaemonUnreachable": "kelpie.client",
    "RemoteError": "kelpie.client",
    "AsyncFleet": "kelpie.fleet",
    "Fleet": "kelpie.fleet",
    "Runtime": "kelpie.runtime",
    "BuildError": "kelpie.runtime",
    "SandboxInfo": "kelpie.runtime",
    "SandboxNameInUse": "kelpie.runtime",
    "SandboxNotFound": "kelpie.runtime",
    "AsyncSandbox": "kelpie.sdk",
    "Sandbox": "kelpie.sdk",
    "SandboxService": "kelpie.service",
    "PeerUnreachable": "kelpie._exceptions",
    "TeleportAborted": "kelpie._exceptions",
    "TeleportError": "kelpie._exceptions",
    "TeleportInDoubt": "kelpie._exceptions",
    "TeleportRefused": "kelpie._exceptions",
    "HostFacts": "kelpie.api",
    "TeleportReport": "kelpie.api",
}


def __getattr__(name: str) -> _Any:
    if name not in __all__:
        raise AttributeError(f"module 'kelpie' has no attribute {name!r}")
    _importlib.import_module("kelpie.backends")  # registers the built-in backends
    value = getattr(_importlib.import_module(_HOMES.get(name, "kelpie.vm")), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "AgentError",
    "AsyncFleet",
    "AsyncSandbox",
    "BackendRegistry",
    "BackendSpec",
    "BackendUnavailable",
    "BootError",
    "BuildError",
    "Capabilities",
    "ConfigError",
    "DaemonClient",
    "DaemonUnreachable",
    "ExecError",
    "ExecExit",
    "ExecOutput",
    "ExecProcess",
    "ExecResult",
    "ExecTimeout",
    "FileInfo",
    "Fleet",
    "GuestFileError",
    "HostFacts",
    "HostInfo",
    "InvalidStateError",
    "KelpieError",
    "MockVm",
    "Mount",
    "NetworkError",
    "NetworkMode",
    "PeerUnreachable",
    "PortMapping",
    "ProbeResult",
    "RemoteError",
    "Runtime",
    "Sandbox",
    "SandboxInfo",
    "SandboxNameInUse",
    "SandboxNotFound",
    "SandboxService",
    "SnapshotCorrupted",
    "SnapshotError",
    "SnapshotIncompatible",
    "SnapshotKind",
    "SnapshotManifest",
    "SnapshotTooLarge",
    "StorageError",
    "TeleportAborted",
    "TeleportError",
    "TeleportInDoubt",
    "TeleportRefused",
    "TeleportReport",
    "UnsupportedOperation",
    "VmConfig",
    "VmConfigBuilder",
    "VmCrashed",
    "VmError",
    "VmFactory",
    "VmInstance",
    "VmSnapshot",
    "VmState",
    "__version__",
]
