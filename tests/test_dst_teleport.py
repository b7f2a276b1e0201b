"""The teleport scenario of the simulator: two hosts, crashes at every teleport step.

The 1,000-seed run is ``python -m kelpie.dst --scenario teleport --seeds 1000 --faults all``;
here, every crash point twice over, a seed reproducing itself, and proof that the
invariants catch a coordinator that rolls back past the commit point.
"""

from __future__ import annotations

from collections import Counter

import pytest

from kelpie.dst._cli import parse_faults, run_cli
from kelpie.dst._teleport_points import TELEPORT_CRASH_POINTS, teleport_crash_point_for
from kelpie.dst._teleport_sim import TeleportSimulation, run_teleport_seed
from kelpie.teleport import Outgoing, Teleporter

STEPS = 40


def test_every_crash_point_twice_over_keeps_every_invariant() -> None:
    faults = parse_faults("all")
    hits: Counter[str] = Counter()
    failed = []
    for seed in range(2 * len(TELEPORT_CRASH_POINTS)):
        report = run_teleport_seed(seed, STEPS, faults)
        hits.update(report.crash_points)
        if not report.ok:
            failed.append(report.summary())
    assert not failed, "\n\n".join(failed)
    assert set(hits) == {str(p) for p in TELEPORT_CRASH_POINTS}


def test_a_seed_reproduces_its_run() -> None:
    faults = parse_faults("all")
    first = run_teleport_seed(11, STEPS, faults)
    again = run_teleport_seed(11, STEPS, faults)
    assert first.trace_digest == again.trace_digest
    assert first.operations["teleport"] + first.operations["teleport-twice"] > 0


def test_seeds_walk_the_crash_points_in_order() -> None:
    assert [teleport_crash_point_for(s) for s in range(len(TELEPORT_CRASH_POINTS))] == \
        list(TELEPORT_CRASH_POINTS)
    assert teleport_crash_point_for(len(TELEPORT_CRASH_POINTS)) == TELEPORT_CRASH_POINTS[0]


def test_the_invariants_catch_a_roll_back_past_the_commit_point(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a source that, after a restart, gives its copy back without asking the target
    async def settle_blindly(self: Teleporter, record: Outgoing, peer: object) -> None:
        await self._give_back(record, "rolled back without asking")

    monkeypatch.setattr(Teleporter, "_settle_with", settle_blindly)
    faults = parse_faults("all")
    broken = {v.invariant for seed in range(len(TELEPORT_CRASH_POINTS))
              for v in TeleportSimulation(seed, STEPS, faults).run().violations}
    assert broken & {"one-running-copy", "one-copy-at-rest", "restored-equals-captured"}


def test_the_cli_runs_the_scenario_and_reports_coverage(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run_cli(0, 10, "all", seeds=3, scenario="teleport") == 0
    out = capsys.readouterr().out
    assert "3 seeds x 10 steps" in out and "crash points:" in out
