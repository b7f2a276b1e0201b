"""The teleport scenario: two hosts move sandboxes back and forth, crashing at every step.

Two :class:`~kelpie.dst._teleport_hosts.SimHost` (each a real Runtime and TeleportHost on
mock VMs, simulated storage and real SQLite) run a seeded workload: create sandboxes,
write to them, pause and resume them, teleport them to the other host in every mode (and
twice at once), restart a host, let time pass and run the teleport upkeep. The link between
the hosts delays, drops and partitions requests, loses answers and damages chunks; storage
fails and crashes; VMs crash. Each seed also crashes one host at one durable step of a
teleport (see :mod:`._teleport_points`). A crashed host stays down until its step ends,
then restarts and recovers. At the end the link heals, time passes beyond every lease and
the upkeep runs until nothing is left to settle.

Invariants checked after every step:

- ``one-running-copy``: no sandbox has a running VM on both hosts;
- ``no-stray-copy``: no VM runs on a host that has no record of its sandbox;
- ``no-copy-lost``: every sandbox created (and not removed) is recorded on some host, and
  no record appears that was never created;
- ``restored-equals-captured``: every live copy of a sandbox holds exactly the guest files
  last written to it; a full teleport's copy is the captured guest, byte for byte;
- ``one-teleport-at-a-time``: two teleports of one sandbox never both move it;
- ``expected-errors``: every failure is a KelpieError the operation may raise.

And at the end: ``every-teleport-ends`` (no journal of either host has an unfinished
record), ``one-copy-at-rest`` (every sandbox is recorded on exactly one host) and
``holds-released`` (nothing is held).
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections import Counter
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

from kelpie._exceptions import KelpieError, TeleportInDoubt
from kelpie.api import TeleportMode, TeleportReport
from kelpie.backends.mock import MockVm
from kelpie.dst._sim import SimReport, Violation, attempt
from kelpie.dst._teleport_hosts import SimHost, SimPeer, settle_all
from kelpie.dst._teleport_points import Side, TeleportCrashPoint, teleport_crash_point_for
from kelpie.runtime import SandboxInfo, SandboxMoving
from kelpie.sim import (
    CrashWhen,
    Fault,
    FaultInjector,
    FaultSpec,
    SimLink,
    SimRng,
    SimulationDeadlock,
    VirtualClock,
    run_simulated,
)
from kelpie.teleport import DEFAULT_IDLE
from kelpie.vm import SnapshotKind, VmState

MAX_SANDBOXES = 4
SETTLE_ROUNDS = 6
LIVE = (VmState.RUNNING, VmState.PAUSED)
MODES = (TeleportMode.AUTO, TeleportMode.AUTO, TeleportMode.FULL, TeleportMode.CHECKPOINT)

Action = Callable[[], Awaitable[str]]


class _HealableFaults(FaultInjector):
    """The seed's faults, until the end heals everything."""

    healed = False

    def check(self, fault: Fault, operation: str) -> bool:
        return not self.healed and super().check(fault, operation)


