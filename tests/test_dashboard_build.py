"""The dashboard's committed assets are what its sources and lock file build, byte for byte
(TypeScript type-checked, then Vite), and the daemon serves exactly those files."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from conftest import real_part_missing
from kelpie.daemon._dashboard import ASSETS

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ROOT / "dashboard"
BUILT = ROOT / "src" / "kelpie" / "daemon" / "dashboard"


def _tools() -> None:
    if shutil.which("npx") is None:
        real_part_missing("Node.js and npm (apt-get install nodejs npm)")
    if not (SOURCES / "node_modules" / ".bin" / "vite").exists():
        real_part_missing("the dashboard's build tools (npm ci --prefix dashboard)")


def test_the_committed_dashboard_is_what_the_lock_file_builds(tmp_path: Path) -> None:
    _tools()
    subprocess.run(["npx", "--no-install", "tsc", "--noEmit"], cwd=SOURCES, check=True,
                   timeout=300)
    out = tmp_path / "built"
    subprocess.run(["npx", "--no-install", "vite", "build", "--logLevel", "warn",
                    "--outDir", str(out), "--emptyOutDir"], cwd=SOURCES, check=True,
                   timeout=300)
    built = {p.name: p.read_bytes() for p in out.iterdir()}
    committed = {p.name: p.read_bytes() for p in BUILT.iterdir() if p.is_file()}
    assert sorted(built) == sorted(committed)
    stale = [name for name in built if built[name] != committed[name]]
    assert not stale, f"{stale} differ from a fresh build: run `npm run build` in dashboard/"


def test_the_daemon_serves_every_built_file_and_no_other() -> None:
    assert {p.name for p in BUILT.iterdir() if p.is_file()} == {*ASSETS, "index.html"}
