"""Starting a daemon in the background and waiting until it is ready.

The child gets the write end of a pipe (``--ready-fd``). It writes ``ready`` once its
listeners are bound and its runtime is open; if it dies first, the pipe reaches EOF. So
the parent waits on an event, never on a sleep, and reports the child's log when it fails.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path

from kelpie.daemon._server import LOG_FILE, READY, DaemonError

START_TIMEOUT = 120.0
LOG_TAIL_LINES = 20


def start_daemon(run_dir: Path, *, extra_args: list[str] | None = None,
                 timeout: float = START_TIMEOUT) -> int:
    """Start ``kelpie daemon run`` detached (own session, output to ``daemon.log``).

    Returns its pid once it is ready; raises :class:`DaemonError` with the tail of its
    log if it exits or is not ready within ``timeout`` seconds.
    """
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    log_path = run_dir / LOG_FILE
    read_end, write_end = os.pipe()
    command = [sys.executable, "-m", "kelpie", "daemon", "run", "--ready-fd", str(write_end),
               *(extra_args or [])]
    try:
        with log_path.open("ab") as log:
            log.write(f"--- kelpie daemon starting at {time.ctime()}\n".encode())
            log.flush()
            child = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                pass_fds=(write_end,), start_new_session=True, close_fds=True,
            )
    finally:
        os.close(write_end)
    try:
        answer = _read_until_eof(read_end, timeout)
    finally:
        os.close(read_end)
    if answer.startswith(READY):
        return child.pid
    if child.poll() is None:
        child.kill()
    child.wait()
    raise DaemonError(f"the kelpie daemon did not start (see {log_path}):\n"
                      + _tail(log_path))


def _read_until_eof(fd: int, timeout: float) -> bytes:
    """What the child writes to the pipe: ``ready`` then EOF, or EOF when it dies."""
    deadline = time.monotonic() + timeout
    data = b""
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        readable, _, _ = select.select([fd], [], [], left)
        if not readable:
            break
        chunk = os.read(fd, 64)
        if not chunk:
            break
        data += chunk
    return data


def _tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "  (no log)"
    start = max((i for i, line in enumerate(lines) if line.startswith("--- kelpie daemon")),
                default=0)
    return "\n".join(f"  {line}" for line in lines[start:][-LOG_TAIL_LINES:])
