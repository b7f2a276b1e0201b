"""What a command costs through the CLI: ``kelpie exec`` of ``true`` against its floors.

Same run, alternating, each a fresh process (as an agent shelling out pays it):

- ``kelpie exec BOX -- true`` (the installed ``kelpie`` script, not a pyenv shim);
- the same REST call made by ``curl`` on the daemon's unix socket (``POST .../exec``);
- ``kelpie --version`` (the CLI's start-up: interpreter, click, our entry point);
- ``python3 -c pass`` (the interpreter alone);
- ``--version`` run in-process with and without the interpreter's teardown at exit, which
  ``kelpie exec`` skips (``os._exit`` once its output is flushed) and ``--version`` pays:
  the table also gives exec's ratio to a ``--version`` without it.

Goals: exec within 1.3x of ``--version``; ``--version`` within 2x of ``python3 -c pass``.
Also printed: what ``kelpie exec`` imports (``-X importtime``). The sandbox is a real QEMU
VM (TCG) from the demo image.

    python benchmarks/cli.py [--runs 15] [--json benchmarks/results/cli_exec.json]
        [--python VENV/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "kelpie/demo:latest"
BOX = "bench"


VERSION = "from kelpie.cli import main; code = main(['--version'])"
NO_TEARDOWN = "; import os, sys; sys.stdout.flush(); os._exit(code)"


def kelpie_script(python: str) -> list[str]:
    """The console script next to ``python`` (a shim would add its own start-up)."""
    script = Path(python).parent / "kelpie"
    return [str(script)] if script.exists() else [python, "-m", "kelpie"]


def timed(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def import_ms(python: str, argv: list[str], env: dict[str, str]) -> dict[str, float]:
    """Cumulative import time (ms) of the top-level modules ``argv`` imports."""
    done = subprocess.run([python, "-X", "importtime", *argv], env=env, check=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    top: dict[str, float] = {}
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = line.split("|")
        if not name.startswith("  ") and cumulative.strip().isdigit():
            top[name.strip()] = int(cumulative) / 1000
    return dict(sorted(top.items(), key=lambda kv: -kv[1])[:6])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/cli_exec.json")
    parser.add_argument("--python", default=sys.executable,
                        help="the interpreter whose CLI is measured, e.g. a clean venv's with "
                             "kelpie, click and h11 (default: this one, which runs the daemon)")
    args = parser.parse_args()
    if shutil.which("curl") is None:
        sys.exit("benchmarks/cli.py needs curl (apt-get install curl)")

    home = Path(tempfile.mkdtemp(prefix="kelpie-bench-"))
    run_dir = Path(tempfile.mkdtemp(prefix="kb", dir="/tmp"))
    env = dict(os.environ, KELPIE_STATE_DIR=str(home / "state"), KELPIE_RUNTIME_DIR=str(run_dir))
    # As installed: modules load from their cached bytecode (written by the warm-up runs
    # below), not compiled from source on every start.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    python = args.python
    kelpie = kelpie_script(python)
    setup = [sys.executable, "-m", "kelpie"]  # the daemon's side needs everything installed
    socket_path = run_dir / "kelpie.sock"
    curl = ["curl", "-sf", "--unix-socket", str(socket_path), "-H",
            "Content-Type: application/json", "-d", '{"argv": ["true"]}',
            f"http://kelpie/v1/sandboxes/{BOX}/exec"]
    cases = {
        "kelpie exec": [*kelpie, "exec", BOX, "--", "true"],
        "REST call (curl)": curl,
        "kelpie --version": [*kelpie, "--version"],
        "python3 -c pass": [python, "-c", "pass"],
        # what the interpreter's teardown costs --version: exec's fast path skips it
        "--version in-process": [python, "-c", VERSION],
        "--version in-process, no teardown": [python, "-c", VERSION + NO_TEARDOWN],
    }
    samples: dict[str, list[float]] = {name: [] for name in cases}
    try:
        layout = home / "layout"
        subprocess.run([sys.executable, str(ROOT / "scripts/demo-image.py"), str(layout)],
                       check=True, stdout=subprocess.DEVNULL)
        subprocess.run([*setup, "image", "import", str(layout), "--reference", IMAGE],
                       env=env, check=True, stdout=subprocess.DEVNULL)
        subprocess.run([*setup, "run", "-d", "--name", BOX, IMAGE, "--", "sleep", "86400"],
                       env=env, check=True, stdout=subprocess.DEVNULL)
        for argv in cases.values():  # warm the page cache and the daemon's paths
            timed(argv, env)
        for _ in range(args.runs):
            for name, argv in cases.items():
                samples[name].append(timed(argv, env))
        entry = kelpie[1:] if kelpie[0] == python else kelpie
        imports = import_ms(python, [*entry, "exec", BOX, "--", "true"], env)
    finally:
        subprocess.run([*setup, "--no-autostart", "daemon", "stop", "--stop-sandboxes"],
                       env=env, check=False, stdout=subprocess.DEVNULL)
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(run_dir, ignore_errors=True)

    median = {name: statistics.median(values) for name, values in samples.items()}
    results: dict[str, Any] = {
        "runs": args.runs,
        "python": python,
        "median_s": median,
        "exec_over_version": median["kelpie exec"] / median["kelpie --version"],
        "version_over_python": median["kelpie --version"] / median["python3 -c pass"],
        "teardown_s": median["--version in-process"]
        - median["--version in-process, no teardown"],
        "exec_imports_ms": imports,
        "samples": samples,
    }
    print(table(results))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.json} ({args.runs} runs, medians)")


def table(results: dict[str, Any]) -> str:
    m = results["median_s"]
    rows = [
        ("`kelpie exec BOX -- true`", f"{m['kelpie exec'] * 1e3:.0f} ms",
         f"`kelpie --version` {m['kelpie --version'] * 1e3:.0f} ms",
         f"{results['exec_over_version']:.2f}x (goal <= 1.3x)"),
        ("`kelpie --version`", f"{m['kelpie --version'] * 1e3:.0f} ms",
         f"`python3 -c pass` {m['python3 -c pass'] * 1e3:.0f} ms",
         f"{results['version_over_python']:.2f}x (goal <= 2x)"),
        ("the same exec as a REST call (curl)", f"{m['REST call (curl)'] * 1e3:.0f} ms", "", ""),
        ("interpreter teardown, which `kelpie exec` skips and `--version` pays",
         f"{results['teardown_s'] * 1e3:.0f} ms", "",
         f"exec {m['kelpie exec'] / (m['kelpie --version'] - results['teardown_s']):.2f}x "
         "of --version without it"),
    ]
    lines = ["| figure | Kelpie | baseline (same run) | ratio |", "|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    imports = ", ".join(f"{name} {ms:.0f}" for name, ms in results["exec_imports_ms"].items())
    lines.append(f"\nimports of `kelpie exec` (ms, cumulative): {imports}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
