"""The fleet's coordinator and placement, over simulated hosts on virtual time (the real
cluster is in test_fleet_ray.py), and the fleet DST scenario."""

from __future__ import annotations

import asyncio
import importlib.util
import random
import subprocess
import sys
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from conftest import real_part_missing
from kelpie.api import SandboxCreate
from kelpie.dst._cli import parse_faults
from kelpie.dst._fleet_sim import SimFleetHost, run_fleet_seed
from kelpie.fleet import (
    FleetCoordinator,
    FleetError,
    FleetTemplates,
    HostedSandbox,
    HostReport,
    HostStatus,
    Placement,
    PlacementError,
    Recovery,
    SandboxStatus,
    choose_host,
)
from kelpie.sim import SimRng, VirtualClock, run_simulated
from kelpie.vm import ConfigError

T = TypeVar("T")
FAULTS = parse_faults("all")


def _report(host: str, *, free: int = 4096, arches: tuple[str, ...] = ("x86_64",),
            templates: dict[str, int] | None = None) -> HostReport:
    return HostReport(host=host, address=f"http://{host}", arches=arches, backends=("qemu",),
                      accelerators=("tcg",), cpus=2, free_vcpus=2, memory_mib=8192,
                      free_memory_mib=free, free_disk_bytes=1 << 30,
                      templates=templates or {})


def test_placement_prefers_the_template_holder_then_the_most_memory_left() -> None:
    rng = random.Random(1)
    hosts = [_report("a", free=8000), _report("b", free=2000, templates={"t": 128})]
    assert choose_host(hosts, Placement(128, 1, template="t"), rng).host == "b"
    assert choose_host(hosts, Placement(128, 1), rng).host == "a"
    # what was placed since the last report counts against the host
    assert choose_host(hosts, Placement(128, 1), rng,
                       pending_mib={"a": 7000}).host == "b"


def test_placement_names_why_each_host_was_passed_over() -> None:
    hosts = [_report("a", free=300), _report("b", arches=("aarch64",))]
    with pytest.raises(PlacementError) as caught:
        choose_host(hosts, Placement(512, 1, arch="x86_64"), random.Random(1))
    message = str(caught.value)
    assert "a: 44 MiB free" in message
    assert "b: runs aarch64 guests, not x86_64" in message


def _simulated(make: Callable[[FleetCoordinator, dict[str, SimFleetHost]], Awaitable[T]],
               hosts: int = 2) -> T:
    clock = VirtualClock()
    rng = SimRng(7)
    store: dict[str, HostedSandbox] = {}
    sims = {f"h{i}": SimFleetHost(f"h{i}", rng.fork(f"h{i}"), store, lambda *_: None)
            for i in range(hosts)}
    for sim in sims.values():
        sim.peers = sims
    coordinator = FleetCoordinator(clock=clock.monotonic, rng=rng.fork("placement"),
                                   lost_after=30.0, call_timeout=5.0, create_timeout=5.0)
    for sim in sims.values():
        coordinator.add_host(sim)

    async def main() -> T:
        await coordinator.refresh()
        return await make(coordinator, sims)

    return run_simulated(main(), clock=clock)


def test_create_records_where_the_sandbox_is_and_labels_its_generation() -> None:
    async def scenario(fleet: FleetCoordinator, sims: dict[str, SimFleetHost]) -> None:
        placed = await fleet.create(SandboxCreate(name="box", memory_mib=256))
        copy = sims[placed.host].copies["box"]
        assert (placed.status, placed.generation, copy.generation) == (
            SandboxStatus.RUNNING, 1, 1)
        assert fleet.get(copy.id).name == "box"
        with pytest.raises(FleetError, match="already has a sandbox named 'box'"):
            await fleet.create(SandboxCreate(name="box"))

    _simulated(scenario)


