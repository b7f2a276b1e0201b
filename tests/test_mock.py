"""MockVm: its shell, streaming exec, files, pause, faults and snapshot round trips."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from kelpie import (
    BootError,
    ExecExit,
    ExecOutput,
    ExecTimeout,
    GuestFileError,
    MockVm,
    SnapshotCorrupted,
    SnapshotKind,
    VmConfig,
    VmCrashed,
    VmSnapshot,
    VmState,
)
from kelpie.sim import Fault, FaultInjector, FaultSpec, SimRng, VirtualClock, run_simulated


async def running(**config: object) -> MockVm:
    vm = MockVm(VmConfig(**config))  # type: ignore[arg-type]
    await vm.start()
    return vm


@pytest.mark.parametrize(
    "argv,code,stdout,stderr",
    [
        (["echo", "hello", "world"], 0, b"hello world\n", b""),
        (["echo", "-n", "x"], 0, b"x", b""),
        (["true"], 0, b"", b""),
        (["false"], 1, b"", b""),
        (["/bin/echo", "p"], 0, b"p\n", b""),
        (["printf", "%s-%d%%\\n", "a", "7"], 0, b"a-7%\n", b""),
        (["pwd"], 0, b"/\n", b""),
        (["sh", "-c", "exit 42"], 42, b"", b""),
        (["sh", "-c", "echo a; echo b"], 0, b"a\nb\n", b""),
        (["sh", "-c", "false && echo no; echo yes"], 0, b"yes\n", b""),
        (["sh", "-c", "false || echo alt"], 0, b"alt\n", b""),
        (["sh", "-c", "echo 'q  w'"], 0, b"q  w\n", b""),
        (["sh", "-c", "echo err >&2"], 0, b"", b"err\n"),
        (["cat", "/nope"], 1, b"", b"cat: /nope: No such file or directory\n"),
        (["ls", "/nope"], 2, b"", b"ls: cannot access '/nope': No such file or directory\n"),
        (["frobnicate"], 127, b"", b"sh: frobnicate: command not found\n"),
    ],
)
async def test_commands(argv: list[str], code: int, stdout: bytes, stderr: bytes) -> None:
    vm = await running()
    result = await vm.exec(argv)
    assert (result.exit_code, result.stdout, result.stderr) == (code, stdout, stderr)


async def test_redirection_and_files() -> None:
    vm = await running()
    script = "echo one > /tmp/f; echo two >> /tmp/f; cat < /tmp/f; mkdir -p /a/b; ls /a"
    result = await vm.exec(["sh", "-c", script])
    assert result.stdout == b"one\ntwo\nb\n"
    assert await vm.read_file("/tmp/f") == b"one\ntwo\n"


async def test_env_cwd_and_cd() -> None:
    vm = await running(env={"FROM_CONFIG": "1"})
    result = await vm.exec(["env"], env={"EXTRA": "x y"})
    lines = result.stdout.decode().splitlines()
    assert "FROM_CONFIG=1" in lines and "EXTRA=x y" in lines
    assert (await vm.exec(["pwd"], cwd="/tmp")).stdout == b"/tmp\n"
    assert (await vm.exec(["sh", "-c", "cd /etc && pwd"])).stdout == b"/etc\n"
    assert (await vm.exec(["pwd"], cwd="/missing")).exit_code == 126


async def test_stdin() -> None:
    vm = await running()
    result = await vm.exec(["cat"], stdin=b"piped\n")
    assert result.stdout == b"piped\n"


async def test_exec_stream_chunks_stdin_and_exit() -> None:
    vm = await running()
    async with vm.exec_stream(["cat"]) as proc:
        await proc.write_stdin(b"a")
        await proc.write_stdin(b"b")
        await proc.close_stdin()
        events = [event async for event in proc]
    assert events[0] == ExecOutput(events[0].stream, b"ab")  # type: ignore[union-attr]
    assert isinstance(events[-1], ExecExit) and events[-1].exit_code == 0


async def test_signal_ends_command() -> None:
    vm = await running()
    async with vm.exec_stream(["sleep", "1000"]) as proc:
        await proc.send_signal(15)
        result = await proc.wait()
    assert (result.exit_code, result.signal) == (143, 15)


async def test_timeout_raises_with_partial_output() -> None:
    vm = await running()
    with pytest.raises(ExecTimeout) as info:
        await vm.exec(["sh", "-c", "echo started; sleep 100"], timeout=0.05)
    assert info.value.stdout == b"started\n"
    assert vm.running_processes == 0


def test_pause_stops_progress_and_resume_continues() -> None:
    """On virtual time: an hour paused does not let a 1 s sleep in the guest finish."""

    async def scenario() -> None:
        vm = await running()
        async with vm.exec_stream(["sh", "-c", "sleep 1; echo done"]) as proc:
            await proc.close_stdin()
            await vm.pause()
            waiter = asyncio.create_task(proc.wait())
            await asyncio.sleep(3600)
            assert not waiter.done()  # the guest made no progress while paused
            await vm.resume()
            assert (await waiter).stdout == b"done\n"

    run_simulated(scenario(), clock=VirtualClock())


async def test_stop_ends_open_streams_with_error() -> None:
    vm = await running()
    async with vm.exec_stream(["sleep", "100"]) as proc:
        await vm.stop()
        with pytest.raises(Exception, match="stopped while the command was running"):
            await proc.wait()


async def test_file_api() -> None:
    vm = await running()

    async def chunks():  # type: ignore[no-untyped-def]
        yield b"part1-"
        yield b"part2"

    await vm.write_file("/tmp/s", chunks(), mode=0o600)
    assert await vm.read_file("/tmp/s") == b"part1-part2"
    names = {(f.name, f.type, f.mode) for f in await vm.list_dir("/tmp")}
    assert ("s", "file", 0o600) in names
    await vm.remove("/tmp/s")
    with pytest.raises(GuestFileError) as info:
        await vm.read_file("/tmp/s")
    assert info.value.code == "ENOENT"
    with pytest.raises(GuestFileError, match="ENOENT"):
        await vm.write_file("/no/such/dir/f", b"x")


async def test_disk_persists_across_stop_start() -> None:
    vm = await running()
    await vm.write_file("/root/keep", b"k")
    await vm.stop()
    await vm.start()
    assert await vm.read_file("/root/keep") == b"k"


@pytest.mark.parametrize("kind", list(SnapshotKind))
async def test_snapshot_round_trip_is_byte_identical(kind: SnapshotKind, tmp_path: Path) -> None:
    vm = await running(hostname="orig")
    await vm.exec(["sh", "-c", "mkdir -p /work && echo state > /work/f"])
    await vm.write_file("/tmp/bin", bytes(range(256)), mode=0o700)
    if kind is SnapshotKind.DISK:
        await vm.stop()
    before = vm.state_digest(kind)
    snap = await vm.snapshot(tmp_path / "s", kind=kind)
    assert snap.manifest.kind is kind and snap.manifest.backend == "mock"
    assert vm.state in (VmState.RUNNING, VmState.STOPPED)  # resumed after a full snapshot
    # change everything, then restore into a fresh VM
    clone = MockVm(VmConfig())
    await clone.restore(VmSnapshot.open(tmp_path / "s"))
    assert clone.state is VmState.RUNNING
    assert clone.state_digest(kind) == before
    assert await clone.read_file("/tmp/bin") == bytes(range(256))
    assert (await clone.exec(["cat", "/work/f"])).stdout == b"state\n"


async def test_restore_paused(tmp_path: Path) -> None:
    vm = await running()
    snap = await vm.snapshot(tmp_path / "s")
    clone = MockVm(VmConfig())
    await clone.restore(snap, paused=True)
    assert clone.state is VmState.PAUSED


async def test_snapshot_leave_paused(tmp_path: Path) -> None:
    vm = await running()
    await vm.snapshot(tmp_path / "s", leave_paused=True)
    assert vm.state is VmState.PAUSED


async def test_corrupted_blob_rejected_before_restore(tmp_path: Path) -> None:
    vm = await running()
    await vm.write_file("/tmp/x", b"payload")
    snap = await vm.snapshot(tmp_path / "s")
    blob = tmp_path / "s" / "state.json"
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))
    clone = MockVm(VmConfig())
    with pytest.raises(SnapshotCorrupted, match=r"blob 'state.json' has sha256 .* \(corrupted\)"):
        await clone.restore(VmSnapshot.open(snap.path))
    assert clone.state is VmState.CREATED  # nothing started


async def test_truncated_blob_rejected(tmp_path: Path) -> None:
    vm = await running()
    await vm.snapshot(tmp_path / "s")
    blob = tmp_path / "s" / "state.json"
    blob.write_bytes(blob.read_bytes()[:-5])
    with pytest.raises(SnapshotCorrupted, match="truncated"):
        await MockVm(VmConfig()).restore(VmSnapshot.open(tmp_path / "s"))


async def test_tampered_manifest_rejected(tmp_path: Path) -> None:
    vm = await running()
    await vm.snapshot(tmp_path / "s")
    manifest = tmp_path / "s" / "manifest.json"
    manifest.write_bytes(manifest.read_bytes().replace(b'"vcpus":2', b'"vcpus":3'))
    with pytest.raises(SnapshotCorrupted, match="manifest checksum"):
        VmSnapshot.open(tmp_path / "s")


def injector(fault: Fault) -> FaultInjector:
    return FaultInjector(SimRng(1), [FaultSpec(fault, 1.0)])


async def test_boot_fail_rolls_back_to_stopped() -> None:
    vm = MockVm(VmConfig(), faults=injector(Fault.BOOT_FAIL))
    with pytest.raises(BootError, match="injected boot_fail"):
        await vm.start()
    assert vm.state is VmState.STOPPED


async def test_crash_marks_crashed() -> None:
    vm = MockVm(VmConfig(), faults=FaultInjector(SimRng(1), [FaultSpec(Fault.CRASH, 1.0,
                                                                        frozenset({"exec"}))]))
    await vm.start()
    with pytest.raises(VmCrashed) as info:
        await vm.exec(["true"])
    assert info.value.requires_recreate
    assert vm.state is VmState.CRASHED and vm.crash_reason
    await vm.stop()
    assert vm.state is VmState.STOPPED


async def test_failed_snapshot_resumes_source(tmp_path: Path) -> None:
    vm = MockVm(VmConfig(), faults=injector(Fault.SNAPSHOT_CREATE_FAIL))
    await vm.start()
    with pytest.raises(Exception, match="snapshot failed"):
        await vm.snapshot(tmp_path / "s")
    assert vm.state is VmState.RUNNING
    assert not list(tmp_path.iterdir())  # no partial snapshot left behind
