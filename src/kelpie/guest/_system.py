"""The guest system: after-restore resync (clock, RNG, hostname), boot id, power-off."""

from __future__ import annotations

import fcntl
import os
import struct
import time

from ._common import DEFAULT_PATH, OpError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Final

#: _IOW('R', 0x03, int[2]): add entropy to the kernel pool and credit it.
RNDADDENTROPY: Final = 0x40085203
#: _IO('R', 0x07): reseed the kernel's CRNG from its input pool now (Linux >= 4.17).
RNDRESEEDCRNG: Final = 0x5207


def op_resync(rid: int, f: dict[str, Any], *, set_clock: bool = True) -> dict[str, Any]:
    """After a snapshot restore: fix the clock (if ``set_clock``), reseed the RNG, rename
    the host."""
    reply: dict[str, Any] = {
        "clock_set": False,
        "entropy_bytes": 0,
        "entropy_credited": False,
        "hostname": None,
        "rng_reseeded": False,
    }
    if f["epoch_ns"] is not None and set_clock:
        try:
            time.clock_settime_ns(time.CLOCK_REALTIME, f["epoch_ns"])
        except OSError as exc:
            raise OpError.from_os(exc, "cannot set the clock") from None
        reply["clock_set"] = True
    if f["entropy"]:
        data = bytes.fromhex(f["entropy"])
        reply["entropy_credited"] = add_entropy(data)
        reply["entropy_bytes"] = len(data)
        reply["rng_reseeded"] = reseed_rng()
    if f["hostname"] is not None:
        try:  # sethostname(2) through /proc: no socket module (see _channel)
            with open("/proc/sys/kernel/hostname", "w") as hostname:
                hostname.write(f["hostname"])
        except OSError as exc:
            raise OpError.from_os(exc, "cannot set the hostname") from None
        reply["hostname"] = f["hostname"]
    return reply


def read_boot_id() -> str:
    """The kernel's boot id (changes on every boot, not on snapshot restore)."""
    try:
        # UTF-8: its codec is loaded at start-up; ASCII's would be one more import at boot.
        with open("/proc/sys/kernel/random/boot_id", encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return ""


def add_entropy(data: bytes) -> bool:
    """Mix bytes into the kernel RNG; return True if they were also credited."""
    fd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data)
        try:
            info = struct.pack("ii", len(data) * 8, len(data)) + data
            fcntl.ioctl(fd, RNDADDENTROPY, info)
        except OSError:  # needs CAP_SYS_ADMIN; mixing in is enough
            return False
        return True
    finally:
        os.close(fd)


def reseed_rng() -> bool:
    """Make the kernel's CRNG rekey from its input pool now; True if it did.

    After a snapshot restore every clone holds the same CRNG state, and credited entropy
    alone is only used at the next scheduled reseed (up to a minute later): until then
    clones could read the same /dev/urandom bytes. VMGenID would reseed too, but QEMU's
    microvm machine has no ACPI table for it, so the restore's resync does it instead.
    """
    try:
        fd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.ioctl(fd, RNDRESEEDCRNG)
    except OSError:  # needs CAP_SYS_ADMIN and an initialised CRNG
        return False
    finally:
        os.close(fd)
    return True


def power_off() -> None:
    """Power the VM off: sysrq 'o' (works even as PID 1), else poweroff -f."""
    os.sync()
    try:
        with open("/proc/sysrq-trigger", "w", encoding="ascii") as trigger:
            trigger.write("o")
        time.sleep(5)
    except OSError:
        pass
    for argv in (["poweroff", "-f"], ["busybox", "poweroff", "-f"]):
        try:
            os.execvpe(argv[0], argv, {"PATH": DEFAULT_PATH})
        except OSError:
            continue
