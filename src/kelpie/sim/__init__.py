"""Deterministic primitives that real Kelpie code takes as parameters under simulation.

:class:`SimRng` (the only randomness), :class:`VirtualClock` + :class:`SimEventLoop` (asyncio
on virtual time), :class:`FaultInjector` (named faults with probability, operation filter,
"after N", "at most N"), :class:`SimStorage` (in-memory storage with storage and crash
faults) and :class:`SimLink` (network faults). They sit below the mock backend and above the
VM layer; the harness that drives whole runs with them is :mod:`kelpie.dst`.
"""

from kelpie.sim._clock import SimEventLoop, SimulationDeadlock, VirtualClock, run_simulated
from kelpie.sim._faults import NO_FAULTS, Fault, FaultInjector, FaultSpec, parse_fault_specs
from kelpie.sim._link import SimLink
from kelpie.sim._rng import SimRng
from kelpie.sim._storage import CrashWhen, SimStorage, SimulatedCrash, StepHook

__all__ = [
    "NO_FAULTS",
    "CrashWhen",
    "Fault",
    "FaultInjector",
    "FaultSpec",
    "SimEventLoop",
    "SimLink",
    "SimRng",
    "SimStorage",
    "SimulatedCrash",
    "SimulationDeadlock",
    "StepHook",
    "VirtualClock",
    "parse_fault_specs",
    "run_simulated",
]
