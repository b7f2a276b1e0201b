"""Firecracker on this host: where its binary is, its version, and whether KVM boots a guest.

``/dev/kvm`` existing proves nothing (a nested, paravirtualised KVM may hang every normal
guest, see DESIGN.md), so the proof boots the guest kit under Firecracker itself (no API
socket: ``--no-api --config-file``) and waits for init's first words on the serial console.
The verdict is cached on disk per host kernel, Firecracker binary and guest kit.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from kelpie._fsutil import write_atomic
from kelpie._paths import state_dir
from kelpie.guestkit import GuestKit, kernel_cmdline

BINARY_ENV = "KELPIE_FIRECRACKER_BIN"
"""A path to the ``firecracker`` binary to use instead of the one on PATH."""
BOOT_ARGS = ("reboot=k", "pci=off")
"""Firecracker's own advice: a reboot (``reboot=k``, the i8042 reset) ends the Firecracker
process, and there is no PCI bus to scan."""
KVM_PROOF_TIMEOUT = 10.0
INIT_MARKER = "kelpie-init"
_VERSIONS: dict[str, str] = {}


def find_binary(given: str | None = None) -> str | None:
    """``given``, else ``KELPIE_FIRECRACKER_BIN``, else ``firecracker`` on PATH; None if absent."""
    candidate = given or os.environ.get(BINARY_ENV)
    if candidate:
        return candidate if os.access(candidate, os.X_OK) else None
    return shutil.which("firecracker")


def firecracker_version(binary: str) -> str:
    """``1.16.1``-style version of a Firecracker binary (``unknown`` if it does not say)."""
    if binary not in _VERSIONS:
        try:
            out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                                 timeout=10, check=False).stdout
        except (OSError, subprocess.TimeoutExpired):
            out = ""
        found = re.search(r"Firecracker v?(\d+\.\d+\.\d+)", out)
        _VERSIONS[binary] = found.group(1) if found else "unknown"
    return _VERSIONS[binary]


def kvm_usable() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def _cache_file() -> Path:
    return state_dir() / "firecracker-kvm.json"


def _cache_key(binary: str, kit_digest: str) -> str:
    stat = os.stat(binary)
    return f"{platform.release()}|{binary}|{stat.st_size}|{int(stat.st_mtime)}|{kit_digest}"


def kvm_boots(binary: str, kit: GuestKit) -> tuple[bool, str]:
    """Whether Firecracker boots the guest kit under this host's KVM, and how we know
    (cached; the first call boots it)."""
    key = _cache_key(binary, kit.digest)
    try:
        cached = json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        cached = {}
    if isinstance(cached, dict) and isinstance(cached.get(key), list):
        boots, reason = cached[key]
        return bool(boots), str(reason)
    verdict = _boot_once(binary, kit)
    cached = cached if isinstance(cached, dict) else {}
    cached[key] = list(verdict)
    with contextlib.suppress(OSError):
        write_atomic(_cache_file(), json.dumps(cached, indent=1).encode())
    return verdict


def _boot_once(binary: str, kit: GuestKit) -> tuple[bool, str]:
    with tempfile.TemporaryDirectory(prefix="kelpie-fc-probe-") as tmp:
        config = Path(tmp) / "vm.json"
        console = Path(tmp) / "console.log"
        config.write_text(json.dumps({
            "boot-source": {"kernel_image_path": str(kit.kernel),
                            "initrd_path": str(kit.initrd),
                            "boot_args": kernel_cmdline(extra=BOOT_ARGS)},
            "machine-config": {"vcpu_count": 1, "mem_size_mib": 256},
        }))
        started = time.monotonic()
        with console.open("wb") as out:
            process = subprocess.Popen(
                [binary, "--no-api", "--config-file", str(config)], stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while time.monotonic() - started < KVM_PROOF_TIMEOUT:
                text = console.read_text(errors="replace")
                if INIT_MARKER in text:
                    return True, f"KVM proof: Firecracker booted the guest in " \
                                 f"{time.monotonic() - started:.1f}s"
                if process.poll() is not None:
                    return False, f"KVM proof: Firecracker exited: {text.strip()[-200:]}"
                time.sleep(0.05)
            return False, (f"KVM proof: the guest did not boot within {KVM_PROOF_TIMEOUT:g}s "
                           f"under Firecracker (a KVM that hangs guests, see DESIGN.md)")
        finally:
            process.kill()
            process.wait()
