"""What this host offers (:class:`kelpie.api.HostFacts`), for a teleport source or the fleet
to decide where a sandbox can go before anything pauses."""

from __future__ import annotations

import os
import platform
import re
import shutil
from collections.abc import Mapping

from kelpie._version import __version__
from kelpie.api import BackendFacts, HostFacts
from kelpie.guestkit import default_cache_dir
from kelpie.runtime._context import RuntimeContext
from kelpie.runtime._info import ACTIVE_STATES
from kelpie.vm import HostInfo

_DIGEST_DIR = re.compile(r"[0-9a-f]{64}")


def host_facts(ctx: RuntimeContext) -> HostFacts:
    """The facts of this host as the runtime ``ctx`` sees it (probes are cached)."""
    arch = HostInfo.current_arch()
    backends = []
    registry = ctx.factory.registry
    for name in registry.names():
        spec = registry.get(name)
        probe = registry.probe(name)
        backends.append(BackendFacts(
            name=spec.name, available=probe.available, reason=probe.reason,
            version=probe.details.get("version") or (__version__ if not spec.real else None),
            arches=_arches(arch, spec.real, probe.details) if probe.available else {},
            capabilities=spec.capabilities.names(),
        ))
    cpus = os.cpu_count() or 1
    promised = sum(i.config.vcpus for i in ctx.db.all() if i.state in ACTIVE_STATES)
    total_mib, available_mib = _memory_mib()
    disk = shutil.disk_usage(ctx.data_dir)
    return HostFacts(
        kelpie_version=__version__, arch=arch, cpu_model=_cpu_model(), cpus=cpus,
        free_vcpus=max(cpus - promised, 0), memory_mib=total_mib,
        free_memory_mib=available_mib, free_disk_bytes=disk.free, backends=backends,
        images=sorted(image.digest for image in ctx.images.list()),
        guestkits=_guestkits(),
    )


def _arches(host: str, real: bool, details: Mapping[str, str]) -> dict[str, str]:
    """The guest architectures a backend runs, each with its accelerator: from its probe's
    ``arches`` (``x86_64:kvm,aarch64:tcg``), else the host's with ``accel_choice`` ("" while
    undecided: QEMU proves KVM with a boot probe on its first start)."""
    listed = details.get("arches")
    if listed:
        return dict(item.split(":", 1) for item in listed.split(",") if ":" in item)
    return {host: details.get("accel_choice", "" if real else "none")}


def _memory_mib() -> tuple[int, int]:
    """Total and available memory from /proc/meminfo (0, 0 where there is none)."""
    values: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                key, _, rest = line.partition(":")
                values[key] = int(rest.split()[0]) // 1024
    except (OSError, ValueError, IndexError):
        return 0, 0
    return values.get("MemTotal", 0), values.get("MemAvailable", 0)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _guestkits() -> list[str]:
    directory = default_cache_dir()
    try:
        return sorted(e.name for e in directory.iterdir() if _DIGEST_DIR.fullmatch(e.name))
    except OSError:
        return []