def test_a_silent_host_is_declared_dead_and_its_sandboxes_come_back_when_it_does() -> None:
    async def scenario(fleet: FleetCoordinator, sims: dict[str, SimFleetHost]) -> None:
        placed = await fleet.create(SandboxCreate(name="box", memory_mib=256))
        sims[placed.host].mode = "partitioned"
        await fleet.refresh()
        assert fleet.get("box").status is SandboxStatus.RUNNING  # silent, not yet too long
        for _ in range(8):
            await fleet.refresh()
        lost = fleet.get("box")
        assert lost.status is SandboxStatus.LOST
        assert lost.reason is not None and "no report from host" in lost.reason
        assert [h.status for h in fleet.hosts() if h.host == placed.host] == [HostStatus.DEAD]
        sims[placed.host].mode = "up"
        await fleet.refresh()
        back = fleet.get("box")
        assert back.status is SandboxStatus.RUNNING and back.host == placed.host
        assert "box" in sims[placed.host].copies  # reported back, not destroyed
        assert [e.kind for e in fleet.events()][-2:] == ["host-up", "returned"]

    _simulated(scenario)


def test_ray_declaring_a_node_dead_loses_its_sandboxes_at_once() -> None:
    async def scenario(fleet: FleetCoordinator, sims: dict[str, SimFleetHost]) -> None:
        placed = await fleet.create(SandboxCreate(name="box", memory_mib=256))
        fleet.host_died(placed.host, "Ray declared node n1 dead")
        assert fleet.get("box").status is SandboxStatus.LOST
        assert fleet.get("box").reason == "its host died: Ray declared node n1 dead"

    _simulated(scenario)


def test_a_create_whose_answer_was_lost_is_removed_once_the_host_reports() -> None:
    async def scenario(fleet: FleetCoordinator, sims: dict[str, SimFleetHost]) -> None:
        fleet.host_died("h1", "gone for this test")  # only h0 can take it
        real_reach = sims["h0"]._reach
        calls = 0

        async def reply_lost() -> None:
            nonlocal calls
            calls += 1
            await real_reach()
            if calls == 2:  # the host made the sandbox; its answer never arrives
                raise ConnectionError("connection reset")

        sims["h0"]._reach = reply_lost  # type: ignore[method-assign]
        with pytest.raises(FleetError, match="the fleet removes it when the host next "):
            await fleet.create(SandboxCreate(name="box", memory_mib=256))
        assert "box" in sims["h0"].copies and fleet.sandboxes() == []
        await fleet.refresh()
        await fleet.refresh()
        assert "box" not in sims["h0"].copies
        assert [e.kind for e in fleet.events() if e.name == "box"] == ["abandoned", "removed"]

    _simulated(scenario)


def test_a_host_refusing_the_request_leaves_nothing_to_clean_up() -> None:
    async def scenario(fleet: FleetCoordinator, sims: dict[str, SimFleetHost]) -> None:
        async def refuse(request: SandboxCreate) -> HostedSandbox:
            raise ConfigError(["image 'nope' is not stored here"], what="sandbox")

        for sim in sims.values():
            sim.create = refuse  # type: ignore[method-assign]
        with pytest.raises(FleetError, match=r"(?s)refused sandbox 'box'.*nope"):
            await fleet.create(SandboxCreate(name="box", image="nope"))
        assert fleet.sandboxes() == []
        assert [e.kind for e in fleet.events()] == []  # nothing abandoned to clean up

    _simulated(scenario)


def test_drain_moves_everything_and_places_nothing_more_there() -> None:
    async def scenario(fleet: FleetCoordinator, sims: dict[str, SimFleetHost]) -> None:
        for i in range(4):
            await fleet.create(SandboxCreate(name=f"b{i}", memory_mib=128))
        sims["h0"].rng = SimRng(3)  # (a drain's teleport in the sim fails 1 in 10)
        moved = await fleet.drain("h0")
        stayed = [s.name for s in moved if s.host == "h0"]
        assert {s.name for s in fleet.sandboxes() if s.host == "h0"} == set(stayed)
        assert set(sims["h0"].copies) == set(stayed)
        placed = await fleet.create(SandboxCreate(name="after", memory_mib=128))
        assert placed.host == "h1"
        fleet.undrain("h0")
        assert [h.status for h in fleet.hosts()] == [HostStatus.UP, HostStatus.UP]
        with pytest.raises(FleetError, match="no host 'h9' in the fleet; known: h0, h1"):
            await fleet.drain("h9")
        with pytest.raises(FleetError, match="no host 'h9' in the fleet; known: h0, h1"):
            fleet.undrain("h9")

    _simulated(scenario)


