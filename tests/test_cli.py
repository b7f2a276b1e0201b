"""The kelpie command: help, exit codes, errors as one line, dst summaries."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon_env import KelpieHome
from kelpie.api import ErrorBody
from kelpie.cli import main
from kelpie.cli._main import EXIT_CODES, exit_code_for
from kelpie.client import remote_error
from waiting import wait_for


@pytest.fixture(scope="module", autouse=True)
def home() -> Iterator[KelpieHome]:
    """One isolated installation (and its daemon, started by the first command)."""
    home = KelpieHome()
    saved = dict(os.environ)
    os.environ.update({k: home.env[k] for k in ("KELPIE_STATE_DIR", "KELPIE_RUNTIME_DIR")})
    try:
        yield home
    finally:
        os.environ.clear()
        os.environ.update(saved)
        home.close()


def kelpie(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kelpie", *args], capture_output=True,
                          text=True, timeout=120, check=False)


def test_help() -> None:
    proc = kelpie("--help")
    assert proc.returncode == 0
    for command in ("run", "dst", "backend"):
        assert command in proc.stdout


def test_every_command_loads_and_has_help(capfd: pytest.CaptureFixture[str]) -> None:
    from kelpie.cli import _main, _run, _sandbox, _snapshot

    listed = {c.name for c in (*_run.COMMANDS, *_sandbox.COMMANDS, *_snapshot.COMMANDS)}
    assert listed <= set(_main.COMMANDS)
    for name in _main.COMMANDS:
        assert main([name, "--help"]) == 0, name
        assert capfd.readouterr().out.startswith(f"Usage: kelpie {name}")


def test_run_mock_prints_output_and_exit_code(capfd: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--backend", "mock", "--", "echo", "hello"]) == 0
    assert capfd.readouterr().out == "hello\n"
    assert main(["run", "--backend", "mock", "--", "sh", "-c", "echo e >&2; exit 7"]) == 7
    assert capfd.readouterr().err == "e\n"
    assert main(["run", "--backend", "mock", "--", "nosuch"]) == 127


def test_run_env_and_workdir(capfd: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--backend", "mock", "-e", "A=1", "-w", "/tmp", "--", "sh", "-c",
                 "env; pwd"]) == 0
    out = capfd.readouterr().out.splitlines()
    assert "A=1" in out and out[-1] == "/tmp"


def test_bad_input_is_one_clear_error(capfd: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--backend", "mock", "--cpus", "0", "--", "true"]) == 2
    err = capfd.readouterr().err
    assert err.startswith("kelpie: error: invalid VM configuration")
    assert "vcpus is 0; allowed range is 1..32" in err and "Traceback" not in err
    assert main(["run", "--backend", "nope", "--", "true"]) == 2
    assert "unknown backend 'nope'" in capfd.readouterr().err
    assert main(["run", "--backend", "mock", "-e", "oops", "--", "true"]) == 2
    assert "expected NAME=VALUE" in capfd.readouterr().err


def test_timeout_exit_code(capfd: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--backend", "mock", "--timeout", "0.05", "--", "sleep", "5"]) == 124
    assert "timed out" in capfd.readouterr().err


def test_debug_shows_traceback(capfd: pytest.CaptureFixture[str]) -> None:
    main(["--debug", "run", "--backend", "nope", "--", "true"])
    assert "Traceback" in capfd.readouterr().err


def test_run_rm_and_ps(capfd: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--rm", "--name", "gone", "--backend", "mock", "--", "true"]) == 0
    assert main(["run", "--name", "kept", "--backend", "mock", "--", "true"]) == 0
    capfd.readouterr()
    assert main(["ps", "-a", "--json"]) == 0
    listed = {s["name"]: s for s in json.loads(capfd.readouterr().out)}
    assert "gone" not in listed and listed["kept"]["state"] == "stopped"
    assert main(["rm", "kept"]) == 0
    assert main(["inspect", "kept"]) == 125
    assert "no sandbox 'kept'" in capfd.readouterr().err


def test_no_autostart_without_daemon(capfd: pytest.CaptureFixture[str], tmp_path: object,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KELPIE_RUNTIME_DIR", f"/tmp/kelpie-none-{os.getpid()}")
    assert main(["--no-autostart", "ps"]) == 125
    assert "kelpie daemon start" in capfd.readouterr().err


def test_backend_ls_json() -> None:
    proc = kelpie("backend", "ls", "--json")
    rows = {row["name"]: row for row in json.loads(proc.stdout)}
    assert rows["mock"]["available"] is True and rows["mock"]["real"] is False
    assert rows["mock"]["auto_selected"] is False and rows["qemu"]["auto_selected"] is True
    firecracker = rows["firecracker"]  # listed with why it cannot run here, and what it can do
    assert firecracker["reason"] and "snapshot:full" in firecracker["capabilities"]


def test_dst_prints_summary() -> None:
    proc = kelpie("dst", "--seed", "7")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("seed 7: 100 steps")
    assert "invariants: all held" in proc.stdout
    bad = kelpie("dst", "--faults", "nonsense")
    assert bad.returncode == 2 and "unknown fault 'nonsense'" in bad.stderr


def test_cp_copies_directory_trees_both_ways(tmp_path: Path,
                                              capfd: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "project"
    (source / "src" / "pkg").mkdir(parents=True)
    (source / "README").write_text("top\n")
    (source / "src" / "pkg" / "mod.py").write_bytes(b"\x00code")
    (source / "src" / "run.sh").write_text("#!/bin/sh\n")
    (source / "src" / "run.sh").chmod(0o750)
    (source / "link").symlink_to("README")
    assert main(["run", "-d", "--name", "files", "--backend", "mock"]) == 0
    assert main(["exec", "files", "--", "mkdir", "/work"]) == 0
    capfd.readouterr()
    assert main(["cp", str(source), "files:/work"]) == 0  # an existing dir: lands inside
    assert "skipped 1 symbolic link" in capfd.readouterr().err
    assert main(["exec", "files", "--", "cat", "/work/project/src/pkg/mod.py"]) == 0
    assert capfd.readouterr().out == "\x00code"

    back = tmp_path / "back"
    assert main(["cp", "files:/work/project", str(back)]) == 0  # a new path: becomes the copy
    assert (back / "README").read_text() == "top\n"
    assert (back / "src" / "pkg" / "mod.py").read_bytes() == b"\x00code"
    assert (back / "src" / "run.sh").stat().st_mode & 0o777 == 0o750
    assert not (back / "link").exists()
    assert main(["cp", "files:/work/project/README", str(tmp_path)]) == 0
    assert (tmp_path / "README").read_text() == "top\n"
    assert main(["rm", "-f", "files"]) == 0


@pytest.mark.parametrize(("cls", "code"), EXIT_CODES, ids=lambda v: getattr(v, "__name__", v))
def test_a_daemons_error_exits_as_its_class_would(cls: type[BaseException], code: int) -> None:
    # the daemon names a subclass this CLI may not know, then its ancestors
    types = ["NewerThanThisCli"] + [c.__name__ for c in cls.__mro__ if c.__name__ != "object"
                                    and c.__module__.startswith("kelpie")]
    error = remote_error(500, ErrorBody(type=types[0], types=types, message="remote"))
    assert exit_code_for(error) == code


def test_network_rules_are_shown_checked_and_refused_where_unenforced(
    capfd: pytest.CaptureFixture[str],
) -> None:
    # the mock backend enforces no egress rules: a sandbox asking for some is refused
    assert main(["run", "--backend", "mock", "--network", "policy", "--allow", "pypi.org",
                 "--", "true"]) == 2
    assert "backend mock cannot enforce egress rules" in capfd.readouterr().err
    assert main(["run", "--backend", "mock", "--allow", "pypi.org:http", "--", "true"]) == 2
    assert "port 'http' is not a number" in capfd.readouterr().err
    assert main(["run", "-d", "--name", "netbox", "--backend", "mock", "--network", "nat",
                 "--", "sleep", "1000"]) == 0
    capfd.readouterr()
    try:
        assert main(["network", "netbox"]) == 0
        assert capfd.readouterr().out == "netbox: network nat\n  (no rules)\n"
        assert main(["network", "netbox", "--allow", "198.51.100.7:443"]) == 2
        assert "cannot change the network of a running sandbox" in capfd.readouterr().err
        assert main(["stop", "netbox"]) == 0
        assert main(["network", "netbox", "--mode", "policy", "--allow",
                     "198.51.100.7:443", "--deny", "*.example.org"]) == 0
        out = capfd.readouterr().out
        assert "netbox: network policy\n  allow 198.51.100.7/32:443\n" in out
        assert "  deny *.example.org\n" in out
        assert main(["network", "netbox", "--mode", "none"]) == 2
    finally:
        main(["rm", "-f", "netbox"])


def test_a_sandbox_timeout_is_set_shown_and_cleared(capfd: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "-d", "--name", "ttl", "--backend", "mock", "--sandbox-timeout",
                 "3600", "--on-timeout", "pause"]) == 0
    capfd.readouterr()
    try:
        assert main(["timeout", "ttl"]) == 0
        out = capfd.readouterr().out
        assert out.startswith("ttl: pause in ") and int(out.split()[3]) > 3500, out
        assert main(["timeout", "ttl", "120", "--on-timeout", "stop"]) == 0
        out = capfd.readouterr().out
        assert out.startswith("ttl: stop in ") and int(out.split()[3]) <= 120, out
        assert main(["timeout", "ttl", "none"]) == 0
        assert capfd.readouterr().out == "ttl: no timeout\n"
        assert main(["timeout", "ttl", "soon"]) == 2
        assert "'soon' is not a number of seconds" in capfd.readouterr().err
        assert main(["timeout", "ttl", "-5"]) != 0
    finally:
        main(["rm", "-f", "ttl"])


def test_exec_streams_output_exit_codes_and_errors(capfd: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "-d", "--name", "lines", "--backend", "mock"]) == 0
    capfd.readouterr()
    script = "echo out; echo err >&2; exit 3"
    assert main(["exec", "-e", "A=b", "lines", "--", "sh", "-c", script]) == 3
    captured = capfd.readouterr()
    assert (captured.out, captured.err) == ("out\n", "err\n")
    assert main(["exec", "--timeout", "0.1", "lines", "sleep", "5"]) == 124
    assert main(["exec", "nope", "true"]) == 125
    assert "no sandbox 'nope'" in capfd.readouterr().err


def test_exec_as_a_command_delivers_all_output_before_it_exits(tmp_path: Path) -> None:
    """The console script's exec ends its process without the interpreter's teardown:
    everything the command wrote still arrives, and its exit code is ours."""
    lines = "".join(f"{n}\n" for n in range(100_000))
    (tmp_path / "big").write_text(lines)
    assert main(["run", "-d", "--name", "piped", "--backend", "mock"]) == 0
    assert main(["cp", str(tmp_path / "big"), "piped:/tmp/big"]) == 0
    proc = kelpie("exec", "piped", "--", "sh", "-c", "cat /tmp/big; echo done >&2; exit 5")
    assert proc.returncode == 5
    assert proc.stdout == lines
    assert proc.stderr == "done\n"


def test_exec_as_a_command_still_runs_what_was_registered_to_run_at_exit(
        tmp_path: Path) -> None:
    """Ending the process early skips the interpreter's teardown, not the exit handlers
    that something else registered (here a sitecustomize, as coverage's would be)."""
    mark = tmp_path / "ran"
    (tmp_path / "sitecustomize.py").write_text(
        f"import atexit, pathlib\natexit.register(pathlib.Path({str(mark)!r}).touch)\n")
    assert main(["run", "-d", "--name", "atexit", "--backend", "mock"]) == 0
    path = os.pathsep.join([str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])])
    done = subprocess.run([sys.executable, "-m", "kelpie", "exec", "atexit", "--", "true"],
                          capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "PYTHONPATH": path})
    assert done.returncode == 0, done.stderr
    assert mark.exists()


