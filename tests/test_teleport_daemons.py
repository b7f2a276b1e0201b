"""Teleport for real: two daemons (separate state dirs, TCP + token on loopback), QEMU VMs.

Daemon A holds the demo image; B starts empty, so the first teleport also carries the
image and its base disk (by digest). A guest process keeps a counter in its own memory and
prints it every 0.2 s as the sandbox's main command: after a full teleport the same PID
goes on counting with no gap. Faults go through a TCP proxy between the daemons that can
damage a chunk, drop the connection, or kill the source daemon as the commit goes out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

import waiting
from conftest import real_part_missing
from daemon_env import KELPIE, KelpieHome
from test_cli_e2e import DEMO, DEMO_IMAGE_SCRIPT, ok

pytestmark = [pytest.mark.vm]

COUNTER = ("echo pid $$; i=0; while :; do i=$((i+1)); echo n $i; "
           "echo $i >> /root/trail; sleep 0.2; done")
WAIT = 120.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Daemon:
    """One home with its daemon listening on loopback TCP with a token."""

    def __init__(self, home: KelpieHome, name: str) -> None:
        self.home = home
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token_file = home.root / f"{name}.token"
        self.token_file.write_text(os.urandom(16).hex() + "\n")
        self.token_file.chmod(0o600)

    def start(self) -> None:
        ok(self.home.kelpie("daemon", "start", "--tcp", f"127.0.0.1:{self.port}",
                            "--token-file", str(self.token_file)))

    def home_command(self, *args: str) -> list[str]:
        return [*KELPIE, *args]

    def kelpie(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return self.home.kelpie(*args, timeout=timeout)

    def listing(self) -> dict[str, dict[str, Any]]:
        return {s["name"]: s for s in json.loads(ok(self.kelpie("ps", "-a", "--json")))}

    def logs(self, name: str) -> str:
        return ok(self.kelpie("logs", name))


@pytest.fixture(scope="module")
def pair(guestkit: object) -> Iterator[tuple[Daemon, Daemon]]:
    a, b = Daemon(KelpieHome(), "a"), Daemon(KelpieHome(), "b")
    try:
        layout = a.home.root / "demo-layout"
        subprocess.run([sys.executable, str(DEMO_IMAGE_SCRIPT), str(layout)], check=True,
                       timeout=60)
        ok(a.kelpie("image", "import", str(layout), "--reference", f"{DEMO}:latest"))
        a.start()
        b.start()
        yield a, b
    finally:
        a.home.close()
        b.home.close()


def _counts(log: str) -> list[int]:
    return [int(n) for n in re.findall(r"^n (\d+)$", log, re.M)]


def _pids(log: str) -> list[str]:
    return re.findall(r"^pid (\d+)$", log, re.M)


def _counting_past(daemon: Daemon, name: str, past: int) -> list[int] | None:
    counts = _counts(daemon.logs(name))
    return counts if counts and counts[-1] > past else None


def _teleport(source: Daemon, target: Daemon, name: str, *extra: str,
              to: str | None = None) -> subprocess.CompletedProcess[str]:
    return source.kelpie("teleport", name, "--to", to or target.url, "--to-token-file",
                         str(target.token_file), *extra)


class _InFlight(threading.Thread):
    """Follows a daemon's teleports in flight (``GET /v1/teleports?follow=true``) until one
    has come and gone."""

    def __init__(self, daemon: Daemon) -> None:
        super().__init__(daemon=True)
        self.url = f"{daemon.url}/v1/teleports"
        self.token = daemon.token_file.read_text().strip()
        self.lines: list[list[dict[str, Any]]] = []
        self.connected = threading.Event()

    def run(self) -> None:
        with httpx.stream("GET", self.url, params={"follow": "true"}, timeout=None,
                          headers={"Authorization": f"Bearer {self.token}"}) as reply:
            for line in reply.iter_lines():
                if not line:
                    continue
                self.lines.append(json.loads(line))
                self.connected.set()
                if self.lines[-1] == [] and any(self.lines):
                    return


def test_full_then_checkpoint_teleport_and_back(pair: tuple[Daemon, Daemon]) -> None:
    a, b = pair
    ok(a.kelpie("run", "-d", "--name", "tp", "--memory", "256", "-e", "COLOUR=teal", DEMO,
                "--", "sh", "-c", COUNTER))
    waiting.wait_for(lambda: _counting_past(a, "tp", 3), WAIT, "the counter on A")
    sandbox_id = a.listing()["tp"]["id"]

    watcher = _InFlight(a)
    watcher.start()
    assert watcher.connected.wait(WAIT)
    out = ok(_teleport(a, b, "tp", "--mode", "full"))
    assert "mode: full" in out, out
    # the source's dashboard saw it go: its phases, bytes and the downtime growing
    watcher.join(WAIT)
    assert watcher.lines[0] == [] and watcher.lines[-1] == [], watcher.lines
    seen = [t for line in watcher.lines for t in line]
    assert {t["sandbox_name"] for t in seen} == {"tp"}
    assert {t["target"] for t in seen} == {b.url} and {t["mode"] for t in seen} == {"full"}
    phases = [t["phase"] for t in seen]
    assert set(phases) <= {"prepare", "capture", "transfer", "switch", "commit"}, phases
    assert {"capture", "transfer"} & set(phases), phases
    paused = [t["paused_s"] for t in seen if t["paused_s"] is not None]
    assert paused and paused == sorted(paused), "the downtime so far only grows"
    assert max(t["bytes_sent"] for t in seen) > 0
    assert "tp" not in a.listing()
    moved = b.listing()["tp"]
    assert moved["id"] == sandbox_id and moved["state"] == "running"
    before = _counts(b.logs("tp"))
    counts = waiting.wait_for(lambda: _counting_past(b, "tp", before[-1] + 3), WAIT,
                              "the counter going on on B")
    assert counts == list(range(1, counts[-1] + 1)), "a gap or a restart in the counter"
    assert len(set(_pids(b.logs("tp")))) == 1, "the main command restarted"
    env = ok(b.kelpie("exec", "tp", "--", "sh", "-c", "echo $COLOUR"))
    assert env.strip() == "teal"

    # checkpoint back to A: files, env and the main command's log survive
    # (the demo image's working directory, /root, is the checkpoint's workspace)
    ok(b.kelpie("exec", "tp", "--", "sh", "-c", "echo kept > /root/file.txt"))
    out = ok(_teleport(b, a, "tp", "--mode", "checkpoint"))
    assert "mode: checkpoint" in out, out
    assert "tp" not in b.listing()
    assert ok(a.kelpie("exec", "tp", "--", "cat", "/root/file.txt")).strip() == "kept"
    assert ok(a.kelpie("exec", "tp", "--", "sh", "-c", "echo $COLOUR")).strip() == "teal"
    log = a.logs("tp")
    assert set(range(1, counts[-1] + 1)) <= set(_counts(log)), "the log lost lines"
    ok(a.kelpie("rm", "-f", "tp"))


def test_live_teleport_keeps_the_guest_and_its_disk_writes(
    pair: tuple[Daemon, Daemon],
) -> None:
    a, b = pair
    ok(a.kelpie("run", "-d", "--name", "lively", "--memory", "256", DEMO, "--", "sh", "-c",
                COUNTER))
    try:
        waiting.wait_for(lambda: _counting_past(a, "lively", 3), WAIT, "the counter on A")
        out = ok(_teleport(a, b, "lively"))  # auto: both run QEMU alike, so live
        assert "mode: live" in out, out
        assert "lively" not in a.listing() and b.listing()["lively"]["state"] == "running"
        before = _counts(b.logs("lively"))
        counts = waiting.wait_for(lambda: _counting_past(b, "lively", before[-1] + 3), WAIT,
                                  "the counter going on on B")
        assert counts == list(range(1, counts[-1] + 1)), "a gap or a restart in the counter"
        assert len(_pids(b.logs("lively"))) == 1, "the main command restarted"
        # every line the guest appended to its disk, during the migration too, is there
        trail = [int(n) for n in ok(b.kelpie("exec", "lively", "--", "cat",
                                             "/root/trail")).split()]
        assert trail == list(range(1, trail[-1] + 1)) and trail[-1] >= counts[-1]
    finally:
        b.kelpie("rm", "-f", "lively")
        a.kelpie("rm", "-f", "lively")


def test_a_sandbox_restored_from_a_template_teleports_live(
    pair: tuple[Daemon, Daemon],
) -> None:
    # its QEMU loaded the template's state with x-ignore-shared on, which a live stream
    # must not claim (the target refused it: "Capability x-ignore-shared is off")
    a, b = pair
    ok(a.kelpie("template", "create", "--name", "tpl128", "--memory", "128m"))
    try:
        ok(a.kelpie("run", "-d", "--name", "fromtpl", "--template", "tpl128"))
        ok(a.kelpie("exec", "fromtpl", "--", "sh", "-c", "echo 42 > /root/answer"))
        out = ok(_teleport(a, b, "fromtpl", "--mode", "live"))
        assert "mode: live" in out, out
        assert ok(b.kelpie("exec", "fromtpl", "--", "cat", "/root/answer")).strip() == "42"
    finally:
        b.kelpie("rm", "-f", "fromtpl")
        a.kelpie("rm", "-f", "fromtpl")
        a.kelpie("template", "rm", "tpl128")


def test_live_that_does_not_converge_falls_back_to_full(pair: tuple[Daemon, Daemon]) -> None:
    a, b = pair
    ok(a.kelpie("run", "-d", "--name", "sluggish", "--memory", "256", DEMO, "--", "sh", "-c",
                COUNTER))
    try:
        waiting.wait_for(lambda: _counting_past(a, "sluggish", 2), WAIT, "the counter on A")
        out = ok(_teleport(a, b, "sluggish", "--converge-timeout", "0.001"))
        assert "mode: full (live did not converge within 0.001 s" in out, out
        assert "sluggish" not in a.listing()
        before = _counts(b.logs("sluggish"))
        counts = waiting.wait_for(lambda: _counting_past(b, "sluggish", before[-1] + 2), WAIT,
                                  "the counter going on on B")
        assert counts == list(range(1, counts[-1] + 1))
    finally:
        b.kelpie("rm", "-f", "sluggish")
        a.kelpie("rm", "-f", "sluggish")


def test_unreachable_target_or_wrong_token_leave_the_sandbox_running(
    pair: tuple[Daemon, Daemon],
) -> None:
    a, b = pair
    ok(a.kelpie("run", "-d", "--name", "stay", "--memory", "256", DEMO, "--", "sleep", "1000"))
    try:
        down = _teleport(a, b, "stay", to=f"http://127.0.0.1:{_free_port()}")
        assert down.returncode != 0
        assert "127.0.0.1" in down.stderr and "answer" in down.stderr, down.stderr
        wrong = a.kelpie("teleport", "stay", "--to", b.url, "--to-token-file",
                         str(a.token_file))
        assert wrong.returncode != 0
        assert "token" in wrong.stderr.lower(), wrong.stderr
        assert a.listing()["stay"]["state"] == "running"
        assert ok(a.kelpie("exec", "stay", "--", "echo", "still")).strip() == "still"
        ok(a.kelpie("pause", "stay"))  # not held by a teleport any more
    finally:
        a.kelpie("rm", "-f", "stay")


class Proxy:
    """A TCP proxy to ``port`` that can damage, drop or act on what passes through."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.port = _free_port()
        self.damage_at: int | None = None
        self.drop_at: int | None = None
        self.on_request: Callable[[bytes], None] | None = None
        self.sent = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._client, "127.0.0.1", self.port))
        self._server = server
        self._ready.set()
        self._loop.run_forever()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)

        async def upstream() -> None:
            while data := await reader.read(1 << 16):
                if self.on_request is not None:
                    self.on_request(data)
                start, self.sent = self.sent, self.sent + len(data)
                if self.drop_at is not None and start <= self.drop_at < self.sent:
                    self.drop_at = None
                    writer.close()
                    up_writer.close()
                    return
                if self.damage_at is not None and start <= self.damage_at < self.sent:
                    at = self.damage_at - start
                    data = data[:at] + bytes([data[at] ^ 0x5A]) + data[at + 1:]
                    self.damage_at = None
                up_writer.write(data)
                await up_writer.drain()

        async def downstream() -> None:
            while data := await up_reader.read(1 << 16):
                writer.write(data)
                await writer.drain()

        pipes = asyncio.gather(upstream(), downstream())
        try:
            await pipes
        except (OSError, ConnectionError):
            pass
        except asyncio.CancelledError:
            pipes.cancel()
            await asyncio.gather(pipes, return_exceptions=True)
            raise
        for w in (writer, up_writer):
            with contextlib.suppress(Exception):
                w.close()

    def close(self) -> None:
        async def shut() -> None:
            self._server.close()
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shut(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def test_damaged_chunk_and_dropped_connection_are_survived(pair: tuple[Daemon, Daemon]) -> None:
    a, b = pair
    ok(a.kelpie("run", "-d", "--name", "rough", "--memory", "256", DEMO, "--", "sh", "-c",
                COUNTER))
    waiting.wait_for(lambda: _counting_past(a, "rough", 2), WAIT, "the counter on A")
    proxy = Proxy(b.port)
    try:
        proxy.damage_at = 3 << 20  # inside the first big blob's first chunks
        proxy.drop_at = 9 << 20
        out = ok(_teleport(a, b, "rough", "--mode", "full", to=proxy.url))
        assert proxy.damage_at is None and proxy.drop_at is None, "the faults never fired"
        assert "mode: full" in out
        assert "rough" not in a.listing() and b.listing()["rough"]["state"] == "running"
        before = _counts(b.logs("rough"))
        waiting.wait_for(lambda: _counting_past(b, "rough", before[-1] + 2), WAIT,
                         "the counter going on on B")
    finally:
        proxy.close()
        b.kelpie("rm", "-f", "rough")


def test_source_killed_before_commit_settles_to_one_copy(pair: tuple[Daemon, Daemon]) -> None:
    a, b = pair
    ok(a.kelpie("run", "-d", "--name", "orphan", "--memory", "256", DEMO, "--", "sh", "-c",
                COUNTER))
    waiting.wait_for(lambda: _counting_past(a, "orphan", 2), WAIT, "the counter on A")
    proxy = Proxy(b.port)
    source_pid = a.home.daemon_pid()
    assert source_pid is not None

    def kill_source_on_commit(data: bytes) -> None:
        if b"/commit " in data:
            os.kill(source_pid, signal.SIGKILL)  # the commit never reaches the target

    proxy.on_request = kill_source_on_commit
    try:
        died = _teleport(a, b, "orphan", "--mode", "full", to=proxy.url)
        assert died.returncode != 0
        proxy.on_request = None
        # B restored it but nobody committed: it is not owned; A's copy is paused, not running
        assert b.listing()["orphan"]["state"] == "running"
        a.start()  # recovery asks B (through the proxy, as recorded) and commits
        assert "orphan" not in a.listing()
        assert b.listing()["orphan"]["state"] == "running"
        before = _counts(b.logs("orphan"))
        waiting.wait_for(lambda: _counting_past(b, "orphan", before[-1] + 2), WAIT,
                         "the counter going on on B")
    finally:
        proxy.close()
        b.kelpie("rm", "-f", "orphan")
        a.kelpie("rm", "-f", "orphan")


GUEST_SERVER = "while :; do echo hello from the guest | nc -l -p 8080; done"


def test_port_the_target_cannot_bind_is_refused_before_the_pause(
    pair: tuple[Daemon, Daemon],
) -> None:
    a, b = pair
    port = _free_port()
    ok(a.kelpie("run", "-d", "--name", "served", "--memory", "256", "-p", f"{port}:8080",
                DEMO, "--", "sh", "-c", GUEST_SERVER))
    try:
        # both daemons share this machine's loopback: A's VM holds the port
        refused = _teleport(a, b, "served")
        assert refused.returncode != 0
        assert f"127.0.0.1:{port}/tcp cannot be bound" in refused.stderr, refused.stderr
        assert a.listing()["served"]["state"] == "running"
    finally:
        a.kelpie("rm", "-f", "served")


def _need_root(what: str) -> None:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        real_part_missing(f"{what} needs root and iproute2 (`ip`)")


class Namespace:
    """A network namespace joined to this one by a veth pair (this side .1, there .2)."""

    def __init__(self) -> None:
        _need_root("a network namespace")
        tag = os.getpid() % 10000
        self.name = f"kelpie-tp-{tag}"
        self.here, self.there = f"ktp{tag}a", f"ktp{tag}b"
        subnet = f"10.201.{tag % 250}"
        self.address = f"{subnet}.2"
        for command in (
            ["ip", "netns", "add", self.name],
            ["ip", "netns", "exec", self.name, "ip", "link", "set", "lo", "up"],
            ["ip", "link", "add", self.here, "type", "veth", "peer", "name", self.there],
            ["ip", "link", "set", self.there, "netns", self.name],
            ["ip", "addr", "add", f"{subnet}.1/30", "dev", self.here],
            ["ip", "link", "set", self.here, "up"],
            ["ip", "netns", "exec", self.name, "ip", "addr", "add", f"{self.address}/30",
             "dev", self.there],
            ["ip", "netns", "exec", self.name, "ip", "link", "set", self.there, "up"],
        ):
            subprocess.run(command, check=True, capture_output=True, timeout=30)

    def run(self, *command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.name, *command], text=True,
                              capture_output=True, timeout=60, check=False)

    def close(self) -> None:
        for command in (["ip", "link", "del", self.here], ["ip", "netns", "del", self.name]):
            subprocess.run(command, capture_output=True, timeout=30, check=False)


