"""In-memory storage for simulations, with the storage faults injected at write time."""

from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO

from kelpie.sim._faults import NO_FAULTS, Fault, FaultInjector
from kelpie.sim._rng import SimRng
from kelpie.vm import Storage, StorageError


class SimulatedCrash(StorageError):
    """The simulated host process died: storage is frozen until :meth:`SimStorage.restart`.

    It derives from StorageError so best-effort cleanup code treats it like any failed I/O,
    while the simulator recognises it as a crash of the whole host process.
    """


class SimStorage(Storage):
    """A file store in memory. Writes consult the fault injector:

    - ``storage_write_fail``: the write fails, nothing changes;
    - ``storage_partial_write``: a torn write: a prefix lands at the path, the call fails;
    - ``crash_before_write`` / ``crash_after_write``: the host process dies before / after
      the data lands; every later call fails with :class:`SimulatedCrash` until restart;
    - ``snapshot_corruption``: silent bit rot: the write "succeeds" with one byte flipped;
      the path is remembered in ``corrupted`` so a simulation knows reads must fail.
    """

    def __init__(self, rng: SimRng, faults: FaultInjector = NO_FAULTS) -> None:
        self._rng = rng
        self._faults = faults
        self.files: dict[str, bytes] = {}
        self.dirs: set[str] = {"/"}
        self.crashed = False
        self.corrupted: set[str] = set()

    # -- helpers
    def _alive(self, op: str, path: Path) -> None:
        if self.crashed:
            raise SimulatedCrash(f"{op} {path}: host process has crashed")

    def _parents(self, path: str) -> list[str]:
        parts = Path(path).parents
        return [str(p) for p in parts]

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
        self._alive("write", path)
        key = str(path)
        if self._faults.check(Fault.CRASH_BEFORE_WRITE, "write"):
            self.crashed = True
            raise SimulatedCrash(f"write {path}: host crashed before the write")
        if self._faults.check(Fault.STORAGE_WRITE_FAIL, "write"):
            raise StorageError(f"cannot write {path}: injected I/O error")
        self.dirs.update(self._parents(key))
        if self._faults.check(Fault.STORAGE_PARTIAL_WRITE, "write") and data:
            self.files[key] = data[: self._rng.randint(0, len(data) - 1)]
            raise StorageError(f"cannot write {path}: injected torn write")
        self.files[key] = bytes(data)
        if self._faults.check(Fault.SNAPSHOT_CORRUPTION, "write"):
            self.corrupt(path)
        if self._faults.check(Fault.CRASH_AFTER_WRITE, "write"):
            self.crashed = True
            raise SimulatedCrash(f"write {path}: host crashed after the write")

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
        self._alive("mkdir", path)
        key = str(path)
        self.dirs.add(key)
        self.dirs.update(self._parents(key))

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
        self._alive("rename", src)
        if self.exists(dst):
            raise StorageError(f"cannot rename {src} to {dst}: destination exists")
        if not self.exists(src):
            raise StorageError(f"cannot rename {src}: no such file or directory")
        s, d = str(src), str(dst)
        files, dirs = self._under(s)
        for f in files:
            self.files[d + f[len(s):]] = self.files.pop(f)
            if f in self.corrupted:
                self.corrupted.discard(f)
                self.corrupted.add(d + f[len(s):])
        for old in dirs:
            self.dirs.discard(old)
            self.dirs.add(d + old[len(s):])
        self.dirs.update(self._parents(d))

    def remove_tree(self, path: Path) -> None:
        self._alive("remove", path)
        files, dirs = self._under(str(path))
        for f in files:
            del self.files[f]
            self.corrupted.discard(f)
        for d in dirs:
            self.dirs.discard(d)
