"""Choosing the host for a new sandbox (or for one a drain or recovery moves)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from kelpie._exceptions import KelpieError
from kelpie.fleet._model import HostReport, Placement

RESERVE_MIB = 256
"""Memory a host keeps for itself beyond the sandboxes placed on it."""


class PlacementError(KelpieError):
    """No host can take the sandbox; the message says what each host lacked."""


class Random(Protocol):
    """The randomness placement breaks ties with (``random.Random`` or the DST's ``SimRng``)."""

    def random(self) -> float: ...


def choose_host(reports: Sequence[HostReport], want: Placement, rng: Random, *,
                pending_mib: Mapping[str, int] | None = None) -> HostReport:
    """The host for ``want``: one that runs its arch and backend and has the memory (its
    free memory less ``pending_mib``, what was placed there since its report, less a
    reserve); among those, one holding its template or image first, then the one with the
    most memory left (so sandboxes spread), ties broken by ``rng``.

    Raises :class:`PlacementError` naming why each host was passed over.
    """
    pending = pending_mib or {}
    fitting: list[tuple[tuple[int, float, float], HostReport]] = []
    passed: list[str] = []
    for report in reports:
        why = _unfit(report, want, pending.get(report.host, 0))
        if why:
            passed.append(f"{report.host}: {why}")
            continue
        left = report.free_memory_mib - pending.get(report.host, 0) - want.memory_mib
        fitting.append(((_locality(report, want), left / max(report.memory_mib, 1),
                         rng.random()), report))
    if not fitting:
        detail = "; ".join(passed) if passed else "the fleet has no host that is up"
        raise PlacementError(f"no host can take a sandbox of {want.memory_mib} MiB "
                             f"({_describe(want)}): {detail}. Add hosts, drain fewer, or "
                             "ask for less memory")
    return max(fitting, key=lambda pair: pair[0])[1]


def _unfit(report: HostReport, want: Placement, pending_mib: int) -> str | None:
    if want.arch and want.arch not in report.arches:
        return f"runs {', '.join(report.arches) or 'no'} guests, not {want.arch}"
    if want.backend and want.backend not in report.backends:
        return f"has backends {', '.join(report.backends) or 'none'}, not {want.backend}"
    free = report.free_memory_mib - pending_mib - RESERVE_MIB
    if free < want.memory_mib:
        return f"{max(free, 0)} MiB free"
    return None


def _locality(report: HostReport, want: Placement) -> int:
    """2: holds the template; 1: holds the image; 0: would have to fetch it."""
    if want.template and want.template in report.templates:
        return 2
    if want.image and want.image in report.images:
        return 1
    return 0


def _describe(want: Placement) -> str:
    parts = [f"{want.cpus} vCPU"]
    for label, value in (("arch", want.arch), ("backend", want.backend),
                         ("template", want.template), ("image", want.image)):
        if value:
            parts.append(f"{label} {value}")
    return ", ".join(parts)
