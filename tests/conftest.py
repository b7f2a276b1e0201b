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


def vm_unavailable(reason: str) -> None:
    """Skip a real-VM test, or fail it when KELPIE_REQUIRE_VM=1 (as in CI)."""
    if os.environ.get(REQUIRE_VM_ENV) == "1":
        pytest.fail(f"real-VM test cannot run ({REQUIRE_VM_ENV}=1): {reason}")
    pytest.skip(f"cannot boot a real VM here: {reason}")


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
