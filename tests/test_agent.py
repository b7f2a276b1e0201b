"""The guest agent, run on the host (``--listen-unix``), driven by AgentClient and raw frames."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import tty
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path

import pytest

from kelpie import protocol
from kelpie.agent import (
    AgentClient,
    AgentConnectError,
    AgentDisconnected,
    AgentProtocolError,
    AgentRemoteError,
    AgentVersionError,
    ClientState,
    ExecHandle,
    ExitStatus,
)
from kelpie.guest._exec import Exec
from kelpie.protocol import FrameType
from waiting import wait_for, wait_until

AGENT = Path(__file__).resolve().parents[1] / "src" / "kelpie" / "guest" / "agent.py"
IS_ROOT = os.geteuid() == 0


# ---------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------


class AgentProcess:
    """The agent as a subprocess listening on a unix socket."""

    def __init__(self, sock: Path, *extra: str, prelude: str = "",
                 cwd: Path | None = None) -> None:
        """``prelude``: Python run before the agent, in its process; ``cwd``: its directory."""
        self.sock = sock
        self.log = sock.with_suffix(".log")
        start = [str(AGENT)]
        if prelude:
            run = f"import runpy, sys; sys.argv[0] = {str(AGENT)!r}; sys.path[0] = " \
                  f"{str(AGENT.parent)!r}; runpy.run_path(sys.argv[0], run_name='__main__')"
            start = ["-c", f"{prelude}\n{run}"]
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-S", *start, "--listen-unix", str(sock), *extra],
                # a pipe that never ends: the agent must not hand it on to commands
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=log,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},  # no PYTHONPATH needed
                cwd=cwd,
            )
        wait_for(lambda: sock.exists() or self.proc.poll() is not None, 10, "the agent to listen")
        assert self.proc.poll() is None, self.log.read_text()

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    proc = AgentProcess(tmp_path_factory.mktemp("agent") / "agent.sock")
    yield proc
    proc.stop()


@pytest.fixture
async def client(agent: AgentProcess) -> AsyncIterator[AgentClient]:
    c = await AgentClient.connect_unix(str(agent.sock), timeout=5)
    await c.hello(timeout=5)
    yield c
    await c.close()


@dataclasses.dataclass(frozen=True)
class Collected:
    """What a finished command printed, and how the agent reported its end."""

    stdout: bytes
    stderr: bytes
    result: ExitStatus


async def collect(handle: ExecHandle) -> Collected:
    """Read a command's events to its exit, keeping its output."""
    out: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
    async for kind, data in handle:
        if kind != "exit":
            assert isinstance(data, bytes)
            out[kind].append(data)
    assert handle.result is not None
    return Collected(b"".join(out["stdout"]), b"".join(out["stderr"]), handle.result)


async def run(client: AgentClient, argv: list[str], **kwargs: object) -> Collected:
    handle = await client.exec(argv, **kwargs)  # type: ignore[arg-type]
    return await asyncio.wait_for(collect(handle), 20)


def sh(script: str) -> list[str]:
    return ["sh", "-c", script]


def state_of(client: AgentClient) -> ClientState:
    """Read the state through a call, so type checkers do not narrow it."""
    return client.state


def pid_gone(pid: int) -> bool:
    """True if the process no longer exists or is a zombie waiting for init."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


class RawConn:
    """A plain socket speaking frames, for tests below the client."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        self.decoder = protocol.FrameDecoder()
        self.frames: list[protocol.Frame] = []

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, rid: int, message: dict[str, object]) -> None:
        self.send(protocol.encode_json(FrameType.REQUEST, rid, message))

    def recv(self) -> protocol.Frame:
        while not self.frames:
            data = self.sock.recv(1 << 20)
            assert data, "agent closed the connection"
            self.decoder.feed(data)
            self.frames.extend(f for f in self.decoder.frames() if isinstance(f, protocol.Frame))
        return self.frames.pop(0)

    def recv_json(self) -> tuple[int, int, dict[str, object]]:
        frame = self.recv()
        return frame.ftype, frame.request_id, frame.json()

    def hello(self) -> dict[str, object]:
        self.request(1, {"op": "hello", "version": protocol.PROTOCOL_VERSION})
        ftype, rid, body = self.recv_json()
        assert (ftype, rid) == (FrameType.REPLY, 1), body
        return body

    def close(self) -> None:
        self.sock.close()


# ---------------------------------------------------------------------------
# Session
# ---------------------------------------------------------------------------


async def test_hello_describes_agent(agent: AgentProcess) -> None:
    async with await AgentClient.connect_unix(str(agent.sock)) as c:
        assert state_of(c) is ClientState.CONNECTED
        with pytest.raises(AgentProtocolError, match="hello"):
            await c.ping()
        info = await c.hello(timeout=5)
        assert state_of(c) is ClientState.READY
        assert info.version == protocol.PROTOCOL_VERSION
        assert info.agent_pid == agent.proc.pid
        assert info.hostname == socket.gethostname()
        assert info.root == "/"
        assert abs(info.time_ns - time.time_ns()) < 10**10
        assert await c.ping() < 5
    assert state_of(c) is ClientState.CLOSED


async def test_connect_times_out_clearly(tmp_path: Path) -> None:
    with pytest.raises(AgentConnectError, match="could not connect"):
        await AgentClient.connect_unix(str(tmp_path / "missing.sock"), timeout=0.2)


def test_version_mismatch_is_refused(agent: AgentProcess) -> None:
    raw = RawConn(agent.sock)
    raw.request(1, {"op": "hello", "version": 999})
    ftype, rid, body = raw.recv_json()
    assert (ftype, rid, body["code"]) == (FrameType.ERROR, 1, "EPROTONOSUPPORT")
    assert "999" in str(body["message"])
    raw.request(2, {"op": "ping"})
    ftype, rid, body = raw.recv_json()
    assert (ftype, rid) == (FrameType.ERROR, 2)
    assert "hello first" in str(body["message"])
    raw.close()


