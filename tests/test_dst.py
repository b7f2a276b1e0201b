"""Deterministic simulation: determinism, invariants that can fail, faults, virtual time."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from kelpie import ConfigError, MockVm, VmSnapshot
from kelpie.dst import (
    Fault,
    FaultInjector,
    FaultSpec,
    SimRng,
    SimStorage,
    SimulatedCrash,
    Simulation,
    SimulationDeadlock,
    VirtualClock,
    parse_fault_specs,
    run_seed,
    run_simulated,
)
from kelpie.vm import StorageError

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
    assert len(parse_fault_specs("all")) == len(Fault) == 17


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
