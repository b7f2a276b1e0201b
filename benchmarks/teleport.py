"""Teleport benchmark: two real daemons on this machine, QEMU VMs, medians of several runs.

Each run moves one sandbox (the demo image, 256 MiB, a counter loop as its main command)
from daemon A to daemon B and back, in each mode being measured, and reads the report:
downtime (guest paused on the source to running on the target), total time, bytes sent.
Both daemons hold the image already, so what is sent is the sandbox's own state.

The baseline, in the same process and run: the sum of a raw snapshot + file copy +
restore of the same kind of VM through Kelpie's VM layer alone (``QemuVm.snapshot`` with
the guest left paused, ``shutil.copytree`` of the snapshot, ``QemuVm.restore`` into a new
VM + ``exec(["true"])``), i.e. what a user would do by hand without teleport. Goal for
live mode: downtime <= 0.2x that sum.

    python benchmarks/teleport.py [--runs 3] [--json benchmarks/results/teleport.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kelpie import VmConfig, VmSnapshot
from kelpie.api import SandboxCreate
from kelpie.backends.qemu._vm import QemuVm
from kelpie.client import DaemonClient
from kelpie.guestkit import build_guestkit
from kelpie.images import ImageStore, rootfs_ext4

ROOT = Path(__file__).resolve().parents[1]
MEMORY_MIB = 256
DEMO = "kelpie/demo:latest"
COUNTER = "i=0; while :; do i=$((i+1)); echo n $i; sleep 0.2; done"
LIVE_GOAL = 0.2


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


class Daemon:
    def __init__(self, base: Path, name: str) -> None:
        self.state = base / name / "state"
        self.run_dir = Path(tempfile.mkdtemp(prefix=f"kb{name}", dir="/tmp"))
        self.token_file = base / name / "token"
        self.token_file.parent.mkdir(parents=True)
        self.token_file.write_text(os.urandom(16).hex())
        with __import__("socket").socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "KELPIE_STATE_DIR": str(self.state),
                    "KELPIE_RUNTIME_DIR": str(self.run_dir)}
        self.env.pop("KELPIE_HOST", None)

    def kelpie(self, *args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "kelpie", *args], env=self.env, text=True,
                              capture_output=True, timeout=600, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"kelpie {' '.join(args)}: {done.stderr}")
        return done.stdout

    def client(self) -> DaemonClient:
        return DaemonClient(f"unix://{self.run_dir / 'kelpie.sock'}")

    @property
    def token(self) -> str:
        return self.token_file.read_text().strip()


async def baseline(kit: Any, tmp: Path, root_disk: Path, runs: int) -> dict[str, Any]:
    """Raw snapshot + copy + restore through the VM layer, the guest paused throughout."""
    sums, parts = [], []
    for i in range(runs):
        vm = QemuVm(VmConfig(memory_mib=MEMORY_MIB, root_disk=root_disk), kit=kit,
                    workdir=tmp / f"base-src{i}")
        await vm.start()
        await vm.exec(["true"])
        started = time.perf_counter()
        snapshot = await vm.snapshot(tmp / f"snap{i}", leave_paused=True)
        saved = time.perf_counter()
        copy = tmp / f"copy{i}"
        await asyncio.to_thread(shutil.copytree, snapshot.path, copy)
        copied = time.perf_counter()
        target = QemuVm(VmConfig(memory_mib=MEMORY_MIB, root_disk=root_disk), kit=kit,
                        workdir=tmp / f"base-dst{i}")
        await target.restore(VmSnapshot.open(copy))
        await target.exec(["true"])
        restored = time.perf_counter()
        size = sum(b.size for b in snapshot.manifest.blobs.values())
        sums.append(restored - started)
        parts.append({"snapshot_s": saved - started, "copy_s": copied - saved,
                      "restore_s": restored - copied, "bytes": size})
        await vm.stop(force=True)
        await target.stop(force=True)
        shutil.rmtree(snapshot.path)
        shutil.rmtree(copy)
    return {"sum_s": median(sums), "snapshot_bytes": median([p["bytes"] for p in parts]),
            "samples": parts}


async def teleports(a: Daemon, b: Daemon, mode: str, runs: int) -> dict[str, Any]:
    downtime, total, sent = [], [], []
    ran = set()
    async with a.client() as client_a, b.client() as client_b:
        box = await client_a.create(SandboxCreate(
            name=f"bench-{mode}", image=DEMO, memory_mib=MEMORY_MIB,
            command=["sh", "-c", COUNTER]))
        here, there = (client_a, a), (client_b, b)
        try:
            for _ in range(runs * 2):
                client, _ = here
                await asyncio.sleep(1.0)  # let the guest run between moves
                report = await client.teleport(box.id, there[1].url, token=there[1].token,
                                               mode=mode)
                ran.add(report.mode.value)
                downtime.append(report.downtime_s)
                total.append(report.total_s)
                sent.append(report.bytes_sent)
                here, there = there, here
        finally:
            await here[0].remove(box.id, force=True)
    return {"modes_ran": sorted(ran), "downtime_s": median(downtime), "total_s": median(total),
            "bytes_sent": median(sent),
            "samples": {"downtime_s": downtime, "total_s": total, "bytes_sent": sent}}


def start_daemons(base: Path) -> tuple[Daemon, Daemon]:
    """Two daemons on loopback TCP with tokens, each holding the demo image."""
    a, b = Daemon(base, "a"), Daemon(base, "b")
    layout = base / "demo-layout"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "demo-image.py"), str(layout)],
                   check=True, timeout=120)
    for daemon in (a, b):
        daemon.kelpie("image", "import", str(layout), "--reference", DEMO)
        daemon.kelpie("daemon", "start", "--tcp", f"127.0.0.1:{daemon.port}",
                      "--token-file", str(daemon.token_file))
    return a, b


def stop_daemons(base: Path, daemons: Sequence[Daemon]) -> None:
    for daemon in daemons:
        subprocess.run([sys.executable, "-m", "kelpie", "--no-autostart", "daemon", "stop",
                        "--stop-sandboxes"], env=daemon.env, capture_output=True,
                       timeout=120, check=False)
        shutil.rmtree(daemon.run_dir, ignore_errors=True)
    shutil.rmtree(base, ignore_errors=True)


async def measure(a: Daemon, b: Daemon, base: Path, runs: int,
                  modes: list[str]) -> dict[str, Any]:
    kit = build_guestkit()
    store = ImageStore(a.state / "images")
    root_disk = await asyncio.to_thread(rootfs_ext4, store, store.resolve(DEMO))
    figures: dict[str, Any] = {"baseline": await baseline(kit, base / "vm", root_disk, runs)}
    for mode in modes:
        figures[mode] = await teleports(a, b, mode, runs)
        figures[mode]["downtime_vs_baseline"] = (figures[mode]["downtime_s"]
                                                 / figures["baseline"]["sum_s"])
        figures[mode]["bytes_vs_snapshot"] = (figures[mode]["bytes_sent"]
                                              / figures["baseline"]["snapshot_bytes"])
    if "live" in figures:
        figures["live"]["goal_ratio"] = LIVE_GOAL
        figures["live"]["goal_met"] = figures["live"]["downtime_vs_baseline"] <= LIVE_GOAL
    return figures


def table(figures: dict[str, Any]) -> str:
    base = figures["baseline"]
    lines = [
        "| what | downtime (s) | vs snapshot+copy+restore | total (s) | bytes sent | vs full "
        "snapshot |",
        "|---|---|---|---|---|---|",
        f"| raw snapshot + copy + restore (baseline) | {base['sum_s']:.2f} | 1.00 | "
        f"{base['sum_s']:.2f} | {base['snapshot_bytes'] / 2**20:.1f} MiB | 1.00 |",
    ]
    for mode in ("live", "full", "checkpoint"):
        if mode in figures:
            f = figures[mode]
            lines.append(
                f"| teleport {mode} (ran: {', '.join(f['modes_ran'])}) | {f['downtime_s']:.2f} "
                f"| {f['downtime_vs_baseline']:.2f} | {f['total_s']:.2f} | "
                f"{f['bytes_sent'] / 2**20:.1f} MiB | {f['bytes_vs_snapshot']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--modes", default="full,checkpoint",
                        help="comma-separated: live, full, checkpoint")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/teleport.json")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="kelpie-bench-teleport-"))
    daemons: tuple[Daemon, ...] = ()
    try:
        daemons = start_daemons(base)
        figures = asyncio.run(measure(*daemons, base, args.runs, args.modes.split(",")))
    finally:
        stop_daemons(base, daemons)
    figures["host"] = {"machine": platform.machine(), "cpus": os.cpu_count(),
                       "python": platform.python_version(), "runs": args.runs,
                       "memory_mib": MEMORY_MIB}
    print(table(figures))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
