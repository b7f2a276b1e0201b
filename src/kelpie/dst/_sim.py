"""The simulation: a seeded workload driving real Kelpie code, with invariants every step.

One seed fixes everything: the workload's choices, which faults fire, link latencies, the
order in which ready tasks run, and virtual time. The trace (one line per step) is
therefore byte-identical for a seed, and a failing seed reproduces its failure.

Invariants checked after every step:

- ``state-machine``: every transition a VM made is in the transition table, and its
  reported state is the last transition's target;
- ``restore-equals-snapshot``: a restore that succeeds yields exactly the captured state;
- ``snapshot-readable``: no snapshot is both reported written (or listed as complete) and
  unreadable, unless storage silently damaged it, in which case restoring it must fail;
- ``fault-caught-by-its-check``: silent damage is refused by the check meant for it, never
  by luck: a flipped byte in a blob by the sha256 check (:class:`BlobDigestMismatch`), a
  lost tail by the size check (:class:`BlobSizeMismatch`), damage to the manifest by its
  checksum (:class:`ManifestCorrupted`); not by a parse error further on;
- ``no-partial-listed``: an interrupted snapshot never appears as complete;
- ``file-model``: a guest file read back equals what was last written to it;
- ``expected-errors``: every failure is a KelpieError the operation may raise, never a bug.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

from kelpie.backends.mock import MockVm
from kelpie.sim import (
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
    MANIFEST_NAME,
    PARTIAL_SUFFIX,
    BlobDigestMismatch,
    BlobSizeMismatch,
    InvalidStateError,
    KelpieError,
    ManifestCorrupted,
    SnapshotCorrupted,
    SnapshotKind,
    VmConfig,
    VmSnapshot,
    VmState,
    is_legal,
)

SNAPSHOT_ROOT = Path("/snapshots")
MAX_VMS = 4
EXEC_TIMEOUT = 30.0
COMMANDS: tuple[tuple[str, ...], ...] = (
    ("echo", "hello"),
    ("sh", "-c", "echo data > /tmp/out; cat /tmp/out"),
    ("sh", "-c", "mkdir -p /work && printf '%s\\n' x >> /work/log"),
    ("sleep", "2"),
    ("false",),
    ("ls", "/tmp"),
    ("nosuchcommand",),
)


@dataclasses.dataclass
class Violation:
    """An invariant that did not hold."""

    step: int
    invariant: str
    detail: str

    def __str__(self) -> str:
        return f"step {self.step}: [{self.invariant}] {self.detail}"


@dataclasses.dataclass
class SimReport:
    """What a simulation did and found."""

    seed: int
    steps: int
    trace: list[str]
    violations: list[Violation]
    operations: Counter[str]
    outcomes: Counter[str]
    faults_fired: Counter[str]
    virtual_seconds: float
    final_states: dict[str, str]
    fault_specs: list[FaultSpec]
    crash_points: Counter[str] = dataclasses.field(default_factory=Counter)
    """Planned crash points this run hit (the runtime scenario)."""
    scenario: str = "vm"

    @property
    def ok(self) -> bool:
        return not self.violations

    @property
    def trace_text(self) -> str:
        return "\n".join(self.trace) + "\n"

    @property
    def trace_digest(self) -> str:
        """sha256 of the trace: equal for equal seeds."""
        return hashlib.sha256(self.trace_text.encode()).hexdigest()

    def summary(self) -> str:
        """A readable multi-line summary."""
        lines = [
            f"seed {self.seed}: {self.steps} steps, {self.virtual_seconds:.1f}s of virtual time, "
            f"trace sha256 {self.trace_digest[:16]}",
            *([f"scenario:   {self.scenario}"] if self.scenario != "vm" else []),
            "operations: " + _counts(self.operations),
            "outcomes:   " + _counts(self.outcomes),
            "faults:     " + (_counts(self.faults_fired) or "none fired"),
            *(["crashed at: " + _counts(self.crash_points)] if self.crash_points else []),
            "final VMs:  " + ", ".join(f"{k}={v}" for k, v in sorted(self.final_states.items())),
        ]
        if self.violations:
            lines.append(f"INVARIANT VIOLATIONS ({len(self.violations)}):")
            lines += [f"  {v}" for v in self.violations]
        else:
            lines.append("invariants: all held")
        return "\n".join(lines)


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(counter.items()))


@dataclasses.dataclass
class _Snap:
    path: Path
    kind: SnapshotKind
    digest: str
    files: dict[str, bytes]


async def attempt(action: Callable[[], Awaitable[str]]) -> tuple[str, str, bool]:
    """Run one step of a workload: its outcome (``ok``, ``host-crash``, ``error`` or
    ``bug``), a trace detail, and whether the error is one no step may raise (an illegal
    state transition was attempted, or Kelpie raised something outside its error tree)."""
    try:
        return "ok", await action(), False
    except SimulatedCrash as exc:
        return "host-crash", str(exc), False
    except InvalidStateError as exc:
        return "error", f"{type(exc).__name__}: {exc}", True
    except KelpieError as exc:
        return "error", f"{type(exc).__name__}: {exc}", False
    except Exception as exc:  # a bug in Kelpie: record it, keep the seed reproducible
        return "bug", f"{type(exc).__name__}: {exc}", True


class Simulation:
    """Runs ``steps`` random operations on MockVms under faults, checking invariants."""

    def __init__(self, seed: int, steps: int = 100, faults: list[FaultSpec] | None = None):
        self.seed = seed
        self.steps = steps
        self.fault_specs = list(faults or [])
        self.rng = SimRng(seed)
        self._choices = self.rng.fork("workload")
        self.clock = VirtualClock()
        self.faults_fired: Counter[str] = Counter()
        self.faults = FaultInjector(self.rng.fork("faults"), self.fault_specs,
                                    on_fire=self._on_fire)
        self.storage = SimStorage(self.rng.fork("storage"), self.faults)
        self.link = SimLink(self.rng.fork("link"), self.faults)
        self.vms: dict[str, MockVm] = {}
        self.files: dict[str, dict[str, bytes]] = {}
        self.snapshots: dict[str, _Snap] = {}
        self.trace: list[str] = []
        self.violations: list[Violation] = []
        self.operations: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()
        self._step = 0
        self._vm_counter = 0
        self._snap_counter = 0

    def _on_fire(self, fault: Fault, operation: str) -> None:
        self.faults_fired[fault.value] += 1

    def run(self) -> SimReport:
        """Run the whole simulation on virtual time and report."""
        try:
            run_simulated(self._main(), clock=self.clock, rng=self.rng.fork("scheduler"))
        except SimulationDeadlock as exc:
            self._violate("no-deadlock", str(exc))
        return SimReport(
            seed=self.seed,
            steps=self.steps,
            trace=self.trace,
            violations=self.violations,
            operations=self.operations,
            outcomes=self.outcomes,
            faults_fired=self.faults_fired,
            virtual_seconds=self.clock.monotonic(),
            final_states={name: vm.state.value for name, vm in self.vms.items()},
            fault_specs=self.fault_specs,
        )

    # ---- the loop -----------------------------------------------------------------------
    async def _main(self) -> None:
        self._new_vm()
        for step in range(1, self.steps + 1):
            self._step = step
            name, op, action = self._choose()
            self.operations[op] += 1
            outcome, detail, unexpected = await attempt(action)
            if unexpected:
                self._violate("expected-errors", f"{op} on {name}: {detail}")
            if outcome == "host-crash" or self.storage.crashed:
                outcome = "host-crash"
                self._recover_host()
            self.outcomes[outcome] += 1
            state = self.vms[name].state.value if name in self.vms else "-"
            first_line = detail.splitlines()[0] if detail else ""
            self.trace.append(
                f"{self.clock.ticks:>16} {step:>4} {name:<4} {op:<9} {outcome:<10} "
                f"{state:<8} {first_line}"
            )
            self._check_invariants()
        for vm in self.vms.values():
            await vm.stop(force=True)

    def _choose(self) -> tuple[str, str, Callable[[], Awaitable[str]]]:
        name = self._choices.choice(sorted(self.vms))
        vm = self.vms[name]
        options: list[tuple[str, Callable[[], Awaitable[str]]]] = []
        state = vm.state
        if state in (VmState.CREATED, VmState.STOPPED):
            options += [("start", lambda: self._start(vm))] * 3
        if state in (VmState.RUNNING, VmState.PAUSED, VmState.CRASHED):
            options.append(("stop", lambda: self._stop(vm)))
        if state is VmState.RUNNING:
            options += [
                ("exec", lambda: self._exec(vm)),
                ("exec", lambda: self._exec(vm)),
                ("write", lambda: self._write(vm)),
                ("read", lambda: self._read(vm)),
                ("pause", lambda: self._pause(vm)),
                ("snapshot", lambda: self._snapshot(vm)),
            ]
        if state is VmState.PAUSED:
            options += [("resume", lambda: self._resume(vm))] * 2
            options.append(("snapshot", lambda: self._snapshot(vm)))
        if state is VmState.STOPPED:
            options.append(("snapshot", lambda: self._snapshot(vm)))
        if self.snapshots:
            options.append(("restore", self._restore))
        if len(self.vms) < MAX_VMS:
            options.append(("create", self._create))
        op, action = self._choices.choice(options)
        return name, op, action

    # ---- operations (each returns a trace detail) ------------------------------------------
    def _new_vm(self) -> MockVm:
        self._vm_counter += 1
        name = f"vm{self._vm_counter}"
        vm = MockVm(
            VmConfig(hostname=name),
            vm_id=name,
            faults=self.faults,
            storage=self.storage,
            link=self.link,
            wall_clock=self.clock.wall,
            boot_seconds=0.5,
        )
        vm.observe(self._check_transition)
        self.vms[name] = vm
        self.files[name] = {}
        return vm

    async def _create(self) -> str:
        return f"created {self._new_vm().id}"

    async def _start(self, vm: MockVm) -> str:
        await vm.start()
        return "booted"

    async def _stop(self, vm: MockVm) -> str:
        await vm.stop(force=self._choices.chance(0.3))
        return "stopped"

    async def _pause(self, vm: MockVm) -> str:
        await vm.pause()
        return "paused"

    async def _resume(self, vm: MockVm) -> str:
        await vm.resume()
        return "resumed"

    async def _exec(self, vm: MockVm) -> str:
        argv = self._choices.choice(COMMANDS)
        result = await vm.exec(argv, timeout=EXEC_TIMEOUT)
        return f"{' '.join(argv)!r} exit={result.exit_code} out={len(result.stdout)}B"

    async def _write(self, vm: MockVm) -> str:
        path = f"/tmp/f{self._choices.randint(0, 4)}"
        data = self._choices.randbytes(self._choices.randint(0, 256))
        await vm.write_file(path, data)
        self.files[vm.id][path] = data
        return f"{path} {len(data)}B"

    async def _read(self, vm: MockVm) -> str:
        if not self.files[vm.id]:
            return "nothing written yet"
        path = self._choices.choice(sorted(self.files[vm.id]))
        data = await vm.read_file(path)
        if data != self.files[vm.id][path]:
            self._violate("file-model", f"{vm.id}:{path} read {len(data)}B, expected "
                          f"{len(self.files[vm.id][path])}B")
        return f"{path} {len(data)}B"

    async def _snapshot(self, vm: MockVm) -> str:
        kind = SnapshotKind.DISK if vm.state is VmState.STOPPED else self._choices.choice(
            [SnapshotKind.FULL, SnapshotKind.FULL, SnapshotKind.CHECKPOINT]
        )
        self._snap_counter += 1
        path = SNAPSHOT_ROOT / f"snap{self._snap_counter}"
        digest = vm.state_digest(kind)
        files = dict(self.files[vm.id])
        await vm.snapshot(path, kind=kind)
        self.snapshots[path.name] = _Snap(path, kind, digest, files)
        return f"{path.name} {kind.value}"

    async def _restore(self) -> str:
        snap = self.snapshots[self._choices.choice(sorted(self.snapshots))]
        stopped = sorted(n for n, vm in self.vms.items() if vm.state is VmState.STOPPED)
        if stopped:
            vm = self.vms[self._choices.choice(stopped)]
        elif len(self.vms) < MAX_VMS:
            vm = self._new_vm()
        else:
            return "no VM free to restore into"
        damage = expected_damage(self.storage, snap.path)
        try:
            await vm.restore(VmSnapshot.open(snap.path, storage=self.storage))
        except KelpieError as exc:
            if damage is None or self.storage.crashed:
                raise
            self._check_caught(snap.path, damage, exc)
            return f"{snap.path.name} into {vm.id}: refused (damaged, as it should be)"
        if damage is not None:
            self._violate("snapshot-readable", f"{snap.path.name} is damaged but restored")
        if vm.state_digest(snap.kind) != snap.digest:
            self._violate("restore-equals-snapshot",
                          f"{vm.id} restored from {snap.path.name} differs from what was captured")
        self.files[vm.id] = dict(snap.files)
        return f"{snap.path.name} ({snap.kind.value}) into {vm.id}"

    # ---- host crash recovery ------------------------------------------------------------
    def _recover_host(self) -> None:
        """The host process restarted: storage works again; partial snapshots are removed."""
        self.storage.restart()
        for name in self.storage.list_dir(SNAPSHOT_ROOT):
            if name.endswith(PARTIAL_SUFFIX):
                self.storage.remove_tree(SNAPSHOT_ROOT / name)

    # ---- invariants ---------------------------------------------------------------------
    def _violate(self, invariant: str, detail: str) -> None:
        """Record a violation once (an invariant broken for good is reported at its first step)."""
        if not any(v.invariant == invariant and v.detail == detail for v in self.violations):
            self.violations.append(Violation(self._step, invariant, detail))

    def _check_transition(self, vm: object, old: VmState, new: VmState) -> None:
        if not is_legal(old, new):
            self._violate("state-machine", f"illegal transition {old} -> {new}")

    def _check_caught(self, path: Path, expected: type[SnapshotCorrupted],
                      error: BaseException | None) -> None:
        """Silent damage must be refused by the check meant for it (see the invariants)."""
        if type(error) is not expected:
            got = "nothing (accepted)" if error is None else f"{type(error).__name__}: {error}"
            self._violate("fault-caught-by-its-check", f"{path.name} must be refused by "
                          f"{expected.__name__}, got {got}")

    def _check_invariants(self) -> None:
        for name, vm in sorted(self.vms.items()):
            expected = vm.transitions[-1][1] if vm.transitions else VmState.CREATED
            if vm.state is not expected:
                self._violate("state-machine", f"{name} reports {vm.state}, last move was to "
                              f"{expected}")
        if self.storage.crashed:
            return
        listed = self.storage.list_dir(SNAPSHOT_ROOT)
        for entry in listed:
            path = SNAPSHOT_ROOT / entry
            if entry.startswith("."):
                continue  # partial: not listed as complete, removed by recovery
            damage = expected_damage(self.storage, path)
            try:
                VmSnapshot.open(path, storage=self.storage).verify()
            except SnapshotCorrupted as exc:
                if damage is None:
                    self._violate("snapshot-readable", f"{entry} is listed complete: {exc}")
                else:
                    self._check_caught(path, damage, exc)
            else:
                if damage is not None:
                    self._check_caught(path, damage, None)
        for name in sorted(self.snapshots):
            if name not in listed:
                self._violate("snapshot-readable", f"{name} was reported written but is gone")
            if f".{name}{PARTIAL_SUFFIX}" in listed:
                self._violate("no-partial-listed", f"{name} is both complete and partial")


def expected_damage(storage: SimStorage, snapshot: Path) -> type[SnapshotCorrupted] | None:
    """Which check must refuse ``snapshot``, given the silent damage storage did to it (None:
    undamaged). The manifest is read first, then the blobs in name order."""
    prefix = str(snapshot) + "/"

    def damage(key: str) -> type[SnapshotCorrupted] | None:
        if key in storage.corrupted:
            return BlobDigestMismatch
        if key in storage.truncated:
            return BlobSizeMismatch
        return None

    if damage(prefix + MANIFEST_NAME) is not None:
        return ManifestCorrupted
    blobs = sorted(k for k in (*storage.corrupted, *storage.truncated)
                   if k.startswith(prefix) and "/" not in k[len(prefix):])
    return damage(blobs[0]) if blobs else None


def run_seed(seed: int, steps: int = 100, faults: list[FaultSpec] | None = None) -> SimReport:
    """Run one seeded simulation and return its report."""
    return Simulation(seed, steps, faults).run()
