"""``kelpie dst``: deterministic simulation runs."""

from __future__ import annotations

import click

from kelpie.dst._cli import (
    DEFAULT_FAULTS,
    DEFAULT_PROBABILITY,
    DEFAULT_SCENARIO,
    SCENARIOS,
    run_cli,
)


@click.command()
@click.option("--scenario", type=click.Choice(sorted(SCENARIOS)), default=DEFAULT_SCENARIO,
              show_default=True,
              help="vm: VMs driven directly; runtime: the runtime, crashed at every storage "
              "step; teleport: two hosts moving sandboxes, crashed at every teleport step.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the (first) run.")
@click.option("--steps", type=int, default=100, show_default=True, help="Operations per run.")
@click.option("--seeds", type=int, default=1, show_default=True, help="Consecutive seeds to run.")
@click.option("--faults", default=DEFAULT_FAULTS, show_default=True,
              help="'all', 'none', or specs like 'crash:p=0.1,exec_fail:ops=exec:max=2'.")
@click.option("--probability", type=float, default=DEFAULT_PROBABILITY, show_default=True,
              help="Probability of faults given without p= (and of 'all').")
@click.option("--trace", is_flag=True, help="Print every step.")
def dst(scenario: str, seed: int, steps: int, seeds: int, faults: str, probability: float,
        trace: bool) -> int:
    """Run seeded simulations of Kelpie VMs (or of the runtime, or of teleports between two
    hosts) with injected faults and check invariants."""
    return run_cli(seed, steps, faults, seeds, trace, probability, scenario)