# ---------------------------------------------------------------------------
# Exec
# ---------------------------------------------------------------------------


async def test_echo(client: AgentClient) -> None:
    out = await run(client, ["echo", "hello", "world"])
    assert out.stdout == b"hello world\n"
    assert out.stderr == b""
    assert (out.result.exit_code, out.result.signal, out.result.timed_out) == (0, None, False)


@pytest.mark.parametrize("code", [0, 1, 42, 255])
async def test_exit_codes(client: AgentClient, code: int) -> None:
    out = await run(client, sh(f"exit {code}"))
    assert out.result.exit_code == code


async def test_signal_exit(client: AgentClient) -> None:
    out = await run(client, sh("kill -TERM $$"))
    assert out.result.exit_code is None
    assert out.result.signal == signal.SIGTERM


async def test_stderr_is_separate(client: AgentClient) -> None:
    out = await run(client, sh("echo out; echo err >&2; echo out2"))
    assert out.stdout == b"out\nout2\n"
    assert out.stderr == b"err\n"


async def test_env_and_cwd(client: AgentClient, tmp_path: Path) -> None:
    out = await run(
        client, sh('echo "$FOO|$PATH|$HOME"; pwd'), env={"FOO": "bar"}, cwd=str(tmp_path)
    )
    foo, path, home = out.stdout.decode().splitlines()[0].split("|")
    assert foo == "bar"
    assert "/usr/bin" in path
    assert home
    assert out.stdout.decode().splitlines()[1] == str(tmp_path)


async def test_children_inherit_only_stdio(client: AgentClient) -> None:
    code = "import os; print(sorted(int(fd) for fd in os.listdir('/proc/self/fd')))"
    out = await run(client, [sys.executable, "-S", "-c", code])
    assert out.stdout == b"[0, 1, 2, 3]\n"  # 3 is listdir's own directory handle


async def test_execs_leave_no_descriptors_behind(tmp_path: Path) -> None:
    """Whatever way an exec ends, the agent keeps no descriptor of it (the pipes it makes
    ahead for the next command are the same few throughout). An agent of its own: no
    other test's commands end while it counts."""
    agent = AgentProcess(tmp_path / "agent.sock")
    client = await AgentClient.connect_unix(str(agent.sock), timeout=5)
    await client.hello(timeout=5)
    holders: list[int] = []

    def agent_fds() -> int:
        return len(os.listdir(f"/proc/{agent.proc.pid}/fd"))

    async def execs() -> None:
        await run(client, ["true"])
        await run(client, sh("echo out; echo err >&2; exit 3"))
        await run(client, ["cat"], stdin=b"in")
        held = await run(client, sh("sleep 60 & echo $!"))  # a background holder of the pipes
        holders.append(int(held.stdout))
        with pytest.raises(AgentRemoteError):
            await client.exec(["/nonexistent"])
        await client.ping()  # a turn of the agent's loop after the last exec's reply

    try:
        await execs()
        before = agent_fds()
        for _ in range(5):
            await execs()
        assert agent_fds() == before
    finally:
        for pid in holders:
            os.kill(pid, signal.SIGKILL)
        await client.close()
        agent.stop()


async def test_stdin_is_devnull_by_default(client: AgentClient) -> None:
    out = await run(client, ["cat"])
    assert out.stdout == b""
    assert out.result.exit_code == 0
    # the agent's own stdin, inherited: /dev/null, whatever the agent was started with (a
    # pipe here, see AgentProcess)
    out = await run(client, ["readlink", "/proc/self/fd/0"])
    assert out.stdout == b"/dev/null\n"


async def test_stdin_streaming(client: AgentClient) -> None:
    handle = await client.exec(["cat"], stdin_open=True)
    await handle.write_stdin(b"first\n")
    kind, data = await asyncio.wait_for(handle.__anext__(), 5)
    assert (kind, data) == ("stdout", b"first\n")
    await handle.write_stdin(b"second\n")
    await handle.close_stdin()
    out = await asyncio.wait_for(collect(handle), 5)
    assert out.stdout == b"second\n"
    assert out.result.exit_code == 0
    with pytest.raises(AgentProtocolError, match="stdin"):
        await handle.write_stdin(b"late")


async def test_large_stdin_bytes(client: AgentClient) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    out = await run(client, ["sha256sum"], stdin=data)
    assert out.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()


async def test_command_ignoring_stdin_does_not_break_the_stream(client: AgentClient) -> None:
    out = await run(client, ["head", "-c", "1"], stdin=os.urandom(3 * 1024 * 1024))
    assert len(out.stdout) == 1
    assert (await run(client, ["echo", "ok"])).stdout == b"ok\n"


async def test_8mib_output_intact(client: AgentClient, tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(8 * 1024 * 1024))
    out = await run(client, ["cat", str(blob)])
    assert len(out.stdout) == 8 * 1024 * 1024
    assert hashlib.sha256(out.stdout).digest() == hashlib.sha256(blob.read_bytes()).digest()


async def test_timeout_kills_process_tree(client: AgentClient) -> None:
    async with asyncio.timeout(30):  # a deadline, far below the 100 s of an unkilled tree
        out = await run(client, sh("sleep 100 & echo $!; sleep 100"), timeout=0.5)
    assert out.result.timed_out
    assert out.result.signal == signal.SIGKILL
    grandchild = int(out.stdout.split()[0])
    await wait_until(lambda: pid_gone(grandchild), 5, f"grandchild {grandchild} to be killed")


async def test_background_process_does_not_hang_exec(client: AgentClient) -> None:
    out = await run(client, sh("sleep 30 & echo $!"))
    assert not pid_gone(int(out.stdout)), "exec waited for its background child to end"
    os.kill(int(out.stdout), signal.SIGKILL)  # the daemon outlives its exec, by design
    assert out.result.exit_code == 0


