"""Deterministic simulation: determinism, invariants that can fail, faults, virtual time."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from kelpie import ConfigError, MockVm, VmSnapshot
from kelpie.dst import (
    CRASH_POINTS,
    RuntimeSimulation,
    Simulation,
    crash_point_for,
    run_runtime_seed,
    run_seed,
)
from kelpie.dst._crashpoints import OPERATION_STEPS
from kelpie.sim import (
    CrashWhen,
    Fault,
    FaultInjector,
    FaultSpec,
    SimRng,
    SimStorage,
    SimulatedCrash,
    SimulationDeadlock,
    VirtualClock,
    parse_fault_specs,
    run_simulated,
)
from kelpie.vm import BackendRegistry, StorageError, VmConfig, VmInstance

ALL_FAULTS = parse_fault_specs("all", default_probability=0.03)


def test_same_seed_same_trace(dst_seed: int) -> None:
    first = run_seed(dst_seed, 100, ALL_FAULTS)
    second = run_seed(dst_seed, 100, ALL_FAULTS)
    assert first.trace_text == second.trace_text, f"DST_SEED={dst_seed}"
    assert first.trace_digest == second.trace_digest


def test_different_seeds_differ(dst_seed: int) -> None:
    assert run_seed(dst_seed, 50, ALL_FAULTS).trace != run_seed(dst_seed + 1, 50, ALL_FAULTS).trace


def test_trace_identical_across_processes_and_hash_seeds(dst_seed: int) -> None:
    """Byte-identical traces from separate interpreters with different hash randomisation."""
    outputs = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        proc = subprocess.run(
            [sys.executable, "-m", "kelpie.dst", "--seed", str(dst_seed), "--steps", "60",
             "--trace"], capture_output=True, env=env, check=False, timeout=120,
        )
        assert proc.returncode == 0, f"DST_SEED={dst_seed}: {proc.stdout!r} {proc.stderr!r}"
        outputs.append(proc.stdout)
    assert outputs[0] == outputs[1], f"DST_SEED={dst_seed}"


def test_many_seeds_with_faults_hold_invariants(dst_seed: int) -> None:
    failures = []
    fired: set[str] = set()
    for seed in range(dst_seed, dst_seed + 500):
        report = run_seed(seed, 100, ALL_FAULTS)
        fired |= set(report.faults_fired)
        if not report.ok:
            failures.append(f"seed {seed}:\n{report.summary()}")
    assert not failures, "\n".join(failures[:3]) + f"\n(DST_SEED={dst_seed})"
    assert fired == {f.value for f in Fault}, "every fault should fire somewhere in 500 seeds"


class _LossyRestoreVm(MockVm):
    """A deliberately broken backend: restore forgets one file."""

    async def _do_restore(self, snapshot: VmSnapshot, *, paused: bool) -> None:
        await super()._do_restore(snapshot, paused=paused)
        for path in sorted(self.fs.files)[:1]:
            del self.fs.files[path]


class _BuggySimulation(Simulation):
    def _new_vm(self) -> Any:
        vm = super()._new_vm()
        vm.__class__ = _LossyRestoreVm
        return vm


def test_invariant_catches_a_buggy_restore_and_the_seed_reproduces_it(dst_seed: int) -> None:
    for seed in range(dst_seed, dst_seed + 50):
        report = _BuggySimulation(seed, 100, []).run()
        if not report.ok:
            break
    else:
        pytest.fail(f"the broken restore was never caught (DST_SEED={dst_seed})")
    assert any(v.invariant == "restore-equals-snapshot" for v in report.violations)
    again = _BuggySimulation(seed, 100, []).run()
    assert [str(v) for v in again.violations] == [str(v) for v in report.violations]
    assert again.trace_text == report.trace_text


def test_summary_is_readable(dst_seed: int) -> None:
    text = run_seed(dst_seed, 30, ALL_FAULTS).summary()
    assert text.startswith(f"seed {dst_seed}: 30 steps")
    assert "invariants: all held" in text


# ---- fault injector -----------------------------------------------------------------------
def test_probability_zero_and_one() -> None:
    never = FaultInjector(SimRng(1), [FaultSpec(Fault.CRASH, 0.0)])
    always = FaultInjector(SimRng(1), [FaultSpec(Fault.CRASH, 1.0)])
    assert not any(never.check(Fault.CRASH, "x") for _ in range(100))
    assert all(always.check(Fault.CRASH, "x") for _ in range(100))


def test_after_and_max_times_and_operation_filter() -> None:
    spec = FaultSpec(Fault.EXEC_FAIL, 1.0, frozenset({"exec"}), after=2, max_times=3)
    inj = FaultInjector(SimRng(1), [spec])
    assert not inj.check(Fault.EXEC_FAIL, "read")  # filtered: does not count
    results = [inj.check(Fault.EXEC_FAIL, "exec") for _ in range(8)]
    assert results == [False, False, True, True, True, False, False, False]
    assert inj.fired == {Fault.EXEC_FAIL: 3}
    assert not inj.check(Fault.CRASH, "exec")  # not configured


def test_probability_is_respected_statistically() -> None:
    inj = FaultInjector(SimRng(3), [FaultSpec(Fault.CRASH, 0.25)])
    hits = sum(inj.check(Fault.CRASH, "x") for _ in range(4000))
    assert 850 < hits < 1150


def test_parse_specs() -> None:
    (spec,) = parse_fault_specs("exec_fail:p=0.5:ops=exec|write:after=3:max=2")
    assert spec == FaultSpec(Fault.EXEC_FAIL, 0.5, frozenset({"exec", "write"}), 3, 2)
    assert len(parse_fault_specs("all")) == len(Fault) == 18


@pytest.mark.parametrize("text,message", [
    ("nope", "unknown fault 'nope'; known faults: boot_fail"),
    ("crash:p=2", "probability 2.0 is not in 0..1"),
    ("crash:q=1", "unknown option 'q=1'"),
    ("crash:after=-1", "after=-1 must be >= 0"),
])
def test_parse_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_fault_specs(text)


# ---- virtual time -------------------------------------------------------------------------
def test_virtual_clock_takes_no_wall_time() -> None:
    clock = VirtualClock()

    async def main() -> float:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(3600)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(10):
                await asyncio.sleep(100)
        return loop.time()

    started = time.monotonic()
    assert run_simulated(main(), clock=clock) == pytest.approx(3610)
    assert clock.ticks == 3610 * 10**9
    assert time.monotonic() - started < 1


def test_deadlock_is_reported_not_hung() -> None:
    async def main() -> None:
        await asyncio.Event().wait()

    with pytest.raises(SimulationDeadlock):
        run_simulated(main(), clock=VirtualClock())


def test_scheduling_order_follows_the_seed() -> None:
    def order(seed: int) -> list[int]:
        seen: list[int] = []

        async def worker(i: int) -> None:
            await asyncio.sleep(0)
            seen.append(i)

        async def main() -> None:
            await asyncio.gather(*(worker(i) for i in range(20)))

        run_simulated(main(), clock=VirtualClock(), rng=SimRng(seed))
        return seen

    assert order(5) == order(5)
    assert order(5) != order(6)
    assert sorted(order(5)) == list(range(20))


# ---- simulated storage --------------------------------------------------------------------
def storage_with(fault: Fault) -> SimStorage:
    return SimStorage(SimRng(1), FaultInjector(SimRng(1), [FaultSpec(fault, 1.0)]))


def test_storage_faults() -> None:
    p = Path("/d/f")
    fail = storage_with(Fault.STORAGE_WRITE_FAIL)
    with pytest.raises(StorageError, match="injected I/O error"):
        fail.write_bytes(p, b"data")
    assert not fail.exists(p)

    torn = storage_with(Fault.STORAGE_PARTIAL_WRITE)
    with pytest.raises(StorageError, match="torn write"):
        torn.write_bytes(p, b"0123456789")
    assert len(torn.files[str(p)]) < 10

    before = storage_with(Fault.CRASH_BEFORE_WRITE)
    with pytest.raises(SimulatedCrash):
        before.write_bytes(p, b"x")
    assert str(p) not in before.files
    with pytest.raises(SimulatedCrash):
        before.read_bytes(p)  # the crashed host does nothing until restart
    before.restart()
    assert not before.exists(p)

    after = storage_with(Fault.CRASH_AFTER_WRITE)
    with pytest.raises(SimulatedCrash):
        after.write_bytes(p, b"x")
    after.restart()
    assert after.read_bytes(p) == b"x"

    rot = storage_with(Fault.SNAPSHOT_CORRUPTION)
    rot.write_bytes(p, b"abc")
    assert rot.read_bytes(p) != b"abc" and str(p) in rot.corrupted

    lost_tail = storage_with(Fault.SNAPSHOT_TRUNCATION)
    lost_tail.write_bytes(p, b"abc")
    assert len(lost_tail.read_bytes(p)) < 3 and str(p) in lost_tail.truncated


@pytest.mark.parametrize(("when", "landed"), [(CrashWhen.BEFORE, False), (CrashWhen.AFTER, True)])
def test_a_planned_crash_lands_before_or_after_the_chosen_step(
    when: CrashWhen, landed: bool,
) -> None:
    storage = SimStorage(SimRng(1))
    seen: list[tuple[str, str]] = []
    crashes: list[int] = []

    def hook(op: str, path: Path) -> CrashWhen | None:
        seen.append((op, str(path)))
        return when if len(seen) == 3 else None

    storage.step_hook = hook
    storage.on_crash = lambda: crashes.append(storage.steps)
    storage.mkdir(Path("/a"))
    storage.write_bytes(Path("/a/f"), b"1")
    with pytest.raises(SimulatedCrash, match=f"{when.value} this step"):
        storage.rename(Path("/a"), Path("/b"))
    assert seen == [("mkdir", "/a"), ("write", "/a/f"), ("rename", "/a")]
    assert crashes == [3]
    with pytest.raises(SimulatedCrash):
        storage.mkdir(Path("/c"))
    storage.restart()
    assert storage.exists(Path("/b/f")) is landed
    assert storage.exists(Path("/a/f")) is not landed


def test_streams_are_steps_too() -> None:
    storage = SimStorage(SimRng(1))
    with storage.open_append(Path("/log")) as log:
        log.write(b"one ")
        log.write(b"two")
    assert storage.read_bytes(Path("/log")) == b"one two"
    assert storage.steps == 3
    with pytest.raises(StorageError, match="exists"):
        storage.open_write(Path("/log"))


# ---- the runtime scenario -----------------------------------------------------------------
def test_runtime_same_seed_same_trace(dst_seed: int) -> None:
    first = run_runtime_seed(dst_seed, 100, ALL_FAULTS)
    second = run_runtime_seed(dst_seed, 100, ALL_FAULTS)
    assert first.trace_text == second.trace_text, f"DST_SEED={dst_seed}"
    assert first.ok, first.summary()
    assert run_runtime_seed(dst_seed + 1, 100, ALL_FAULTS).trace != first.trace


def test_runtime_trace_identical_across_processes_and_hash_seeds(dst_seed: int) -> None:
    outputs = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        proc = subprocess.run(
            [sys.executable, "-m", "kelpie.dst", "--scenario", "runtime", "--seed",
             str(dst_seed), "--steps", "60", "--trace"],
            capture_output=True, env=env, check=False, timeout=120,
        )
        assert proc.returncode == 0, f"DST_SEED={dst_seed}: {proc.stdout!r} {proc.stderr!r}"
        outputs.append(proc.stdout)
    assert outputs[0] == outputs[1], f"DST_SEED={dst_seed}"
    assert b"kelpie-dst-" not in outputs[0]  # no temporary directory names in the trace


def test_crash_points_are_enumerated_and_each_seed_has_one() -> None:
    assert len(set(CRASH_POINTS)) == len(CRASH_POINTS)
    assert {crash_point_for(s) for s in range(len(CRASH_POINTS))} == set(CRASH_POINTS)
    assert crash_point_for(3) == crash_point_for(3 + len(CRASH_POINTS))
    steps = {(p.operation, p.step) for p in CRASH_POINTS if p.primer is None}
    assert steps == {(op, i) for op, n in OPERATION_STEPS.items() for i in range(1, n + 1)}


def test_consecutive_seeds_hit_every_crash_point_and_hold_invariants(dst_seed: int) -> None:
    hits: Counter[str] = Counter()
    failures = []
    for seed in range(dst_seed, dst_seed + len(CRASH_POINTS)):
        report = run_runtime_seed(seed, 100, [])
        hits.update(report.crash_points)
        if not report.ok:
            failures.append(f"seed {seed}:\n{report.summary()}")
    assert not failures, "\n".join(failures[:3]) + f"\n(DST_SEED={dst_seed})"
    missed = {str(p) for p in CRASH_POINTS} - set(hits)
    assert not missed, f"crash points no seed reached: {sorted(missed)} (DST_SEED={dst_seed})"


def test_runtime_scenario_with_faults_holds_invariants(dst_seed: int) -> None:
    failures = []
    for seed in range(dst_seed, dst_seed + 60):
        report = run_runtime_seed(seed, 100, ALL_FAULTS)
        if not report.ok:
            failures.append(f"seed {seed}:\n{report.summary()}")
    assert not failures, "\n".join(failures[:3]) + f"\n(DST_SEED={dst_seed})"


class _LossyRuntimeSimulation(RuntimeSimulation):
    """The runtime over a deliberately broken backend: restore forgets one file."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed, 100, [])
        durable = self.backend

        def create(config: VmConfig, **options: Any) -> VmInstance:
            vm = durable.create(config, **options)
            vm.__class__ = _LossyRestoreVm
            return vm

        self.registry = BackendRegistry()
        self.registry.register(dataclasses.replace(durable.spec(), create=create))


def test_runtime_invariant_catches_a_buggy_restore(dst_seed: int) -> None:
    for seed in range(dst_seed, dst_seed + 50):
        report = _LossyRuntimeSimulation(seed).run()
        if not report.ok:
            break
    else:
        pytest.fail(f"the broken restore was never caught (DST_SEED={dst_seed})")
    assert {v.invariant for v in report.violations} == {"restore-equals-snapshot"}
    assert _LossyRuntimeSimulation(seed).run().trace_text == report.trace_text


def test_cli_reports_crash_point_coverage() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "kelpie.dst", "--scenario", "runtime", "--seeds",
         str(len(CRASH_POINTS)), "--steps", "60", "--faults", "none"],
        capture_output=True, text=True, check=False, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"crash points: {len(CRASH_POINTS)} of {len(CRASH_POINTS)} hit" in proc.stdout
