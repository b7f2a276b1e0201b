"""Command-line front of the simulator, shared by ``python -m kelpie.dst`` and ``kelpie dst``."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from kelpie.dst._sim import run_seed
from kelpie.sim._faults import FaultSpec, parse_fault_specs
from kelpie.vm import ConfigError

DEFAULT_FAULTS = "all"
DEFAULT_PROBABILITY = 0.03


def parse_faults(text: str, probability: float = DEFAULT_PROBABILITY) -> list[FaultSpec]:
    """``none`` -> no faults; otherwise :func:`parse_fault_specs`."""
    if text.strip() in ("", "none"):
        return []
    return parse_fault_specs(text, default_probability=probability)


def run_cli(seed: int, steps: int, faults: str, seeds: int = 1, show_trace: bool = False,
            probability: float = DEFAULT_PROBABILITY) -> int:
    """Run ``seeds`` consecutive seeds from ``seed``; print summaries; 1 if any failed."""
    try:
        specs = parse_faults(faults, probability)
    except ConfigError as exc:
        print(f"kelpie dst: {exc}", file=sys.stderr)
        return 2
    failed = []
    started = time.monotonic()
    for current in range(seed, seed + seeds):
        report = run_seed(current, steps, specs)
        if show_trace:
            print(report.trace_text, end="")
        if seeds == 1 or not report.ok:
            print(report.summary())
        if not report.ok:
            failed.append(current)
            print(f"reproduce with: python -m kelpie.dst --seed {current} --steps {steps} "
                  f"--faults {faults!r} --trace", file=sys.stderr)
    if seeds > 1:
        elapsed = time.monotonic() - started
        print(f"{seeds} seeds x {steps} steps in {elapsed:.1f}s: "
              f"{seeds - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kelpie.dst", description="Deterministic simulation of Kelpie VMs."
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the (first) run")
    parser.add_argument("--steps", type=int, default=100, help="operations per run")
    parser.add_argument("--seeds", type=int, default=1, help="how many consecutive seeds")
    parser.add_argument("--faults", default=DEFAULT_FAULTS,
                        help="'all', 'none', or specs like 'crash:p=0.1,exec_fail:ops=exec:max=2'")
    parser.add_argument("--probability", type=float, default=DEFAULT_PROBABILITY,
                        help="probability for faults given without p= (and for 'all')")
    parser.add_argument("--trace", action="store_true", help="print every step")
    args = parser.parse_args(argv)
    return run_cli(args.seed, args.steps, args.faults, args.seeds, args.trace, args.probability)
