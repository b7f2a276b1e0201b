"""The fleet scenario: the real :class:`~kelpie.fleet.FleetCoordinator` over simulated hosts.

Four simulated hosts (each a dict of sandboxes behind a link that answers, fails, hangs or
dawdles, sharing one simulated object store) serve a coordinator whose refresh loop runs on
virtual time. The seeded workload creates sandboxes (half of them with a recovery policy,
so they are saved to the store and recovered elsewhere when lost) and removes them, drains
and undrains hosts, lets time pass, and with faults on kills hosts (calls fail), partitions
them (calls hang past the timeout), slows them (answers up to twice the timeout), brings
them back with their sandboxes or wiped, and makes a sandbox vanish from its host. A call
whose host fails midway loses its answer after the host acted, as a real network does. At
the end every host heals and the loop runs until the directory settles.

Invariants checked after every step:

- ``one-copy``: no generation of a sandbox is on two hosts at once (a drain's teleport
  moves it whole; a recovered copy is the next generation, and the older one is fenced);
- ``no-wrong-fence``: no host is told to destroy the copy the directory stands behind;
- ``saved-state-kept``: a recovery never asks for a saved state the store no longer has;
- ``saved-is-current``: the state a sandbox would be recovered from is its current copy's,
  or the one that copy was recovered from (never a late save of a fenced copy);
- ``no-silent-drop``: every sandbox created and not removed is in the directory;
- ``removed-stays-removed``: no removed sandbox comes back (say, adopted from a host that
  kept an older copy);
- ``lost-is-reported``: every sandbox the directory calls lost has a reason and a ``lost``
  event;
- ``within-capacity``: no host holds more sandbox memory than it has.

And at rest: ``directory-is-true`` (a running record's host has it, and no host an older
copy; a sandbox no host has is lost), ``recoverable-is-recovered`` (no sandbox with a saved
state stays lost while a host has room for it), ``no-orphan`` (every sandbox on a host is
the directory's: abandoned creates and removes done while a host was away are cleaned up)
and ``hosts-up`` (a healed host is not left dead).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from collections.abc import Awaitable, Callable

from kelpie.api import SandboxCreate, TemplateCreate
from kelpie.dst._sim import SimReport, Violation, attempt
from kelpie.fleet import (
    FLEET_LABEL,
    GENERATION_LABEL,
    RECOVER_LABEL,
    RESERVE_MIB,
    FleetCoordinator,
    HostedSandbox,
    HostReport,
    HostStatus,
    Recovery,
    SandboxStatus,
    SavedState,
)
from kelpie.sim import FaultSpec, SimRng, SimulationDeadlock, VirtualClock, run_simulated

HOSTS = ("h1", "h2", "h3", "h4")
HOST_MEMORY_MIB = 2048
SIZES_MIB = (128, 256, 512)
INTERVAL = 5.0
LOST_AFTER = 30.0
CALL_TIMEOUT = 5.0
SETTLE_SECONDS = 120.0

Action = Callable[[], Awaitable[str]]


class HostDown(ConnectionError):
    """The simulated host does not answer (its raylet died)."""


class SimFleetHost:
    """One simulated host: its sandboxes, and how its link behaves now."""

    def __init__(self, name: str, rng: SimRng, store: dict[str, HostedSandbox],
                 on_remove: Callable[[str, HostedSandbox], None]) -> None:
        self.name = name
        self.rng = rng
        self.mode = "up"
        """up, dead, partitioned or slow."""
        self.copies: dict[str, HostedSandbox] = {}
        self.peers: dict[str, SimFleetHost] = {}
        self.store = store
        """The shared object store: key -> the copy as it was saved."""
        self.recovered_from: dict[tuple[str, int], str] = {}
        """(sandbox, generation) -> the key of the saved state that copy was made from."""
        self.problems: list[tuple[str, str]] = []
        """(sandbox, what went wrong) for recoveries from a state the store lost."""
        self._on_remove = on_remove
        self._ids = 0

    @property
    def host(self) -> str:
        return self.name

    def used_mib(self) -> int:
        return sum(copy.memory_mib for copy in self.copies.values())

    async def _reach(self) -> None:
        """One way of a call: fails, hangs or dawdles as the host's mode says."""
        if self.mode == "dead":
            await asyncio.sleep(0.01)
            raise HostDown(f"host {self.name} is down")
        if self.mode == "partitioned":
            await asyncio.sleep(3600.0)
            raise HostDown(f"host {self.name} is unreachable")
        if self.mode == "slow":
            await asyncio.sleep(self.rng.uniform(0.0, 2 * CALL_TIMEOUT))
        else:
            await asyncio.sleep(self.rng.uniform(0.001, 0.05))

    async def report(self) -> HostReport:
        await self._reach()
        copies = tuple(sorted(self.copies.values(), key=lambda c: c.name))
        await self._reach()
        return HostReport(
            host=self.name, address=f"sim://{self.name}", arches=("x86_64",),
            backends=("mock",), accelerators=("sim",), cpus=8, free_vcpus=8,
            memory_mib=HOST_MEMORY_MIB, free_memory_mib=HOST_MEMORY_MIB - self.used_mib(),
            free_disk_bytes=1 << 40, sandboxes=copies)

    async def create(self, request: SandboxCreate) -> HostedSandbox:
        await self._reach()
        assert request.name is not None
        if request.name in self.copies:
            raise ValueError(f"host {self.name} already has a sandbox {request.name!r}")
        memory = request.memory_mib or 512
        self._ids += 1
        copy = HostedSandbox(id=f"{self.name}-{self._ids:04d}", name=request.name,
                             generation=int(request.labels[GENERATION_LABEL]),
                             state="running", memory_mib=memory, cpus=request.cpus or 1,
                             recover=Recovery.from_label(request.labels.get(RECOVER_LABEL)))
        assert request.labels[FLEET_LABEL] == "1"
        self.copies[request.name] = copy
        await self._reach()  # the answer can be lost after the host acted
        return copy

    async def remove(self, name: str, *, forget_saved: bool = False,
                     upto: int | None = None) -> None:
        await self._reach()
        copy = self.copies.get(name)
        if copy is not None and (upto is None or copy.generation <= upto):
            del self.copies[name]
            self._on_remove(self.name, copy)
        if forget_saved:
            for key in [k for k in self.store if k.startswith(f"sandboxes/{name}/")]:
                del self.store[key]
        await self._reach()

    async def save(self, name: str, kind: str, generation: int, keep: SavedState | None,
                   ) -> SavedState:
        await self._reach()
        copy = self.copies.get(name)
        if copy is None or copy.generation != generation:
            raise ValueError(f"host {self.name} has no sandbox {name!r} of generation "
                             f"{generation}")
        self._ids += 1
        key = f"sandboxes/{name}/g{generation}-{self.name}-{self._ids:04d}"
        self.store[key] = copy
        kept = {key, keep.key if keep else key}
        for other in [k for k in self.store if k.startswith(f"sandboxes/{name}/")]:
            if other not in kept:
                del self.store[other]
        await self._reach()  # the answer can be lost after the save
        return SavedState(name=name, generation=generation, kind=kind, key=key,
                          digest=f"sha256:{self._ids:064x}", size=copy.memory_mib,
                          image_digest=None, backend="mock",
                          arch="x86_64" if kind == "full" else None)

    async def recover(self, saved: SavedState, labels: dict[str, str]) -> HostedSandbox:
        await self._reach()
        stored = self.store.get(saved.key)
        if stored is None:
            self.problems.append((saved.name, f"recovery of {saved.name} on {self.name} from "
                                              f"{saved.key}, which the store no longer has"))
            raise ValueError(f"saved state {saved.key} is not in the store")
        if saved.name in self.copies:
            raise ValueError(f"host {self.name} already has a sandbox {saved.name!r}")
        self._ids += 1
        self.recovered_from[saved.name, int(labels[GENERATION_LABEL])] = saved.key
        copy = dataclasses.replace(stored, id=f"{self.name}-{self._ids:04d}",
                                   generation=int(labels[GENERATION_LABEL]),
                                   recover=Recovery.from_label(labels[RECOVER_LABEL]))
        self.copies[saved.name] = copy
        await self._reach()
        return copy

    async def create_template(self, request: TemplateCreate) -> None:
        await self._reach()

    async def push_template(self, name: str) -> object:
        await self._reach()
        return name

    async def pull_template(self, name: str) -> object:
        await self._reach()
        return name

    async def teleport(self, name: str, to: HostReport) -> HostedSandbox:
        await self._reach()
        copy = self.copies.get(name)
        if copy is None:
            raise ValueError(f"host {self.name} has no sandbox {name!r}")
        target = self.peers[to.host]
        if target.mode in ("dead", "partitioned") or self.rng.chance(0.1):
            raise ValueError(f"teleport of {name} to {to.host} aborted: target unreachable")
        if name in target.copies:
            raise ValueError(f"teleport of {name} to {to.host} refused: it has a sandbox "
                             "of that name")
        del self.copies[name]  # the commit point: the copy is on exactly one side
        target.copies[name] = copy
        await self._reach()
        return copy