def test_published_port_is_bound_again_on_a_target_in_another_namespace(
    pair: tuple[Daemon, Daemon],
) -> None:
    a, _ = pair
    namespace = Namespace()
    far = Daemon(KelpieHome(), "far")
    port = _free_port()
    try:
        far.port = _free_port()
        far.url = f"http://{namespace.address}:{far.port}"
        listen = f"{namespace.address}:{far.port}"
        command = far.home_command("daemon", "start", "--tcp", listen, "--token-file",
                                   str(far.token_file))
        started = subprocess.run(["ip", "netns", "exec", namespace.name, *command],
                                 env=far.home.env, text=True, capture_output=True,
                                 timeout=120, check=False)
        assert started.returncode == 0, started.stderr
        ok(a.kelpie("run", "-d", "--name", "web", "--memory", "256", "-p", f"{port}:8080",
                    DEMO, "--", "sh", "-c", GUEST_SERVER))
        out = ok(_teleport(a, far, "web"))  # far lacks the image: it goes along
        assert "mode: live" in out, out
        assert "web" not in a.listing()
        probe = ("import socket,sys; s=socket.create_connection(('127.0.0.1', int(sys.argv[1])),"
                 " 10); s.settimeout(10); print(s.recv(100).decode().strip())")

        def answers() -> str | None:
            reply = namespace.run(sys.executable, "-c", probe, str(port))
            return reply.stdout.strip() or None

        assert waiting.wait_for(answers, WAIT, "the guest's port in the namespace") == \
            "hello from the guest"
    finally:
        a.kelpie("rm", "-f", "web")
        far.home.close()
        namespace.close()