def test_exec_runs_from_a_thread_that_cannot_take_signals() -> None:
    """Only the main thread may set signal handlers: called from another, exec runs without
    forwarding them."""
    assert main(["run", "-d", "--name", "threaded", "--backend", "mock"]) == 0
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(
        main(["exec", "threaded", "--", "sh", "-c", "exit 4"])))
    thread.start()
    thread.join(timeout=60)
    assert codes == [4]


def test_exec_forwards_sigterm_to_the_command() -> None:
    assert main(["run", "-d", "--name", "signals", "--backend", "mock"]) == 0
    child = subprocess.Popen([sys.executable, "-m", "kelpie", "exec", "signals", "--", "sh",
                              "-c", "echo ready; sleep 30"], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "ready\n"  # the command runs: its output came
        child.send_signal(signal.SIGTERM)
        # forwarded, the command ends by the signal and the CLI exits with its code; not
        # forwarded, SIGTERM would have ended the CLI itself (returncode -15)
        assert child.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        child.kill()
        child.wait()


def test_run_flags_shape_the_sandbox_as_docker_does(capfd: pytest.CaptureFixture[str],
                                                    tmp_path: Path) -> None:
    env_file = tmp_path / "env"
    env_file.write_text("# settings\nFROM_FILE=1\nBOTH=file\n\nFROM_SHELL\n")
    os.environ["FROM_SHELL"] = "shell"
    try:
        assert main(["run", "-d", "--name", "shaped", "--backend", "mock", "--hostname", "web1",
                     "--label", "team=ml", "-l", "tier=gpu", "--env-file", str(env_file),
                     "-e", "BOTH=flag", "-w", "/tmp", "--user", "root", "--memory", "1g"]) == 0
    finally:
        del os.environ["FROM_SHELL"]
    capfd.readouterr()
    assert main(["inspect", "shaped"]) == 0
    record = json.loads(capfd.readouterr().out)[0]
    assert record["labels"] == {"team": "ml", "tier": "gpu"}
    assert (record["workdir"], record["user"], record["memory_mib"]) == ("/tmp", "root", 1024)
    assert record["env"] == {"FROM_FILE": "1", "BOTH": "flag", "FROM_SHELL": "shell"}
    assert main(["exec", "shaped", "--", "sh", "-c", "pwd; hostname"]) == 0
    assert capfd.readouterr().out == "/tmp\nweb1\n"

    assert main(["run", "-d", "--name", "plain", "--backend", "mock", "-l", "team=web"]) == 0
    capfd.readouterr()
    for filters, names in ((["label=team"], {"shaped", "plain"}),
                           (["label=team=ml"], {"shaped"}),
                           (["label=team", "label=tier"], {"shaped"}),
                           (["name=pla", "name=sha"], {"shaped", "plain"}),
                           (["name=plain", "label=tier"], set())):
        args = [a for f in filters for a in ("--filter", f)]
        assert main(["ps", "-q", *args]) == 0
        listed = set(capfd.readouterr().out.split())
        assert listed == {json.loads(_inspect(n))["id"] for n in names}, filters
    assert main(["ps", "--filter", "colour=red"]) == 2
    assert "expected label=KEY" in capfd.readouterr().err
    assert main(["run", "-d", "--backend", "mock", "--env-file", str(tmp_path / "none")]) == 2
    assert "cannot read it" in capfd.readouterr().err
    assert main(["run", "-d", "--backend", "mock", "--memory", "lots"]) == 2
    assert "not a size" in capfd.readouterr().err
    assert main(["rm", "-f", "shaped", "plain"]) == 0


def _inspect(name: str) -> str:
    done = kelpie("inspect", name)
    assert done.returncode == 0, done.stderr
    return json.dumps(json.loads(done.stdout)[0])


def test_create_records_then_start_boots_with_the_main_command(
    capfd: pytest.CaptureFixture[str],
) -> None:
    assert main(["create", "--name", "later", "--backend", "mock", "--", "echo", "hi"]) == 0
    capfd.readouterr()
    assert main(["inspect", "later"]) == 0
    assert json.loads(capfd.readouterr().out)[0]["state"] == "created"
    assert main(["start", "later"]) == 0
    capfd.readouterr()
    assert main(["inspect", "later"]) == 0
    record = json.loads(capfd.readouterr().out)[0]
    assert record["state"] == "running" and record["command"] == ["echo", "hi"]
    assert main(["rm", "-f", "later"]) == 0


def test_wait_rename_port_and_exec_detached(capfd: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "-d", "--name", "waiter", "--backend", "mock", "-p", "127.0.0.1:18080:80",
                 "--", "sh", "-c", "sleep 0.2; exit 3"]) == 0
    capfd.readouterr()
    assert main(["wait", "waiter"]) == 0
    assert capfd.readouterr().out == "3\n"  # the main command's exit code
    assert main(["rename", "waiter", "waited"]) == 0
    assert main(["inspect", "waiter"]) == 125
    assert "no sandbox 'waiter'" in capfd.readouterr().err
    assert main(["port", "waited"]) == 0
    assert capfd.readouterr().out == "80/tcp -> 127.0.0.1:18080\n"
    assert main(["port", "waited", "80"]) == 0
    assert capfd.readouterr().out == "127.0.0.1:18080\n"
    assert main(["port", "waited", "81/udp"]) == 2
    assert "publishes no port 81/udp" in capfd.readouterr().err
    assert main(["run", "-d", "--name", "taken", "--backend", "mock"]) == 0
    assert main(["rename", "waited", "taken"]) == 125
    assert "already in use" in capfd.readouterr().err
    assert main(["exec", "-d", "waited", "--", "sh", "-c", "echo late > /tmp/detached"]) == 0
    capfd.readouterr()
    assert main(["exec", "waited", "cat", "/tmp/detached"]) == 0
    assert capfd.readouterr().out == "late\n"
    assert main(["exec", "-d", "-t", "waited", "true"]) == 2
    assert main(["rm", "-f", "waited", "taken"]) == 0


