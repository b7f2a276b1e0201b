"""Backend registry and VmFactory: which backend runs a VM on this host.

Selection order: an explicit backend name, else ``KELPIE_BACKEND``, else the
highest-priority *real* backend whose probe proves it runs here. The mock backend is used
only when asked for by name. When nothing fits, :class:`BackendUnavailable` lists every
backend probed and why it was rejected.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from importlib import metadata
from typing import Any

from kelpie._exceptions import BackendUnavailable, UnknownBackend
from kelpie.vm._config import VmConfig
from kelpie.vm._instance import Capabilities, VmInstance

BACKEND_ENV = "KELPIE_BACKEND"


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    """Whether a backend can run VMs on this host, and why (not)."""

    available: bool
    reason: str
    details: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class BackendSpec:
    """A backend as the registry knows it.

    ``probe`` must be cheap after its first call (cache expensive checks such as a KVM boot
    test). ``create(config, **options)`` builds an unstarted :class:`VmInstance`.
    ``attach(vm_id)``, for backends whose VMs outlive the process that started them, finds
    a VM started earlier (by id, in the backend's own VM directory) and reconnects to it;
    ``None`` means VMs of this backend die with their process. A backend that is not
    ``auto_selected`` (libkrun, say: lighter isolation) runs only when asked for by name.
    """

    name: str
    description: str
    capabilities: Capabilities
    probe: Callable[[], ProbeResult]
    create: Callable[..., VmInstance]
    priority: int = 0
    real: bool = True
    attach: Callable[[str], Awaitable[VmInstance]] | None = None
    auto_selected: bool = True


BUILTIN_BACKENDS = (
    "kelpie.backends.mock",
    "kelpie.backends.qemu",
    "kelpie.backends.firecracker",
    "kelpie.backends.libkrun",
    "kelpie.backends.vz",
)
"""Modules of the built-in backends, each with a ``SPEC``. Names, not imports: the VM layer
never imports a backend; the registry loads these when first asked."""

ENTRY_POINT_GROUP = "kelpie.backends"
"""Other packages add a backend with an entry point in this group naming a BackendSpec."""


class BackendRegistry:
    """The backends Kelpie knows, by name. Probe results are cached per registry.

    ``modules`` (module names, each with a ``SPEC``) and the ``entry_points`` group are
    loaded on first use, so building a registry imports nothing.
    """

    def __init__(self, modules: tuple[str, ...] = (), *, entry_points: str | None = None) -> None:
        self._specs: dict[str, BackendSpec] = {}
        self._probes: dict[str, ProbeResult] = {}
        self._pending_modules = modules
        self._entry_points = entry_points

    def register(self, spec: BackendSpec) -> None:
        """Add (or replace) a backend."""
        self._specs[spec.name] = spec
        self._probes.pop(spec.name, None)

    def _load(self) -> None:
        """Load the pending backend modules and entry points, each on its own: one that
        fails to load becomes a backend whose probe says why, never an error for all."""
        modules, self._pending_modules = self._pending_modules, ()
        for module in modules:
            self._load_one(module, partial(_module_spec, module))
        if self._entry_points is not None:
            group, self._entry_points = self._entry_points, None
            for entry in metadata.entry_points(group=group):
                self._load_one(entry.name, entry.load)

    def _load_one(self, name: str, load: Callable[[], object]) -> None:
        try:
            spec = load()
            if not isinstance(spec, BackendSpec):
                raise TypeError(f"{type(spec).__name__} is not a BackendSpec")
        except Exception as exc:
            spec = _unloadable(name, exc)
        self._specs.setdefault(spec.name, spec)

    def names(self) -> list[str]:
        """Backend names, best first."""
        self._load()
        return [s.name for s in sorted(self._specs.values(), key=lambda s: (-s.priority, s.name))]

    def get(self, name: str) -> BackendSpec:
        """The backend called ``name``; :class:`BackendUnavailable` lists the known ones."""
        self._load()
        try:
            return self._specs[name]
        except KeyError:
            raise UnknownBackend(name, self.names()) from None

    def probe(self, name: str, *, refresh: bool = False) -> ProbeResult:
        """Probe one backend (cached unless ``refresh``); a crashing probe counts as a no."""
        if refresh or name not in self._probes:
            spec = self.get(name)
            try:
                result = spec.probe()
            except Exception as exc:  # a probe must never take the caller down
                result = ProbeResult(False, f"probe failed: {exc}")
            self._probes[name] = result
        return self._probes[name]

    def with_capability(self, capability: str) -> list[str]:
        """Names of backends that declare ``capability`` (e.g. ``pause``, ``snapshot:full``)."""
        return [n for n in self.names() if capability in self._specs[n].capabilities.names()]


def _module_spec(module: str) -> object:
    return importlib.import_module(module).SPEC


def _unloadable(name: str, exc: Exception) -> BackendSpec:
    """A backend whose module or entry point failed to load: listed, never available."""
    reason = f"failed to load: {type(exc).__name__}: {exc}"

    def create(config: VmConfig, **options: Any) -> VmInstance:
        raise BackendUnavailable(f"backend {name!r} cannot be used", [(name, reason)])

    return BackendSpec(name=name.rsplit(".", 1)[-1], description=reason,
                       capabilities=Capabilities(), probe=lambda: ProbeResult(False, reason),
                       create=create, priority=-1000)


DEFAULT_REGISTRY = BackendRegistry(BUILTIN_BACKENDS, entry_points=ENTRY_POINT_GROUP)
"""The process-wide registry: the built-in backends and those other packages declare."""


def backends_with(capability: str) -> list[str]:
    """Names of the registered backends that declare ``capability``."""
    return DEFAULT_REGISTRY.with_capability(capability)


class VmFactory:
    """Creates VMs on the right backend for this host.

    ``VmFactory().create(config)`` auto-selects; ``create(config, backend="qemu")`` insists.
    """

    def __init__(
        self,
        registry: BackendRegistry | None = None,
        *,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.registry = DEFAULT_REGISTRY if registry is None else registry
        self._environ = os.environ if environ is None else environ

    def select(self, backend: str | None = None) -> BackendSpec:
        """The backend to use: explicit name, else ``KELPIE_BACKEND``, else the best real one."""
        name = backend or self._environ.get(BACKEND_ENV) or None
        if name:
            spec = self.registry.get(name)
            result = self.registry.probe(name)
            if not result.available:
                source = "requested" if backend else f"set by {BACKEND_ENV}"
                raise BackendUnavailable(
                    f"backend {name!r} ({source}) cannot run on this host",
                    [(name, result.reason)],
                )
            return spec
        rejections = []
        for candidate in self.registry.names():
            spec = self.registry.get(candidate)
            if not spec.real:
                rejections.append((candidate, "simulated; used only when asked for by name"))
                continue
            if not spec.auto_selected:
                rejections.append((candidate, "used only when asked for by name"))
                continue
            result = self.registry.probe(candidate)
            if result.available:
                return spec
            rejections.append((candidate, result.reason))
        raise BackendUnavailable("no VM backend can run on this host", rejections)

    def create(self, config: VmConfig, *, backend: str | None = None, **options: Any) -> VmInstance:
        """An unstarted VM for ``config`` on the selected backend."""
        return self.select(backend).create(config, **options)