class TeleportSimulation:
    """Runs ``steps`` random operations on two hosts under faults and one planned crash."""

    def __init__(self, seed: int, steps: int = 60, faults: list[FaultSpec] | None = None,
                 crash_point: TeleportCrashPoint | None = None) -> None:
        self.seed = seed
        self.steps = steps
        self.fault_specs = list(faults or [])
        self.rng = SimRng(seed)
        self._choices = self.rng.fork("workload")
        self._transit = self.rng.fork("transit")
        self.clock = VirtualClock()
        self.faults_fired: Counter[str] = Counter()
        self.faults = _HealableFaults(self.rng.fork("faults"), self.fault_specs,
                                      on_fire=self._on_fire)
        self.link = SimLink(self.rng.fork("host-link"), self.faults)
        self.crash_point = teleport_crash_point_for(seed) if crash_point is None \
            else crash_point
        self._armed = True
        self.crash_points: Counter[str] = Counter()
        self.hosts: dict[str, SimHost] = {}
        self.trace: list[str] = []
        self.violations: list[Violation] = []
        self.operations: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()
        self.known: set[str] = set()
        """Every sandbox created and not removed (the model)..."""
        self.expected: dict[str, str] = {}
        """...and the sha256 of the guest files of those that run, as last written."""
        self.gone: set[str] = set()
        """Sandboxes removed where they were owned (a stale copy elsewhere must go too)."""
        self._written: dict[str, SimHost] = {}
        self._created = False
        self._removed: dict[str, SimHost] = {}
        self._names = 0
        self._step = 0
        self._root = Path()

    # ---- running ------------------------------------------------------------------------
    def run(self) -> SimReport:
        """Run the whole simulation on virtual time and report."""
        with tempfile.TemporaryDirectory(prefix="kelpie-dst-") as tmp:
            self._root = Path(tmp)
            for name in ("a", "b"):
                self.hosts[name] = SimHost(
                    name, self._root, rng=self.rng.fork(f"host-{name}"), faults=self.faults,
                    clock=self.clock, plan_crash=self._plan_crash, peer_of=self._peer_of)
            log = logging.getLogger("kelpie.teleport")
            was_disabled, log.disabled = log.disabled, True  # (the trace says it all)
            try:
                run_simulated(self._main(), clock=self.clock, rng=self.rng.fork("scheduler"))
            except SimulationDeadlock as exc:
                self._violate("no-deadlock", str(exc))
            finally:
                log.disabled = was_disabled
        return SimReport(
            seed=self.seed, steps=self.steps, trace=self.trace, violations=self.violations,
            operations=self.operations, outcomes=self.outcomes,
            faults_fired=self.faults_fired, virtual_seconds=self.clock.monotonic(),
            final_states={f"{h.name}:{vm_id[:6]}": vm.state.value
                          for h in self.hosts.values()
                          for vm_id, vm in sorted(h.backend.vms.items())},
            fault_specs=self.fault_specs, crash_points=self.crash_points,
            scenario="teleport",
        )

    async def _main(self) -> None:
        for host in self.hosts.values():
            await host.open()
        for step in range(1, self.steps + 1):
            self._step = step
            op, action = await self._choose()
            self.operations[op] += 1
            await self._run_step(op, action)
            await self._check()
        self._step += 1
        await self._run_step("settle", self._settle)
        await self._check(final=True)
        for host in self.hosts.values():
            await host.close()

    async def _run_step(self, op: str, action: Action) -> None:
        self._written.clear()
        self._created = False
        self._removed.clear()
        outcome, detail, unexpected = await attempt(action)
        if unexpected:
            self._violate("expected-errors", f"{op}: {detail}")
        crashed = [h for h in self.hosts.values() if h.down]
        for host in crashed:
            await host.restart()
        if crashed:
            outcome = "host-crash"
            detail = f"{'+'.join(h.name for h in crashed)} crashed; {detail}"
        await self._update_model()
        self.outcomes[outcome] += 1
        first_line = detail.splitlines()[0] if detail else ""
        self.trace.append(f"{self.clock.ticks:>16} {self._step:>4} {op:<14} {outcome:<10} "
                          f"{first_line.replace(str(self._root), '$ROOT')}")

    def _on_fire(self, fault: Fault, operation: str) -> None:
        self.faults_fired[fault.value] += 1

    def _plan_crash(self, host: SimHost, side: Side, phase: str) -> CrashWhen | None:
        point = self.crash_point
        if self._armed and point.side is side and point.phase == phase:
            self._armed = False
            self.crash_points[str(point)] += 1
            return point.when
        return None

    def _peer_of(self, source: SimHost, name: str) -> SimPeer:
        return SimPeer(source, self.hosts[name], self.link, self.faults, self._transit)

    def _other(self, host: SimHost) -> SimHost:
        return self.hosts["b" if host.name == "a" else "a"]

    # ---- the workload -------------------------------------------------------------------
    async def _choose(self) -> tuple[str, Action]:
        options: list[tuple[str, Action]] = []
        total = 0
        for host in self.hosts.values():
            infos = await host.runtime.list_sandboxes(all=True)
            total += len(infos)
            for info in infos:
                if host.runtime.moves.holder(info.id) is not None:
                    continue  # being moved: only the upkeep and recovery touch it
                if info.state is VmState.RUNNING:
                    options += [("write", partial(self._write, host, info))] * 2
                    options += [("pause", partial(self._pause, host, info))]
                if info.state is VmState.PAUSED:
                    options += [("resume", partial(self._resume, host, info))]
                if info.state in LIVE:
                    options += [("teleport", partial(self._teleport, host, info))] * 5
                    options += [("teleport-twice", partial(self._teleport_twice, host, info))]
                if self._choices.chance(0.2):
                    options += [("remove", partial(self._remove, host, info))]
        for host in self.hosts.values():
            if total < MAX_SANDBOXES:
                options += [("create", partial(self._create, host))] * 3
            options += [("restart", partial(self._restart, host)),
                        ("upkeep", partial(self._upkeep, host))]
        return self._choices.choice(options)

    async def _create(self, host: SimHost) -> str:
        taken = [i.name for i in await self._other(host).runtime.list_sandboxes(all=True)]
        if taken and self._choices.chance(0.2):
            name = self._choices.choice(taken)  # a teleport of either one must be refused
        else:
            self._names += 1
            name = f"s{self._names}"
        self._created = True
        info = await host.runtime.create(backend="mock", name=name)
        return f"{host.name}: created {name} {info.id[:8]} ({info.state.value})"

    async def _write(self, host: SimHost, info: SandboxInfo) -> str:
        self._written[info.id] = host
        if self._choices.chance(0.5):
            path = f"/tmp/f{self._choices.randint(0, 3)}"
            data = self._choices.randbytes(self._choices.randint(0, 2048))
            await host.runtime.write_file(info.id, path, data)
            return f"{host.name}: {info.name} {path} {len(data)}B"
        token = self._choices.randint(0, 999)
        argv = ["sh", "-c", f"mkdir -p /work && printf '%s\\n' {token} >> /work/log"]
        result = await host.runtime.exec(info.id, argv, timeout=30.0)
        return f"{host.name}: {info.name} exec exit={result.exit_code}"

    async def _pause(self, host: SimHost, info: SandboxInfo) -> str:
        return f"{host.name}: {info.name} {(await host.runtime.pause(info.id)).state.value}"

    async def _resume(self, host: SimHost, info: SandboxInfo) -> str:
        return f"{host.name}: {info.name} {(await host.runtime.resume(info.id)).state.value}"

    async def _remove(self, host: SimHost, info: SandboxInfo) -> str:
        self._removed[info.id] = host
        await host.runtime.remove(info.id, force=True)
        return f"{host.name}: removed {info.name}"

    async def _restart(self, host: SimHost) -> str:
        await host.restart()
        return f"{host.name}: reopened"

    async def _upkeep(self, host: SimHost) -> str:
        waited = self._choices.choice([1.0, 30.0, 400.0])
        await asyncio.sleep(waited)
        await host.teleports.upkeep_once()
        stuck = len(host.teleports.teleporter.stuck())
        return f"{host.name}: upkeep after {waited:g}s ({stuck} still to settle)"

    async def _teleport(self, host: SimHost, info: SandboxInfo) -> str:
        mode = self._choices.choice(MODES)
        report = await self._move(host, info, mode)
        return f"{host.name}->{report.target}: {info.name} {report.mode.value} " \
               f"{report.bytes_sent}B"

    async def _move(self, host: SimHost, info: SandboxInfo,
                    mode: TeleportMode) -> TeleportReport:
        """Teleport ``info`` to the other host; check what arrived is what was captured."""
        target = self._other(host)
        vm = host.backend.vms[info.id]
        captured = vm.state_digest(SnapshotKind.FULL)
        report = await host.teleports.teleporter.teleport(info.id, to=target.name, mode=mode)
        if report.mode is TeleportMode.FULL:
            arrived = target.backend.vms[info.id].state_digest(SnapshotKind.FULL)
            if arrived != captured:
                self._violate("restored-equals-captured",
                              f"{info.name}: the full teleport's copy on {target.name} is "
                              "not the guest captured")
        return report

    async def _teleport_twice(self, host: SimHost, info: SandboxInfo) -> str:
        mode = self._choices.choice(MODES)
        results = await asyncio.gather(self._move(host, info, mode),
                                       self._move(host, info, mode), return_exceptions=True)
        done = [r for r in results if isinstance(r, TeleportReport)]
        if len(done) > 1:
            self._violate("one-teleport-at-a-time", f"{info.name} was teleported twice at once")
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, KelpieError):
                raise result  # a crash, or a bug (attempt() reports it)
        refused = [r for r in results if isinstance(r, SandboxMoving)]
        in_doubt = [r for r in results if isinstance(r, TeleportInDoubt)]
        return f"{host.name}: {info.name} {len(done)} moved, {len(refused)} refused as " \
               f"moving, {len(in_doubt)} in doubt, " + \
            "; ".join(f"{type(r).__name__}" for r in results)

    async def _settle(self) -> str:
        """The end: the link heals, every lease runs out, the upkeep settles everything."""
        self.link.partitioned_until = 0.0
        self.faults.healed = True
        await asyncio.sleep(DEFAULT_IDLE + 1)
        await settle_all(list(self.hosts.values()), SETTLE_ROUNDS)
        return "settled"

    # ---- the model ----------------------------------------------------------------------
    async def _records(self) -> dict[str, list[SimHost]]:
        """sandbox id -> the hosts that record it."""
        where: dict[str, list[SimHost]] = {}
        for host in self.hosts.values():
            for info in await host.runtime.list_sandboxes(all=True):
                where.setdefault(info.id, []).append(host)
        return where

    def _live_vm(self, host: SimHost, sandbox_id: str) -> MockVm | None:
        vm = host.backend.vms.get(sandbox_id)
        return vm if vm is not None and vm.state in LIVE else None

    async def _update_model(self) -> None:
        """What the step changed: sandboxes created, removed or written to."""
        where = await self._records()
        new = set(where) - self.known - self.gone
        if new and not self._created:
            self._violate("no-copy-lost", "records appeared outside create: " +
                          ", ".join(sorted(i[:8] for i in new)))
        self.known |= new
        changed = {i: where[i][0] for i in new} | \
            {i: host for i, host in self._written.items() if i in where}
        for sandbox_id, host in sorted(changed.items()):
            copy = self._live_vm(host, sandbox_id)
            if copy is not None:
                self.expected[sandbox_id] = copy.state_digest(SnapshotKind.CHECKPOINT)
            else:
                self.expected.pop(sandbox_id, None)  # nothing runs: nothing to compare
        for sandbox_id, host in self._removed.items():
            if host in where.get(sandbox_id, []):
                continue  # the remove failed: it is still there
            self.known.discard(sandbox_id)
            self.expected.pop(sandbox_id, None)
            self.gone.add(sandbox_id)

    # ---- invariants ---------------------------------------------------------------------
    def _violate(self, invariant: str, detail: str) -> None:
        if not any(v.invariant == invariant and v.detail == detail for v in self.violations):
            self.violations.append(Violation(self._step, invariant, detail))

    async def _check(self, final: bool = False) -> None:
        where = await self._records()
        for sandbox_id in sorted(self.known - set(where)):
            self._violate("no-copy-lost", f"sandbox {sandbox_id[:8]} is recorded nowhere")
            self.known.discard(sandbox_id)
            self.expected.pop(sandbox_id, None)
        running: Counter[str] = Counter()
        for host in self.hosts.values():
            for vm in host.backend.created:
                if vm.state is not VmState.RUNNING:
                    continue
                running[vm.id] += 1
                if host not in where.get(vm.id, []):
                    self._violate("no-stray-copy", f"a VM of {vm.id[:8]} runs on {host.name}, "
                                  "which has no record of it")
        for sandbox_id, count in sorted(running.items()):
            if count > 1:
                self._violate("one-running-copy", f"sandbox {sandbox_id[:8]} runs {count} times")
        for sandbox_id, digest in sorted(self.expected.items()):
            for host in where.get(sandbox_id, []):
                if host.runtime.moves.holder(sandbox_id) is not None:
                    continue  # leaving or arriving: not the copy anyone uses (yet)
                copy = self._live_vm(host, sandbox_id)
                if copy is not None and copy.state_digest(SnapshotKind.CHECKPOINT) != digest:
                    self._violate("restored-equals-captured",
                                  f"the copy of {sandbox_id[:8]} on {host.name} does not hold "
                                  "the files last written to it")
        if final:
            self._check_at_rest(where)

    def _check_at_rest(self, where: dict[str, list[SimHost]]) -> None:
        for host in self.hosts.values():
            journal = host.teleports.journal
            unfinished = [f"outgoing {r.id[:8]} {r.phase.value}"
                          for r in journal.unfinished_outgoing()]
            unfinished += [f"incoming {r.id[:8]} {r.phase.value}"
                           for r in journal.unfinished_incoming()]
            if unfinished:
                self._violate("every-teleport-ends", f"{host.name} never settled: " +
                              ", ".join(unfinished))
            for sandbox_id in where:
                if host.runtime.moves.holder(sandbox_id) is not None:
                    self._violate("holds-released", f"{sandbox_id[:8]} is still held on "
                                  f"{host.name}")
        for sandbox_id in sorted(self.gone & set(where)):
            self._violate("removed-stays-removed", f"sandbox {sandbox_id[:8]} was removed, "
                          "yet a copy is left")
        for sandbox_id, hosts in sorted(where.items()):
            if len(hosts) > 1:
                self._violate("one-copy-at-rest", f"sandbox {sandbox_id[:8]} is recorded on "
                              f"{' and '.join(h.name for h in hosts)}")


def run_teleport_seed(seed: int, steps: int = 60, faults: list[FaultSpec] | None = None,
                      ) -> SimReport:
    """Run one seeded teleport simulation (crashing at the seed's crash point)."""
    return TeleportSimulation(seed, steps, faults).run()

