"""The simulator's checks are sharp: a real bug makes it fail.

Each bug is applied to a copy of the source tree (never to the tree under test) and the
simulator is run on the copy in a subprocess, exactly as a developer would run it: two
snapshot checks turned off (each scenario must notice), and two crash-recovery bugs of the
runtime (the runtime scenario must notice).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
SNAPSHOT = "kelpie/vm/_snapshot.py"
RUNTIME_SNAPSHOTS = "kelpie/runtime/_snapshots.py"


@dataclasses.dataclass(frozen=True)
class Bug:
    module: str
    line: str
    replacement: str


BUGS = {
    "sha256 check off": Bug(SNAPSHOT, "    if sha and sha != info.sha256:\n", "    if False:\n"),
    "size check off": Bug(SNAPSHOT, "    if size != info.size:\n        raise BlobSizeMismatch(",
                          "    if False:\n        raise BlobSizeMismatch("),
    # recovery deletes a snapshot whose removal crashed before its record was deleted
    "trashed snapshot not put back": Bug(
        RUNTIME_SNAPSHOTS,
        "            if entry.startswith(TRASH_PREFIX) and trashed in known and trashed not "
        "in entries:\n",
        "            if False:\n"),
    # a snapshot whose VM failed after it was written is left behind, whole but unrecorded
    "failed snapshot left behind": Bug(
        RUNTIME_SNAPSHOTS,
        "                _remove_quietly(ctx.storage, dest, only_if_there=True)\n",
        "                pass\n"),
}

RUNS = {  # (bug, simulator arguments): each bug with each scenario meant to catch it
    ("sha256 check off", "vm"): ["--seeds", "30", "--faults", "all"],
    ("size check off", "vm"): ["--seeds", "30", "--faults", "all"],
    ("sha256 check off", "runtime"): ["--scenario", "runtime", "--seeds", "56"],
    ("size check off", "runtime"): ["--scenario", "runtime", "--seeds", "56"],
    ("trashed snapshot not put back", "runtime"):
        ["--scenario", "runtime", "--seeds", "28", "--faults", "none"],
    ("failed snapshot left behind", "runtime"):
        ["--scenario", "runtime", "--seeds", "28", "--faults", "none"],
}
INVARIANT = {
    "sha256 check off": "[fault-caught-by-its-check]",
    "size check off": "[fault-caught-by-its-check]",
    "trashed snapshot not put back": "[no-valid-looking-leftover]",
    "failed snapshot left behind": "[no-valid-looking-leftover]",
}


def _copy_with(tmp_path: Path, bug: Bug | None) -> Path:
    copy = tmp_path / "src"
    shutil.copytree(SRC, copy, ignore=shutil.ignore_patterns("__pycache__"))
    if bug is not None:
        module = copy / bug.module
        text = module.read_text()
        assert text.count(bug.line) == 1, f"the line to break is not in {bug.module} once"
        module.write_text(text.replace(bug.line, bug.replacement))
    return copy


def _simulate(copy: Path, args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kelpie.dst", *args],
        env={**os.environ, "PYTHONPATH": str(copy)}, capture_output=True, text=True,
        check=False, timeout=600,
    )


@pytest.mark.parametrize("scenario", ["vm", "runtime"])
def test_the_unbroken_copy_passes(tmp_path: Path, scenario: str) -> None:
    copy = _copy_with(tmp_path, None)
    runs = {tuple(args) for (_, run_scenario), args in RUNS.items() if run_scenario == scenario}
    for args in sorted(runs):
        proc = _simulate(copy, list(args))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert " passed, 0 failed" in proc.stdout


@pytest.mark.parametrize(("bug", "scenario"), sorted(RUNS))
def test_the_simulator_fails_with_the_bug(tmp_path: Path, bug: str, scenario: str) -> None:
    copy = _copy_with(tmp_path, BUGS[bug])
    proc = _simulate(copy, RUNS[bug, scenario])
    assert proc.returncode == 1, proc.stdout
    assert INVARIANT[bug] in proc.stdout
    where = subprocess.run(  # the copy ran, not the tree under test
        [sys.executable, "-c", "import kelpie; print(kelpie.__file__)"],
        env={**os.environ, "PYTHONPATH": str(copy)}, capture_output=True, text=True,
        check=True,
    )
    assert where.stdout.startswith(str(copy))
