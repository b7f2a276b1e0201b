"""The real ``kelpie`` command, end to end: a subprocess per command, a real daemon, real VMs.

One isolated Kelpie installation (:class:`KelpieHome`) serves the module; the demo image
(static busybox, ``scripts/demo-image.py``) is imported into it once. Each test boots as
few VMs as it can (about 3 s each under TCG) and removes what it created.

These fail instead of skipping when qemu is in KELPIE_REQUIRE_BACKENDS (CI) and no VM can boot.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pexpect
import pytest

import waiting
from daemon_env import KELPIE, KelpieHome
from vm_fixtures import demo_home

pytestmark = [pytest.mark.vm]

DEMO = "kelpie/demo"
DEMO_IMAGE_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "demo-image.py"
WAIT_SECONDS = 60.0
PROMPT = "/root # "  # busybox ash's prompt for root in the image's working directory
SANDBOX_ID = re.compile(r"[0-9a-f]{12}")

T = TypeVar("T")


# ---- the installation -------------------------------------------------------------------
@pytest.fixture(scope="module")
def home(guestkit: object) -> Iterator[KelpieHome]:
    """An isolated installation with the demo image; its daemon starts with the first run."""
    yield from demo_home()


@pytest.fixture(scope="module")
def box(home: KelpieHome) -> str:
    """A long-lived detached sandbox ``e2e-box`` for the tests that only exec into it."""
    return run_detached(home, "e2e-box", "echo ready; sleep 1000")


# ---- helpers ----------------------------------------------------------------------------
def ok(result: subprocess.CompletedProcess[str]) -> str:
    """stdout of a command that must succeed (its stderr in the failure message)."""
    assert result.returncode == 0, (
        f"{result.args[len(KELPIE):]} exited {result.returncode}\n"
        f"stdout: {result.stdout}\nstderr: {result.stderr}"
    )
    return result.stdout


def run_detached(home: KelpieHome, name: str, script: str) -> str:
    """``kelpie run -d --name NAME demo -- sh -c SCRIPT``; returns the printed id."""
    out = ok(home.kelpie("run", "-d", "--name", name, DEMO, "--", "sh", "-c", script))
    assert SANDBOX_ID.fullmatch(out.strip()), out
    return out.strip()


def listing(home: KelpieHome, *, all: bool = True) -> dict[str, dict[str, Any]]:
    """``kelpie ps [-a] --json`` by sandbox name."""
    sandboxes = json.loads(ok(home.kelpie("ps", "--json", *(["-a"] if all else []))))
    return {s["name"]: s for s in sandboxes}


def wait_for(probe: Callable[[], T | None], what: str, timeout: float = WAIT_SECONDS) -> T:
    """Poll ``probe`` until it returns something truthy; fail after ``timeout`` seconds."""
    return waiting.wait_for(probe, timeout, what, interval=0.25)


def qemu_pid(home: KelpieHome, sandbox_id: str) -> int:
    return int((home.state / "vms" / sandbox_id / "qemu.pid").read_text())


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def kill_and_wait(pid: int) -> None:
    """SIGKILL ``pid`` (not our child) and wait until it has exited."""
    fd = os.pidfd_open(pid)
    try:
        os.kill(pid, signal.SIGKILL)
        readable, _, _ = select.select([fd], [], [], WAIT_SECONDS)
        assert readable, f"process {pid} survived SIGKILL for {WAIT_SECONDS}s"
    finally:
        os.close(fd)


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single ``kelpie: error:`` line a failed command printed (no traceback)."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("kelpie: error: "), result.stderr
    return lines[0]


def spawn_in_terminal(home: KelpieHome, *args: str, rows: int = 24,
                      cols: int = 80) -> tuple[pexpect.spawn, str]:
    """``kelpie ARGS`` on a pseudo-terminal, between two ``stty -g`` of that terminal.

    A wrapping shell prints the terminal settings before and after, and exits with
    kelpie's exit code. Returns the child and the settings before; see
    :func:`finish_in_terminal`.
    """
    command = " ".join(_quote(a) for a in [*KELPIE, *args])
    script = f"stty -g; {command}; code=$?; echo; stty -g; exit $code"
    child = pexpect.spawn("sh", ["-c", script], env=home.env, encoding="utf-8",
                          timeout=WAIT_SECONDS, dimensions=(rows, cols))
    child.expect(r"([0-9a-f]+(?::[0-9a-f]+)+)\r\n")
    return child, child.match.group(1)


def finish_in_terminal(child: pexpect.spawn, settings_before: str) -> int:
    """Wait for the end; check the terminal settings are restored; return the exit code."""
    child.expect(r"\r\n([0-9a-f]+(?::[0-9a-f]+)+)\r\n")
    assert child.match.group(1) == settings_before, "terminal settings not restored"
    child.expect(pexpect.EOF)
    child.close()
    assert child.signalstatus is None
    code: int = child.exitstatus
    return code


def _quote(arg: str) -> str:
    return "'" + arg.replace("'", "'\\''") + "'"


# ---- run --------------------------------------------------------------------------------
def test_run_streams_exit_code_and_leaves_a_stopped_sandbox(home: KelpieHome) -> None:
    result = home.kelpie("run", "--name", "e2e-run", DEMO, "--",
                         "sh", "-c", "echo out; echo err >&2; exit 3")
    assert (result.returncode, result.stdout, result.stderr) == (3, "out\n", "err\n")
    assert listing(home)["e2e-run"]["state"] == "stopped"
    assert "e2e-run" not in listing(home, all=False)
    assert ok(home.kelpie("rm", "e2e-run")) == "e2e-run\n"
    assert "e2e-run" not in listing(home)


def test_build_then_run_the_image(home: KelpieHome, tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text(
        f"FROM {DEMO}\nCOPY note.txt /srv/\nRUN echo built > /srv/made && echo in-vm\n"
        "CMD [\"cat\", \"/srv/note.txt\", \"/srv/made\"]\n")
    (tmp_path / "note.txt").write_text("from the context\n")
    (tmp_path / "secret.key").write_text("never sent\n")
    (tmp_path / ".dockerignore").write_text("*.key\n")
    built = home.kelpie("build", "-t", "local/cli-built:1", str(tmp_path))
    assert built.returncode == 0, built.stderr
    assert "#3/4 [0] RUN echo built" in built.stderr and "in-vm" in built.stderr
    ran = home.kelpie("run", "--rm", "local/cli-built:1")
    assert (ran.returncode, ran.stdout) == (0, "from the context\nbuilt\n"), ran.stderr
    (tmp_path / "Dockerfile").write_text(f"FROM {DEMO}\nCOPY secret.key /\n")
    refused = home.kelpie("build", str(tmp_path))
    assert refused.returncode != 0 and "line 2: 'secret.key' is not in the build " \
        "context" in refused.stderr
    (tmp_path / "Dockerfile").write_text(f"FROM {DEMO}\nRUN echo oops >&2; exit 7\n")
    failed = home.kelpie("build", str(tmp_path))
    assert failed.returncode != 0 and "failed with exit code 7" in failed.stderr
    assert "oops" in failed.stderr


def test_run_without_double_dash_and_rm(home: KelpieHome) -> None:
    result = home.kelpie("run", "--rm", "--name", "e2e-rm", DEMO, "echo", "hi")
    assert (result.returncode, result.stdout, result.stderr) == (0, "hi\n", "")
    assert "e2e-rm" not in listing(home)


def test_run_env_and_workdir_reach_the_command(home: KelpieHome) -> None:
    result = home.kelpie("run", "--rm", "-e", "NAME=two words", "-e", "EMPTY=", "-w", "/tmp",
                         DEMO, "--", "sh", "-c",
                         'printf "%s|%s|%s|%s\\n" "$NAME" "${EMPTY-unset}" "$PATH" "$(pwd)"')
    assert (result.returncode, result.stdout, result.stderr) == (
        0, "two words||/bin|/tmp\n", "")


# ---- a detached sandbox's whole life ----------------------------------------------------
def test_detached_sandbox_lifecycle(home: KelpieHome, tmp_path: Path) -> None:
    script = "echo started; echo second; sleep 1000"
    sandbox_id = run_detached(home, "e2e-life", script)

    running = listing(home, all=False)["e2e-life"]
    assert (running["id"], running["state"]) == (sandbox_id, "running")
    assert running["command"] == ["sh", "-c", script]

    # exec: output on the right streams, the exit code, -e and -w
    result = home.kelpie("exec", "e2e-life", "--", "sh", "-c", "echo out; echo err >&2; exit 4")
    assert (result.returncode, result.stdout, result.stderr) == (4, "out\n", "err\n")
    assert ok(home.kelpie("exec", "-e", "A=1", "-w", "/tmp", "e2e-life", "--",
                          "sh", "-c", "echo $A; pwd")) == "1\n/tmp\n"
    assert ok(home.kelpie("exec", sandbox_id[:6], "echo", "by id prefix")) == "by id prefix\n"

    # logs: the main command starts in the background, so wait for its output
    wait_for(lambda: ok(home.kelpie("logs", "e2e-life")) == "started\nsecond\n",
             "the main command's output in `kelpie logs`")
    assert ok(home.kelpie("logs", "--tail", "1", "e2e-life")) == "second\n"
    assert ok(home.kelpie("logs", "--tail", "0", "e2e-life")) == ""

    # cp host -> guest (a file, then into an existing directory), and back
    payload = bytes(range(256)) * 4096 + b"tail"  # 1 MiB + 4 bytes: more than one chunk
    source = tmp_path / "payload.bin"
    source.write_bytes(payload)
    source.chmod(0o750)
    assert ok(home.kelpie("cp", str(source), "e2e-life:/tmp/copied.bin")) == ""
    assert ok(home.kelpie("cp", str(source), "e2e-life:/root")) == ""
    assert ok(home.kelpie("exec", "e2e-life", "--", "sh", "-c",
                          "wc -c < /tmp/copied.bin; wc -c < /root/payload.bin; "
                          "stat -c %a /tmp/copied.bin")) == f"{len(payload)}\n" * 2 + "750\n"
    back = tmp_path / "back.bin"
    assert ok(home.kelpie("cp", "e2e-life:/tmp/copied.bin", str(back))) == ""
    assert back.read_bytes() == payload
    umask = os.umask(0)
    os.umask(umask)
    assert back.stat().st_mode & 0o777 == 0o666 & ~umask  # not a temporary file's 0600
    into = tmp_path / "into"
    into.mkdir()
    assert ok(home.kelpie("cp", "e2e-life:/root/payload.bin", str(into))) == ""
    assert (into / "payload.bin").read_bytes() == payload
    assert sorted(p.name for p in into.iterdir()) == ["payload.bin"]  # no temporary left

    # inspect: the record and its state history
    [record] = json.loads(ok(home.kelpie("inspect", "e2e-life")))
    assert record["id"] == record["short_id"] == sandbox_id
    assert (record["name"], record["state"], record["backend"]) == ("e2e-life", "running",
                                                                    "qemu")
    assert record["image"].startswith("docker.io/kelpie/demo@sha256:")
    assert record["image"].endswith(record["image_digest"])
    assert record["command"] == ["sh", "-c", script]
    assert record["image_command"] == ["cat", "/etc/os-release"]
    assert (record["workdir"], record["env"]) == ("/root", {"PATH": "/bin"})
    assert (record["crash_reason"], record["last_error"]) == (None, None)
    assert [e["state"] for e in record["events"]] == ["created", "starting", "running"]
    # the guest's own view of its root disk: the payload copied in is on it
    assert record["disk_full"] is False and record["disk_used_bytes"] > len(payload)

    # stop, then remove
    assert ok(home.kelpie("stop", "e2e-life")) == "e2e-life\n"
    stopped = listing(home)["e2e-life"]
    assert (stopped["id"], stopped["state"]) == (sandbox_id, "stopped")
    assert "e2e-life" not in listing(home, all=False)
    assert ok(home.kelpie("logs", "e2e-life")) == "started\nsecond\n"  # kept after stop
    assert ok(home.kelpie("rm", "e2e-life")) == "e2e-life\n"
    assert "e2e-life" not in listing(home)
    gone = home.kelpie("inspect", "e2e-life")
    assert gone.returncode == 125
    assert "no sandbox 'e2e-life'" in one_error_line(gone)
    assert not (home.state / "vms" / sandbox_id).exists()


# ---- volumes ----------------------------------------------------------------------------
def test_volumes_read_write_and_read_only(home: KelpieHome, tmp_path: Path) -> None:
    shared, frozen = tmp_path / "shared", tmp_path / "frozen"
    shared.mkdir()
    frozen.mkdir()
    (shared / "from-host.txt").write_text("host data\n")
    (frozen / "keep.txt").write_text("original\n")
    home_run = home.kelpie("run", "-d", "--name", "e2e-vol", "-v", f"{shared}:/mnt/data",
                           "-v", f"{frozen}:/mnt/ro:ro", DEMO, "--", "sh", "-c",
                           "sleep 1000")
    ok(home_run)
    try:
        [record] = json.loads(ok(home.kelpie("inspect", "e2e-vol")))
        assert record["volumes"] == [
            {"host_path": str(shared), "guest_path": "/mnt/data", "read_only": False},
            {"host_path": str(frozen), "guest_path": "/mnt/ro", "read_only": True},
        ]
        # read-write: both ways, also for a file the host writes while the guest runs
        assert ok(home.kelpie("exec", "e2e-vol", "cat", "/mnt/data/from-host.txt")) \
            == "host data\n"
        ok(home.kelpie("exec", "e2e-vol", "--", "sh", "-c",
                       "echo guest data > /mnt/data/from-guest.txt"))
        assert (shared / "from-guest.txt").read_text() == "guest data\n"
        (shared / "later.txt").write_text("written later\n")
        assert ok(home.kelpie("exec", "e2e-vol", "cat", "/mnt/data/later.txt")) \
            == "written later\n"

        # read-only: readable, but neither changed nor added to
        assert ok(home.kelpie("exec", "e2e-vol", "cat", "/mnt/ro/keep.txt")) == "original\n"
        for write in ("echo changed > /mnt/ro/keep.txt", "echo new > /mnt/ro/new.txt"):
            refused = home.kelpie("exec", "e2e-vol", "--", "sh", "-c", write)
            assert refused.returncode != 0, write
            assert "Read-only file system" in refused.stderr, refused.stderr
        assert (frozen / "keep.txt").read_text() == "original\n"
        assert sorted(p.name for p in frozen.iterdir()) == ["keep.txt"]
    finally:
        ok(home.kelpie("rm", "-f", "e2e-vol"))


def test_missing_volume_directory_is_a_clear_error(home: KelpieHome, tmp_path: Path) -> None:
    before = listing(home)
    missing = tmp_path / "no-such-dir"
    result = home.kelpie("run", "--name", "e2e-novol", "-v", f"{missing}:/mnt/data", DEMO,
                         "true")
    assert result.returncode == 2
    assert str(missing) in result.stderr and "does not exist" in result.stderr
    assert result.stderr.startswith("kelpie: error: ") and "Traceback" not in result.stderr
    assert result.stdout == ""
    assert listing(home) == before


# ---- names ------------------------------------------------------------------------------
def test_name_clash_is_refused_and_the_first_sandbox_untouched(home: KelpieHome,
                                                               box: str) -> None:
    before = listing(home)
    clash = home.kelpie("run", "-d", "--name", "e2e-box", DEMO, "--", "sh", "-c",
                        "echo second; sleep 1000")
    assert clash.returncode == 125
    line = one_error_line(clash)
    assert "sandbox name 'e2e-box' is already in use" in line and box in line
    assert clash.stdout == ""
    assert listing(home) == before
    first = listing(home)["e2e-box"]
    assert (first["id"], first["state"]) == (box, "running")
    assert first["command"] == ["sh", "-c", "echo ready; sleep 1000"]
    assert ok(home.kelpie("exec", "e2e-box", "echo", "still here")) == "still here\n"


# ---- standard input ---------------------------------------------------------------------
def test_stdin_from_a_pipe_a_file_and_dev_null(home: KelpieHome, box: str,
                                               tmp_path: Path) -> None:
    cat = ["exec", "-i", "e2e-box", "--", "sh", "-c", "cat; echo end"]
    piped = home.kelpie(*cat, input="through a pipe\n", timeout=60)
    assert (piped.returncode, piped.stdout) == (0, "through a pipe\nend\n")
    source = tmp_path / "stdin.txt"
    source.write_text("from a file\n")
    with source.open("rb") as from_file:
        result = subprocess.run([*KELPIE, *cat], stdin=from_file, env=home.env, text=True,
                                capture_output=True, timeout=60, check=False)
    assert (result.returncode, result.stdout) == (0, "from a file\nend\n")
    # /dev/null cannot be watched with epoll; it must still end the command's input
    result = subprocess.run([*KELPIE, *cat], stdin=subprocess.DEVNULL, env=home.env,
                            text=True, capture_output=True, timeout=60, check=False)
    assert (result.returncode, result.stdout) == (0, "end\n")
    # without -i the command's stdin is closed at once
    closed = home.kelpie("exec", "e2e-box", "--", "sh", "-c", "cat; echo end",
                         input="not forwarded\n", timeout=60)
    assert (closed.returncode, closed.stdout) == (0, "end\n")


# ---- exit codes -------------------------------------------------------------------------
def test_exit_codes(home: KelpieHome, box: str, tmp_path: Path) -> None:
    missing = home.kelpie("exec", "e2e-box", "no-such-command")
    assert (missing.returncode, missing.stdout, missing.stderr) == (
        127, "", "no-such-command: command not found\n")
    nowhere = home.kelpie("exec", "-w", "/no/such/dir", "e2e-box", "true")
    assert nowhere.returncode != 0 and "cannot change directory to '/no/such/dir'" in \
        nowhere.stderr and "command not found" not in nowhere.stderr
    killed = home.kelpie("exec", "e2e-box", "--", "sh", "-c", "kill -9 $$")
    assert (killed.returncode, killed.stdout, killed.stderr) == (128 + 9, "", "")

    started = time.monotonic()
    timed_out = home.kelpie("exec", "--timeout", "1", "e2e-box", "--", "sh", "-c", "sleep 10")
    assert time.monotonic() - started < 8
    assert timed_out.returncode == 124
    assert "timed out after 1s" in one_error_line(timed_out)
    assert ok(home.kelpie("exec", "e2e-box", "echo", "fine")) == "fine\n"

    for args in (("exec", "no-such-box", "true"), ("logs", "no-such-box"),
                 ("inspect", "no-such-box"), ("cp", "no-such-box:/etc/os-release", str(tmp_path))):
        unknown = home.kelpie(*args)
        assert unknown.returncode == 125, args
        assert "no sandbox 'no-such-box'" in one_error_line(unknown), args
        assert unknown.stdout == "", args


# ---- daemon and VM failures -------------------------------------------------------------
def test_sandboxes_survive_a_killed_daemon(home: KelpieHome) -> None:
    names = ("e2e-k1", "e2e-k2")
    starts = [subprocess.Popen([*KELPIE, "run", "-d", "--name", name, DEMO, "--", "sh", "-c",
                                f"echo {name}; sleep 1000"],
                               env=home.env, text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE) for name in names]
    ids = {}
    for name, start in zip(names, starts, strict=True):
        out, err = start.communicate(timeout=300)
        assert start.returncode == 0, err
        ids[name] = out.strip()
    try:
        qemus = {name: qemu_pid(home, ids[name]) for name in names}
        for name in names:  # a new daemon does not capture main commands' output again
            wait_for(lambda n=name: ok(home.kelpie("logs", n)) == f"{n}\n",
                     f"the output of {name}'s main command")
        daemon = home.daemon_pid()
        assert daemon is not None
        kill_and_wait(daemon)
        assert all(alive(pid) for pid in qemus.values())

        now = listing(home, all=False)  # starts a new daemon, which re-attaches
        assert home.daemon_pid() not in (None, daemon)
        for name in names:
            assert (now[name]["id"], now[name]["state"]) == (ids[name], "running")
            assert ok(home.kelpie("exec", name, "--", "sh", "-c", "echo $((1+1))")) == "2\n"
            assert qemu_pid(home, ids[name]) == qemus[name] and alive(qemus[name])
            assert ok(home.kelpie("logs", name)) == f"{name}\n"  # kept across the restart

        # a re-attached VM (not the new daemon's child) that dies is seen crashing too
        kill_and_wait(qemus["e2e-k2"])
        crashed = wait_for(lambda: (s := listing(home)["e2e-k2"])["state"] == "crashed" and s,
                           "e2e-k2 to be marked crashed")
        assert crashed["crash_reason"]
        assert listing(home)["e2e-k1"]["state"] == "running"

        # the new daemon drives the VMs it re-attached to: stop one, remove both
        assert ok(home.kelpie("stop", "e2e-k1")) == "e2e-k1\n"
        assert listing(home)["e2e-k1"]["state"] == "stopped"
        assert not alive(qemus["e2e-k1"])
        assert ok(home.kelpie("rm", "e2e-k1", "e2e-k2")) == "e2e-k1\ne2e-k2\n"
        assert not set(names) & set(listing(home))
    finally:
        for name in names:
            home.kelpie("rm", "-f", name)


def test_killed_vm_is_marked_crashed(home: KelpieHome) -> None:
    sandbox_id = run_detached(home, "e2e-crash", "sleep 1000")
    kill_and_wait(qemu_pid(home, sandbox_id))
    crashed = wait_for(lambda: (s := listing(home)["e2e-crash"])["state"] == "crashed" and s,
                       "e2e-crash to be marked crashed")
    assert crashed["id"] == sandbox_id
    assert crashed["crash_reason"] and "exited unexpectedly" in crashed["crash_reason"]
    assert "e2e-crash" not in listing(home, all=False)
    refused = home.kelpie("exec", "e2e-crash", "true")
    assert refused.returncode == 125
    assert "crashed" in one_error_line(refused)
    # a crashed sandbox is at rest: removing it needs no -f
    assert ok(home.kelpie("rm", "e2e-crash")) == "e2e-crash\n"
    assert "e2e-crash" not in listing(home)
    assert not (home.state / "vms" / sandbox_id).exists()


# ---- terminals --------------------------------------------------------------------------
def test_run_interactive_terminal(home: KelpieHome) -> None:
    child, settings = spawn_in_terminal(home, "run", "-it", "--rm", "--name", "e2e-tty", DEMO, "--",
                              "sh")
    try:
        child.expect_exact(PROMPT)
        child.sendline("echo $((6*7))")
        child.expect(r"\r\n42\r\n")
        child.expect_exact(PROMPT)
        child.sendline("stty size")
        child.expect(r"\r\n24 80\r\n")

        child.setwinsize(40, 120)  # SIGWINCH -> kelpie -> the guest's terminal

        def resized() -> bool:
            child.expect_exact(PROMPT)
            child.sendline("stty size")
            return child.expect([r"\r\n40 120\r\n", r"\r\n\d+ \d+\r\n"]) == 0

        wait_for(resized, "the guest terminal to be 40x120", timeout=10)

        # Ctrl-C interrupts the foreground command, not the shell. The job announces itself
        # once it owns the terminal: a Ctrl-C before then would reach the shell instead.
        child.expect_exact(PROMPT)
        child.sendline("sh -c 'echo sleeping; exec sleep 100'")
        child.expect(r"\r\nsleeping\r\n")
        started = time.monotonic()
        child.sendcontrol("c")
        child.expect_exact(PROMPT)
        assert time.monotonic() - started < 30
        child.sendline("echo status=$?")
        child.expect(r"\r\nstatus=130\r\n")
        child.expect_exact(PROMPT)
        child.sendline("exit 5")
        assert finish_in_terminal(child, settings) == 5
    finally:
        child.close(force=True)
    assert "e2e-tty" not in listing(home)


def test_exec_interactive_terminal(home: KelpieHome, box: str) -> None:
    child, settings = spawn_in_terminal(home, "exec", "-it", "e2e-box", "sh", rows=30, cols=100)
    try:
        child.expect_exact(PROMPT)
        child.sendline("stty size; echo $((6*7))")
        child.expect(r"\r\n30 100\r\n42\r\n")
        child.expect_exact(PROMPT)
        child.sendline("exit 7")
        assert finish_in_terminal(child, settings) == 7
    finally:
        child.close(force=True)
    assert listing(home)["e2e-box"]["state"] == "running"
