"""The runtime scenario: the real :class:`~kelpie.runtime.Runtime`, crashed at every storage step.

A seeded workload creates, execs in, snapshots, restores and removes sandboxes, removes
snapshots and restarts the runtime (close, then a new Runtime on the same storage and
database). The runtime runs on mock VMs that outlive it (like detached VM processes),
with :class:`~kelpie.sim.SimStorage` for every directory change, a virtual clock and a
real SQLite state database in a temporary directory.

Each seed crashes the host at one enumerated crash point (see :mod:`._crashpoints`). A
crash is the death of the host process: storage freezes, the database is set back to what
was committed at that instant (the runtime's writes after it never happened), the old
runtime is dropped and a new one opens on what is left; its recovery must settle it.

Invariants checked after every step:

- ``no-record-lost``: every sandbox that was created (or restored) and not removed keeps its
  record; no record appears outside create and restore; a failed remove keeps it;
- ``no-valid-looking-leftover``: every listed snapshot is recorded *and* complete (it
  verifies), no snapshot directory lies around without a record (a partial or unrecorded
  one is gone once the runtime has opened), every sandbox directory has a record;
- ``snapshots-kept``: a snapshot reported taken stays listed until it is removed, and one
  that failed or crashed is never listed;
- ``restore-equals-snapshot``: a restore yields exactly the guest state that was captured;
- ``fault-caught-by-its-check``: a silently damaged snapshot is refused by the check meant
  for the damage (see :mod:`._sim`);
- ``crash-points-enumerated``: no operation takes a storage step that is not listed as a
  crash point;
- ``expected-errors``: every failure is a KelpieError the operation may raise.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import tempfile
from collections import Counter
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

from kelpie.backends.mock import MockVm
from kelpie.dst._crashpoints import OPERATION_STEPS, RECOVERY, CrashPoint, crash_point_for
from kelpie.dst._sim import SimReport, Violation, attempt, expected_damage
from kelpie.runtime import Runtime, SandboxInfo
from kelpie.sim import (
    CrashWhen,
    Fault,
    FaultInjector,
    FaultSpec,
    SimLink,
    SimRng,
    SimStorage,
    SimulatedCrash,
    SimulationDeadlock,
    VirtualClock,
    run_simulated,
)
from kelpie.vm import (
    BackendRegistry,
    BackendSpec,
    BootError,
    KelpieError,
    ProbeResult,
    SnapshotCorrupted,
    SnapshotKind,
    VmConfig,
    VmFactory,
    VmInstance,
    VmSnapshot,
    VmState,
)

Option = tuple[str, Callable[[], Awaitable[str]]]
"""An operation the workload may take next: its name and what runs it."""

MAX_SANDBOXES = 4
STEER = 4
"""Extra weight (copies) of the options that lead to the seed's armed crash point."""
MAX_SNAPSHOTS = 6
MAX_RECOVERIES = 4
EXEC_TIMEOUT = 30.0
DATA_MARK = "$DATA"


@dataclasses.dataclass(frozen=True)
class _Captured:
    """What a snapshot captured, as the simulation saw it when it was taken."""

    kind: SnapshotKind
    digest: str


class _PlannedFaults(FaultInjector):
    """The seed's faults, plus the one the armed crash point needs to take its failure path
    (fired at its check whenever that point's operation runs, until the crash happens)."""

    def __init__(self, sim: RuntimeSimulation, rng: SimRng, specs: list[FaultSpec]) -> None:
        super().__init__(rng, specs, on_fire=sim._on_fire)
        self._sim = sim

    def check(self, fault: Fault, operation: str) -> bool:
        point = self._sim.armed_point
        if point is not None and point.fault == (fault, operation) \
                and self._sim.operation == point.operation:
            self._sim._on_fire(fault, operation)
            return True
        return super().check(fault, operation)


