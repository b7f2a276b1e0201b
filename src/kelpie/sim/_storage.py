"""In-memory storage for simulations, with storage faults and host crashes at every step.

Every call that changes the store (write, stream write, mkdir, rename, remove) is one
*step*. A step hook chosen by the simulation may crash the host just before or just after
any step, so a harness can enumerate every crash point of an operation instead of hoping a
probability hits it. After a crash every call fails until :meth:`SimStorage.restart`.
"""

from __future__ import annotations

import enum
import io
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, cast

from kelpie.sim._faults import NO_FAULTS, Fault, FaultInjector
from kelpie.sim._rng import SimRng
from kelpie.vm import Storage, StorageError


class SimulatedCrash(BaseException):
    """The simulated host process died: storage is frozen until :meth:`SimStorage.restart`.

    A BaseException, like SystemExit: a process that dies runs none of its own error
    handling, so no ``except Exception`` (or ``except StorageError``) in Kelpie may catch
    it; only the simulator does. ``finally`` blocks still run, and storage refuses every
    step they try, so nothing they do lands.
    """


class CrashWhen(enum.StrEnum):
    """Where around a storage step a planned crash happens."""

    BEFORE = "before"
    """The step never lands."""
    AFTER = "after"
    """The step lands, then the host dies (before the caller sees it succeed)."""


StepHook = Callable[[str, Path], CrashWhen | None]
"""Called before every step with its operation name and path: whether to crash there."""


