"""``kelpie image`` end to end: the real command against a real registry and a layout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import real_part_missing
from fixtures.images import tarbuild
from registry_server import RunningRegistry, missing_tools, start_registry


def kelpie(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KELPIE_STATE_DIR": str(state)}
    return subprocess.run([sys.executable, "-m", "kelpie", *args], capture_output=True,
                          text=True, env=env, timeout=120, check=False)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRegistry]:
    missing = missing_tools()
    if missing:
        real_part_missing(f"needs {', '.join(missing)} (see scripts/setup)")
    work = tmp_path_factory.mktemp("cli-registry")
    tarbuild.write_oci_layout(work / "layout", [[tarbuild.file("hello.txt", "hi\n")]], tag="v1")
    running = start_registry(work / "registry")
    try:
        running.push(work / "layout", "v1", "cli/hello")
        yield running
    finally:
        running.stop()


def test_pull_ls_inspect_rm(registry: RunningRegistry, tmp_path: Path) -> None:
    ref = f"{registry.address}/cli/hello:v1"
    pulled = kelpie(tmp_path, "image", "pull", ref)
    assert pulled.returncode == 0, pulled.stderr
    image_id, digest = pulled.stdout.split()
    assert digest.startswith("sha256:") and digest.removeprefix("sha256:").startswith(image_id)

    listed = json.loads(kelpie(tmp_path, "image", "ls", "--json").stdout)
    assert [i["tags"] for i in listed] == [[ref]]
    inspected = json.loads(kelpie(tmp_path, "image", "inspect", image_id[:6]).stdout)
    assert inspected["digest"] == digest and inspected["platform"] == "linux/amd64"
    assert len(inspected["layers"]) == 1

    removed = kelpie(tmp_path, "image", "rm", ref)
    assert removed.returncode == 0 and digest in removed.stdout
    assert json.loads(kelpie(tmp_path, "image", "ls", "--json").stdout) == []


def test_push_a_pulled_image_to_another_repository(registry: RunningRegistry,
                                                   tmp_path: Path) -> None:
    ref = f"{registry.address}/cli/hello:v1"
    assert kelpie(tmp_path, "image", "pull", ref).returncode == 0
    copy = f"{registry.address}/cli/copy:v2"
    pushed = kelpie(tmp_path, "image", "push", ref, copy)
    assert pushed.returncode == 0, pushed.stderr
    digest = json.loads(kelpie(tmp_path, "image", "inspect", ref).stdout)["digest"]
    assert pushed.stdout == f"{copy}@{digest}\n"
    assert "0 blobs sent (0 bytes), 2 mounted, 0 already there" in pushed.stderr
    again = kelpie(tmp_path, "image", "push", ref)  # to its own name: all there already
    assert again.returncode == 0 and "2 already there" in again.stderr
    assert again.stdout == f"{ref}@{digest}\n"
    unknown = kelpie(tmp_path, "image", "push", "nope:1", copy)
    assert unknown.returncode == 125 and "nope" in unknown.stderr


def test_import_layout_and_clear_errors(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    tarbuild.write_oci_layout(layout, [[tarbuild.file("a", "b")]])
    imported = kelpie(tmp_path / "state", "image", "import", str(layout), "--reference",
                      "local/thing:1")
    assert imported.returncode == 0, imported.stderr
    assert "docker.io/local/thing:1" in imported.stdout
    missing = kelpie(tmp_path / "state", "image", "inspect", "nope:1")
    assert missing.returncode == 125 and missing.stderr.startswith("kelpie: error:")
    bad = kelpie(tmp_path / "state", "image", "pull", "UPPER/Case")
    assert bad.returncode == 2 and "kelpie: error:" in bad.stderr
    assert "Traceback" not in bad.stderr + missing.stderr


def test_image_commands_and_run_against_a_daemon(registry: RunningRegistry,
                                                 tmp_path: Path) -> None:
    """With --host, images live in the daemon's store; `run` makes the daemon pull."""
    from daemon_env import KelpieHome

    home = KelpieHome()
    try:
        assert home.kelpie("daemon", "start").returncode == 0
        host = ("--host", f"unix://{home.socket}")
        ref = f"{registry.address}/cli/hello:v1"
        ran = kelpie(tmp_path, *host, "run", "--rm", "--backend", "mock", ref, "--",
                     "echo", "ran")  # (the mock guest does not read the image's files)
        assert ran.returncode == 0, ran.stderr
        assert ran.stdout == "ran\n" and "the daemon is pulling" in ran.stderr
        listed = json.loads(kelpie(tmp_path, *host, "image", "ls", "--json").stdout)
        assert [i["tags"] for i in listed] == [[ref]]
        assert json.loads(kelpie(tmp_path, "image", "ls", "--json").stdout) == []  # local
        inspected = json.loads(kelpie(tmp_path, *host, "image", "inspect", ref).stdout)
        assert inspected["digest"] == listed[0]["digest"]
        again = kelpie(tmp_path, *host, "image", "pull", ref)
        assert again.returncode == 0 and listed[0]["digest"] in again.stdout
        pushed = kelpie(tmp_path, *host, "image", "push", ref, f"{registry.address}/d/copy:1")
        assert pushed.returncode == 0, pushed.stderr  # by the daemon, from its store
        assert pushed.stdout == f"{registry.address}/d/copy:1@{listed[0]['digest']}\n"
        assert "2 mounted" in pushed.stderr
        removed = kelpie(tmp_path, *host, "image", "rm", ref)
        assert removed.returncode == 0 and listed[0]["digest"] in removed.stdout
        refused = kelpie(tmp_path, *host, "image", "import", str(tmp_path))
        assert refused.returncode == 2 and "push the image to a registry" in refused.stderr
    finally:
        home.close()