async def test_32_concurrent_execs(client: AgentClient) -> None:
    outs = await asyncio.gather(
        *(run(client, sh(f"sleep 0.2; echo {i}; echo e{i} >&2; exit {i % 7}")) for i in range(32))
    )
    for i, out in enumerate(outs):
        assert out.stdout == f"{i}\n".encode()
        assert out.stderr == f"e{i}\n".encode()
        assert out.result.exit_code == i % 7


NO_PIDFD = """
import os
def pidfd_open(pid, flags=0):
    raise OSError(38, "Function not implemented")
os.pidfd_open = pidfd_open
"""


@pytest.mark.parametrize("prelude", [
    "import signal; signal.signal(signal.SIGCHLD, signal.SIG_IGN)",  # as a careless init might
    NO_PIDFD,  # a kernel before 5.3: exits are polled
], ids=["inherited-sigchld-ignored", "no-pidfd"])
async def test_exit_statuses_whatever_the_start(tmp_path: Path, prelude: str) -> None:
    """Exit statuses, output and timeouts arrive with SIGCHLD ignored by whoever started
    the agent (the kernel would discard them: the agent resets it) and without pidfds."""
    agent = AgentProcess(tmp_path / "agent.sock", prelude=prelude)
    try:
        c = await AgentClient.connect_unix(str(agent.sock), timeout=5)
        await c.hello(timeout=5)
        async with asyncio.timeout(30):  # a deadline, not a measurement: exits must come
            outs = await asyncio.gather(*(run(c, sh(f"sleep 0.{i}; echo {i}; exit {i}"))
                                          for i in range(4)))
            out = await run(c, ["sleep", "30"], timeout=0.2)
        assert [(o.stdout, o.result.exit_code) for o in outs] == [
            (f"{i}\n".encode(), i) for i in range(4)]
        assert (out.result.timed_out, out.result.signal) == (True, signal.SIGKILL)
        await c.close()
    finally:
        agent.stop()
    assert "internal error" not in agent.log.read_text()


#: Signals 32 and 33, which glibc keeps for itself: its posix_spawn leaves them ignored in
#: the child (a program's glibc takes them over when it needs them).
GLIBC_INTERNAL_SIGNALS = (1 << 31) | (1 << 32)


async def test_commands_start_with_default_signals(tmp_path: Path) -> None:
    """An agent started with signals ignored (init runs it in the background, where the
    shell ignores SIGINT and SIGQUIT) starts commands with none ignored, blocked or
    handled, through posix_spawn and through fork (a PTY)."""
    ignore = "import signal\nfor s in ('SIGINT', 'SIGQUIT', 'SIGTERM', 'SIGUSR1'):\n" \
             "    signal.signal(getattr(signal, s), signal.SIG_IGN)"
    agent = AgentProcess(tmp_path / "agent.sock", prelude=ignore)
    try:
        c = await AgentClient.connect_unix(str(agent.sock), timeout=5)
        await c.hello(timeout=5)
        for pty in (False, True):
            out = await run(c, ["cat", "/proc/self/status"], pty=pty)
            masks = dict(line.split(":\t") for line in out.stdout.decode().splitlines()
                         if line.startswith(("SigIgn", "SigBlk")))
            ignored = int(masks["SigIgn"], 16) & ~GLIBC_INTERNAL_SIGNALS
            # SIGUSR1 stays ignored: nothing in the agent ignores it, so it is not reset
            assert (int(masks["SigBlk"], 16), ignored) == (0, 1 << (signal.SIGUSR1 - 1)), pty
        await c.close()
    finally:
        agent.stop()


async def test_send_signal(client: AgentClient) -> None:
    handle = await client.exec(["sleep", "30"])
    await handle.send_signal(signal.SIGTERM)
    result = await asyncio.wait_for(handle.wait(), 5)
    assert result.signal == signal.SIGTERM
    with pytest.raises(AgentRemoteError) as info:
        await handle.send_signal(signal.SIGTERM)
    assert info.value.code == "ESRCH"


async def test_kill_ends_exec(client: AgentClient) -> None:
    handle = await client.exec(sh("sleep 30"))
    await handle.kill()
    result = await asyncio.wait_for(handle.wait(), 5)
    assert result.signal == signal.SIGKILL


@pytest.mark.parametrize(
    ("argv", "cwd", "code", "fragment"),
    [
        (["/nonexistent/program"], None, "ENOENT", "cannot execute"),
        (["no-such-command-kelpie"], None, "ENOENT", "cannot execute"),
        (["true"], "/nonexistent-dir", "ENOENT", "cannot change directory"),
        (["/etc/passwd"], None, "EACCES", "cannot execute"),
    ],
)
async def test_spawn_failures(
    client: AgentClient, argv: list[str], cwd: str | None, code: str, fragment: str
) -> None:
    with pytest.raises(AgentRemoteError) as info:
        await client.exec(argv, cwd=cwd)
    assert info.value.code == code
    assert fragment in info.value.message
    assert (await run(client, ["true"])).result.exit_code == 0