class SimStorage(Storage):
    """A file store in memory. Writes consult the fault injector:

    - ``storage_write_fail``: the write fails, nothing changes;
    - ``storage_partial_write``: a torn write: a prefix lands at the path, the call fails;
    - ``crash_before_write`` / ``crash_after_write``: the host process dies before / after
      the data lands; every later call fails with :class:`SimulatedCrash` until restart;
    - ``snapshot_corruption``: silent bit rot: the write "succeeds" with one byte flipped;
      the path is remembered in ``corrupted`` so a simulation knows reads must fail (and
      which check must catch it: a digest);
    - ``snapshot_truncation``: a silently lost tail: the write "succeeds" but only a prefix
      is kept; the path is remembered in ``truncated`` (a size check must catch it).

    ``step_hook`` (see :data:`StepHook`) plans crashes at chosen steps; ``on_crash`` is
    called at the instant of any crash (a harness freezes the other durable state there,
    e.g. the state database); ``steps`` counts every step taken.
    """

    def __init__(self, rng: SimRng, faults: FaultInjector = NO_FAULTS) -> None:
        self._rng = rng
        self._faults = faults
        self.files: dict[str, bytes] = {}
        self.dirs: set[str] = {"/"}
        self.crashed = False
        self.corrupted: set[str] = set()
        self.truncated: set[str] = set()
        self.steps = 0
        self.step_hook: StepHook | None = None
        self.on_crash: Callable[[], None] | None = None

    # -- helpers
    def _alive(self, op: str, path: Path) -> None:
        if self.crashed:
            raise SimulatedCrash(f"{op} {path}: host process has crashed")

    def _crash(self, message: str) -> SimulatedCrash:
        self.crashed = True
        if self.on_crash is not None:
            self.on_crash()
        return SimulatedCrash(message)

    def _step(self, op: str, path: Path) -> bool:
        """Begin a step: crash now if planned; True if the host must crash once it lands."""
        self._alive(op, path)
        self.steps += 1
        when = self.step_hook(op, path) if self.step_hook is not None else None
        if when is CrashWhen.BEFORE:
            raise self._crash(f"{op} {path}: host crashed before this step (planned)")
        return when is CrashWhen.AFTER

    def _landed(self, op: str, path: Path, crash_after: bool) -> None:
        if crash_after:
            raise self._crash(f"{op} {path}: host crashed after this step (planned)")

    def _parents(self, path: str) -> list[str]:
        parts = Path(path).parents
        return [str(p) for p in parts]

    def crash(self, why: str) -> SimulatedCrash:
        """The host dies now, away from any storage step (say, at a database write): the
        error to raise. Storage refuses every call until :meth:`restart`."""
        return self._crash(f"host crashed: {why}")

    def restart(self) -> None:
        """The host process came back: storage works again (contents as the crash left them)."""
        self.crashed = False

    def corrupt(self, path: Path) -> None:
        """Flip one byte of a stored file (bit rot), chosen by the RNG."""
        key = str(path)
        self.corrupted.add(key)
        data = bytearray(self.files[key])
        if not data:
            self.files[key] = b"\x00"
            return
        i = self._rng.randint(0, len(data) - 1)
        data[i] ^= 0xFF
        self.files[key] = bytes(data)

    # -- Storage
    def write_bytes(self, path: Path, data: bytes) -> None:
        crash_after = self._step("write", path)
        key = str(path)
        if self._faults.check(Fault.CRASH_BEFORE_WRITE, "write"):
            raise self._crash(f"write {path}: host crashed before the write")
        if self._faults.check(Fault.STORAGE_WRITE_FAIL, "write"):
            raise StorageError(f"cannot write {path}: injected I/O error")
        self.dirs.update(self._parents(key))
        if self._faults.check(Fault.STORAGE_PARTIAL_WRITE, "write") and data:
            self.files[key] = data[: self._rng.randint(0, len(data) - 1)]
            raise StorageError(f"cannot write {path}: injected torn write")
        self.files[key] = bytes(data)
        self.corrupted.discard(key)
        self.truncated.discard(key)
        if self._faults.check(Fault.SNAPSHOT_CORRUPTION, "write"):
            self.corrupt(path)
        elif data and self._faults.check(Fault.SNAPSHOT_TRUNCATION, "write"):
            self.files[key] = data[: self._rng.randint(0, len(data) - 1)]
            self.truncated.add(key)
        if self._faults.check(Fault.CRASH_AFTER_WRITE, "write"):
            raise self._crash(f"write {path}: host crashed after the write")
        self._landed("write", path, crash_after)

    def read_bytes(self, path: Path) -> bytes:
        self._alive("read", path)
        try:
            return self.files[str(path)]
        except KeyError:
            raise StorageError(f"cannot read {path}: no such file") from None

    def open_read(self, path: Path) -> BinaryIO:
        return io.BytesIO(self.read_bytes(path))

    def size(self, path: Path) -> int:
        return len(self.read_bytes(path))

    def exists(self, path: Path) -> bool:
        self._alive("stat", path)
        key = str(path)
        return key in self.files or key in self.dirs

    def mkdir(self, path: Path) -> None:
        crash_after = self._step("mkdir", path)
        key = str(path)
        self.dirs.add(key)
        self.dirs.update(self._parents(key))
        self._landed("mkdir", path, crash_after)

    def list_dir(self, path: Path) -> list[str]:
        self._alive("list", path)
        key = str(path)
        names = {
            Path(p).name
            for p in (*self.files, *self.dirs)
            if p != key and str(Path(p).parent) == key
        }
        return sorted(names)

    def _under(self, key: str) -> tuple[list[str], list[str]]:
        prefix = key.rstrip("/") + "/"
        files = sorted(f for f in self.files if f == key or f.startswith(prefix))
        dirs = sorted(d for d in self.dirs if d == key or d.startswith(prefix))
        return files, dirs

    def rename(self, src: Path, dst: Path) -> None:
        crash_after = self._step("rename", src)
        if self.exists(dst):
            raise StorageError(f"cannot rename {src} to {dst}: destination exists")
        if not self.exists(src):
            raise StorageError(f"cannot rename {src}: no such file or directory")
        s, d = str(src), str(dst)
        files, dirs = self._under(s)
        for f in files:
            self.files[d + f[len(s):]] = self.files.pop(f)
            for damaged in (self.corrupted, self.truncated):
                if f in damaged:
                    damaged.discard(f)
                    damaged.add(d + f[len(s):])
        for old in dirs:
            self.dirs.discard(old)
            self.dirs.add(d + old[len(s):])
        self.dirs.update(self._parents(d))
        self._landed("rename", src, crash_after)

    def remove_tree(self, path: Path) -> None:
        crash_after = self._step("remove", path)
        files, dirs = self._under(str(path))
        for f in files:
            del self.files[f]
            self.corrupted.discard(f)
            self.truncated.discard(f)
        for d in dirs:
            self.dirs.discard(d)
        self._landed("remove", path, crash_after)

    def is_dir(self, path: Path) -> bool:
        self._alive("stat", path)
        return str(path) in self.dirs

    def open_write(self, path: Path) -> BinaryIO:
        if self.exists(path):
            raise StorageError(f"cannot create {path}: it exists")
        return self._open_stream("create", path)

    def open_append(self, path: Path) -> BinaryIO:
        return self._open_stream("append", path)

    def _open_stream(self, op: str, path: Path) -> BinaryIO:
        crash_after = self._step(op, path)
        key = str(path)
        self.dirs.update(self._parents(key))
        self.files.setdefault(key, b"")
        self._landed(op, path, crash_after)
        return cast(BinaryIO, _SimStream(self, path))

    def _append(self, path: Path, data: bytes) -> None:
        """One write of a stream: a step, subject to the write faults (not corruption)."""
        crash_after = self._step("write", path)
        if self._faults.check(Fault.STORAGE_WRITE_FAIL, "write"):
            raise StorageError(f"cannot write {path}: injected I/O error")
        key = str(path)
        self.files[key] = self.files.get(key, b"") + bytes(data)
        self._landed("write", path, crash_after)


class _SimStream(io.RawIOBase):
    """A file of a :class:`SimStorage` open for writing at its end."""

    def __init__(self, storage: SimStorage, path: Path) -> None:
        self._storage = storage
        self._path = path

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self._storage._append(self._path, bytes(data))
        return len(data)
