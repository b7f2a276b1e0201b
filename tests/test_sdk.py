"""The SDK: AsyncSandbox and Sandbox, in-process (mock and a real VM) and through a daemon."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from conftest import vm_unavailable
from daemon_env import KelpieHome
from kelpie import AsyncSandbox, ExecOutput, ExecTimeout, RemoteError, Sandbox, SandboxNotFound
from kelpie.vm import ExecExit


@pytest.fixture(autouse=True)
def isolated_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KELPIE_STATE_DIR", str(tmp_path / "state"))


async def test_async_sandbox_in_process() -> None:
    async with await AsyncSandbox.create(backend="mock", env={"A": "1"}, name="sdk") as box:
        assert box.name == "sdk" and (await box.info()).state == "running"
        result = await box.exec(["sh", "-c", "env; echo err >&2; exit 4"])
        assert (result.exit_code, result.stderr) == (4, b"err\n")
        assert b"A=1\n" in result.stdout
        await box.files.write("/tmp/f", "text", mode=0o600)
        assert await box.files.read("/tmp/f") == b"text"
        assert [e.name for e in await box.files.list("/tmp")] == ["f"]
        await box.files.remove("/tmp/f")
        assert await box.files.list("/tmp") == []
        async with box.exec_stream(["cat"]) as process:
            await process.write_stdin(b"streamed")
            await process.close_stdin()
            events = [event async for event in process]
        assert ExecOutput(events[0].stream, b"streamed") == events[0]  # type: ignore[union-attr]
        assert isinstance(events[-1], ExecExit) and events[-1].exit_code == 0
        await box.pause()
        assert (await box.info()).state == "paused"
        await box.resume()
        with pytest.raises(ExecTimeout):
            await box.exec(["sleep", "5"], timeout=0.05)
        sandbox_id = box.id
    # leaving the block removed it
    other = await AsyncSandbox.create(backend="mock")
    with pytest.raises(SandboxNotFound):
        await other._service.inspect(sandbox_id)
    await other.remove()


def test_blocking_sandbox_in_process() -> None:
    with Sandbox.create(backend="mock", command=["echo", "main says hi"]) as box:
        assert box.exec(["echo", "hi"]).stdout == b"hi\n"
        box.files.write("/tmp/x", b"\x00\xff")
        assert box.files.read("/tmp/x") == b"\x00\xff"
        with box.exec_stream(["cat"]) as process:
            process.write_stdin(b"abc")
            process.close_stdin()
            result = process.wait()
        assert result.stdout == b"abc"
        info = box.info()
        assert info.command == ["echo", "main says hi"]
        box.kill()
        assert box.info().state == "stopped"
        assert box.logs() == b"main says hi\n"


async def test_async_files_mkdir_and_streams() -> None:
    async with await AsyncSandbox.create(backend="mock") as box:
        await box.files.mkdir("/tmp/a/b", mode=0o700)
        listed = await box.files.list("/tmp/a")
        assert [(e.name, e.type) for e in listed] == [("b", "dir")]

        async def chunks() -> AsyncIterator[bytes]:
            for part in (b"one,", b"two,", b"three"):
                yield part

        await box.files.write("/tmp/a/b/f", chunks())
        assert await box.files.read("/tmp/a/b/f") == b"one,two,three"
        read = [chunk async for chunk in box.files.read_stream("/tmp/a/b/f")]
        assert b"".join(read) == b"one,two,three"


def test_blocking_files_mkdir_and_streams() -> None:
    with Sandbox.create(backend="mock", command=["echo", "logged"]) as box:
        box.files.mkdir("/tmp/x/y")
        box.files.write("/tmp/x/y/f", (bytes([n]) * 1000 for n in range(3)))
        assert b"".join(box.files.read_stream("/tmp/x/y/f")) == \
            b"\x00" * 1000 + b"\x01" * 1000 + b"\x02" * 1000
        box.files.remove("/tmp/x", recursive=True)
        assert "x" not in [e.name for e in box.files.list("/tmp")]
        box.kill()
        assert b"".join(box.follow_logs()) == b"logged\n"


def test_bad_input_is_a_clear_error() -> None:
    from kelpie import ConfigError

    with pytest.raises(ConfigError, match="vcpus is 0"):
        Sandbox.create(backend="mock", cpus=0)
    with pytest.raises(ConfigError, match="network"):  # the request model's own checks
        Sandbox.create(backend="mock", network="bridge")
    # every problem the request model finds, each with its field's name
    with pytest.raises(ConfigError) as bad:
        Sandbox.create(backend="mock", network="bridge", name="x" * 300,
                       volumes=[1])  # type: ignore[list-item]
    assert [p.split(":")[0] for p in bad.value.problems] == ["name", "volumes.0", "network"]
    assert all(p in str(bad.value) for p in bad.value.problems)


def test_blocking_write_takes_bytes_like_as_one_payload() -> None:
    with Sandbox.create(backend="mock") as box:
        for payload in (bytearray(b"\x00array"), memoryview(b"\x01view"), b"bytes", "text"):
            box.files.write("/tmp/f", payload)
            expected = payload.encode() if isinstance(payload, str) else bytes(payload)
            assert box.files.read("/tmp/f") == expected
        box.files.write("/tmp/f", [bytearray(b"ch"), b"unks"])  # an iterable: chunks
        assert box.files.read("/tmp/f") == b"chunks"


async def test_async_write_takes_bytes_like_as_one_payload() -> None:
    async with await AsyncSandbox.create(backend="mock") as box:
        for payload in (bytearray(b"\x00array"), memoryview(b"\x01view")):
            await box.files.write("/tmp/f", payload)
            assert await box.files.read("/tmp/f") == bytes(payload)


@pytest.fixture
def home() -> Iterator[KelpieHome]:
    home = KelpieHome()
    try:
        yield home
    finally:
        home.close()


def test_sandbox_through_a_daemon(home: KelpieHome, monkeypatch: pytest.MonkeyPatch) -> None:
    assert home.kelpie("daemon", "start").returncode == 0
    url = f"unix://{home.socket}"
    box = Sandbox.create(backend="mock", daemon=url, name="remote")
    try:
        assert box.exec(["echo", "over http"]).stdout == b"over http\n"
        box.files.write("/tmp/f", b"data")
        assert box.files.read("/tmp/f") == b"data"
        with box.exec_stream(["sleep", "60"]) as process:
            process.send_signal(signal.SIGTERM)
            result = process.wait()
        assert result.exit_code == 128 + signal.SIGTERM
        again = Sandbox.attach("remote", daemon=url)
        assert again.id == box.id
        with pytest.raises(RemoteError) as caught:
            Sandbox.attach("nosuch", daemon=url)
        assert caught.value.is_a("SandboxNotFound") and caught.value.status == 404
        with pytest.raises(SandboxNotFound):  # the same class as in-process
            Sandbox.attach("nosuch", daemon=url)
        box.files.mkdir("/tmp/d/e")
        box.files.write("/tmp/d/e/big", iter([b"a" * 70_000, b"b" * 70_000]))
        assert b"".join(box.files.read_stream("/tmp/d/e/big")) == b"a" * 70_000 + b"b" * 70_000
        assert [e.name for e in box.files.list("/tmp/d")] == ["e"]
    finally:
        box.remove()
    listed = home.kelpie("ps", "-a", "-q")
    assert box.id not in listed.stdout


@pytest.mark.vm
def test_real_vm_in_process(guestkit: object) -> None:
    try:
        box = Sandbox.create(memory=256)
    except Exception as exc:  # pragma: no cover - depends on the host
        vm_unavailable(str(exc))
    with box:
        result = box.exec(["sh", "-c", "echo $((6*7)); uname -s"])
        assert result.stdout == b"42\nLinux\n"
        box.files.write("/tmp/payload", b"x" * 100_000)
        assert box.files.read("/tmp/payload") == b"x" * 100_000
        assert box.info().backend == "qemu"


def test_dirs_of_dead_sdk_processes_are_pruned(tmp_path: Path) -> None:
    import sqlite3
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    sdk = tmp_path / "state" / "sdk"
    empty, kept = sdk / f"{dead.pid}-0", sdk / f"{dead.pid}-1"
    empty.mkdir(parents=True)
    kept.mkdir()
    with sqlite3.connect(kept / "runtime.db") as db:
        db.execute("CREATE TABLE sandboxes (id TEXT)")
        db.execute("INSERT INTO sandboxes VALUES ('abc')")
    with Sandbox.create(backend="mock") as box:
        assert box.exec(["true"]).exit_code == 0
    assert not empty.exists() and kept.exists()  # a leaked sandbox's records are kept


def test_a_stream_left_early_is_closed() -> None:
    with Sandbox.create(backend="mock") as box:
        box.files.write("/tmp/f", b"x" * 300_000)
        chunks = box.files.read_stream("/tmp/f")
        assert next(chunks)
        chunks.close()  # the async stream on the loop is closed, the sandbox serves on
        assert box.exec(["true"]).exit_code == 0


def test_a_program_using_the_sdk_exits_quietly(tmp_path: Path) -> None:
    """At exit the SDK closes its in-process runtime on its loop: nothing of it is destroyed
    pending (asyncio says so on stderr), even with a sandbox left running."""
    import os
    import subprocess
    import sys

    program = ("from kelpie import Sandbox\n"
               "with Sandbox.create(backend='mock') as box:\n"
               "    print(box.exec(['echo', 'hi']).stdout.decode(), end='')\n"
               "left = Sandbox.create(backend='mock', name='left')\n")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=120, check=False,
                          env={**os.environ, "PYTHONASYNCIODEBUG": "1"})
    assert (done.returncode, done.stdout) == (0, "hi\n"), done.stderr
    assert "destroyed but it is pending" not in done.stderr, done.stderr
    assert "Exception ignored" not in done.stderr, done.stderr