@pytest.mark.parametrize(
    ("argv", "path", "cwd"),
    [
        (["true"], "/nonexistent:/usr/bin:/bin", "/"),
        (["not-executable"], "/nonexistent:{tmp}:/bin", "/"),
        (["no-such-command-kelpie"], "/bin:/usr/bin", "/"),
        (["{tmp}/not-executable"], "/bin", "/"),
        (["./not-executable"], "/bin", "{tmp}"),
        (["true"], "/bin:/usr/bin", "/nonexistent-dir"),
    ],
)
def test_posix_spawn_matches_fork(tmp_path: Path, argv: list[str], path: str, cwd: str) -> None:
    """The posix_spawn fast path starts, and fails, exactly like fork + exec."""
    from kelpie.guest import OpError, SpawnPlan, _spawn

    (tmp_path / "not-executable").write_text("x")
    argv = [arg.format(tmp=tmp_path) for arg in argv]
    plan = SpawnPlan(
        argv=argv, env={"PATH": path.format(tmp=tmp_path)}, cwd=cwd.format(tmp=tmp_path),
        root="/", user=None, pty=False,
    )
    outcomes = []
    before = os.getcwd()
    for start in (_spawn._posix_spawn, partial(_spawn._fork_spawn, rows=24, cols=80)):
        try:
            ex = start(plan, exec_id=1, want_stdin=False)
        except OpError as exc:
            outcomes.append((exc.code, exc.message))
        else:
            _, status = os.waitpid(ex.pid, 0)
            ex.close_fds()
            outcomes.append((os.waitstatus_to_exitcode(status), ""))
    assert outcomes[0] == outcomes[1]
    assert os.getcwd() == before  # the agent's own directory is restored


async def test_sweep_is_refused_outside_a_vm(client: AgentClient) -> None:
    # on a host it would kill every process of the machine: only a VM's own agent sweeps
    with pytest.raises(AgentRemoteError, match="sweep runs only in a VM's own agent") as info:
        await client.sweep()
    assert info.value.code == "EPERM"


async def test_unknown_user(client: AgentClient) -> None:
    with pytest.raises(AgentRemoteError) as info:
        await client.exec(["true"], user="no-such-user-kelpie")
    assert info.value.code == "EINVAL"


@pytest.mark.skipif(not IS_ROOT, reason="switching users needs root")
async def test_user_switch(client: AgentClient) -> None:
    out = await run(client, sh("id -u; id -g"), user=65534)
    assert out.stdout.split() == [b"65534", b"65534"]
    out = await run(client, ["id", "-un"], user="root")
    assert out.stdout == b"root\n"
    # Docker's USER user:group: that group only
    out = await run(client, sh("id -u; id -g; id -G"), user="65534:4242")
    assert out.stdout.split() == [b"65534", b"4242", b"4242"]
    out = await run(client, sh("id -u; id -g"), user="root:0")
    assert out.stdout.split() == [b"0", b"0"]
    with pytest.raises(AgentRemoteError, match="no group named 'no-such-group-kelpie'"):
        await client.exec(["true"], user="root:no-such-group-kelpie")


async def test_pty_exec_and_resize(client: AgentClient) -> None:
    out = await run(client, ["tty"], pty=True)
    assert out.stdout.startswith(b"/dev/pts/")
    handle = await client.exec(
        sh("stty size; read x; stty size"), pty=True, stdin_open=True, term_size=(24, 80)
    )
    seen = b""
    async for kind, data in handle:
        assert kind == "stdout"
        assert isinstance(data, bytes)
        seen += data
        if b"24 80" in seen:
            break
    await handle.resize(40, 100)
    await handle.write_stdin(b"go\n")
    out = await asyncio.wait_for(collect(handle), 5)
    assert b"40 100" in out.stdout
    assert out.result.exit_code == 0


async def test_resize_needs_a_pty(client: AgentClient) -> None:
    handle = await client.exec(["sleep", "5"])
    with pytest.raises(AgentRemoteError) as info:
        await handle.resize(10, 10)
    assert info.value.code == "EINVAL"
    await handle.kill()
    await handle.wait()


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------


async def test_16mib_file_round_trip(client: AgentClient, tmp_path: Path) -> None:
    data = os.urandom(16 * 1024 * 1024)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(data), 1_000_000):  # not frame aligned on purpose
            yield data[start : start + 1_000_000]

    target = str(tmp_path / "big.bin")
    assert await client.write_file(target, chunks()) == len(data)
    digest = hashlib.sha256()
    size = 0
    async for chunk in client.read_file(target):
        assert len(chunk) <= protocol.MAX_FRAME_PAYLOAD
        digest.update(chunk)
        size += len(chunk)
    assert size == len(data)
    assert digest.digest() == hashlib.sha256(data).digest()
    assert (await client.stat(target)).size == len(data)


async def test_write_mode_and_overwrite(client: AgentClient, tmp_path: Path) -> None:
    target = tmp_path / "secret"
    await client.write_file(str(target), b"one", mode=0o600)
    assert target.read_bytes() == b"one"
    assert target.stat().st_mode & 0o7777 == 0o600
    await client.write_file(str(target), [b"tw", b"", b"o"], mode=0o751)
    assert target.read_bytes() == b"two"
    st = await client.stat(str(target))
    assert (st.type, st.mode, st.size) == ("file", 0o751, 3)
    assert os.listdir(tmp_path) == ["secret"]  # no temp files left
    await client.write_file(str(tmp_path / "empty"), b"")
    assert (tmp_path / "empty").read_bytes() == b""


async def test_failed_upload_leaves_no_temp_file(client: AgentClient, tmp_path: Path) -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield b"x" * 100_000
        raise RuntimeError("source failed")

    with pytest.raises(RuntimeError, match="source failed"):
        await client.write_file(str(tmp_path / "partial"), broken())
    assert await client.ping() < 5  # the cancel went ahead of this ping
    assert os.listdir(tmp_path) == []


