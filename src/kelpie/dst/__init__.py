"""Deterministic simulation testing: one seed reproduces a whole run, faults included.

The harness on top of everything: :class:`Simulation` drives a seeded workload through the
real code, built from the deterministic primitives of :mod:`kelpie.sim` (re-exported here),
and checks invariants every step.

Run it: ``python -m kelpie.dst --seed 7 --steps 100 --faults all``.
"""

from kelpie.dst._sim import SimReport, Simulation, Violation, run_seed
from kelpie.sim import (
    NO_FAULTS,
    Fault,
    FaultInjector,
    FaultSpec,
    SimEventLoop,
    SimLink,
    SimRng,
    SimStorage,
    SimulatedCrash,
    SimulationDeadlock,
    VirtualClock,
    parse_fault_specs,
    run_simulated,
)

__all__ = [
    "NO_FAULTS",
    "Fault",
    "FaultInjector",
    "FaultSpec",
    "SimEventLoop",
    "SimLink",
    "SimReport",
    "SimRng",
    "SimStorage",
    "SimulatedCrash",
    "Simulation",
    "SimulationDeadlock",
    "Violation",
    "VirtualClock",
    "parse_fault_specs",
    "run_seed",
    "run_simulated",
]
