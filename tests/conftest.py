"""Shared fixtures: the DST seed (from DST_SEED, random when unset, always reported)."""

from __future__ import annotations

import os
import random

import pytest

_SEED = int(os.environ.get("DST_SEED") or random.SystemRandom().randrange(2**32))


def pytest_report_header() -> str:
    return f"DST_SEED={_SEED} (set DST_SEED to reproduce)"


@pytest.fixture
def dst_seed() -> int:
    """The session's base seed for simulation tests."""
    return _SEED