def test_target_killed_mid_transfer_then_back_resumes(pair: tuple[Daemon, Daemon]) -> None:
    a, b = pair
    ok(a.kelpie("run", "-d", "--name", "resumed", "--memory", "256", DEMO, "--", "sh", "-c",
                COUNTER))
    waiting.wait_for(lambda: _counting_past(a, "resumed", 2), WAIT, "the counter on A")
    proxy = Proxy(b.port)
    restarted = threading.Event()

    def kill_and_restart_target(data: bytes) -> None:
        if proxy.sent > (6 << 20) and not restarted.is_set():
            restarted.set()
            pid = b.home.daemon_pid()
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            threading.Thread(target=b.start, daemon=True).start()  # back within the retries

    proxy.on_request = kill_and_restart_target
    try:
        out = ok(_teleport(a, b, "resumed", "--mode", "full", to=proxy.url))
        assert restarted.is_set(), "the target was never killed"
        assert "mode: full" in out
        assert "resumed" not in a.listing()
        assert b.listing()["resumed"]["state"] == "running"
        before = _counts(b.logs("resumed"))
        waiting.wait_for(lambda: _counting_past(b, "resumed", before[-1] + 2), WAIT,
                         "the counter going on on B")
    finally:
        proxy.close()
        b.kelpie("rm", "-f", "resumed")
        a.kelpie("rm", "-f", "resumed")