async def test_file_errors(client: AgentClient, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    cases = [
        (client.stat(str(tmp_path / "missing")), "ENOENT"),
        (client.read_bytes(str(tmp_path / "missing")), "ENOENT"),
        (client.read_bytes(str(tmp_path)), "EISDIR"),
        (client.write_file(str(tmp_path), b"x"), "EISDIR"),
        (client.write_file(str(tmp_path / "missing" / "f"), b"x"), "ENOENT"),
        (client.list_dir(str(tmp_path / "file")), "ENOTDIR"),
        (client.mkdir(str(tmp_path / "file")), "EEXIST"),
        (client.remove(str(tmp_path / "missing")), "ENOENT"),
    ]
    for coro, code in cases:
        with pytest.raises(AgentRemoteError) as info:
            await coro
        assert info.value.code == code, info.value
        assert info.value.message
    with pytest.raises(AgentRemoteError) as info:
        await client.stat("relative/path")
    assert info.value.code == "EPROTO"


async def test_stat_list_mkdir_remove(client: AgentClient, tmp_path: Path) -> None:
    base = tmp_path / "tree"
    await client.mkdir(str(base / "a" / "b"), parents=True, mode=0o700)
    await client.mkdir(str(base / "a" / "b"), parents=True)  # like mkdir -p: no error
    assert (base / "a" / "b").stat().st_mode & 0o777 == 0o700
    await client.write_file(str(base / "a" / "f.txt"), b"12345")
    os.symlink("f.txt", base / "a" / "link")
    entries = await client.list_dir(str(base / "a"))
    assert [(e.name, e.type) for e in entries] == [
        ("b", "dir"),
        ("f.txt", "file"),
        ("link", "symlink"),
    ]
    assert entries[1].size == 5
    link = await client.stat(str(base / "a" / "link"), follow_symlinks=False)
    assert (link.type, link.target) == ("symlink", "f.txt")
    assert (await client.stat(str(base / "a" / "link"))).type == "file"
    with pytest.raises(AgentRemoteError) as info:
        await client.remove(str(base / "a"))
    assert info.value.code == "ENOTEMPTY"
    await client.remove(str(base / "a" / "link"))
    assert (base / "a" / "f.txt").exists()
    await client.remove(str(base), recursive=True)
    assert not base.exists()


async def test_list_large_directory(client: AgentClient, tmp_path: Path) -> None:
    for i in range(1300):
        (tmp_path / f"f{i:05d}").touch()
    entries = await client.list_dir(str(tmp_path))
    assert [e.name for e in entries] == [f"f{i:05d}" for i in range(1300)]


async def test_abandoned_download_is_cancelled(client: AgentClient, tmp_path: Path) -> None:
    (tmp_path / "big").write_bytes(b"x" * (4 * 1024 * 1024))
    async for _chunk in client.read_file(str(tmp_path / "big")):
        break
    assert await client.ping() < 5
    assert (await run(client, ["true"])).result.exit_code == 0


async def test_resync_mixes_entropy(client: AgentClient) -> None:
    result = await client.resync(entropy=os.urandom(64))
    assert result.entropy_bytes == 64
    assert not result.clock_set
    assert result.hostname is None


# ---------------------------------------------------------------------------
# Robustness
# ---------------------------------------------------------------------------


def test_garbage_and_oversized_frames_then_exec_works(agent: AgentProcess) -> None:
    raw = RawConn(agent.sock)
    raw.hello()
    garbage = os.urandom(4096).replace(protocol.MAGIC, b"")
    raw.send(garbage)
    ftype, rid, body = raw.recv_json()
    assert (ftype, rid, body["code"]) == (FrameType.ERROR, 0, "EPROTO")
    assert "corrupt input" in str(body["message"])
    oversized = protocol.HEADER.pack(
        protocol.MAGIC, protocol.MAX_FRAME_PAYLOAD + 1, FrameType.REQUEST, 7
    )
    raw.send(oversized)
    raw.request(8, {"op": "exec", "argv": ["echo", "still alive"]})
    ftype, rid, body = raw.recv_json()
    assert (ftype, rid) == (FrameType.ERROR, 0)
    assert "exceeds the maximum" in str(body["message"])
    assert raw.recv_json()[:2] == (FrameType.EVENT, 8)
    frame = raw.recv()
    assert (frame.ftype, frame.request_id, frame.payload) == (FrameType.STDOUT, 8, b"still alive\n")
    ftype, rid, body = raw.recv_json()
    assert (ftype, rid, body["exit_code"]) == (FrameType.REPLY, 8, 0)
    raw.close()


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (b"{not json", "not valid UTF-8 JSON"),
        (b'{"op": "frobnicate"}', "unknown op"),
        (b'{"op": "exec"}', "missing required field 'argv'"),
        (b'{"op": "mkdir", "path": 5}', "field 'path'"),
    ],
)
def test_malformed_requests_get_errors(agent: AgentProcess, payload: bytes, fragment: str) -> None:
    raw = RawConn(agent.sock)
    raw.hello()
    raw.send(protocol.encode_frame(FrameType.REQUEST, 5, payload))
    ftype, rid, body = raw.recv_json()
    assert (ftype, rid, body["code"]) == (FrameType.ERROR, 5, "EPROTO")
    assert fragment in str(body["message"])
    raw.send(protocol.encode_frame(FrameType.STDOUT, 6, b"wrong direction"))
    ftype, rid, body = raw.recv_json()
    assert (ftype, rid) == (FrameType.ERROR, 0)
    raw.request(7, {"op": "ping"})
    assert raw.recv_json()[:2] == (FrameType.REPLY, 7)
    raw.close()