class DurableMock:
    """The mock backend with VMs that outlive the runtime, as detached VM processes do.

    ``make_vm`` builds each VM (default :class:`MockVm`) with the simulation's faults,
    storage, link and wall clock.
    """

    def __init__(self, *, faults: FaultInjector, storage: SimStorage, link: SimLink,
                 clock: VirtualClock, make_vm: Callable[..., MockVm] = MockVm) -> None:
        self._parts: dict[str, Any] = dict(faults=faults, storage=storage, link=link,
                                           wall_clock=clock.wall, boot_seconds=0.5)
        self._make_vm = make_vm
        self.vms: dict[str, MockVm] = {}
        """The latest VM of each sandbox."""
        self.created: list[MockVm] = []
        """Every VM made, in order (an older one of a sandbox may still run: a leak)."""

    def create(self, config: VmConfig, **options: Any) -> VmInstance:
        vm = self._make_vm(config, **self._parts, **options)
        self.vms[vm.id] = vm
        self.created.append(vm)
        return vm

    async def attach(self, vm_id: str) -> VmInstance:
        vm = self.vms.get(vm_id)
        if vm is None or vm.state not in (VmState.RUNNING, VmState.PAUSED):
            raise BootError(f"VM {vm_id} is not running (no process)")
        return vm

    def spec(self) -> BackendSpec:
        return BackendSpec(
            name="mock", description="simulated VMs that survive their runtime",
            capabilities=MockVm.capabilities,
            probe=lambda: ProbeResult(True, "simulated"),
            create=self.create, real=False, attach=self.attach,
        )