def test_target_out_of_space_is_refused_before_the_pause(pair: tuple[Daemon, Daemon]) -> None:
    a, _ = pair
    _need_root("a small tmpfs for the target's state")
    small = Daemon(KelpieHome(), "small")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs",
                              str(small.home.state.parent)], capture_output=True, text=True,
                             timeout=30, check=False)
    assert mounted.returncode == 0, mounted.stderr
    small.token_file = small.home.run_dir / "small.token"  # the tmpfs hid the first one
    small.token_file.write_text(os.urandom(16).hex() + "\n")
    try:
        small.start()
        ok(a.kelpie("run", "-d", "--name", "big", "--memory", "256", DEMO, "--", "sleep",
                    "1000"))
        refused = _teleport(a, small, "big")
        assert refused.returncode != 0
        assert "not enough disk space" in refused.stderr, refused.stderr
        assert a.listing()["big"]["state"] == "running"
    finally:
        a.kelpie("rm", "-f", "big")
        small.home.close()
        subprocess.run(["umount", "-l", str(small.home.state.parent)], capture_output=True,
                       timeout=30, check=False)


@contextlib.contextmanager
def _host_service() -> Iterator[int]:
    """A TCP server on every address of this host that says hi; its port."""
    server = socket.create_server(("0.0.0.0", 0))
    port: int = server.getsockname()[1]

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = server.accept()
                with conn:
                    conn.sendall(b"hi\n")

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield port
    finally:
        server.close()


