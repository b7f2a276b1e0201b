"""What the source of a QEMU live migration tells its target (no QMP, no I/O).

The source describes its VM in a :class:`LivePlan` (JSON-able: it crosses hosts); the
target answers with the :class:`~kelpie.vm.LiveEndpoints` it listens on (the VM layer's
types, see :mod:`kelpie.vm._live`). The plan is the record a full snapshot would carry
(:class:`SnapshotRecord`), plus what a snapshot's manifest says about the host, so the
target refuses it with the same checks a restore does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from kelpie.backends.qemu._snapshot import RECORD_KEY, SnapshotRecord
from kelpie.vm import SnapshotCorrupted, SnapshotKind, SnapshotManifest

PLAN_VERSION = 1


@dataclasses.dataclass(frozen=True)
class LivePlan:
    """What the target of a live migration must know about the source VM."""

    record: SnapshotRecord
    """The VM's config, host name, accelerator, base image and device signature."""
    backend_version: str
    arch: str
    cpu_model: str
    machine: str
    guestkit_digest: str | None
    base_image_digest: str | None
    """sha256 of the read-only base image under the disk overlay (None: no root disk)."""
    vm_id: str
    """The source VM's id (the target keeps its own)."""

    def manifest(self) -> SnapshotManifest:
        """The plan as the manifest of a blob-less full snapshot: what restore checks read."""
        return SnapshotManifest(
            kind=SnapshotKind.FULL, backend="qemu", backend_version=self.backend_version,
            arch=self.arch, cpu_model=self.cpu_model, machine=self.machine,
            vcpus=self.record.config.vcpus, memory_mib=self.record.config.memory_mib,
            blobs={}, created_at="", guestkit_digest=self.guestkit_digest,
            base_image_digest=self.base_image_digest, vm_id=self.vm_id,
            extra=self.record.to_extra(),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION,
            "record": self.record.to_extra()[RECORD_KEY],
            "backend_version": self.backend_version,
            "arch": self.arch,
            "cpu_model": self.cpu_model,
            "machine": self.machine,
            "guestkit_digest": self.guestkit_digest,
            "base_image_digest": self.base_image_digest,
            "vm_id": self.vm_id,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LivePlan:
        """Read a plan; :class:`SnapshotCorrupted` says what is missing or wrong."""
        if data.get("version") != PLAN_VERSION:
            raise SnapshotCorrupted(
                f"live migration plan version {data.get('version')!r} is not supported (this "
                f"Kelpie reads version {PLAN_VERSION}): run the same Kelpie on both hosts"
            )
        try:
            record = SnapshotRecord.from_extra({RECORD_KEY: data["record"]})
            digest = data["guestkit_digest"]
            base = data["base_image_digest"]
            return cls(
                record=record,
                backend_version=str(data["backend_version"]), arch=str(data["arch"]),
                cpu_model=str(data["cpu_model"]), machine=str(data["machine"]),
                guestkit_digest=None if digest is None else str(digest),
                base_image_digest=None if base is None else str(base),
                vm_id=str(data["vm_id"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SnapshotCorrupted(f"the live migration plan is malformed: {exc}") from exc
