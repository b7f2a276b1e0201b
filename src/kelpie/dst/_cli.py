"""Command-line front of the simulator, shared by ``python -m kelpie.dst`` and ``kelpie dst``."""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence

from kelpie.dst._crashpoints import CRASH_POINTS
from kelpie.dst._fleet_sim import run_fleet_seed
from kelpie.dst._runtime_sim import run_runtime_seed
from kelpie.dst._sim import SimReport, run_seed
from kelpie.dst._teleport_points import TELEPORT_CRASH_POINTS
from kelpie.dst._teleport_sim import run_teleport_seed
from kelpie.sim import FaultSpec, parse_fault_specs
from kelpie.vm import ConfigError

DEFAULT_FAULTS = "all"
DEFAULT_PROBABILITY = 0.03
DEFAULT_SCENARIO = "vm"

SCENARIOS: dict[str, Callable[[int, int, list[FaultSpec]], SimReport]] = {
    "vm": run_seed,
    "runtime": run_runtime_seed,
    "teleport": run_teleport_seed,
    "fleet": run_fleet_seed,
}
"""``vm``: MockVms driven directly; ``runtime``: the Runtime, crashed at every storage step;
``teleport``: two hosts moving sandboxes, either crashed at every durable teleport step;
``fleet``: the fleet's coordinator over simulated hosts that die, hang and dawdle."""
CRASH_POINT_NAMES: dict[str, list[str]] = {
    "runtime": [str(p) for p in CRASH_POINTS],
    "teleport": [str(p) for p in TELEPORT_CRASH_POINTS],
}


def parse_faults(text: str, probability: float = DEFAULT_PROBABILITY) -> list[FaultSpec]:
    """``none`` -> no faults; otherwise :func:`parse_fault_specs`."""
    if text.strip() in ("", "none"):
        return []
    return parse_fault_specs(text, default_probability=probability)


def run_cli(seed: int, steps: int, faults: str, seeds: int = 1, show_trace: bool = False,
            probability: float = DEFAULT_PROBABILITY, scenario: str = DEFAULT_SCENARIO) -> int:
    """Run ``seeds`` consecutive seeds from ``seed``; print summaries; 1 if any failed (or,
    for the runtime scenario over enough seeds, if a crash point was never hit)."""
    try:
        specs = parse_faults(faults, probability)
        run = SCENARIOS[scenario]
    except ConfigError as exc:
        print(f"kelpie dst: {exc}", file=sys.stderr)
        return 2
    except KeyError:
        print(f"kelpie dst: unknown scenario {scenario!r}; known: {', '.join(SCENARIOS)}",
              file=sys.stderr)
        return 2
    failed = []
    hits: Counter[str] = Counter()
    started = time.monotonic()
    for current in range(seed, seed + seeds):
        report = run(current, steps, specs)
        hits.update(report.crash_points)
        if show_trace:
            print(report.trace_text, end="")
        if seeds == 1 or not report.ok:
            print(report.summary())
        if not report.ok:
            failed.append(current)
            print(f"reproduce with: python -m kelpie.dst --scenario {scenario} --seed {current} "
                  f"--steps {steps} --faults {faults!r} --trace", file=sys.stderr)
    if seeds > 1:
        elapsed = time.monotonic() - started
        print(f"{seeds} seeds x {steps} steps in {elapsed:.1f}s: "
              f"{seeds - len(failed)} passed, {len(failed)} failed")
    points = CRASH_POINT_NAMES.get(scenario, [])
    uncovered = bool(points) and seeds > 1 and \
        not _coverage(points, hits, enough=seeds >= len(points) and bool(specs))
    return 1 if failed or uncovered else 0


def _coverage(points: list[str], hits: Counter[str], *, enough: bool) -> bool:
    """Print which crash points the seeds hit; False if some was missed over enough seeds
    (some are on failure paths only faults open, so without faults a miss is no failure)."""
    missed = [p for p in points if not hits[p]]
    counts = [hits[p] for p in points]
    print(f"crash points: {len(points) - len(missed)} of {len(points)} hit "
          f"(each {min(counts)} to {max(counts)} times)")
    if missed:
        print("never hit: " + "; ".join(missed))
    return not (missed and enough)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kelpie.dst",
        description="Deterministic simulation of Kelpie VMs (or of the runtime over them).",
    )
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default=DEFAULT_SCENARIO,
                        help="vm: VMs driven directly; runtime: the runtime, crashed at "
                        "every storage step (one crash point per seed); teleport: two hosts "
                        "moving sandboxes, crashed at every teleport step")
    parser.add_argument("--seed", type=int, default=0, help="seed of the (first) run")
    parser.add_argument("--steps", type=int, default=100, help="operations per run")
    parser.add_argument("--seeds", type=int, default=1, help="how many consecutive seeds")
    parser.add_argument("--faults", default=DEFAULT_FAULTS,
                        help="'all', 'none', or specs like 'crash:p=0.1,exec_fail:ops=exec:max=2'")
    parser.add_argument("--probability", type=float, default=DEFAULT_PROBABILITY,
                        help="probability for faults given without p= (and for 'all')")
    parser.add_argument("--trace", action="store_true", help="print every step")
    args = parser.parse_args(argv)
    return run_cli(args.seed, args.steps, args.faults, args.seeds, args.trace, args.probability,
                   args.scenario)