def _a_host_address() -> str:
    out = subprocess.run(["ip", "-j", "-4", "addr", "show"], capture_output=True, text=True,
                         check=True).stdout
    return next(a["local"] for i in json.loads(out) for a in i.get("addr_info", [])
                if not a["local"].startswith("127.") and not a["local"].startswith("10.254."))


def test_egress_rules_travel_with_the_sandbox(pair: tuple[Daemon, Daemon]) -> None:
    a, b = pair
    host = _a_host_address()
    with _host_service() as allowed, _host_service() as other:
        ok(a.kelpie("run", "-d", "--name", "fenced", "--memory", "256", "--network", "policy",
                    "--allow", f"host:{allowed}", DEMO, "--", "sleep", "100000"))
        try:
            for daemon in (a, b):
                reach = ok(daemon.kelpie("exec", "fenced", "--", "sh", "-c",
                                         f"nc -w 3 {host} {allowed} </dev/null"))
                assert reach.strip() == "hi", reach
                denied = daemon.kelpie("exec", "fenced", "--", "sh", "-c",
                                       f"nc -w 3 {host} {other} </dev/null")
                assert "hi" not in denied.stdout, denied
                if daemon is a:
                    ok(_teleport(a, b, "fenced", "--mode", "full"))
            record = json.loads(ok(b.kelpie("inspect", "fenced")))[0]
            assert record["network"] == "policy" and record["allow"] == [f"host:{allowed}"]
        finally:
            a.kelpie("rm", "-f", "fenced")
            b.kelpie("rm", "-f", "fenced")


