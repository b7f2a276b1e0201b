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


REQUIRE_VM_ENV = "KELPIE_REQUIRE_VM"


def real_part_missing(reason: str) -> None:
    """Skip a test that needs a real part (QEMU, umoci...), or fail it in CI.

    CI sets KELPIE_REQUIRE_VM=1: there every real part must be present, so a missing one
    is a failure, never a silent skip.
    """
    if os.environ.get(REQUIRE_VM_ENV) == "1":
        pytest.fail(f"test needs a real part ({REQUIRE_VM_ENV}=1): {reason}")
    pytest.skip(reason)


def vm_unavailable(reason: str) -> None:
    """Skip a real-VM test, or fail it when KELPIE_REQUIRE_VM=1 (as in CI)."""
    real_part_missing(f"cannot boot a real VM here: {reason}")


@pytest.fixture(scope="session")
def guestkit():  # type: ignore[no-untyped-def]
    """The guest kit, built (or taken from the cache) once per session."""
    import shutil

    from kelpie.guestkit import GuestKitError, build_guestkit

    for tool in ("qemu-system-x86_64", "qemu-img"):
        if shutil.which(tool) is None:
            vm_unavailable(f"{tool} is not installed")
    try:
        return build_guestkit()
    except GuestKitError as exc:
        vm_unavailable(f"the guest kit cannot be built: {exc}")
