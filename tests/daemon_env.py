"""An isolated Kelpie installation for tests that drive the real ``kelpie`` command.

Each :class:`KelpieHome` has its own state dir (images, sandboxes, VM dirs) and a short
runtime dir (unix socket paths are limited to 107 bytes). :meth:`KelpieHome.close` stops
the daemon it started and kills every VM left in it, so a failing test leaks nothing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

KELPIE = [sys.executable, "-m", "kelpie"]


class KelpieHome:
    """A state dir + runtime dir and the environment pointing at them."""

    def __init__(self, base: Path | None = None) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="kh", dir=base))
        self.state = self.root / "state"
        self.run_dir = Path(tempfile.mkdtemp(prefix="kr", dir="/tmp"))
        self.env = {
            **os.environ,
            "KELPIE_STATE_DIR": str(self.state),
            "KELPIE_RUNTIME_DIR": str(self.run_dir),
            "PYTHONUNBUFFERED": "1",
        }
        self.env.pop("KELPIE_HOST", None)
        self.env.pop("KELPIE_TOKEN", None)

    @property
    def socket(self) -> Path:
        return self.run_dir / "kelpie.sock"

    def kelpie(self, *args: str, input: str | bytes | None = None, timeout: float = 300,
               check: bool = False) -> subprocess.CompletedProcess[str]:
        """Run ``kelpie ARGS`` against this home; text output."""
        data = input.decode() if isinstance(input, bytes) else input
        return subprocess.run([*KELPIE, *args], env=self.env, input=data, text=True,
                              capture_output=True, timeout=timeout, check=check)

    def daemon_pid(self) -> int | None:
        try:
            return int((self.run_dir / "daemon.pid").read_text())
        except (OSError, ValueError):
            return None

    def close(self) -> None:
        """Stop the daemon (sandboxes too) and kill whatever VM is left."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.kelpie("--no-autostart", "daemon", "stop", "--stop-sandboxes", timeout=120)
        pid = self.daemon_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        vms = self.state / "vms"
        for pid_file in vms.glob("*/qemu.pid") if vms.exists() else ():
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self.run_dir, ignore_errors=True)
