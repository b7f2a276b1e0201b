"""Sizes as people type them: ``512m``, ``2g``, ``10G``, ``1.5g``; a bare number is MiB."""

from __future__ import annotations

import re

from kelpie._exceptions import ConfigError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?)?\s*$", re.IGNORECASE)
_MIB_PER = {"k": 1 / 1024, "m": 1, "g": 1024, "t": 1024 * 1024}


def mib(value: int | str, what: str) -> int:
    """``value`` in MiB: an int is MiB already; a string may carry a unit (k, m, g, t, with
    or without ``i``/``b``; powers of 1024, as Docker reads them). ConfigError names
    ``what`` and the forms allowed; a size that is not a whole number of MiB is refused."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = _SIZE.match(value) if isinstance(value, str) else None
    if match is None:
        raise ConfigError([f"{what} {value!r} is not a size: give MiB (512) or a number "
                           "with a unit (512m, 2g, 10G)"], what=what)
    number, unit = float(match.group(1)), (match.group(2) or "m")[0].lower()
    size = number * _MIB_PER[unit]
    if size != int(size):
        raise ConfigError([f"{what} {value!r} is not a whole number of MiB"], what=what)
    return int(size)


def optional_mib(value: int | str | None, what: str) -> int | None:
    """:func:`mib`, None staying None (a setting left at its default)."""
    return None if value is None else mib(value, what)
