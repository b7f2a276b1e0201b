"""The live migration plan: what a source tells its target, through JSON (no VM)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from kelpie import SnapshotCorrupted, VmConfig
from kelpie.backends.qemu import LivePlan
from kelpie.backends.qemu._snapshot import SnapshotRecord
from kelpie.backends.qemu._vm import QemuVm
from kelpie.vm import HostInfo, LiveMigratable


def a_plan() -> LivePlan:
    record = SnapshotRecord(
        config=VmConfig(memory_mib=256, env={"A": "1"}), hostname="kelpie-abc", accel="tcg",
        base_path=Path("/images/root.ext4"), base_format="raw", signature=("-m", "256"),
    )
    return LivePlan(
        record=record, backend_version="7.2.19", arch="x86_64", cpu_model="qemu64",
        machine="microvm", guestkit_digest="sha256:" + "a" * 64,
        base_image_digest="sha256:" + "b" * 64, vm_id="abc",
    )


def test_a_plan_survives_json() -> None:
    plan = a_plan()
    assert LivePlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


def test_a_plan_of_another_version_is_refused() -> None:
    data = {**a_plan().to_dict(), "version": 99}
    with pytest.raises(SnapshotCorrupted, match="version 99 is not supported"):
        LivePlan.from_dict(data)


@pytest.mark.parametrize("drop", ["record", "arch", "vm_id"])
def test_a_plan_missing_a_field_is_refused(drop: str) -> None:
    data = a_plan().to_dict()
    del data[drop]
    with pytest.raises(SnapshotCorrupted, match="malformed"):
        LivePlan.from_dict(data)


def test_the_target_checks_a_plan_like_a_full_snapshot() -> None:
    plan = a_plan()
    host = HostInfo(arch="x86_64", backend="qemu", backend_version="7.2.0",
                    cpu_model="qemu64", machine="microvm", guestkit_digest=plan.guestkit_digest)
    assert plan.manifest().incompatibilities(host) == []
    other = dataclasses.replace(host, cpu_model="host", guestkit_digest="sha256:" + "c" * 64)
    reasons = plan.manifest().incompatibilities(other)
    assert any("CPU model" in r for r in reasons) and any("guest kit" in r for r in reasons)


def test_a_qemu_vm_is_live_migratable() -> None:
    assert isinstance(QemuVm(VmConfig()), LiveMigratable)
    assert QemuVm.capabilities.live_migration
