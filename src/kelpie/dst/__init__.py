"""Deterministic simulation testing: one seed reproduces a whole run, faults included.

The pieces are injectable into real Kelpie code: :class:`SimRng` (the only randomness),
:class:`VirtualClock` + :class:`SimEventLoop` (asyncio on virtual time), :class:`FaultInjector`
(named faults with probability, operation filter, "after N", "at most N"),
:class:`SimStorage` (in-memory storage with storage faults) and :class:`SimLink` (network
faults). :class:`Simulation` drives a seeded workload and checks invariants every step.

Run it: ``python -m kelpie.dst --seed 7 --steps 100 --faults all``.
"""

from kelpie.dst._clock import (
    SimEventLoop,
    SimulationDeadlock,
    VirtualClock,
    run_simulated,
)
from kelpie.dst._faults import NO_FAULTS, Fault, FaultInjector, FaultSpec, parse_fault_specs
from kelpie.dst._link import SimLink
from kelpie.dst._rng import SimRng
from kelpie.dst._sim import SimReport, Simulation, Violation, run_seed
from kelpie.dst._storage import SimStorage, SimulatedCrash

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
