"""Sizes and signals as typed on the command line and in the SDK: units, bare numbers as
MiB; signal names with or without SIG, as Linux numbers."""

from __future__ import annotations

import pytest

from kelpie._signals import signal_number
from kelpie._units import mib, optional_mib
from kelpie.vm import ConfigError


@pytest.mark.parametrize(("text", "expected"), [
    ("512", 512), (512, 512), ("512m", 512), ("512M", 512), ("512MiB", 512), ("2g", 2048),
    ("10G", 10240), ("1.5g", 1536), ("1t", 1 << 20), ("2048k", 2), (" 3 g ", 3072),
])
def test_sizes(text: int | str, expected: int) -> None:
    assert mib(text, "disk") == expected


@pytest.mark.parametrize("text", ["", "g", "2x", "-1g", "1.1m", "512 bytes", "0x10"])
def test_what_is_not_a_size_is_refused_naming_the_forms(text: str) -> None:
    with pytest.raises(ConfigError, match=r"disk .*(not a size: give MiB|whole number of MiB)"):
        mib(text, "disk")


def test_none_stays_none() -> None:
    assert optional_mib(None, "memory") is None and optional_mib("1g", "memory") == 1024


@pytest.mark.parametrize(("typed", "number"), [
    ("TERM", 15), ("SIGTERM", 15), ("sigint", 2), ("15", 15), (9, 9), ("USR1", 10),
    ("WINCH", 28), ("64", 64),
])
def test_signals_are_read_as_linux_numbers(typed: int | str, number: int) -> None:
    assert signal_number(typed) == number


@pytest.mark.parametrize("typed", ["0", "65", "", "SIG", "NOPE", "-1", "1.5"])
def test_unknown_signals_are_refused_naming_the_forms(typed: str) -> None:
    with pytest.raises(ConfigError, match="a number from 1 to 64 or a name such as TERM"):
        signal_number(typed)
