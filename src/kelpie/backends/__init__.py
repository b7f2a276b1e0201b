"""The built-in backends, registered with the default :class:`~kelpie.VmFactory` registry.

Real backends' modules are imported only when a VM is created on them, so probing the
host never pays for (or fails on) another backend's imports.
"""

from __future__ import annotations

from typing import Any

from kelpie.backends.mock import MockVm
from kelpie.backends.qemu import SPEC as QEMU
from kelpie.vm import DEFAULT_REGISTRY, BackendSpec, ProbeResult, VmConfig, VmInstance


def _create_mock(config: VmConfig, **options: Any) -> VmInstance:
    return MockVm(config, **options)


def _probe_mock() -> ProbeResult:
    return ProbeResult(True, "always available (simulated, in-process)")


MOCK = BackendSpec(
    name="mock",
    description="deterministic simulated VM for tests and simulation",
    capabilities=MockVm.capabilities,
    probe=_probe_mock,
    create=_create_mock,
    priority=0,
    real=False,
)

DEFAULT_REGISTRY.register(MOCK)
DEFAULT_REGISTRY.register(QEMU)

__all__ = ["MOCK", "QEMU"]
