"""The simulator's checks are sharp: a real bug in a snapshot check makes it fail.

Each bug is applied to a copy of the source tree (never to the tree under test) and the
simulator is run on the copy in a subprocess, exactly as a developer would run it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
SNAPSHOT_MODULE = Path("kelpie") / "vm" / "_snapshot.py"

BUGS = {
    # the line that checks a blob's sha256, and the one that checks its size
    "sha256 check off": ("    if sha and sha != info.sha256:\n", "    if False:\n"),
    "size check off": ("    if size != info.size:\n        raise BlobSizeMismatch(",
                       "    if False:\n        raise BlobSizeMismatch("),
}
SEEDS = "30"


def _copy_with(tmp_path: Path, bug: tuple[str, str] | None) -> Path:
    copy = tmp_path / "src"
    shutil.copytree(SRC, copy, ignore=shutil.ignore_patterns("__pycache__"))
    if bug is not None:
        module = copy / SNAPSHOT_MODULE
        text = module.read_text()
        line, replacement = bug
        assert text.count(line) == 1, f"the line to break is not in {SNAPSHOT_MODULE} once"
        module.write_text(text.replace(line, replacement))
    return copy


def _simulate(copy: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(copy)}
    return subprocess.run(
        [sys.executable, "-m", "kelpie.dst", "--seeds", SEEDS, "--faults", "all", *args],
        env=env, capture_output=True, text=True, check=False,
    )


def test_the_unbroken_copy_passes(tmp_path: Path) -> None:
    proc = _simulate(_copy_with(tmp_path, None))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{SEEDS} passed, 0 failed" in proc.stdout


@pytest.mark.parametrize("bug", sorted(BUGS))
def test_the_simulator_fails_with_a_snapshot_check_off(tmp_path: Path, bug: str) -> None:
    copy = _copy_with(tmp_path, BUGS[bug])
    proc = _simulate(copy)
    assert proc.returncode == 1, proc.stdout
    assert "[fault-caught-by-its-check]" in proc.stdout
    assert str(copy) in subprocess.run(  # the copy ran, not the tree under test
        [sys.executable, "-c", "import kelpie; print(kelpie.__file__)"],
        env={**os.environ, "PYTHONPATH": str(copy)}, capture_output=True, text=True,
        check=True,
    ).stdout
