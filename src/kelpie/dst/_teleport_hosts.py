"""Two hosts in one simulation: each a real Runtime and TeleportHost that can crash.

A :class:`SimHost` is one host: its own :class:`~kelpie.sim.SimStorage`, mock VMs that
outlive its process, a real SQLite state database and teleport journal, and the real
:class:`~kelpie.teleport.TeleportHost` over them. Its crash is the death of the process:
storage refuses every call, the databases are set back to what was committed at that
instant, its VMs refuse the dead process's calls, and its peers see a dropped connection.
It stays down until the step ends; :meth:`SimHost.restart` then opens a new runtime and
teleport host on what is left, whose recovery must settle it.

:class:`SimPeer` carries the source's requests to the target's current receiver over a
:class:`~kelpie.sim.SimLink` (delay, drop, partition) that may also lose an answer or damage
a chunk in transit.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from kelpie._exceptions import NetworkError, PeerUnreachable
from kelpie.backends.mock import MockVm
from kelpie.dst._runtime_sim import DurableMock
from kelpie.dst._teleport_points import Side
from kelpie.runtime import Runtime
from kelpie.sim import (
    CrashWhen,
    Fault,
    FaultInjector,
    SimLink,
    SimRng,
    SimStorage,
    SimulatedCrash,
    VirtualClock,
)
from kelpie.teleport import (
    JOURNAL_FILENAME,
    Incoming,
    LocalPeer,
    Outgoing,
    SourcePhase,
    TargetPhase,
    TeleportHost,
    TeleportJournal,
)
from kelpie.vm import BackendRegistry, VmFactory

T = TypeVar("T")

CHUNK_SIZE = 512
"""Bytes per chunk: small, so a snapshot goes in several (each a step that may fail)."""
MAX_RECOVERIES = 4

PlanCrash = Callable[["SimHost", Side, str], CrashWhen | None]
"""Asked at every journal record: whether (and when) the host dies at it."""


class SimHost:
    """One host of the simulation; ``peer_of(source, name)`` opens its teleports' peers."""

    def __init__(self, name: str, root: Path, *, rng: SimRng, faults: FaultInjector,
                 clock: VirtualClock, plan_crash: PlanCrash,
                 peer_of: Callable[[SimHost, str], SimPeer]) -> None:
        self.name = name
        self.data_dir = root / name
        self.clock = clock
        self._rng = rng
        self._faults = faults
        self._plan_crash = plan_crash
        self._peer_of = peer_of
        self.storage = SimStorage(rng.fork("storage"), faults)
        self.storage.on_crash = self._freeze
        self.backend = DurableMock(
            faults=faults, storage=self.storage, link=SimLink(rng.fork("guest-link"), faults),
            clock=clock, make_vm=lambda config, **options: HostedVm(config, host=self,
                                                                    **options))
        self.registry = BackendRegistry()
        self.registry.register(self.backend.spec())
        self._ids = rng.fork("ids")
        self._teleport_ids = rng.fork("teleport-ids")
        self._runtime: Runtime | None = None
        self._teleports: TeleportHost | None = None
        self._frozen: dict[Path, sqlite3.Connection] = {}
        self.restarts = 0

    @property
    def down(self) -> bool:
        """Whether the host's process is dead (until :meth:`restart`)."""
        return self.storage.crashed

    @property
    def runtime(self) -> Runtime:
        assert self._runtime is not None
        return self._runtime

    @property
    def teleports(self) -> TeleportHost:
        assert self._teleports is not None
        return self._teleports

    def crash(self, why: str) -> SimulatedCrash:
        """The host dies now: the error to raise."""
        return self.storage.crash(f"{self.name}: {why}")

    def plan(self, side: Side, phase: str) -> CrashWhen | None:
        return self._plan_crash(self, side, phase)

    # ---- life and death -----------------------------------------------------------------
    async def open(self) -> None:
        """Open a runtime and teleport host on what is there, recovering (no upkeep task:
        the workload runs the upkeep as a step)."""
        self._runtime = Runtime(
            data_dir=self.data_dir, factory=VmFactory(self.registry, environ={}),
            clock=self.clock.wall, new_id=lambda: self.name * 2 + self._ids.randbytes(6).hex(),
            storage=self.storage)
        self._teleports = TeleportHost(
            self._runtime, connect=lambda url, token: self._peer_of(self, url),
            clock=self.clock.wall, new_id=lambda: self._teleport_ids.randbytes(8).hex(),
            offload=_inline, journal=SimJournal(self.data_dir / JOURNAL_FILENAME, self),
            check_ports=lambda ports: [], chunk_size=CHUNK_SIZE)
        await self._runtime.open()
        await self._teleports.open(upkeep=False)

    async def close(self) -> None:
        if self._teleports is not None:
            await self._teleports.close()
        if self._runtime is not None:
            await self._runtime.close()

    async def restart(self) -> None:
        """Open again: after a crash on what it left (crashing again in the recovery is
        recovered from again), else after a clean close."""
        for _ in range(MAX_RECOVERIES):
            await self.close()
            self._thaw()
            self.storage.restart()
            self.restarts += 1
            try:
                await self.open()
                return
            except SimulatedCrash:
                continue
        raise AssertionError(f"host {self.name} could not open after {MAX_RECOVERIES} crashes")

    def _databases(self) -> list[Path]:
        return [self.runtime.db.path, self.data_dir / JOURNAL_FILENAME]

    def _freeze(self) -> None:
        """The instant of the crash: keep what the databases have committed, nothing later."""
        for path in self._databases():
            frozen = sqlite3.connect(":memory:")
            source = sqlite3.connect(path)
            try:
                source.backup(frozen)
            finally:
                source.close()
            self._frozen[path] = frozen

    def _thaw(self) -> None:
        for path, frozen in self._frozen.items():
            for suffix in ("", "-wal", "-shm"):
                path.with_name(path.name + suffix).unlink(missing_ok=True)
            target = sqlite3.connect(path)
            try:
                frozen.backup(target)
            finally:
                target.close()
                frozen.close()
        self._frozen = {}