def test_restart_stop_timeout_and_events(capfd: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "-d", "--name", "flaky", "--backend", "mock", "--restart", "on-failure:2",
                 "--stop-timeout", "5", "--", "sh", "-c", "echo go; exit 4"]) == 0
    capfd.readouterr()
    assert main(["wait", "flaky"]) == 0
    assert capfd.readouterr().out == "4\n"
    assert main(["inspect", "flaky"]) == 0
    record = json.loads(capfd.readouterr().out)[0]
    assert (record["restart"], record["restart_count"], record["stop_timeout"]) == (
        "on-failure:2", 2, 5.0)
    assert main(["logs", "flaky"]) == 0
    assert capfd.readouterr().out == "go\n" * 3
    assert main(["events", "--since", "1h", "--until", "0s", "--filter", "sandbox=flaky",
                 "--filter", "kind=restarted", "--json"]) == 0
    lines = [json.loads(line) for line in capfd.readouterr().out.splitlines()]
    assert [(e["name"], e["kind"]) for e in lines] == [("flaky", "restarted")] * 2
    assert main(["events", "--since", "1h", "--until", "0s", "-f", "sandbox=flaky",
                 "-f", "kind=main-exited"]) == 0
    out = capfd.readouterr().out.splitlines()
    assert len(out) == 3 and all("main-exited flaky" in line and "exit code 4" in line
                                 for line in out)
    assert main(["events", "--filter", "colour=red"]) == 2
    assert "KEY one of sandbox, kind, state" in capfd.readouterr().err
    assert main(["events", "--since", "yesterday"]) == 2
    assert "expected Unix seconds" in capfd.readouterr().err
    assert main(["run", "--backend", "mock", "--restart", "always", "--", "true"]) == 2
    assert "use it with -d" in capfd.readouterr().err
    assert main(["run", "-d", "--backend", "mock", "--restart", "sometimes", "--", "true"]) == 2
    assert "allowed: no, always, on-failure" in capfd.readouterr().err
    assert main(["rm", "-f", "flaky"]) == 0