class RuntimeSimulation:
    """Runs ``steps`` random runtime operations under faults and one planned crash."""

    def __init__(self, seed: int, steps: int = 100, faults: list[FaultSpec] | None = None,
                 crash_point: CrashPoint | None = None) -> None:
        self.seed = seed
        self.steps = steps
        self.fault_specs = list(faults or [])
        self.rng = SimRng(seed)
        self._choices = self.rng.fork("workload")
        self._ids = self.rng.fork("ids")
        self.clock = VirtualClock()
        self.faults_fired: Counter[str] = Counter()
        self.faults = _PlannedFaults(self, self.rng.fork("faults"), self.fault_specs)
        self.storage = SimStorage(self.rng.fork("storage"), self.faults)
        self.storage.step_hook = self._on_step
        self.storage.on_crash = self._freeze_database
        self.link = SimLink(self.rng.fork("link"), self.faults)
        self.backend = DurableMock(faults=self.faults, storage=self.storage,
                                   link=self.link, clock=self.clock)
        self.registry = BackendRegistry()
        self.registry.register(self.backend.spec())
        self.crash_point = crash_point_for(seed) if crash_point is None else crash_point
        self._armed = [p for p in (self.crash_point.primer, self.crash_point) if p is not None]
        self.crash_points: Counter[str] = Counter()
        self.trace: list[str] = []
        self.violations: list[Violation] = []
        self.operations: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()
        self.sandboxes: set[str] = set()
        self.snapshots: dict[str, _Captured] = {}
        self._step = 0
        self._operation = ""
        self._operation_steps = 0
        self._settle: Callable[[], Awaitable[None]] | None = None
        self._frozen: sqlite3.Connection | None = None
        self._data_dir = Path()
        self._db_path = Path()
        self._runtime: Runtime | None = None

    # ---- running ------------------------------------------------------------------------
    def run(self) -> SimReport:
        """Run the whole simulation on virtual time and report."""
        with tempfile.TemporaryDirectory(prefix="kelpie-dst-") as tmp:
            self._data_dir = Path(tmp) / "data"
            try:
                run_simulated(self._main(), clock=self.clock, rng=self.rng.fork("scheduler"))
            except SimulationDeadlock as exc:
                self._violate("no-deadlock", str(exc))
        return SimReport(
            seed=self.seed, steps=self.steps, trace=self.trace, violations=self.violations,
            operations=self.operations, outcomes=self.outcomes,
            faults_fired=self.faults_fired, virtual_seconds=self.clock.monotonic(),
            final_states={vm_id[:6]: vm.state.value for vm_id, vm in
                          sorted(self.backend.vms.items()) if vm_id in self.sandboxes},
            fault_specs=self.fault_specs, crash_points=self.crash_points,
            scenario="runtime",
        )

    @property
    def armed_point(self) -> CrashPoint | None:
        """The next planned crash point, until it has been hit."""
        return self._armed[0] if self._armed else None

    @property
    def operation(self) -> str:
        """The operation running now ('' between operations)."""
        return self._operation

    @property
    def runtime(self) -> Runtime:
        assert self._runtime is not None
        return self._runtime

    async def _main(self) -> None:
        await self._open()
        for step in range(1, self.steps + 1):
            self._step = step
            op, action = await self._choose()
            self.operations[op] += 1
            self._begin(op)
            self._settle = None
            outcome, detail, unexpected = await attempt(action)
            if unexpected:
                self._violate("expected-errors", f"{op}: {detail}")
            if self.storage.crashed:
                outcome = "host-crash"
                await self._recover_from_crash()
            settle = self._pending_settle()
            if settle is not None:
                await settle()  # what the operation changed, as the runtime now records it
            self._begin("")
            self.outcomes[outcome] += 1
            first_line = detail.splitlines()[0] if detail else ""
            self.trace.append(f"{self.clock.ticks:>16} {step:>4} {op:<15} {outcome:<10} "
                              f"{self._clean(first_line)}")
            await self._check_invariants()
        await self.runtime.close()

    def _pending_settle(self) -> Callable[[], Awaitable[None]] | None:
        """What the operation left to settle once the runtime is open again (if anything)."""
        return self._settle

    def _begin(self, operation: str) -> None:
        self._operation = operation
        self._operation_steps = 0

    def _clean(self, text: str) -> str:
        """Trace text without the temporary directory's name (one seed, one trace)."""
        return text.replace(str(self._data_dir), DATA_MARK)

    def _new_id(self) -> str:
        return self._ids.randbytes(6).hex()

    async def _open(self) -> None:
        """Open a new runtime on the storage and database as they are."""
        self._runtime = Runtime(
            data_dir=self._data_dir, factory=VmFactory(self.registry, environ={}),
            clock=self.clock.wall, new_id=self._new_id, storage=self.storage,
        )
        outer = self._operation
        self._begin(RECOVERY)
        try:
            await self._runtime.open()
        finally:
            self._begin(outer)
        self._db_path = self._runtime.db.path  # (the first open has nothing to recover)

    # ---- crashes ------------------------------------------------------------------------
    def _on_fire(self, fault: Fault, operation: str) -> None:
        self.faults_fired[fault.value] += 1

    def _on_step(self, op: str, path: Path) -> CrashWhen | None:
        """Every storage step: check it is enumerated; crash here if this is the point."""
        self._operation_steps += 1
        current, index = self._operation, self._operation_steps
        known = OPERATION_STEPS.get(current)
        if current != RECOVERY and (known is None or index > known):
            self._violate("crash-points-enumerated",
                          f"{current or 'no operation'} took storage step {index} ({op} "
                          f"{self._clean(str(path))}), which no crash point lists")
        if self._armed and self._armed[0].operation == current \
                and self._armed[0].step == index:
            point = self._armed.pop(0)
            if point == self.crash_point:
                self.crash_points[str(point)] += 1
            return point.when
        return None

    def _freeze_database(self) -> None:
        """The instant of the crash: keep what the database has committed, nothing later."""
        frozen = sqlite3.connect(":memory:")
        source = sqlite3.connect(self._db_path)
        try:
            source.backup(frozen)
        finally:
            source.close()
        self._frozen = frozen

    async def _recover_from_crash(self) -> None:
        """The host process died: a new runtime opens on what the crash left."""
        for _ in range(MAX_RECOVERIES):
            await self.runtime.close()  # storage is frozen: nothing more reaches it
            self._restore_database()
            self.storage.restart()
            try:
                await self._open()
                return
            except SimulatedCrash:
                continue  # crashed again while recovering: recover again
        raise AssertionError(f"the runtime could not open after {MAX_RECOVERIES} crashes")

    def _restore_database(self) -> None:
        if self._frozen is None:
            return
        db = self._db_path
        for suffix in ("", "-wal", "-shm"):
            db.with_name(db.name + suffix).unlink(missing_ok=True)
        target = sqlite3.connect(db)
        try:
            self._frozen.backup(target)
        finally:
            target.close()
            self._frozen.close()
            self._frozen = None

    # ---- the workload -------------------------------------------------------------------
    async def _choose(self) -> Option:
        infos = await self.runtime.list_sandboxes(all=True)
        snaps = sorted(await self._snapshot_ids())
        options: list[Option] = []
        resuming: list[Option] = []  # snapshots that resume
        if len(infos) < MAX_SANDBOXES:
            options += [("create", self._create)] * 2
            if snaps:
                options += [("restore", lambda: self._restore(snaps))] * 2
        for info in infos:
            if info.state is VmState.RUNNING:
                options += [("exec", partial(self._exec, info))] * 2
                options += [("write", partial(self._write, info)),
                            ("pause", partial(self._pause, info)),
                            ("stop", partial(self._stop, info))]
                if len(snaps) < MAX_SNAPSHOTS:
                    snapshot = [("snapshot", partial(self._snapshot, info))] * 2
                    resuming += snapshot
                    options += snapshot
            elif info.state is VmState.PAUSED:
                options += [("resume", partial(self._resume, info))]
                if len(snaps) < MAX_SNAPSHOTS:
                    options += [("snapshot", partial(self._snapshot, info))]
            else:
                options += [("start", partial(self._start, info))]
            options += [("remove", partial(self._remove, info))]
        if snaps:
            options += [("delete_snapshot", lambda: self._delete_snapshot(snaps))]
        options += [("restart", self._restart)]
        if self._armed:
            options += self._steer(self._armed[0], options, resuming) * STEER
        return self._choices.choice(options)

    @staticmethod
    def _steer(point: CrashPoint, options: list[Option], resuming: list[Option]) -> list[Option]:
        """The options to lean toward, so that every seed reaches its crash point within
        its steps: those of the point's operation (the runtime opens again only through a
        restart). A point on the failure path of a resume needs a snapshot of a running
        sandbox (a paused one's is not resumed, so its planned fault never fires): lean
        toward one, or toward what makes one possible. Leaning toward any snapshot let a
        CI seed miss that point (its seed was not kept; this is the one way the code allows)."""
        if point.fault is not None and point.fault[1] == "resume":
            return resuming or [o for o in options
                                if o[0] in ("create", "start", "resume", "delete_snapshot")]
        target = {RECOVERY: "restart"}.get(point.operation, point.operation)
        return [o for o in options if o[0] == target]

    async def _ids_now(self) -> set[str]:
        return {info.id for info in await self.runtime.list_sandboxes(all=True)}

    async def _snapshot_ids(self) -> set[str]:
        return {s.id for s in await self.runtime.list_snapshots()}

    async def _create(self) -> str:
        self._settle = self._adopt_new_records
        info = await self.runtime.create(backend="mock")
        return f"created {info.id[:6]} ({info.state.value})"

    async def _adopt_new_records(self) -> None:
        """A create or restore writes one record (kept even when the start fails)."""
        new = await self._ids_now() - self.sandboxes
        if len(new) > 1:
            self._violate("no-record-lost", f"one operation wrote {len(new)} records")
        self.sandboxes |= new

    async def _exec(self, info: SandboxInfo) -> str:
        token = self._choices.randint(0, 999)
        argv = ["sh", "-c", f"mkdir -p /work && printf '%s\\n' {token} >> /work/log"]
        result = await self.runtime.exec(info.id, argv, timeout=EXEC_TIMEOUT)
        return f"{info.id[:6]} exit={result.exit_code}"

    async def _write(self, info: SandboxInfo) -> str:
        path = f"/tmp/f{self._choices.randint(0, 3)}"
        data = self._choices.randbytes(self._choices.randint(0, 128))
        await self.runtime.write_file(info.id, path, data)
        return f"{info.id[:6]} {path} {len(data)}B"

    async def _pause(self, info: SandboxInfo) -> str:
        return f"{info.id[:6]} {(await self.runtime.pause(info.id)).state.value}"

    async def _resume(self, info: SandboxInfo) -> str:
        return f"{info.id[:6]} {(await self.runtime.resume(info.id)).state.value}"

    async def _stop(self, info: SandboxInfo) -> str:
        timeout = 0.0 if self._choices.chance(0.5) else None
        return f"{info.id[:6]} {(await self.runtime.stop(info.id, timeout=timeout)).state.value}"

    async def _start(self, info: SandboxInfo) -> str:
        return f"{info.id[:6]} {(await self.runtime.start(info.id)).state.value}"

    async def _remove(self, info: SandboxInfo) -> str:
        await self.runtime.remove(info.id, force=True)
        self.sandboxes.discard(info.id)  # a failed remove keeps the record (checked after)
        if info.id in await self._ids_now():
            self._violate("no-record-lost", f"{info.id[:6]} is still recorded after remove")
        return f"removed {info.id[:6]}"

    async def _snapshot(self, info: SandboxInfo) -> str:
        vm = self.backend.vms[info.id]
        kinds = [SnapshotKind.FULL] if info.state is VmState.PAUSED else \
            [SnapshotKind.FULL, SnapshotKind.FULL, SnapshotKind.CHECKPOINT]
        kind = self._choices.choice(kinds)
        captured = _Captured(kind, vm.state_digest(kind))
        snap = await self.runtime.snapshot(info.id, kind=kind)
        self.snapshots[snap.id] = captured
        return f"{info.id[:6]} -> {snap.id[:6]} {kind.value}"

    async def _restore(self, snaps: list[str]) -> str:
        snap_id = self._choices.choice(snaps)
        captured = self.snapshots.get(snap_id)
        path = (await self.runtime.inspect_snapshot(snap_id)).path
        assert path is not None
        damage = expected_damage(self.storage, path)
        self._settle = self._adopt_new_records
        try:
            info = await self.runtime.restore(snap_id)
        except KelpieError as exc:
            if damage is None or self.storage.crashed:
                raise
            self._check_caught(snap_id, damage, exc)
            return f"{snap_id[:6]}: refused (damaged, as it should be)"
        if damage is not None:
            self._check_caught(snap_id, damage, None)
        elif captured is not None and \
                self.backend.vms[info.id].state_digest(captured.kind) != captured.digest:
            self._violate("restore-equals-snapshot",
                          f"{info.id[:6]} restored from {snap_id[:6]} differs from what was "
                          "captured")
        return f"{snap_id[:6]} -> {info.id[:6]} {info.state.value}"

    async def _delete_snapshot(self, snaps: list[str]) -> str:
        snap_id = self._choices.choice(snaps)
        self._settle = partial(self._settle_removed_snapshot, snap_id)
        await self.runtime.delete_snapshot(snap_id)
        return f"removed {snap_id[:6]}"

    async def _settle_removed_snapshot(self, snap_id: str) -> None:
        """Removed, or (failed, crashed before its record went) still whole and listed."""
        if snap_id not in await self._snapshot_ids():
            self.snapshots.pop(snap_id, None)

    async def _restart(self) -> str:
        await self.runtime.close()
        await self._open()
        return f"reopened: {len(await self.runtime.list_sandboxes(all=True))} sandboxes, " \
               f"{len(await self._snapshot_ids())} snapshots"

    # ---- invariants ---------------------------------------------------------------------
    def _violate(self, invariant: str, detail: str) -> None:
        if not any(v.invariant == invariant and v.detail == detail for v in self.violations):
            self.violations.append(Violation(self._step, invariant, detail))

    def _check_caught(self, snap_id: str, expected: type[SnapshotCorrupted],
                      error: BaseException | None) -> None:
        if type(error) is not expected:
            got = "nothing (accepted)" if error is None else f"{type(error).__name__}: {error}"
            self._violate("fault-caught-by-its-check", f"snapshot {snap_id[:6]} must be "
                          f"refused by {expected.__name__}, got {self._clean(got)}")

    async def _check_invariants(self) -> None:
        runtime = self.runtime
        ids = await self._ids_now()
        lost = sorted(self.sandboxes - ids)
        if lost:
            self._violate("no-record-lost", f"records lost: {', '.join(i[:6] for i in lost)}")
        appeared = sorted(ids - self.sandboxes)
        if appeared:
            self._violate("no-record-lost", "records appeared outside create/restore: "
                          f"{', '.join(i[:6] for i in appeared)}")
        self.sandboxes = set(ids)
        listed = {s.id: s for s in await runtime.list_snapshots()}
        for snap_id in sorted(set(self.snapshots) - set(listed)):
            self._violate("snapshots-kept", f"snapshot {snap_id[:6]} was taken but is gone")
            del self.snapshots[snap_id]
        for snap_id in sorted(set(listed) - set(self.snapshots)):
            self._violate("snapshots-kept", f"snapshot {snap_id[:6]} is listed but was never "
                          "reported taken (a failed or crashed snapshot)")
        for snap_id, snap in sorted(listed.items()):
            assert snap.path is not None
            damage = expected_damage(self.storage, snap.path)
            try:
                VmSnapshot.open(snap.path, storage=self.storage).verify()
            except SnapshotCorrupted as exc:
                if damage is None:
                    self._violate("no-valid-looking-leftover",
                                  f"listed snapshot {snap_id[:6]} is not whole: "
                                  f"{self._clean(str(exc))}")
                else:
                    self._check_caught(snap_id, damage, exc)
            else:
                if damage is not None:
                    self._check_caught(snap_id, damage, None)
        on_disk = self.storage.list_dir(runtime.snapshots_dir)
        stray = sorted(set(on_disk) - set(listed))
        if stray:
            self._violate("no-valid-looking-leftover",
                          f"snapshot directories without a record: {', '.join(stray)}")
        dirs = self.storage.list_dir(runtime.snapshots_dir.parent / "sandboxes")
        orphans = sorted(set(dirs) - ids)
        if orphans:
            self._violate("no-valid-looking-leftover",
                          f"sandbox directories without a record: {', '.join(orphans)}")


def run_runtime_seed(seed: int, steps: int = 100, faults: list[FaultSpec] | None = None,
                     ) -> SimReport:
    """Run one seeded runtime simulation (crashing at the seed's crash point)."""
    return RuntimeSimulation(seed, steps, faults).run()
