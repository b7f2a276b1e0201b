"""Shared fixtures: the DST seed (from DST_SEED, random when unset, always reported), the
QEMU guest kit, and what a test does when a real part or a VM backend is missing here."""

from __future__ import annotations

import os
import random
from typing import NoReturn

import pytest

from backend_requirements import backend_cannot_run, require_backend

_SEED = int(os.environ.get("DST_SEED") or random.SystemRandom().randrange(2**32))


def pytest_report_header() -> str:
    return f"DST_SEED={_SEED} (set DST_SEED to reproduce)"


@pytest.fixture
def dst_seed() -> int:
    """The session's base seed for simulation tests."""
    return _SEED


REQUIRE_VM_ENV = "KELPIE_REQUIRE_VM"
"""Set to 1 (CI does) where every real part a test needs must be present: a missing tool
(umoci, a registry server, busybox, debugfs...) then fails the test instead of skipping it.
Which VM backends must run is said separately, per backend: KELPIE_REQUIRE_BACKENDS (see
backend_requirements.py)."""


def real_part_missing(reason: str) -> NoReturn:
    """Skip a test that needs a real part (umoci, a registry, busybox...), or fail it in CI.

    CI sets KELPIE_REQUIRE_VM=1: there every real part must be present, so a missing one
    is a failure, never a silent skip.
    """
    if os.environ.get(REQUIRE_VM_ENV) == "1":
        pytest.fail(f"test needs a real part ({REQUIRE_VM_ENV}=1): {reason}")
    pytest.skip(reason)


def vm_unavailable(reason: str, backend: str = "qemu") -> NoReturn:
    """End a test that cannot boot a real VM of ``backend``: a failure when the backend is
    required here (KELPIE_REQUIRE_BACKENDS), else a skip."""
    backend_cannot_run(backend, f"cannot boot a real VM here: {reason}")


@pytest.fixture(scope="session")
def guestkit():  # type: ignore[no-untyped-def]
    """The guest kit, built (or taken from the cache) once per session. QEMU's: a test
    that needs it fails or skips as the qemu backend's requirement says."""
    from kelpie.guestkit import GuestKitError, build_guestkit

    require_backend("qemu")
    try:
        return build_guestkit()
    except GuestKitError as exc:
        vm_unavailable(f"the guest kit cannot be built: {exc}")