def test_checkpoint_teleport_across_architectures_and_back(
        pair: tuple[Daemon, Daemon]) -> None:
    """x86_64 -> aarch64 -> x86_64 on one machine (each daemon runs both, aarch64 emulated):
    files, env and the main command arrive; memory modes are refused before any pause."""
    a, b = pair
    main = "uname -m; while :; do sleep 1; done"
    ok(a.kelpie("run", "-d", "--name", "xa", "--memory", "256", "-e", "COLOUR=plum",
                "--", "sh", "-c", main))  # the guest kit's userland: every arch has one
    waiting.wait_for(lambda: "x86_64" in a.logs("xa"), WAIT, "the main command on A")
    ok(a.kelpie("exec", "xa", "--", "sh", "-c",
                "mkdir -p /workspace; echo from-x86 > /workspace/f"))

    refused = _teleport(a, b, "xa", "--mode", "full", "--arch", "aarch64")
    assert refused.returncode != 0
    assert "a memory snapshot resumes only in a guest of its own architecture" in \
        refused.stderr, refused.stderr
    assert a.listing()["xa"]["state"] == "running"  # refused before anything paused

    out = ok(_teleport(a, b, "xa", "--arch", "aarch64"))
    assert "mode: checkpoint" in out and "would be aarch64 there" in out, out
    assert "arch: aarch64" in out, out
    moved = b.listing()["xa"]
    assert (moved["arch"], moved["state"]) == ("aarch64", "running")
    assert ok(b.kelpie("exec", "xa", "--", "uname", "-m")).strip() == "aarch64"
    assert ok(b.kelpie("exec", "xa", "--", "cat", "/workspace/f")).strip() == "from-x86"
    assert ok(b.kelpie("exec", "xa", "--", "sh", "-c", "echo $COLOUR")).strip() == "plum"
    waiting.wait_for(lambda: "aarch64" in b.logs("xa"), WAIT, "the main command on B")

    ok(b.kelpie("exec", "xa", "--", "sh", "-c", "echo from-arm >> /workspace/f"))
    out = ok(_teleport(b, a, "xa", "--arch", "x86_64"))
    assert "mode: checkpoint" in out, out
    assert ok(a.kelpie("exec", "xa", "--", "uname", "-m")).strip() == "x86_64"
    assert ok(a.kelpie("exec", "xa", "--", "cat", "/workspace/f")).split() == \
        ["from-x86", "from-arm"]
    ok(a.kelpie("rm", "-f", "xa"))