def test_a_restarted_coordinator_adopts_what_the_hosts_report() -> None:
    async def scenario(fleet: FleetCoordinator, sims: dict[str, SimFleetHost]) -> None:
        sims["h0"].copies["old"] = HostedSandbox(id="h0-9", name="old", generation=3,
                                                 state="running", memory_mib=128)
        await fleet.refresh()
        adopted = fleet.get("old")
        assert (adopted.host, adopted.generation, adopted.status) == (
            "h0", 3, SandboxStatus.RUNNING)

    _simulated(scenario)


def test_fleet_simulation_is_reproducible_and_holds_its_invariants() -> None:
    first = [run_fleet_seed(seed, 120, faults=[object()]) for seed in range(1, 9)]  # type: ignore[list-item]
    again = run_fleet_seed(3, 120, faults=FAULTS)
    assert [r.violations for r in first] == [[]] * 8
    assert again.trace_digest == first[2].trace_digest
    kinds = {k for r in first for k in r.outcomes if k.startswith("event:")}
    assert {"event:lost", "event:returned", "event:moved", "event:abandoned", "event:saved",
            "event:recovered", "event:fenced"} <= kinds


def test_fleet_simulation_catches_a_coordinator_that_leaves_orphans(
        monkeypatch: pytest.MonkeyPatch) -> None:
    async def forget(self: FleetCoordinator) -> None:
        pass

    monkeypatch.setattr(FleetCoordinator, "_clean_doomed", forget)
    found = {v.invariant for seed in range(1, 21)
             for v in run_fleet_seed(seed, 100, faults=FAULTS).violations}
    assert "no-orphan" in found


def test_fleet_simulation_catches_a_coordinator_that_never_recovers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    async def never(self: FleetCoordinator, record: object, saved: object) -> None:
        pass

    monkeypatch.setattr(FleetCoordinator, "_recover", never)
    found = {v.invariant for seed in range(1, 21)
             for v in run_fleet_seed(seed, 100, faults=FAULTS).violations}
    assert "recoverable-is-recovered" in found


