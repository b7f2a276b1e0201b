"""What a Virtualization.framework full snapshot holds besides its blobs.

A full snapshot (a :class:`~kelpie.vm.VmSnapshot` directory) has these blobs::

    state.vzvmsave   the VM's state as ``saveMachineStateToURL`` wrote it (memory, devices)
    disk.img         the VM's whole writable root disk, copied while the VM was paused
                     (absent when the VM has no root disk)

and ``extra["vz"]`` (:class:`VzRecord`) what the framework needs to find again in the
machine a restore loads the state into: the same kernel command line, CPUs, memory and
devices (the VM's configuration), the generic platform's machine identifier and the NIC's
MAC address. The guest kit is named by the manifest's ``guestkit_digest``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from kelpie.vm import ConfigError, SnapshotCorrupted, SnapshotManifest, VmConfig

RECORD_KEY = "vz"
RECORD_VERSION = 1
STATE_BLOB = "state.vzvmsave"
DISK_BLOB = "disk.img"


@dataclasses.dataclass(frozen=True)
class VzRecord:
    """What a restore needs besides the blobs (the manifest's ``extra["vz"]``)."""

    config: VmConfig
    """The VM's configuration when the snapshot was taken."""
    hostname: str
    """The guest's host name when it booted."""
    command_line: str
    """The kernel command line the saved guest booted with (the restored machine's too)."""
    agent_port: int
    machine_id: bytes
    mac_address: str | None

    def to_extra(self) -> dict[str, Any]:
        return {RECORD_KEY: {
            "version": RECORD_VERSION,
            "config": self.config.to_dict(),
            "hostname": self.hostname,
            "command_line": self.command_line,
            "agent_port": self.agent_port,
            "machine_id": self.machine_id.hex(),
            "mac_address": self.mac_address,
        }}

    @classmethod
    def from_manifest(cls, manifest: SnapshotManifest) -> VzRecord:
        """Read the record; :class:`SnapshotCorrupted` says what is missing or wrong."""
        return cls.from_extra(manifest.extra)

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any]) -> VzRecord:
        data = extra.get(RECORD_KEY)
        if not isinstance(data, dict):
            raise SnapshotCorrupted(f"the manifest has no extra[{RECORD_KEY!r}] record: not a "
                                    f"Virtualization.framework snapshot made by Kelpie")
        if data.get("version") != RECORD_VERSION:
            raise SnapshotCorrupted(f"vz snapshot record version {data.get('version')!r} is "
                                    f"not supported (this Kelpie reads version {RECORD_VERSION})")
        try:
            mac = data["mac_address"]
            return cls(
                config=VmConfig.from_dict(data["config"]),
                hostname=str(data["hostname"]),
                command_line=str(data["command_line"]),
                agent_port=int(data["agent_port"]),
                machine_id=bytes.fromhex(str(data["machine_id"])),
                mac_address=None if mac is None else str(mac),
            )
        except (ConfigError, KeyError, TypeError, ValueError) as exc:
            raise SnapshotCorrupted(f"the vz snapshot record is malformed: {exc}") from exc