def test_kill_signal_and_attach_forwarding_ctrl_c(capfd: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "-d", "--name", "sig", "--backend", "mock", "--", "sleep", "1e6"]) == 0
    assert main(["kill", "-s", "TERM", "sig"]) == 0
    assert main(["wait", "sig"]) == 0
    assert capfd.readouterr().out.splitlines()[-1] == "143"  # 128 + SIGTERM, as sh reports
    assert main(["kill", "--signal", "TERM", "sig"]) == 1  # nothing running to signal
    assert "no main command running (it ended with exit code 143)" in capfd.readouterr().err
    assert main(["kill", "-s", "BOGUS", "sig"]) == 2
    assert "signal 'BOGUS' is not known" in capfd.readouterr().err

    assert main(["run", "-d", "--name", "ctrlc", "--backend", "mock", "--", "sleep", "1e6"]) == 0
    before = signal.getsignal(signal.SIGINT)

    def interrupt_once_attached() -> None:
        wait_for(lambda: signal.getsignal(signal.SIGINT) is not before, 60,
                 "kelpie attach to take SIGINT")
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C at the attached terminal

    interrupter = threading.Thread(target=interrupt_once_attached)
    interrupter.start()
    assert main(["attach", "ctrlc"]) == 128 + signal.SIGINT  # it reached the main command
    interrupter.join()
    assert signal.getsignal(signal.SIGINT) is before  # the terminal's Ctrl-C is back
    capfd.readouterr()
    assert main(["inspect", "ctrlc"]) == 0
    assert json.loads(capfd.readouterr().out)[0]["state"] == "running"  # the sandbox runs on
    assert main(["commit", "ctrlc", "local/nope:1"]) == 2  # no image to commit over
    assert "has no image: a commit records the changes over one" in capfd.readouterr().err
    assert main(["rm", "-f", "sig", "ctrlc"]) == 0