async def _inline(function: Callable[[], T]) -> T:
    return function()


class HostedVm(MockVm):
    """A mock VM of one host: a dead host's process cannot drive it (its VM lives on)."""

    def __init__(self, *args: Any, host: SimHost, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.host = host

    def _alive(self, operation: str) -> None:
        if self.host.down:
            raise SimulatedCrash(f"{operation} of VM {self.id[:6]}: host {self.host.name} "
                                 "has crashed")

    async def start(self) -> None:
        self._alive("start")
        await super().start()

    async def stop(self, *, force: bool = False, grace: float | None = None) -> None:
        self._alive("stop")
        await super().stop(force=force, grace=grace)

    async def pause(self) -> None:
        self._alive("pause")
        await super().pause()

    async def resume(self) -> None:
        self._alive("resume")
        await super().resume()

    async def _do_pause(self) -> None:
        self._alive("pause")
        await super()._do_pause()

    async def _do_resume(self) -> None:
        self._alive("resume")
        await super()._do_resume()

    async def _do_start(self) -> None:
        self._alive("start")
        await super()._do_start()


class SimJournal(TeleportJournal):
    """The real journal; each record of a phase is a step the host may crash at, and a
    dead host's process records nothing."""

    def __init__(self, path: Path, host: SimHost) -> None:
        super().__init__(path)
        self._host = host

    def _step(self, side: Side, phase: str, write: Callable[[], T]) -> T:
        host = self._host
        if host.down:
            raise SimulatedCrash(f"{host.name}: record {phase}: host has crashed")
        when = host.plan(side, phase)
        if when is CrashWhen.BEFORE:
            raise host.crash(f"crashed before recording {side.value} {phase} (planned)")
        result = write()
        if when is CrashWhen.AFTER:
            raise host.crash(f"crashed after recording {side.value} {phase} (planned)")
        return result

    def begin_outgoing(self, record: Outgoing) -> None:
        self._step(Side.SOURCE, record.phase.value,
                   lambda: TeleportJournal.begin_outgoing(self, record))

    def set_outgoing(self, teleport_id: str, phase: SourcePhase, at: float, *,
                     error: str | None = None, mode: str | None = None,
                     reason: str | None = None) -> None:
        self._step(Side.SOURCE, phase.value, lambda: TeleportJournal.set_outgoing(
            self, teleport_id, phase, at, error=error, mode=mode, reason=reason))

    def begin_incoming(self, record: Incoming) -> None:
        self._step(Side.TARGET, record.phase.value,
                   lambda: TeleportJournal.begin_incoming(self, record))

    def move_incoming(self, teleport_id: str, allowed: frozenset[TargetPhase],
                      phase: TargetPhase, at: float, *, error: str | None = None,
                      ) -> TargetPhase | None:
        return self._step(Side.TARGET, phase.value, lambda: TeleportJournal.move_incoming(
            self, teleport_id, allowed, phase, at, error=error))

    def touch_incoming(self, teleport_id: str, at: float) -> None:
        if self._host.down:
            raise SimulatedCrash(f"{self._host.name}: host has crashed")
        super().touch_incoming(teleport_id, at)


class SimPeer(LocalPeer):
    """The target's current receiver, seen by the source across a simulated link.

    A request may be delayed, lost or refused by a partition (the link); the target may be
    down (connection refused) or die while it answers (connection reset); an answer may be
    lost; a chunk may be damaged in transit. A dead source sends nothing.
    """

    def __init__(self, source: SimHost, target: SimHost, link: SimLink,
                 faults: FaultInjector, rng: SimRng) -> None:
        super().__init__(lambda: target.teleports.receiver, address=target.name,
                         corrupt=self._damage)
        self._source = source
        self._target = target
        self._net = link
        self._faults = faults
        self._rng = rng

    def _damage(self, data: bytes) -> bytes:
        if not data or not self._faults.check(Fault.SNAPSHOT_CORRUPTION, "transit"):
            return data
        at = self._rng.randint(0, len(data) - 1)
        return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]

    async def _call(self, step: str, request: Callable[[], Awaitable[T]]) -> T:
        source, target = self._source, self._target
        if source.down:
            raise SimulatedCrash(f"{source.name}: {step}: host has crashed")
        try:
            await self._net.round_trip(step)
        except NetworkError as exc:
            raise PeerUnreachable(f"{target.name}: {exc}") from None
        if target.down:
            raise PeerUnreachable(f"{target.name}: {step}: connection refused (host down)")
        try:
            result = await request()
        except SimulatedCrash:
            if source.down:
                raise
            raise PeerUnreachable(f"{target.name}: {step}: connection reset (the host "
                                  "died answering)") from None
        if source.down:
            raise SimulatedCrash(f"{source.name}: {step}: host has crashed")
        if self._faults.check(Fault.NETWORK_DROP, f"{step}-answer"):
            raise PeerUnreachable(f"{target.name}: {step}: the answer was lost")
        return result


async def settle_all(hosts: list[SimHost], rounds: int) -> None:
    """Run the upkeep of every host until nothing is left to settle (or ``rounds`` end)."""
    for _ in range(rounds):
        pending = False
        for host in hosts:
            await host.teleports.upkeep_once()
            pending |= bool(host.teleports.journal.unfinished_outgoing())
        if not pending:
            return
        await asyncio.sleep(1.0)
