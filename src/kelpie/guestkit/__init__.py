"""The guest kit: the kernel and initramfs every Kelpie micro-VM boots.

`build_guestkit()` assembles it from Debian packages (the generic kernel, static busybox,
a trimmed Python 3.11 and the guest agent) and caches it by the digest of its inputs;
`load_guestkit()` finds an already built kit. The initramfs's `/init` (init.sh) reads its
settings from the kernel command line, which `kernel_cmdline()` writes.
"""

from kelpie.guestkit._arch import ARCHES, ArchError, GuestArch, guest_arch, host_arch
from kelpie.guestkit._build import (
    GuestKit,
    GuestKitError,
    build_guestkit,
    default_cache_dir,
    load_guestkit,
)
from kelpie.guestkit._cmdline import (
    AGENT_PORT_NAME,
    GuestNetwork,
    GuestShare,
    host_tsc_khz,
    kernel_cmdline,
)

__all__ = [
    "AGENT_PORT_NAME",
    "ARCHES",
    "ArchError",
    "GuestArch",
    "GuestKit",
    "GuestKitError",
    "GuestNetwork",
    "GuestShare",
    "build_guestkit",
    "default_cache_dir",
    "guest_arch",
    "host_arch",
    "host_tsc_khz",
    "kernel_cmdline",
    "load_guestkit",
]