def test_stats_top_and_attach(capfd: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "-d", "--name", "watched", "--backend", "mock", "--memory", "256m",
                 "--", "sh", "-c", "sleep 0.5; echo late; exit 5"]) == 0
    capfd.readouterr()
    assert main(["attach", "watched"]) == 5  # the main command's exit code
    assert capfd.readouterr().out == "late\n"  # its output from the attach on
    assert main(["exec", "-d", "watched", "--", "sleep", "30"]) == 0
    capfd.readouterr()
    assert main(["stats", "--no-stream", "--json", "watched"]) == 0
    (sample,) = json.loads(capfd.readouterr().out)
    assert (sample["name"], sample["memory_limit_bytes"]) == ("watched", 256 << 20)
    assert sample["guest"]["processes"] == 2  # the mock's init and the sleep
    assert main(["stats", "--no-stream"]) == 0
    table = capfd.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["NAME", "ID", "STATE"]
    assert any(line.startswith("watched ") for line in table[1:])
    assert main(["top", "watched"]) == 0
    listing = capfd.readouterr().out.splitlines()
    assert listing[0].split() == ["UID", "PID", "PPID", "S", "STIME", "TIME", "RSS", "CMD"]
    assert [line.split()[-2:] for line in listing[1:]] == [["0B", "/sbin/init"],
                                                            ["sleep", "30"]]
    assert main(["stop", "watched"]) == 0
    assert main(["top", "watched"]) == 125
    assert "start it first" in capfd.readouterr().err
    assert main(["run", "-d", "--name", "nomain", "--backend", "mock"]) == 0
    assert main(["attach", "nomain"]) == 2
    assert "has no main command" in capfd.readouterr().err
    assert main(["rm", "-f", "watched", "nomain"]) == 0