class FleetSimulation:
    """Runs ``steps`` random fleet operations over simulated hosts, checking invariants."""

    def __init__(self, seed: int, steps: int = 80, faults: list[FaultSpec] | None = None,
                 ) -> None:
        self.seed = seed
        self.steps = steps
        self.fault_specs = list(faults or [])
        self.host_faults = bool(self.fault_specs)
        self.rng = SimRng(seed)
        self._choices = self.rng.fork("workload")
        self.clock = VirtualClock()
        self.store: dict[str, HostedSandbox] = {}
        self.hosts = {name: SimFleetHost(name, self.rng.fork(f"host-{name}"), self.store,
                                         self._removed) for name in HOSTS}
        for host in self.hosts.values():
            host.peers = self.hosts
        self.coordinator = FleetCoordinator(
            clock=self.clock.monotonic, rng=self.rng.fork("placement"),
            lost_after=LOST_AFTER, call_timeout=CALL_TIMEOUT, create_timeout=CALL_TIMEOUT,
            move_timeout=60.0)
        self.created: set[str] = set()
        """Sandboxes whose create succeeded and that were not removed (the model)."""
        self.removed: set[str] = set()
        """Sandboxes removed on request (names are never reused here)."""
        self.trace: list[str] = []
        self.violations: list[Violation] = []
        self.operations: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()
        self.faults_fired: Counter[str] = Counter()
        self._step = 0
        self._names = 0

    def run(self) -> SimReport:
        """Run the whole simulation on virtual time and report."""
        try:
            run_simulated(self._main(), clock=self.clock, rng=self.rng.fork("scheduler"))
        except SimulationDeadlock as exc:
            self._violate("no-deadlock", str(exc))
        return SimReport(
            seed=self.seed, steps=self.steps, trace=self.trace, violations=self.violations,
            operations=self.operations, outcomes=self.outcomes,
            faults_fired=self.faults_fired, virtual_seconds=self.clock.monotonic(),
            final_states={f"{s.name}@{s.host}": s.status.value
                          for s in self.coordinator.sandboxes()},
            fault_specs=self.fault_specs, scenario="fleet")

    async def _main(self) -> None:
        for host in self.hosts.values():
            self.coordinator.add_host(host)
        await self.coordinator.refresh()
        loop = asyncio.create_task(self.coordinator.watch(INTERVAL))
        try:
            for step in range(1, self.steps + 1):
                self._step = step
                op, action = self._choose()
                self.operations[op] += 1
                outcome, detail, unexpected = await attempt(action)
                self.outcomes[outcome] += 1
                self.trace.append(f"{step:04d} {op}: {outcome} {detail}")
                if unexpected:
                    self._violate("expected-errors", f"{op}: {detail}")
                self._check()
            self._step += 1
            await self._settle()
            self._check(at_rest=True)
        finally:
            loop.cancel()
        for event in self.coordinator.events():
            self.outcomes[f"event:{event.kind}"] += 1

    # ---- the workload -----------------------------------------------------------------
    def _choose(self) -> tuple[str, Action]:
        names = sorted(self.created)
        choices: list[tuple[str, float, Action]] = [
            ("create", 5.0, self._create),
            ("wait", 4.0, self._wait),
            ("drain", 0.7, self._drain),
            ("undrain", 0.7, self._undrain),
        ]
        if names:
            choices.append(("remove", 1.5, lambda: self._remove(self._choices.choice(names))))
        if self.host_faults:
            choices += [("kill", 0.6, lambda: self._fault("dead")),
                        ("partition", 0.6, lambda: self._fault("partitioned")),
                        ("slow", 0.6, lambda: self._fault("slow")),
                        ("heal", 1.5, self._heal),
                        ("vanish", 0.3, self._vanish)]
        total = sum(weight for _, weight, _ in choices)
        pick = self._choices.uniform(0.0, total)
        for op, weight, action in choices:
            pick -= weight
            if pick <= 0:
                return op, action
        return choices[-1][0], choices[-1][2]

    async def _create(self) -> str:
        self._names += 1
        name = f"s{self._names:03d}"
        memory = self._choices.choice(SIZES_MIB)
        recover = None
        if self._choices.chance(0.5):
            recover = Recovery(self._choices.choice(("checkpoint", "snapshot")),
                               self._choices.uniform(5.0, 30.0))
        placed = await self.coordinator.create(SandboxCreate(name=name, memory_mib=memory),
                                               recover=recover)
        self.created.add(name)
        policy = f", recover {recover.label()}" if recover else ""
        return f"{name} ({memory} MiB{policy}) on {placed.host}"

    async def _remove(self, name: str) -> str:
        await self.coordinator.remove(name)
        self.created.discard(name)
        self.removed.add(name)
        return name

    async def _wait(self) -> str:
        seconds = self._choices.uniform(1.0, 40.0)
        await asyncio.sleep(seconds)
        return f"{seconds:.1f} s"

    async def _drain(self) -> str:
        host = self._choices.choice(HOSTS)
        moved = await self.coordinator.drain(host)
        return f"{host}: " + ", ".join(f"{s.name}->{s.host}" for s in moved)

    async def _undrain(self) -> str:
        host = self._choices.choice(HOSTS)
        self.coordinator.undrain(host)
        return host

    async def _fault(self, mode: str) -> str:
        host = self.hosts[self._choices.choice(HOSTS)]
        host.mode = mode
        self.faults_fired[mode] += 1
        return host.name

    async def _heal(self) -> str:
        host = self.hosts[self._choices.choice(HOSTS)]
        if host.mode == "dead" and self._choices.chance(0.3):
            host.copies.clear()  # it came back with a new disk
            self.faults_fired["wiped"] += 1
            return f"{host.name} (wiped)"
        host.mode = "up"
        return host.name

    async def _vanish(self) -> str:
        host = self.hosts[self._choices.choice(HOSTS)]
        if not host.copies:
            return f"{host.name} (has none)"
        name = self._choices.choice(sorted(host.copies))
        del host.copies[name]
        self.faults_fired["vanish"] += 1
        return f"{name} on {host.name}"

    async def _settle(self) -> None:
        for host in self.hosts.values():
            host.mode = "up"
            self.coordinator.undrain(host.name)
        await asyncio.sleep(SETTLE_SECONDS)
        self.trace.append(f"{self._step:04d} settle: {len(self.coordinator.sandboxes())} "
                          "sandboxes in the directory")

    # ---- invariants -------------------------------------------------------------------
    def _violate(self, invariant: str, detail: str) -> None:
        if not any(v.invariant == invariant and v.detail == detail for v in self.violations):
            self.violations.append(Violation(self._step, invariant, detail))

    def _removed(self, host: str, copy: HostedSandbox) -> None:
        """A host removed ``copy``: it must not be the one the directory stands behind."""
        if copy.name not in self.created:
            return
        record = next((s for s in self.coordinator.sandboxes() if s.name == copy.name), None)
        if record is not None and record.host == host and record.generation == copy.generation:
            self._violate("no-wrong-fence", f"{copy.name} (generation {copy.generation}) "
                                            f"destroyed on {host}, its directory's host")

    def _check(self, at_rest: bool = False) -> None:
        where: dict[str, list[str]] = {}
        generations: dict[tuple[str, int], list[str]] = {}
        for host in self.hosts.values():
            for name, copy in host.copies.items():
                where.setdefault(name, []).append(host.name)
                generations.setdefault((name, copy.generation), []).append(host.name)
            if host.used_mib() > HOST_MEMORY_MIB:
                self._violate("within-capacity", f"{host.name} holds {host.used_mib()} MiB")
            for name, problem in host.problems:
                if name in self.created:  # a removed one's states go with it
                    self._violate("saved-state-kept", problem)
        for (name, generation), hosts in sorted(generations.items()):
            if len(hosts) > 1:
                self._violate("one-copy", f"{name} (generation {generation}) is on "
                                          f"{' and '.join(hosts)}")
        directory = {s.name: s for s in self.coordinator.sandboxes()}
        for name in sorted(self.created - set(directory)):
            self._violate("no-silent-drop", f"{name} was created, never removed, and is "
                                             "not in the directory")
        for name in sorted(self.removed & set(directory)):
            self._violate("removed-stays-removed", f"{name} was removed but is back in the "
                                                   "directory")
        recovered_from = {key: saved for host in self.hosts.values()
                          for key, saved in host.recovered_from.items()}
        for record in directory.values():
            saved = record.saved
            if saved is not None and saved.generation != record.generation and \
                    recovered_from.get((record.name, record.generation)) != saved.key:
                self._violate("saved-is-current", f"{record.name} (generation "
                              f"{record.generation}) would be recovered from {saved.key}, "
                              "a state of an older copy it was not made from")
        lost_events = {e.name for e in self.coordinator.events() if e.kind == "lost"}
        for record in directory.values():
            if record.status is SandboxStatus.LOST and (not record.reason
                                                        or record.name not in lost_events):
                self._violate("lost-is-reported", f"{record.name} is lost without a reason "
                                                  "or event")
        if not at_rest:
            return
        for record in directory.values():
            holders = where.get(record.name, [])
            if record.status is SandboxStatus.RUNNING and holders != [record.host]:
                self._violate("directory-is-true", f"{record.name} is running on "
                              f"{record.host} by the directory, on {holders or 'no host'} "
                              "in fact")
            if not holders and record.status is not SandboxStatus.LOST:
                self._violate("directory-is-true", f"{record.name} is on no host but "
                                                   f"{record.status.value}")
            if record.status is SandboxStatus.LOST and record.saved is not None and any(
                    HOST_MEMORY_MIB - host.used_mib() - RESERVE_MIB >= record.memory_mib
                    for host in self.hosts.values() if host.name != record.host):
                self._violate("recoverable-is-recovered", f"{record.name} has a saved state "
                              "and a host has room for it, but it is still lost")
        for name in sorted(set(where) - set(directory)):
            self._violate("no-orphan", f"{name} is on {where[name]} but not the fleet's")
        for seen in self.coordinator.hosts():
            if seen.status is HostStatus.DEAD:
                self._violate("hosts-up", f"{seen.host} healed but is still dead")


def run_fleet_seed(seed: int, steps: int = 80, faults: list[FaultSpec] | None = None,
                   ) -> SimReport:
    """Run one seeded fleet simulation."""
    return FleetSimulation(seed, steps, faults).run()
