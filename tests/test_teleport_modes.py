"""The mode a teleport runs in, decided from the two hosts' facts before anything pauses."""

from __future__ import annotations

from pathlib import Path

import pytest

from kelpie import TeleportRefused
from kelpie.api import BackendFacts, HostFacts, TeleportMode
from kelpie.teleport import choose_mode
from kelpie.vm import Mount, VmConfig

QEMU_CAPS = ["pause", "snapshot:full", "snapshot:disk", "snapshot:checkpoint", "live_migration"]


def facts(arch: str = "x86_64", *, accel: str = "tcg", version: str = "7.2.0",
          caps: list[str] | None = None, kits: list[str] | None = None,
          available: bool = True, emulates: tuple[str, ...] = ()) -> HostFacts:
    qemu = BackendFacts(name="qemu", available=available, reason="", version=version,
                        arches={arch: accel, **{a: "tcg" for a in emulates}}
                        if available else {},
                        capabilities=QEMU_CAPS if caps is None else caps)
    return HostFacts(kelpie_version="0", arch=arch, cpu_model="cpu", cpus=2, free_vcpus=2,
                     memory_mib=4096, free_memory_mib=2048, free_disk_bytes=1 << 40,
                     backends=[qemu], images=[], guestkits=["k1"] if kits is None else kits)


def choose(requested: str = "auto", config: VmConfig | None = None,  # type: ignore[no-untyped-def]
           to_arch: str | None = None, **target: object):
    return choose_mode(TeleportMode(requested), backend="qemu", config=config or VmConfig(),
                       source=facts(emulates=("aarch64",)),
                       target=facts(**target),  # type: ignore[arg-type]
                       guestkit_digest="k1", arch=to_arch)


def test_another_architecture_is_reached_by_checkpoint_and_says_why() -> None:
    # the target emulates aarch64 too: by default the guest keeps its own arch there
    assert choose(emulates=("aarch64",)).mode is TeleportMode.LIVE
    asked = choose(to_arch="aarch64", emulates=("aarch64",))
    assert (asked.mode, asked.target_arch) == (TeleportMode.CHECKPOINT, "aarch64")
    assert "the sandbox's guest is x86_64 and would be aarch64 there" in asked.reason
    with pytest.raises(TeleportRefused, match="a memory snapshot resumes only in a guest of "
                                              "its own architecture"):
        choose("full", to_arch="aarch64", emulates=("aarch64",))
    # an aarch64 sandbox (emulated here) goes home to an aarch64 target in full mode
    home = choose_mode(TeleportMode.AUTO, backend="qemu", config=VmConfig(arch="aarch64"),
                       source=facts(emulates=("aarch64",)), target=facts("aarch64"),
                       guestkit_digest="k1")
    assert home.mode is TeleportMode.LIVE and home.target_arch == "aarch64"


def test_auto_picks_live_when_both_hosts_can() -> None:
    choice = choose()
    assert choice.mode is TeleportMode.LIVE
    assert "best mode" in choice.reason


def test_auto_says_why_it_fell_to_full_or_checkpoint() -> None:
    full = choose(caps=[c for c in QEMU_CAPS if c != "live_migration"])
    assert full.mode is TeleportMode.FULL
    assert "not live: backend qemu on the target cannot do live_migration" in full.reason
    checkpoint = choose(arch="aarch64")
    assert checkpoint.mode is TeleportMode.CHECKPOINT
    assert "backend qemu on the target runs no x86_64 guests (only aarch64)" in \
        checkpoint.reason
    assert checkpoint.target_arch == "aarch64"
    other_kit = choose(kits=["k2"])
    assert other_kit.mode is TeleportMode.CHECKPOINT and "guest kit" in other_kit.reason


def test_an_explicit_mode_the_pair_cannot_do_is_refused_with_every_reason() -> None:
    with pytest.raises(TeleportRefused) as refused:
        choose("full", arch="aarch64", version="8.2.0")
    text = str(refused.value)
    assert "runs no x86_64 guests (only aarch64)" in text and "version 7.2.0 here but 8.2.0" in text


def test_an_undecided_accelerator_is_not_a_mismatch() -> None:
    assert choose(accel="").mode is TeleportMode.LIVE
    assert choose(accel="kvm").mode is TeleportMode.CHECKPOINT


def test_volumes_are_refused_unless_left_behind_in_checkpoint_mode(tmp_path: Path) -> None:
    config = VmConfig(mounts=(Mount(tmp_path, "/data"),))
    with pytest.raises(TeleportRefused, match=f"{tmp_path}:/data"):
        choose(config=config)
    left = choose_mode(TeleportMode.AUTO, backend="qemu", config=config, source=facts(),
                       target=facts(), without_volumes=True)
    assert left.mode is TeleportMode.CHECKPOINT


def test_a_target_without_the_backend_gets_a_checkpoint_on_one_it_has() -> None:
    target = facts()
    target.backends[0].name = "firecracker"
    target.backends[0].capabilities = ["snapshot:checkpoint"]
    choice = choose_mode(TeleportMode.AUTO, backend="qemu", config=VmConfig(), source=facts(),
                         target=target)
    assert choice.mode is TeleportMode.CHECKPOINT and choice.target_backend == "firecracker"
