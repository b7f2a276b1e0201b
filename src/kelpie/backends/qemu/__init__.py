"""The QEMU backend: real micro-VMs (KVM when a probe proves it boots a guest, else TCG)."""

from __future__ import annotations

import shutil
from typing import Any

from kelpie.backends.qemu._liveplan import LivePlan
from kelpie.vm import BackendSpec, Capabilities, ProbeResult, SnapshotKind, VmConfig, VmInstance

# Declared here, not imported from _vm, so probing the host does not import qemu.qmp.
# Full snapshots need a VM without shared directories: QEMU's virtio-9p blocks migration
# while a share is mounted (the snapshot then fails saying so). Checkpoints go through the
# guest agent's file operations (kelpie.vm._checkpoint): a running VM, any architecture.
CAPABILITIES = Capabilities(
    pause=True,
    snapshot_kinds=frozenset({SnapshotKind.FULL, SnapshotKind.DISK, SnapshotKind.CHECKPOINT}),
    shared_dirs=True,
    networking=True,
    pty=True,
    live_migration=True,
    egress_policy=True,
)


def probe() -> ProbeResult:
    """Available when qemu-system-x86_64 is installed; reports the cached accelerator."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ProbeResult(False, f"this backend runs x86_64 guests; host is {platform.machine()}")
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        return ProbeResult(False, "qemu-system-x86_64 not found (apt-get install qemu-system-x86)")
    if shutil.which("qemu-img") is None:
        return ProbeResult(False, "qemu-img not found (apt-get install qemu-utils)")
    from kelpie.backends.qemu._accel import cached_accel_summary
    from kelpie.backends.qemu._host import qemu_version

    accel = cached_accel_summary(qemu)
    decided = accel.split()[0] if accel.startswith(("kvm (", "tcg (")) else ""
    return ProbeResult(True, f"{qemu}; accel: {accel}",
                       {"qemu": qemu, "accel": accel, "accel_choice": decided,
                        "version": qemu_version(qemu)})


def create(config: VmConfig, **options: Any) -> VmInstance:
    """Create an unstarted QemuVm."""
    from kelpie.backends.qemu._vm import QemuVm

    return QemuVm(config, **options)


async def attach(vm_id: str) -> VmInstance:
    """Reconnect to a QemuVm started earlier, found by id in ``vms_dir()``."""
    from kelpie.backends.qemu._vm import QemuVm

    return await QemuVm.attach(vm_id)


SPEC = BackendSpec(
    name="qemu",
    description="QEMU microvm: KVM when proven to boot a guest, TCG otherwise",
    capabilities=CAPABILITIES,
    probe=probe,
    create=create,
    priority=10,
    attach=attach,
)

__all__ = [
    "CAPABILITIES",
    "SPEC",
    "LivePlan",
    "attach",
    "create",
    "probe",
]