def test_started_event_comes_first_and_is_not_held_long(agent: AgentProcess) -> None:
    """The started event, held for a command's first output or exit (one write for
    both), leads its request's frames, and a silent command still gets it while it runs."""
    raw = RawConn(agent.sock)
    raw.hello()
    raw.request(2, {"op": "exec", "argv": ["true"]})
    raw.request(3, {"op": "exec", "argv": sh("echo out; echo err >&2")})
    frames: dict[int, list[tuple[int, bytes]]] = {2: [], 3: []}
    while sum(ftype == FrameType.REPLY for kinds in frames.values() for ftype, _ in kinds) < 2:
        frame = raw.recv()
        frames[frame.request_id].append((frame.ftype, frame.payload))
    assert [ftype for ftype, _ in frames[2]] == [FrameType.EVENT, FrameType.REPLY]
    kinds = [ftype for ftype, _ in frames[3]]
    assert kinds[0] == FrameType.EVENT and kinds[-1] == FrameType.REPLY
    assert sorted(kinds[1:-1]) == [FrameType.STDOUT, FrameType.STDERR]
    raw.request(4, {"op": "exec", "argv": ["sleep", "60"]})
    ftype, rid, body = raw.recv_json()  # within the socket's 10 s timeout, long before exit
    assert (ftype, rid, body["event"]) == (FrameType.EVENT, 4, "started")
    pid = body["pid"]
    assert isinstance(pid, int) and not pid_gone(pid)
    raw.request(5, {"op": "signal", "target": 4, "signum": signal.SIGKILL})
    replies = {rid: (ftype, body) for ftype, rid, body in (raw.recv_json() for _ in range(2))}
    assert replies[5] == (FrameType.REPLY, {})
    assert replies[4][0] == FrameType.REPLY and replies[4][1]["signal"] == signal.SIGKILL
    raw.close()


def test_output_backpressure_pauses_the_command(agent: AgentProcess) -> None:
    """While the host reads nothing, the agent stops reading the command's pipe."""
    total = 32 * 1024 * 1024
    raw = RawConn(agent.sock)
    raw.hello()
    raw.request(2, {"op": "exec", "argv": ["head", "-c", str(total), "/dev/zero"]})
    time.sleep(1.0)  # a child that was not paused would be done by now
    received = 0
    done = None
    while done is None:
        frame = raw.recv()
        if frame.ftype == FrameType.STDOUT:
            received += len(frame.payload)
        elif frame.ftype == FrameType.REPLY:
            done = frame.json()
    assert received == total
    assert done["exit_code"] == 0
    raw.close()


async def test_disconnect_fails_pending_and_reconnect_attaches(agent: AgentProcess) -> None:
    first = await AgentClient.connect_unix(str(agent.sock))
    await first.hello()
    handle = await first.exec(sh("echo one; read x; echo two"), stdin_open=True)
    assert await asyncio.wait_for(handle.__anext__(), 5) == ("stdout", b"one\n")

    # A new connection replaces the old one: the old client sees the loss.
    second = await AgentClient.connect_unix(str(agent.sock))
    info = await second.hello()
    with pytest.raises(AgentDisconnected, match=f"attach\\({handle.exec_id}\\)"):
        await asyncio.wait_for(handle.__anext__(), 5)
    with pytest.raises(AgentDisconnected):
        await first.ping()
    assert first.state is ClientState.CLOSED
    await first.close()

    listed = {e.exec_id: e for e in info.execs}
    assert listed[handle.exec_id].running
    assert listed[handle.exec_id].pid == handle.pid
    assert info.agent_pid == agent.proc.pid

    again = await second.attach(handle.exec_id, stdin_open=True)
    assert again.pid == handle.pid
    await again.write_stdin(b"\n")
    out = await asyncio.wait_for(collect(again), 5)
    assert out.stdout == b"two\n"
    assert out.result.exit_code == 0
    with pytest.raises(AgentRemoteError) as exc_info:
        await second.attach(handle.exec_id)
    assert exc_info.value.code == "ESRCH"
    await second.close()


async def test_attach_replays_the_output_a_lost_host_had_not_got(agent: AgentProcess) -> None:
    # output the old host never wrote down (in flight when it went: a daemon restarted, a
    # VM moved live) comes again on attach, from the offset the new host says it has
    first = await AgentClient.connect_unix(str(agent.sock))
    await first.hello()
    handle = await first.exec(sh("echo one; read x; echo two >&2; read x; echo three"),
                              stdin_open=True, replay=1024)
    assert handle.offset == 0
    assert await asyncio.wait_for(handle.__anext__(), 5) == ("stdout", b"one\n")
    await handle.write_stdin(b"\n")
    assert await asyncio.wait_for(handle.__anext__(), 5) == ("stderr", b"two\n")
    await first.close()

    async with await AgentClient.connect_unix(str(agent.sock)) as second:
        await second.hello()
        again = await second.attach(handle.exec_id, stdin_open=True, offset=4)  # has "one\n"
        assert again.offset == 4
        await again.write_stdin(b"\n")
        out = await asyncio.wait_for(collect(again), 5)
        assert (out.stdout, out.stderr) == (b"three\n", b"two\n")


async def test_attach_says_where_output_restarts_when_less_was_kept(agent: AgentProcess) -> None:
    async with await AgentClient.connect_unix(str(agent.sock)) as first:
        await first.hello()
        handle = await first.exec(sh("printf 0123456789; read x; printf end"),
                                  stdin_open=True, replay=4)
        assert await asyncio.wait_for(handle.__anext__(), 5) == ("stdout", b"0123456789")
    async with await AgentClient.connect_unix(str(agent.sock)) as second:
        await second.hello()
        again = await second.attach(handle.exec_id, stdin_open=True, offset=0)
        assert again.offset == 0  # one read of 10 bytes: kept whole, so all of it
        await again.write_stdin(b"\n")
        assert (await asyncio.wait_for(collect(again), 5)).stdout == b"0123456789end"
    unkept = await AgentClient.connect_unix(str(agent.sock))
    await unkept.hello()
    plain = await unkept.exec(sh("printf abc; read x"), stdin_open=True)  # replay=0
    assert await asyncio.wait_for(plain.__anext__(), 5) == ("stdout", b"abc")
    await unkept.close()
    async with await AgentClient.connect_unix(str(agent.sock)) as third:
        await third.hello()
        again = await third.attach(plain.exec_id, stdin_open=True, offset=1)
        assert again.offset == 3  # nothing kept: it goes on after all 3 bytes
        await again.write_stdin(b"\n")
        assert (await asyncio.wait_for(collect(again), 5)).stdout == b""


