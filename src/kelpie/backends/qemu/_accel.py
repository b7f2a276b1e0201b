"""Choosing QEMU's accelerator: KVM only when a probe proves it boots a guest, else TCG.

``/dev/kvm`` existing proves nothing (a nested, paravirtualised KVM may hang every normal
guest, see DESIGN.md), so the probe boots the guest kit under KVM with a short timeout and
waits for its init to speak on the console. The verdict is cached on disk per kernel,
QEMU binary and guest kit, so only the first VM on a host pays for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

from kelpie._paths import state_dir
from kelpie.guestkit import kernel_cmdline

KVM_PROBE_TIMEOUT = 10.0
INIT_MARKER = "kelpie-init"
ACCEL_ENV = "KELPIE_QEMU_ACCEL"


@dataclasses.dataclass(frozen=True)
class AccelChoice:
    """The accelerator to use and why."""

    accel: str  # "kvm" or "tcg"
    reason: str


def _cache_file() -> Path:
    return state_dir() / "qemu-accel.json"


def _cache_key(qemu: str, kit_digest: str) -> str:
    stat = os.stat(qemu)
    return f"{platform.release()}|{qemu}|{stat.st_size}|{int(stat.st_mtime)}|{kit_digest}"


def cached_choice(qemu: str, kit_digest: str) -> AccelChoice | None:
    """The cached verdict for this kernel, QEMU and kit, if any."""
    try:
        data = json.loads(_cache_file().read_text())
        entry = data[_cache_key(qemu, kit_digest)]
        return AccelChoice(entry["accel"], entry["reason"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _store(qemu: str, kit_digest: str, choice: AccelChoice) -> None:
    path = _cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    data[_cache_key(qemu, kit_digest)] = dataclasses.asdict(choice)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def cached_accel_summary(qemu: str) -> str:
    """What ``backend ls`` shows: the accelerator last proven for this QEMU, if any."""
    forced = os.environ.get(ACCEL_ENV)
    if forced in ("kvm", "tcg"):
        return f"{forced} (forced by {ACCEL_ENV})"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg (no usable /dev/kvm)"
    try:
        data = json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        data = {}
    prefix = f"{platform.release()}|{qemu}|"
    verdicts = [v for k, v in sorted(data.items()) if k.startswith(prefix)]
    if not verdicts:
        return "kvm or tcg: decided by a boot probe on the first start"
    return f"{verdicts[-1]['accel']} ({verdicts[-1]['reason']})"


def choose_accel(qemu: str, kernel: Path, initrd: Path, kit_digest: str) -> AccelChoice:
    """KVM if proven to boot the kit (cached), else TCG. ``KELPIE_QEMU_ACCEL`` forces one."""
    forced = os.environ.get(ACCEL_ENV)
    if forced in ("kvm", "tcg"):
        return AccelChoice(forced, f"forced by {ACCEL_ENV}")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return AccelChoice("tcg", "no usable /dev/kvm")
    cached = cached_choice(qemu, kit_digest)
    if cached is not None:
        return cached
    choice = _probe_kvm(qemu, kernel, initrd)
    _store(qemu, kit_digest, choice)
    return choice


def _probe_kvm(qemu: str, kernel: Path, initrd: Path) -> AccelChoice:
    with tempfile.TemporaryDirectory(prefix="kelpie-kvm-probe-") as tmp:
        console = Path(tmp) / "console.log"
        command = [
            qemu, "-M", "microvm,accel=kvm", "-cpu", "host", "-m", "256", "-smp", "1",
            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", kernel_cmdline(),
            "-serial", f"file:{console}",
        ]  # fmt: skip
        started = time.monotonic()
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, start_new_session=True,
        )
        try:
            while time.monotonic() - started < KVM_PROBE_TIMEOUT:
                if process.poll() is not None:
                    err = process.stderr.read() if process.stderr else b""
                    text = err.decode(errors="replace").strip()[:200]
                    return AccelChoice("tcg", f"KVM probe: QEMU exited: {text}")
                with contextlib.suppress(FileNotFoundError):
                    if INIT_MARKER in console.read_text(errors="replace"):
                        took = time.monotonic() - started
                        return AccelChoice("kvm", f"KVM probe booted the guest in {took:.1f}s")
                time.sleep(0.05)
            return AccelChoice(
                "tcg", f"KVM probe: guest did not boot within {KVM_PROBE_TIMEOUT:g}s under KVM"
            )
        finally:
            process.kill()
            process.wait()
            if process.stderr:
                process.stderr.close()