def test_fleet_scenario_runs_from_the_dst_command_line() -> None:
    done = subprocess.run([sys.executable, "-m", "kelpie.dst", "--scenario", "fleet",
                           "--seeds", "3", "--faults", "all"], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "3 passed, 0 failed" in done.stdout


def test_fleet_cli_says_when_no_ray_cluster_answers() -> None:
    if importlib.util.find_spec("ray") is None:
        real_part_missing("the fleet needs Ray (pip install -e '.[fleet]')")
    done = subprocess.run([sys.executable, "-m", "kelpie", "fleet", "ls", "--address",
                           "127.0.0.1:1"], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode != 0
    assert "no Ray cluster answers at 127.0.0.1:1" in done.stderr


def test_create_on_a_named_host_and_a_clear_error_for_an_unknown_one() -> None:
    async def scenario(fleet: FleetCoordinator, sims: dict[str, SimFleetHost]) -> None:
        for i in range(3):
            placed = await fleet.create(SandboxCreate(name=f"b{i}", memory_mib=128), host="h1")
            assert placed.host == "h1"
        with pytest.raises(FleetError, match="host 'h9' is not up in the fleet"):
            await fleet.create(SandboxCreate(name="x"), host="h9")

    _simulated(scenario)


def test_share_template_pushes_from_a_holder_and_pulls_onto_the_others() -> None:
    async def scenario(fleet: FleetCoordinator, sims: dict[str, SimFleetHost]) -> None:
        with pytest.raises(FleetError, match="no host that is up holds template 't'"):
            await FleetTemplates(fleet).share("t")
        calls: list[tuple[str, str]] = []
        for sim in sims.values():
            async def push(name: str, host: str = sim.name) -> object:
                calls.append(("push", host))
                return name

            async def pull(name: str, host: str = sim.name) -> object:
                calls.append(("pull", host))
                if host == "h2":
                    raise ConnectionError("store unreachable")
                return name

            sim.push_template = push  # type: ignore[method-assign]
            sim.pull_template = pull  # type: ignore[method-assign]
        real_report = sims["h0"].report

        async def with_template() -> HostReport:
            report = await real_report()
            return HostReport(**{**report.__dict__, "templates": {"t": 128}})

        sims["h0"].report = with_template  # type: ignore[method-assign]
        await fleet.refresh()
        shared = await FleetTemplates(fleet).share("t")
        assert calls == [("push", "h0"), ("pull", "h1"), ("pull", "h2")]
        assert shared == {"h0": None, "h1": None, "h2": "store unreachable"}

    _simulated(scenario, hosts=3)


def test_a_lost_sandbox_comes_back_elsewhere_from_its_latest_save_and_the_old_copy_is_fenced(
        ) -> None:
    async def scenario(fleet: FleetCoordinator, sims: dict[str, SimFleetHost]) -> None:
        placed = await fleet.create(SandboxCreate(name="box", memory_mib=256), host="h0",
                                    recover=Recovery("checkpoint", 10.0))
        assert sims["h0"].copies["box"].recover == Recovery("checkpoint", 10.0)  # label
        for _ in range(3):  # two saves, 10 s apart: the store keeps only the latest
            await asyncio.sleep(6.0)
            await fleet.refresh()
        saved = fleet.get("box").saved
        assert saved is not None and saved.generation == 1
        assert sorted(sims["h0"].store) == [saved.key]
        sims["h0"].mode = "dead"
        fleet.host_died(placed.host, "Ray declared node n0 dead")
        await fleet.refresh()  # starts the recovery in the background
        await asyncio.sleep(1.0)
        back = fleet.get("box")
        assert (back.host, back.generation, back.status) == ("h1", 2, SandboxStatus.RUNNING)
        assert back.reason is not None and "lost on h0: its host died" in back.reason
        assert sims["h1"].copies["box"].generation == 2
        sims["h0"].mode = "up"  # the old host returns with generation 1: fenced, not kept
        await fleet.refresh()
        await fleet.refresh()
        assert "box" not in sims["h0"].copies and "box" in sims["h1"].copies
        kinds = [e.kind for e in fleet.events() if e.name == "box"]
        assert kinds[-3:] == ["lost", "recovered", "fenced"]
        await fleet.remove("box")  # its saved states go with it
        assert sims["h1"].store == {}

    _simulated(scenario)


def test_a_lost_sandbox_without_a_saved_state_stays_lost_with_its_reason() -> None:
    async def scenario(fleet: FleetCoordinator, sims: dict[str, SimFleetHost]) -> None:
        await fleet.create(SandboxCreate(name="box", memory_mib=256), host="h0",
                           recover=Recovery("snapshot", 60.0))
        fleet.host_died("h0", "Ray declared node n0 dead")
        await fleet.refresh()
        await asyncio.sleep(1.0)
        lost = fleet.get("box")
        assert (lost.status, lost.saved) == (SandboxStatus.LOST, None)
        assert "box" not in sims["h1"].copies

    _simulated(scenario)


def test_a_recovery_policy_names_what_is_wrong_with_it() -> None:
    with pytest.raises(ConfigError) as caught:
        Recovery("zip", 0.5)  # type: ignore[arg-type]
    assert caught.value.problems == (
        "recover='zip': expected 'checkpoint' or 'snapshot'",
        "recover_interval=0.5: expected seconds, at least 5")
    assert Recovery.from_label("snapshot/30") == Recovery("snapshot", 30.0)
    assert Recovery.from_label("nonsense") is None


def test_a_shared_templates_image_is_pulled_pinned_to_its_digest() -> None:
    from kelpie.fleet._agent import pinned

    digest = "sha256:" + "ab" * 32
    assert str(pinned("docker.io/library/alpine:3.19", digest)) == \
        f"docker.io/library/alpine@{digest}"
    # a colon before the last slash is a registry's port, not a tag
    local = pinned("10.0.0.1:5000/team/app", digest)
    assert (str(local), local.registry) == (f"10.0.0.1:5000/team/app@{digest}",
                                            "10.0.0.1:5000")
    assert str(pinned("10.0.0.1:5000/team/app:v2@sha256:" + "00" * 32, digest)) == \
        f"10.0.0.1:5000/team/app@{digest}"
