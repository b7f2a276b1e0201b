"""The Virtualization.framework backend: micro-VMs on macOS, run inside this process.

pyobjc (``pip install 'kelpie[vz]'``) reaches the framework; nothing imports it before a
probe or a VM needs it (see :mod:`._bridge`). The framework's VMs belong to the process
that made them, so a VM dies with its process and cannot be attached to later.

What the guest kit's init needs to run under it (``kelpie.vsock``, ``console=hvc0``,
``kelpie.sharefs=virtiofs``; see :mod:`._launch`): the agent on vsock, virtio-fs shares,
eth0 by DHCP with network nat, and the kit built for the Mac's architecture with the
virtio-pci, vsock and virtiofs drivers.
"""

from __future__ import annotations

from typing import Any

from kelpie.vm import BackendSpec, Capabilities, ProbeResult, SnapshotKind, VmConfig, VmInstance

# Declared here, not imported from _vm, so probing the host imports nothing heavy. Full
# snapshots need macOS 14 on Apple silicon (UnsupportedOperation elsewhere, saying so);
# checkpoints go through the guest agent's file operations. Network nat only: the
# framework's NAT is the host's, with no rules of Kelpie's on it.
CAPABILITIES = Capabilities(
    pause=True,
    snapshot_kinds=frozenset({SnapshotKind.FULL, SnapshotKind.CHECKPOINT}),
    shared_dirs=True,
    networking=True,
    pty=True,
    egress_policy=False,
)


def probe() -> ProbeResult:
    """Available on macOS 12+ with pyobjc's Virtualization importable and a Mac that
    supports virtualization."""
    from kelpie.backends.vz._bridge import (
        FrameworkUnavailable,
        load_framework,
        save_restore_problem,
        unavailable_reason,
    )

    try:
        fw = load_framework()
    except FrameworkUnavailable as exc:
        return ProbeResult(False, str(exc))
    reason = unavailable_reason(fw)
    if reason is not None:
        return ProbeResult(False, reason)
    save_restore = save_restore_problem(fw)
    return ProbeResult(
        True, f"macOS {fw.macos_version}; full snapshots: {save_restore or 'yes'}",
        {"macos": fw.macos_version, "full_snapshots": "no" if save_restore else "yes"},
    )


def create(config: VmConfig, **options: Any) -> VmInstance:
    """Create an unstarted VzVm."""
    from kelpie.backends.vz._vm import VzVm

    return VzVm(config, **options)


SPEC = BackendSpec(
    name="vz",
    description="Apple Virtualization.framework (macOS): VMs in this process, via pyobjc",
    capabilities=CAPABILITIES,
    probe=probe,
    create=create,
    priority=20,
    attach=None,
)

__all__ = ["CAPABILITIES", "SPEC", "create", "probe"]
