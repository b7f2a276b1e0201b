"""`kelpie run --rm IMAGE -- true` through the CLI and daemon vs the in-process SDK.

Both boot a real VM from the same image (the demo busybox image), run ``true`` in it and
remove it. The CLI runs are separate processes talking to an already running daemon (the
cold start of the daemon itself is reported once, apart); the SDK runs are
``Sandbox.create(...)`` + ``exec`` + ``remove`` in this process. Runs alternate; figures are
medians, the ratio is CLI / SDK from the same run.

    python benchmarks/cli_vs_sdk.py [--runs 5] [--json benchmarks/results/cli.json]
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


def kelpie(*args: str, env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "kelpie", *args], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def sdk_run() -> float:
    from kelpie import Sandbox

    started = time.perf_counter()
    with Sandbox.create(IMAGE) as box:
        box.exec(["true"])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/cli.json")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="kelpie-bench-"))
    run_dir = Path(tempfile.mkdtemp(prefix="kb", dir="/tmp"))
    os.environ["KELPIE_STATE_DIR"] = str(home / "state")
    os.environ["KELPIE_RUNTIME_DIR"] = str(run_dir)
    env = dict(os.environ)
    try:
        layout = home / "layout"
        subprocess.run([sys.executable, str(ROOT / "scripts/demo-image.py"), str(layout)],
                       check=True, stdout=subprocess.DEVNULL)
        kelpie("image", "import", str(layout), "--reference", IMAGE, env=env)
        cold = kelpie("run", "--rm", IMAGE, "--", "true", env=env)  # starts the daemon too
        cli: list[float] = []
        sdk: list[float] = []
        sdk_run()  # warm the in-process runtime (imports, KVM probe cache, root disk cache)
        for _ in range(args.runs):
            cli.append(kelpie("run", "--rm", IMAGE, "--", "true", env=env))
            sdk.append(sdk_run())
        noop = [kelpie("--version", env=env) for _ in range(args.runs)]
    finally:
        subprocess.run([sys.executable, "-m", "kelpie", "--no-autostart", "daemon", "stop",
                        "--stop-sandboxes"], env=env, check=False, stdout=subprocess.DEVNULL)
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(run_dir, ignore_errors=True)

    cli_s, sdk_s, noop_s = (statistics.median(x) for x in (cli, sdk, noop))
    results: dict[str, Any] = {
        "runs": args.runs,
        "cli_run_rm_true_s": cli_s,
        "sdk_create_exec_remove_s": sdk_s,
        "ratio_cli_over_sdk": cli_s / sdk_s,
        "cli_overhead_s": cli_s - sdk_s,
        "cli_process_startup_s": noop_s,
        "first_cli_run_with_daemon_start_s": cold,
        "samples": {"cli": cli, "sdk": sdk, "cli_version": noop},
    }
    print(f"{'figure':44} {'value':>10}")
    print(f"{'CLI run --rm IMAGE -- true (daemon up)':44} {cli_s:9.2f}s")
    print(f"{'SDK create + exec true + remove':44} {sdk_s:9.2f}s")
    print(f"{'ratio CLI / SDK':44} {cli_s / sdk_s:9.2f}x")
    print(f"{'  of which `kelpie --version` startup':44} {noop_s:9.2f}s")
    print(f"{'first CLI run, daemon autostarted':44} {cold:9.2f}s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
