"""The Firecracker backend: micro-VMs under Firecracker on Linux hosts whose KVM boots a guest.

:class:`FirecrackerApi` speaks Firecracker's API, written against its own API document
(v1.16.1, vendored beside it as :data:`API_DOCUMENT`); ``FirecrackerVm`` (``_vm``) is the
VM. The agent is reached over hybrid vsock. Tested here by contract (a stand-in Firecracker
that validates every request against the document and runs the real guest agent); tested
for real only where Firecracker and a guest-booting KVM exist.
"""

from __future__ import annotations

from typing import Any

from kelpie.backends.firecracker._api import (
    API_DOCUMENT,
    API_VERSION,
    FirecrackerApi,
    FirecrackerApiError,
)
from kelpie.vm import BackendSpec, Capabilities, ProbeResult, SnapshotKind, VmConfig, VmInstance

# Declared here, not imported from _vm, so probing the host imports little.
# Firecracker has no shared directories (no virtio-fs, no 9p) and the backend attaches no
# network yet (see FirecrackerMachine._prepare); a checkpoint goes through the agent.
CAPABILITIES = Capabilities(
    pause=True,
    snapshot_kinds=frozenset({SnapshotKind.FULL, SnapshotKind.DISK, SnapshotKind.CHECKPOINT}),
    pty=True,
)


def probe() -> ProbeResult:
    """Available on x86_64/aarch64 Linux with the binary, a usable /dev/kvm and a KVM that
    is proven to boot the guest kit under Firecracker (cached; the first probe boots it)."""
    import platform

    from kelpie.backends.firecracker._host import (
        BINARY_ENV,
        find_binary,
        firecracker_version,
        kvm_boots,
        kvm_usable,
    )

    if platform.system() != "Linux":
        return ProbeResult(False, f"Firecracker runs on Linux only; this is {platform.system()}")
    binary = find_binary()
    if binary is None:
        return ProbeResult(False, f"firecracker not found (set {BINARY_ENV} or put it on PATH)")
    if not kvm_usable():
        return ProbeResult(False, "no usable /dev/kvm (Firecracker needs KVM)")
    from kelpie.guestkit import GuestKitError, build_guestkit

    try:
        kit = build_guestkit()
    except GuestKitError as exc:
        return ProbeResult(False, f"cannot prepare the guest kit to prove KVM: {exc}")
    boots, why = kvm_boots(binary, kit)
    return ProbeResult(boots, f"{binary}; {why}",
                       {"firecracker": binary, "version": firecracker_version(binary)})


def create(config: VmConfig, **options: Any) -> VmInstance:
    """Create an unstarted FirecrackerVm."""
    from kelpie.backends.firecracker._vm import FirecrackerVm

    return FirecrackerVm(config, **options)


async def attach(vm_id: str) -> VmInstance:
    """Reconnect to a FirecrackerVm started earlier, found by id in ``vms_dir()``."""
    from kelpie.backends.firecracker._vm import FirecrackerVm

    return await FirecrackerVm.attach(vm_id)


SPEC = BackendSpec(
    name="firecracker",
    description="Firecracker micro-VMs (Linux, KVM proven to boot a guest)",
    capabilities=CAPABILITIES,
    probe=probe,
    create=create,
    priority=15,
    attach=attach,
)

__all__ = [
    "API_DOCUMENT",
    "API_VERSION",
    "CAPABILITIES",
    "SPEC",
    "FirecrackerApi",
    "FirecrackerApiError",
    "attach",
    "create",
    "probe",
]
