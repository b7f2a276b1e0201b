"""Deterministic simulation testing: one seed reproduces a whole run, faults included.

The harness on top of everything, built from the deterministic primitives of
:mod:`kelpie.sim` (import those from there), checking invariants every step. Two scenarios:

- ``vm`` (:class:`Simulation`): a seeded workload on MockVms driven directly;
- ``runtime`` (:class:`RuntimeSimulation`): the real :class:`~kelpie.runtime.Runtime` on
  mock VMs and simulated storage, each seed crashing the host at one of the enumerated
  :data:`CRASH_POINTS` (every storage step of every operation);
- ``teleport`` (:class:`TeleportSimulation`): two hosts, each a real Runtime and
  :class:`~kelpie.teleport.TeleportHost`, moving sandboxes over a faulty link, each seed
  crashing one of them at one of the :data:`TELEPORT_CRASH_POINTS` (every durable step of
  either side).

Run it: ``python -m kelpie.dst --seed 7 --steps 100 --faults all`` (add ``--scenario
runtime`` or ``--scenario teleport``; ``--seeds 500`` also reports which crash points were
hit).
"""

from kelpie.dst._crashpoints import CRASH_POINTS, CrashPoint, crash_point_for
from kelpie.dst._runtime_sim import RuntimeSimulation, run_runtime_seed
from kelpie.dst._sim import SimReport, Simulation, Violation, run_seed
from kelpie.dst._teleport_points import TELEPORT_CRASH_POINTS, TeleportCrashPoint
from kelpie.dst._teleport_sim import TeleportSimulation, run_teleport_seed

__all__ = [
    "CRASH_POINTS",
    "TELEPORT_CRASH_POINTS",
    "CrashPoint",
    "RuntimeSimulation",
    "SimReport",
    "Simulation",
    "TeleportCrashPoint",
    "TeleportSimulation",
    "Violation",
    "crash_point_for",
    "run_runtime_seed",
    "run_seed",
    "run_teleport_seed",
]
