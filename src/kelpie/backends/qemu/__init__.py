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
    emulation=True,
    shared_memory=True,
    grow_disk=True,
)


GUEST_ARCHES = {"x86_64": "qemu-system-x86", "aarch64": "qemu-system-arm"}
"""Guest architectures and the Debian package of their QEMU."""


def probe() -> ProbeResult:
    """Available when QEMU for some guest architecture and qemu-img are installed; reports
    each architecture it runs with its accelerator (the host's: as last proven; another
    one: emulated, TCG)."""
    import platform

    from kelpie.backends.qemu._accel import cached_accel_summary
    from kelpie.backends.qemu._host import qemu_version

    machine = platform.machine().lower()
    host = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    binaries = {arch: shutil.which(f"qemu-system-{arch}") for arch in GUEST_ARCHES}
    found = {arch: path for arch, path in binaries.items() if path}
    if not found:
        packages = " ".join(GUEST_ARCHES.values())
        return ProbeResult(False, f"no qemu-system-* for any of {', '.join(GUEST_ARCHES)} "
                                  f"(apt-get install {packages})")
    if shutil.which("qemu-img") is None:
        return ProbeResult(False, "qemu-img not found (apt-get install qemu-utils)")
    arches = {arch: "tcg" for arch in found if arch != host}
    summary = f"{host}: not installed ({GUEST_ARCHES.get(host, 'no QEMU for it')})"
    if host in found and host == "x86_64":  # the KVM boot probe is microvm's (x86)
        summary = cached_accel_summary(found[host])
        arches[host] = summary.split()[0] if summary.startswith(("kvm (", "tcg (")) else ""
    elif host in found:
        summary = "tcg (KVM is proven only for x86_64 hosts so far)"
        arches[host] = "tcg"
    qemu = found.get(host) or next(iter(found.values()))
    emulated = ", ".join(f"{a} (tcg)" for a in found if a != host)
    return ProbeResult(True, f"{qemu}; accel: {summary}" +
                       (f"; emulated: {emulated}" if emulated else ""),
                       {"qemu": qemu, "accel": summary, "accel_choice": arches.get(host, ""),
                        "version": qemu_version(qemu),
                        "arches": ",".join(f"{a}:{c}" for a, c in sorted(arches.items()))})


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
    "GUEST_ARCHES",
    "SPEC",
    "LivePlan",
    "attach",
    "create",
    "probe",
]