def test_an_exec_keeps_its_latest_output_within_its_budget() -> None:
    ex = Exec(1, 1, ["x"], pty=False)
    ex.keep = 5
    for chunk in (b"abc", b"def", b"gh"):
        ex.forwarded(FrameType.STDOUT, chunk)
    assert ex.produced == 8
    assert ex.since(3) == (3, [(FrameType.STDOUT, b"def"), (FrameType.STDOUT, b"gh")])
    assert ex.since(4) == (4, [(FrameType.STDOUT, b"ef"), (FrameType.STDOUT, b"gh")])
    assert ex.since(0) == (3, [(FrameType.STDOUT, b"def"), (FrameType.STDOUT, b"gh")])
    assert ex.since(8) == (8, []) and ex.since(99) == (8, [])


async def test_exit_while_detached_is_collected_later(agent: AgentProcess) -> None:
    first = await AgentClient.connect_unix(str(agent.sock))
    await first.hello()
    handle = await first.exec(sh("sleep 0.2; echo done; exit 3"))
    await first.close()
    await wait_until(lambda: not os.path.exists(f"/proc/{handle.pid}"), 5, "the command's exit")
    async with await AgentClient.connect_unix(str(agent.sock)) as second:
        info = await second.hello()
        listed = {e.exec_id: e for e in info.execs}
        assert not listed[handle.exec_id].running
        out = await asyncio.wait_for(collect(await second.attach(handle.exec_id)), 5)
        assert out.stdout == b"done\n"
        assert out.result.exit_code == 3


async def test_shutdown_stops_agent_and_commands(tmp_path: Path) -> None:
    proc = AgentProcess(tmp_path / "s.sock")
    try:
        async with await AgentClient.connect_unix(str(proc.sock)) as c:
            await c.hello()
            handle = await c.exec(["sleep", "30"])
            await c.shutdown(poweroff=True)  # host test mode never powers off
            with pytest.raises(AgentDisconnected):
                await asyncio.wait_for(handle.wait(), 5)
        assert proc.proc.wait(5) == 0
        await wait_until(lambda: pid_gone(handle.pid), 5, "the command to end with the agent")
    finally:
        proc.stop()


@pytest.mark.skipif(not IS_ROOT, reason="chroot needs root")
@pytest.mark.parametrize("agent_cwd", ["/", "tmp"])
async def test_root_chroots_commands_and_confines_paths(tmp_path: Path, agent_cwd: str) -> None:
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("needs a static busybox")
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    (root / "etc").mkdir()
    shutil.copy(busybox, root / "bin" / "busybox")
    os.symlink("busybox", root / "bin" / "sh")
    (root / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nbob:x:1234:1234::/home/bob:/bin/sh\n"
    )
    os.symlink("/", root / "escape")
    own_cwd = Path("/") if agent_cwd == "/" else tmp_path
    proc = AgentProcess(tmp_path / "r.sock", "--root", str(root), cwd=own_cwd)
    try:
        async with await AgentClient.connect_unix(str(proc.sock)) as c:
            info = await c.hello()
            assert info.root == str(root)
            out = await run(c, ["sh", "-c", "pwd; ls /; echo $HOME"], cwd="/bin", user="bob")
            assert out.stdout.decode().split() == ["/bin", "bin", "escape", "etc", "/home/bob"]
            for cwd in ("/", "/bin", "/"):  # as the agent's user: chroot around posix_spawn
                out = await run(c, ["sh", "-c", "pwd; ls /"], cwd=cwd)
                assert out.stdout.decode().split() == [cwd, "bin", "escape", "etc"]
                # and the agent has its own root and directory back
                assert os.readlink(f"/proc/{info.agent_pid}/root") == "/"
                assert os.readlink(f"/proc/{info.agent_pid}/cwd") == str(own_cwd)
            await c.write_file("/escape/hello.txt", b"inside")
            assert (root / "hello.txt").read_bytes() == b"inside"
            assert (await c.stat("/escape/../../hello.txt")).size == 6
            link = await c.stat("/escape", follow_symlinks=False)
            assert (link.type, link.target) == ("symlink", "/")
            names = [e.name for e in await c.list_dir("/escape")]
            assert names == ["bin", "escape", "etc", "hello.txt"]
            with pytest.raises(AgentRemoteError) as exc_info:
                await c.remove("/", recursive=True)
            assert exc_info.value.code == "EBUSY"
    finally:
        proc.stop()


def test_device_mode_waits_for_the_host(tmp_path: Path) -> None:
    """--device: serve a character device; its hang-up means "wait", not "exit".

    A raw-mode pseudo-terminal stands in for the virtio-serial port.
    """
    master, slave = os.openpty()
    tty.setraw(slave)
    log = (tmp_path / "device.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-S", str(AGENT), "--device", os.ttyname(slave)],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
    )
    try:
        decoder = protocol.FrameDecoder()

        def exchange(rid: int, message: dict[str, object]) -> list[protocol.Frame]:
            os.write(master, protocol.encode_json(FrameType.REQUEST, rid, message))
            frames: list[protocol.Frame] = []
            while not frames or frames[-1].ftype not in (FrameType.REPLY, FrameType.ERROR):
                ready, _, _ = select.select([master], [], [], 10)
                assert ready, "no reply over the device"
                decoder.feed(os.read(master, 65536))
                frames += [f for f in decoder.frames() if isinstance(f, protocol.Frame)]
            return frames

        hello = exchange(1, {"op": "hello", "version": protocol.PROTOCOL_VERSION})
        assert hello[-1].json()["agent_pid"] == proc.pid
        frames = exchange(2, {"op": "exec", "argv": ["echo", "over the device"]})
        assert [f.ftype for f in frames] == [FrameType.EVENT, FrameType.STDOUT, FrameType.REPLY]
        assert frames[1].payload == b"over the device\n"
        os.close(master)  # the host goes away: the device now reports POLLHUP
        time.sleep(0.5)
        assert proc.poll() is None, "the agent must wait for the next host, not exit"
    finally:
        proc.terminate()
        proc.wait(5)
        os.close(slave)
        log.close()


