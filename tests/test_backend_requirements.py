"""The rule of KELPIE_REQUIRE_BACKENDS: a required backend that cannot run fails its tests,
any other skips them. Checked by injecting a registry and an environment."""

from __future__ import annotations

import pytest

from backend_requirements import (
    REQUIRE_BACKENDS_ENV,
    backend_cannot_run,
    require_backend,
    required_backends,
)
from kelpie.vm import (
    DEFAULT_REGISTRY,
    BackendRegistry,
    BackendSpec,
    Capabilities,
    ProbeResult,
    VmInstance,
)


def _never_created(*_args: object, **_options: object) -> VmInstance:
    raise AssertionError("the rule must not create a VM")


def _registry() -> BackendRegistry:
    registry = BackendRegistry()
    for name, probe in (("runs", ProbeResult(True, "fine here")),
                        ("broken", ProbeResult(False, "no /dev/kvm on this host"))):
        registry.register(BackendSpec(name=name, description=name, capabilities=Capabilities(),
                                      probe=lambda probe=probe: probe, create=_never_created))
    return registry


def test_the_list_is_comma_separated_and_empty_when_unset() -> None:
    assert required_backends({}) == frozenset()
    assert required_backends({REQUIRE_BACKENDS_ENV: ""}) == frozenset()
    assert required_backends({REQUIRE_BACKENDS_ENV: " mock, qemu ,,"}) == {"mock", "qemu"}


def test_a_required_backend_whose_probe_fails_fails() -> None:
    environ = {REQUIRE_BACKENDS_ENV: "runs,broken"}
    with pytest.raises(pytest.fail.Exception) as info:
        require_backend("broken", registry=_registry(), environ=environ)
    message = str(info.value)
    assert "'broken' must run on this host" in message
    assert "no /dev/kvm on this host" in message and "broken,runs" in message


def test_a_backend_nobody_requires_skips_with_the_probes_reason() -> None:
    for environ in ({}, {REQUIRE_BACKENDS_ENV: "runs"}):
        with pytest.raises(pytest.skip.Exception, match="no /dev/kvm on this host"):
            require_backend("broken", registry=_registry(), environ=environ)


def test_a_backend_that_runs_is_neither_failed_nor_skipped() -> None:
    require_backend("runs", registry=_registry(), environ={REQUIRE_BACKENDS_ENV: "runs"})
    require_backend("runs", registry=_registry(), environ={})


def test_a_required_backend_nobody_registered_fails() -> None:
    with pytest.raises(pytest.fail.Exception, match="no such backend is registered"):
        require_backend("firecracker", registry=_registry(),
                        environ={REQUIRE_BACKENDS_ENV: "firecracker"})


def test_a_part_a_required_backend_lacks_fails_it_too() -> None:
    # e.g. the QEMU guest kit cannot be built: the probe passed, but the backend cannot run
    with pytest.raises(pytest.fail.Exception, match="guest kit"):
        backend_cannot_run("runs", "the guest kit cannot be built",
                           environ={REQUIRE_BACKENDS_ENV: "runs"})
    with pytest.raises(pytest.skip.Exception, match="guest kit"):
        backend_cannot_run("runs", "the guest kit cannot be built", environ={})


def test_every_backend_required_here_is_registered() -> None:
    unknown = required_backends() - set(DEFAULT_REGISTRY.names())
    assert not unknown, (f"{REQUIRE_BACKENDS_ENV} names backends nobody registered: "
                         f"{sorted(unknown)} (registered: {DEFAULT_REGISTRY.names()})")
