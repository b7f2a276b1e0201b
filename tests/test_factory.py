"""Backend selection: explicit name, KELPIE_BACKEND, auto-select, and honest rejections."""

from __future__ import annotations

import dataclasses

import pytest

from kelpie import (
    BackendUnavailable,
    Capabilities,
    MockVm,
    UnsupportedOperation,
    VmConfig,
    VmFactory,
)
from kelpie.vm import DEFAULT_REGISTRY, BackendRegistry, BackendSpec, ProbeResult, VmInstance

NO_CAPS = Capabilities()


def spec(name: str, ok: bool, priority: int = 0, real: bool = True,
         caps: Capabilities = NO_CAPS) -> BackendSpec:
    def create(config: VmConfig, **options: object) -> VmInstance:
        vm = MockVm(config)
        vm.created_by = name  # type: ignore[attr-defined]
        return vm

    return BackendSpec(name, f"{name} backend", caps,
                       lambda: ProbeResult(ok, "works" if ok else f"{name} missing"),
                       create, priority, real)


def registry(*specs: BackendSpec) -> BackendRegistry:
    reg = BackendRegistry()
    for s in specs:
        reg.register(s)
    return reg


def test_auto_picks_best_available_real_backend() -> None:
    reg = registry(spec("mock", True, 0, real=False), spec("slow", True, 1),
                   spec("fast", False, 10))
    vm = VmFactory(reg, environ={}).create(VmConfig())
    assert vm.created_by == "slow"  # type: ignore[attr-defined]


def test_nothing_fits_lists_every_rejection() -> None:
    reg = registry(spec("mock", True, real=False), spec("qemu", False, 5),
                   spec("firecracker", False, 9))
    with pytest.raises(BackendUnavailable) as info:
        VmFactory(reg, environ={}).select()
    assert info.value.rejections == (
        ("firecracker", "firecracker missing"),
        ("qemu", "qemu missing"),
        ("mock", "simulated; used only when asked for by name"),
    )
    assert "qemu: qemu missing" in str(info.value)


def test_a_backend_not_auto_selected_runs_only_when_named() -> None:
    light = dataclasses.replace(spec("libkrun", True, 50), auto_selected=False)
    reg = registry(light, spec("qemu", True, 10))
    factory = VmFactory(reg, environ={})
    assert factory.select().name == "qemu"
    assert factory.select("libkrun").name == "libkrun"
    with pytest.raises(BackendUnavailable) as info:
        VmFactory(registry(light), environ={}).select()
    assert info.value.rejections == (("libkrun", "used only when asked for by name"),)


def test_the_builtin_backends_are_all_registered_and_each_says_why_it_cannot_run() -> None:
    names = set(DEFAULT_REGISTRY.names())
    assert {"mock", "qemu", "firecracker"} <= names
    for name in names:
        result = DEFAULT_REGISTRY.probe(name)
        assert result.available or result.reason  # never a silent no


def test_explicit_name_wins_over_env() -> None:
    reg = registry(spec("a", True), spec("b", True))
    factory = VmFactory(reg, environ={"KELPIE_BACKEND": "b"})
    assert factory.select("a").name == "a"
    assert factory.select().name == "b"


def test_explicit_unavailable_backend_says_why() -> None:
    reg = registry(spec("qemu", False))
    with pytest.raises(BackendUnavailable, match="'qemu' \\(requested\\) cannot run"):
        VmFactory(reg, environ={}).select("qemu")
    with pytest.raises(BackendUnavailable, match="set by KELPIE_BACKEND"):
        VmFactory(reg, environ={"KELPIE_BACKEND": "qemu"}).select()


def test_unknown_backend_lists_known() -> None:
    with pytest.raises(BackendUnavailable, match="unknown backend 'nope'; known backends: a"):
        VmFactory(registry(spec("a", True)), environ={}).select("nope")


def test_mock_only_when_asked() -> None:
    reg = registry(spec("mock", True, real=False))
    assert VmFactory(reg, environ={}).select("mock").name == "mock"
    with pytest.raises(BackendUnavailable):
        VmFactory(reg, environ={}).select()


def test_probe_is_cached_and_crash_safe() -> None:
    calls = []

    def probe() -> ProbeResult:
        calls.append(1)
        raise OSError("device exploded")

    reg = BackendRegistry()
    reg.register(BackendSpec("x", "x", Capabilities(), probe, MockVm))
    assert reg.probe("x") == ProbeResult(False, "probe failed: device exploded")
    reg.probe("x")
    assert len(calls) == 1
    reg.probe("x", refresh=True)
    assert len(calls) == 2


def test_default_registry_has_mock() -> None:
    vm = VmFactory(environ={}).create(VmConfig(), backend="mock")
    assert isinstance(vm, MockVm)


async def test_unsupported_operation_names_backend_and_alternatives() -> None:
    class NoPause(MockVm):
        backend_name = "nopause"
        capabilities = Capabilities()

    vm = NoPause(VmConfig())
    await vm.start()
    with pytest.raises(UnsupportedOperation) as info:
        await vm.pause()
    assert info.value.backend == "nopause"
    assert "mock" in info.value.supported_by
    assert "backend 'nopause' does not support pause; backends that support it:" in str(
        info.value)


def test_registry_loads_backends_by_module_name_on_first_use() -> None:
    import sys

    from kelpie.vm import BackendRegistry

    registry = BackendRegistry(("kelpie.backends.mock",))
    assert registry.names() == ["mock"]
    assert "kelpie.backends.mock" in sys.modules
    assert registry.get("mock").real is False


def test_a_backend_that_fails_to_load_is_listed_unavailable_and_spares_the_others() -> None:
    from kelpie.vm import BackendRegistry, BackendUnavailable, VmConfig, VmFactory

    registry = BackendRegistry(("kelpie.backends.no_such_backend", "kelpie.backends.mock"))
    assert set(registry.names()) == {"mock", "no_such_backend"}
    probe = registry.probe("no_such_backend")
    assert not probe.available and "No module named" in probe.reason
    with pytest.raises(BackendUnavailable, match="failed to load"):
        VmFactory(registry).create(VmConfig(), backend="no_such_backend")
    with pytest.raises(BackendUnavailable) as caught:
        VmFactory(registry, environ={}).select()  # mock is never picked by itself
    assert ("no_such_backend", probe.reason) in caught.value.rejections
