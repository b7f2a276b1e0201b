"""Which VM backends must run on this host, and what happens to a test of one that cannot.

``KELPIE_REQUIRE_BACKENDS`` names the backends that must run here, comma-separated (CI sets
``mock,qemu`` for its hosts, see ``.ci/run``). A test of a required backend that cannot run
(its probe fails, or a part it needs, such as the QEMU guest kit, cannot be built) FAILS;
a test of any other backend SKIPS with the reason. Unset, nothing is required: every
backend that cannot run is skipped.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import NoReturn

import pytest

from kelpie.vm import DEFAULT_REGISTRY, BackendRegistry

REQUIRE_BACKENDS_ENV = "KELPIE_REQUIRE_BACKENDS"


def required_backends(environ: Mapping[str, str] | None = None) -> frozenset[str]:
    """The backend names ``KELPIE_REQUIRE_BACKENDS`` lists (empty when unset)."""
    text = (os.environ if environ is None else environ).get(REQUIRE_BACKENDS_ENV, "")
    return frozenset(name.strip() for name in text.split(",") if name.strip())


def backend_cannot_run(backend: str, reason: str, *,
                       environ: Mapping[str, str] | None = None) -> NoReturn:
    """End the calling test: fail it when ``backend`` is required here, else skip it."""
    required = required_backends(environ)
    if backend in required:
        pytest.fail(
            f"backend {backend!r} must run on this host ({REQUIRE_BACKENDS_ENV}="
            f"{','.join(sorted(required))}) but cannot: {reason}. Install what it needs "
            f"(scripts/setup), or drop it from {REQUIRE_BACKENDS_ENV} on hosts that cannot "
            f"run it.",
            pytrace=False,
        )
    pytest.skip(f"backend {backend!r} cannot run here: {reason}")


def require_backend(backend: str, *, registry: BackendRegistry = DEFAULT_REGISTRY,
                    environ: Mapping[str, str] | None = None) -> None:
    """Return when ``backend`` is registered and its probe says it runs here; otherwise
    fail or skip the calling test (see :func:`backend_cannot_run`)."""
    if backend not in registry.names():
        backend_cannot_run(backend, f"no such backend is registered (known: "
                                    f"{', '.join(registry.names())})", environ=environ)
    probe = registry.probe(backend)
    if not probe.available:
        backend_cannot_run(backend, f"its probe says: {probe.reason}", environ=environ)
