"""The data directory's owner lock: one runtime process per data directory."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

from kelpie.runtime._errors import RuntimeLocked

LOCK_FILENAME = "runtime.lock"


def lock_data_dir(data_dir: Path) -> IO[str]:
    """Take the data directory's exclusive lock, or say who holds it.

    A real file and a kernel lock, not storage: the kernel drops it when the process dies,
    so a crashed runtime never blocks the next one. Closing the file releases it.
    """
    lock_file = (data_dir / LOCK_FILENAME).open("a+")
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.seek(0)
        owner = lock_file.read().strip()
        lock_file.close()
        raise RuntimeLocked(data_dir, owner) from None
    lock_file.seek(0)
    lock_file.truncate()
    lock_file.write(f"pid {os.getpid()}\n")
    lock_file.flush()
    return lock_file
