"""Every legal and illegal transition, and every operation in every state."""

from __future__ import annotations

import itertools

import pytest

from kelpie import InvalidStateError, MockVm, VmConfig, VmState
from kelpie.vm import ALLOWED, TRANSITIONS, Operation, allowed_states, is_legal

LEGAL = {
    (VmState.CREATED, VmState.STARTING), (VmState.CREATED, VmState.STOPPED),
    (VmState.STARTING, VmState.RUNNING), (VmState.STARTING, VmState.PAUSED),
    (VmState.STARTING, VmState.STOPPED), (VmState.STARTING, VmState.CRASHED),
    (VmState.RUNNING, VmState.PAUSED), (VmState.RUNNING, VmState.STOPPED),
    (VmState.RUNNING, VmState.CRASHED), (VmState.PAUSED, VmState.RUNNING),
    (VmState.PAUSED, VmState.STOPPED), (VmState.PAUSED, VmState.CRASHED),
    (VmState.STOPPED, VmState.STARTING), (VmState.CRASHED, VmState.STOPPED),
    (VmState.CRASHED, VmState.STARTING),
}


@pytest.mark.parametrize("old,new", list(itertools.product(VmState, VmState)))
def test_transition_table(old: VmState, new: VmState) -> None:
    assert is_legal(old, new) == ((old, new) in LEGAL)


def test_table_covers_every_state() -> None:
    assert set(TRANSITIONS) == set(VmState)
    assert set(ALLOWED) == set(Operation)


async def vm_in(state: VmState) -> MockVm:
    vm = MockVm(VmConfig(disk_mib=1024), vm_id="t1")
    if state is VmState.CREATED:
        return vm
    await vm.start()
    if state is VmState.PAUSED:
        await vm.pause()
    elif state is VmState.STOPPED:
        await vm.stop()
    elif state is VmState.CRASHED:
        vm.mark_crashed("test")
    return vm


async def call(vm: MockVm, operation: Operation, tmp: object) -> None:
    from pathlib import Path

    path = Path(str(tmp)) / f"snap-{vm.state}"
    match operation:
        case Operation.START:
            await vm.start()
        case Operation.STOP:
            await vm.stop()
        case Operation.PAUSE:
            await vm.pause()
        case Operation.RESUME:
            await vm.resume()
        case Operation.EXEC:
            await vm.exec(["true"])
        case Operation.FILES:
            await vm.write_file("/tmp/x", b"x")
        case Operation.SNAPSHOT:
            from kelpie import SnapshotKind

            kind = SnapshotKind.DISK if vm.state is VmState.STOPPED else SnapshotKind.FULL
            await vm.snapshot(path, kind=kind)
        case Operation.RESTORE:
            other = MockVm(VmConfig(), vm_id="src")
            await other.start()
            snap = await other.snapshot(path.with_name(path.name + "-src"))
            await vm.restore(snap)
        case Operation.GROW_DISK:
            await vm.grow_disk(2048)
            assert vm.config.disk_mib == 2048


STATES = [VmState.CREATED, VmState.RUNNING, VmState.PAUSED, VmState.STOPPED, VmState.CRASHED]


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("operation", list(Operation))
async def test_operation_in_state(state: VmState, operation: Operation, tmp_path: object) -> None:
    vm = await vm_in(state)
    if state in ALLOWED[operation]:
        await call(vm, operation, tmp_path)
        for old, new in vm.transitions:
            assert is_legal(old, new)
    else:
        with pytest.raises(InvalidStateError) as info:
            await call(vm, operation, tmp_path)
        error = info.value
        assert error.current is state and error.allowed == allowed_states(operation)
        message = str(error)
        assert f"it is {state.value}" in message
        for allowed in allowed_states(operation):
            assert allowed.value in message
        assert vm.state is state  # an illegal call changes nothing


async def test_exec_on_paused_names_running() -> None:
    vm = await vm_in(VmState.PAUSED)
    with pytest.raises(InvalidStateError, match="cannot exec VM t1: it is paused; exec is "
                       "allowed when running"):
        await vm.exec(["true"])


async def test_transitions_recorded_and_observed() -> None:
    seen: list[tuple[VmState, VmState]] = []
    vm = MockVm(VmConfig())
    vm.observe(lambda _vm, old, new: seen.append((old, new)))
    await vm.start()
    await vm.pause()
    await vm.resume()
    await vm.stop()
    await vm.stop()  # no-op on a stopped VM
    assert seen == vm.transitions == [
        (VmState.CREATED, VmState.STARTING), (VmState.STARTING, VmState.RUNNING),
        (VmState.RUNNING, VmState.PAUSED), (VmState.PAUSED, VmState.RUNNING),
        (VmState.RUNNING, VmState.STOPPED),
    ]
