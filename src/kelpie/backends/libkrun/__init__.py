"""The libkrun backend: each VM in a child process of its own that enters libkrun.

Its ctypes binding (:class:`Libkrun`) is checked against libkrun's own header (v1.19.0,
vendored beside it). A VM's root is a directory shared over virtio-fs (see ``_root``), its
guest runs the Kelpie agent from the guest kit's tree (see ``_launch``). libkrun has no
pause, snapshot or restore API, and its networking (TSI) cannot be filtered, so a VM has
neither; checkpoints work. Not registered by default (``kelpie.vm.BUILTIN_BACKENDS``).
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any

from kelpie._exceptions import BackendUnavailable
from kelpie.backends.libkrun._binding import (
    FUNCTIONS,
    HEADER,
    LIBRARY_ENV,
    KrunError,
    Libkrun,
    find_library,
)
from kelpie.vm import BackendSpec, Capabilities, ProbeResult, SnapshotKind, VmConfig, VmInstance

# Declared here, not in _vm, so probing the host imports no more than the binding.
CAPABILITIES = Capabilities(
    snapshot_kinds=frozenset({SnapshotKind.CHECKPOINT}),
    shared_dirs=True,
    pty=True,
)


@functools.cache
def probe() -> ProbeResult:
    """Available when libkrun loads and KVM is usable (on Linux); cached per process."""
    try:
        library = find_library()
        Libkrun(library)
    except BackendUnavailable as exc:
        return ProbeResult(False, str(exc).replace("\n", " "))
    if sys.platform.startswith("linux") and not os.access("/dev/kvm", os.R_OK | os.W_OK):
        why = "missing" if not os.path.exists("/dev/kvm") else "not readable and writable"
        return ProbeResult(False, f"/dev/kvm is {why}: libkrun needs KVM (load kvm_intel "
                                  f"or kvm_amd; add the user to the kvm group)")
    return ProbeResult(True, f"libkrun at {library}", {"library": library})


def create(config: VmConfig, **options: Any) -> VmInstance:
    """Create an unstarted LibkrunVm."""
    from kelpie.backends.libkrun._vm import LibkrunVm

    return LibkrunVm(config, **options)


async def attach(vm_id: str) -> VmInstance:
    """Reconnect to a LibkrunVm started earlier, found by id in ``vms_dir()``."""
    from kelpie.backends.libkrun._vm import LibkrunVm

    return await LibkrunVm.attach(vm_id)


SPEC = BackendSpec(
    name="libkrun",
    description="libkrun: a KVM micro-VM in a child process; virtio-fs root, no network",
    capabilities=CAPABILITIES,
    probe=probe,
    create=create,
    priority=5,
    attach=attach,
    auto_selected=False,  # lighter isolation than a full VMM: only when asked for
)

__all__ = [
    "CAPABILITIES",
    "FUNCTIONS",
    "HEADER",
    "LIBRARY_ENV",
    "SPEC",
    "KrunError",
    "Libkrun",
    "attach",
    "create",
    "find_library",
    "probe",
]