# ---------------------------------------------------------------------------
# The client against a scripted fake agent
# ---------------------------------------------------------------------------

HELLO_REPLY: dict[str, object] = {
    "version": protocol.PROTOCOL_VERSION,
    "agent_pid": 1,
    "boot_id": "b",
    "hostname": "fake",
    "root": "/",
    "time_ns": 0,
    "execs": [],
}


class FakeAgent:
    """A unix-socket server whose replies each test scripts."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = protocol.FrameDecoder()
        self.frames: list[protocol.Frame] = []

    async def request(self) -> tuple[int, dict[str, object]]:
        while not self.frames:
            data = await self.reader.read(65536)
            assert data, "client went away"
            self.decoder.feed(data)
            self.frames += [f for f in self.decoder.frames() if isinstance(f, protocol.Frame)]
        frame = self.frames.pop(0)
        assert frame.ftype == FrameType.REQUEST
        return frame.request_id, frame.json()

    def send(self, ftype: int, rid: int, body: dict[str, object]) -> None:
        self.writer.write(protocol.encode_json(ftype, rid, body))


async def connect_fake(
    tmp_path: Path, script: Callable[[FakeAgent], Awaitable[None]]
) -> tuple[AgentClient, asyncio.Server]:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await script(FakeAgent(reader, writer))
        writer.close()

    path = str(tmp_path / "fake.sock")
    server = await asyncio.start_unix_server(serve, path)
    return await AgentClient.connect_unix(path, timeout=5), server


async def answer_hello(fake: FakeAgent) -> None:
    rid, body = await fake.request()
    assert body == {"op": "hello", "version": protocol.PROTOCOL_VERSION}
    fake.send(FrameType.REPLY, rid, HELLO_REPLY)


async def test_client_rejects_other_protocol_version(tmp_path: Path) -> None:
    async def script(fake: FakeAgent) -> None:
        rid, _ = await fake.request()
        fake.send(FrameType.REPLY, rid, {**HELLO_REPLY, "version": 999})
        await fake.reader.read()

    client, server = await connect_fake(tmp_path, script)
    async with server, client:
        with pytest.raises(AgentVersionError, match="999"):
            await client.hello(timeout=5)


async def test_client_maps_eprotonosupport(tmp_path: Path) -> None:
    async def script(fake: FakeAgent) -> None:
        rid, _ = await fake.request()
        fake.send(FrameType.ERROR, rid, {"code": "EPROTONOSUPPORT", "message": "v1 only"})
        await fake.reader.read()

    client, server = await connect_fake(tmp_path, script)
    async with server, client:
        with pytest.raises(AgentVersionError, match="v1 only"):
            await client.hello(timeout=5)


async def test_client_hello_times_out(tmp_path: Path) -> None:
    async def script(fake: FakeAgent) -> None:
        await fake.reader.read()  # never answers

    client, server = await connect_fake(tmp_path, script)
    async with server, client:
        with pytest.raises(AgentConnectError, match="did not answer hello"):
            await client.hello(timeout=0.2)


async def test_disconnect_fails_every_pending_request(tmp_path: Path) -> None:
    async def script(fake: FakeAgent) -> None:
        await answer_hello(fake)
        for _ in range(3):
            rid, body = await fake.request()
            if body["op"] == "exec":
                fake.send(FrameType.EVENT, rid, {"event": "started", "exec_id": 9, "pid": 99})
        # ... and the connection drops with all three unanswered.

    client, server = await connect_fake(tmp_path, script)
    async with server, client:
        await client.hello(timeout=5)
        handle = await client.exec(["sleep", "9"])
        results = await asyncio.gather(
            client.ping(), client.stat("/x"), handle.wait(), return_exceptions=True
        )
        assert all(isinstance(r, AgentDisconnected) for r in results), results
        assert "attach(9)" in str(results[2])
        assert state_of(client) is ClientState.CLOSED
        with pytest.raises(AgentDisconnected):
            await client.ping()


async def test_client_skips_garbage_and_strays(tmp_path: Path) -> None:
    async def script(fake: FakeAgent) -> None:
        await answer_hello(fake)
        rid, _ = await fake.request()
        fake.writer.write(b"\x00garbage\xff" * 50)
        fake.send(FrameType.REPLY, rid + 1000, {"stray": True})
        fake.send(FrameType.ERROR, 0, {"code": "EPROTO", "message": "connection-level"})
        fake.send(FrameType.REPLY, rid, {"time_ns": 1})
        await fake.reader.read()

    client, server = await connect_fake(tmp_path, script)
    async with server, client:
        await client.hello(timeout=5)
        assert await asyncio.wait_for(client.ping(), 5) >= 0


async def test_cancelled_call_leaves_client_usable(tmp_path: Path) -> None:
    first_sent = asyncio.Event()

    async def script(fake: FakeAgent) -> None:
        await answer_hello(fake)
        first, _ = await fake.request()  # never answered before the client cancels
        first_sent.set()
        second, _ = await fake.request()
        fake.send(FrameType.REPLY, first, {"time_ns": 1})  # late: must be dropped
        fake.send(FrameType.REPLY, second, {"time_ns": 2})
        await fake.reader.read()

    client, server = await connect_fake(tmp_path, script)
    async with server, client:
        await client.hello(timeout=5)
        task = asyncio.create_task(client.ping())
        await asyncio.wait_for(first_sent.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await asyncio.wait_for(client.ping(), 5) >= 0
