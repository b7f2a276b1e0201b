"""QEMU snapshot benchmarks, each figure a median of several runs with a same-run baseline.

- snapshot: ``QemuVm.snapshot`` of a running 512 MiB VM (pause, save the memory and
  devices, hash and fsync the blob, write the manifest, resume), vs the bare QMP sequence
  on the same VM: ``stop``, ``migrate`` to ``exec:cat > FILE`` with the same
  ``max-bandwidth`` Kelpie sets, wait for ``completed`` (and for QEMU to leave
  ``finish-migrate``), ``cont``. Time (the guest is paused for all of it) and bytes.
- restore: ``restore`` of that snapshot into a new QemuVm + ``exec(["true"])``, vs a cold
  ``start`` + ``exec(["true"])`` of the same configuration. Goal: <= 0.25x of cold boot.
- throughput: sandboxes started per minute through the Runtime, ``create(template=...)``
  vs ``create(...)``: one at a time (each timed until it runs, then removed), and 4
  concurrent creates (wall time of the batch). Isolated data dir, cached guest kit; the
  first create there (which probes the accelerator: no cached verdict yet) is apart.

Runs alternate Kelpie and baseline; figures are medians, ratios are from the same run.

    python benchmarks/snapshots.py [--runs 5] [--json benchmarks/results/snapshots.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from kelpie import VmConfig, VmSnapshot
from kelpie.backends.qemu._vm import QemuVm
from kelpie.guestkit import GuestKit, build_guestkit
from kelpie.runtime import Runtime

ROOT = Path(__file__).resolve().parents[1]
MEMORY_MIB = 512
RESTORE_GOAL = 0.25
CONCURRENT = 4
SETTLE_S = 2.0
"""Seconds a freshly booted guest is left alone before it is snapshotted."""


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


async def raw_snapshot(vm: QemuVm, path: Path, bandwidth: int) -> float:
    """Seconds for stop + migrate to ``exec:cat > path`` + cont, straight over QMP."""
    qmp = vm._qmp
    assert qmp is not None
    started = time.perf_counter()
    await qmp.execute("stop")
    await qmp.execute("migrate-set-parameters", {"max-bandwidth": bandwidth})
    await qmp.execute("migrate", {"uri": f"exec:cat > {shlex.quote(str(path))}"})
    while True:
        info = await qmp.execute("query-migrate")
        assert isinstance(info, dict)
        if info.get("status") in ("completed", "failed", "cancelled"):
            break
        await asyncio.sleep(0.005)
    assert info["status"] == "completed", info
    while True:  # "completed" comes before QEMU leaves finish-migrate; cont fails until then
        status = await qmp.execute("query-status")
        if not isinstance(status, dict) or status.get("status") != "finish-migrate":
            break
        await asyncio.sleep(0.005)
    await qmp.execute("cont")
    return time.perf_counter() - started


async def snapshot_figures(
    kit: GuestKit, tmp: Path, runs: int
) -> tuple[dict[str, Any], VmSnapshot]:
    vm = QemuVm(VmConfig(memory_mib=MEMORY_MIB), kit=kit, workdir=tmp / "source")
    await vm.start()
    await asyncio.sleep(SETTLE_S)
    ours, raw, our_bytes, raw_bytes, migration = [], [], [], [], []
    kept: VmSnapshot | None = None
    try:
        for i in range(runs):
            dest = tmp / f"snap{i}"
            started = time.perf_counter()
            snapshot = await vm.snapshot(dest)
            ours.append(time.perf_counter() - started)
            our_bytes.append(sum(b.size for b in snapshot.manifest.blobs.values()))
            stats = snapshot.manifest.extra["qemu"]["migration"]
            migration.append(float(stats["total_time_ms"]) / 1e3)  # QEMU's own, within ours
            await vm.exec(["true"])  # the guest runs again between the two
            raw_file = tmp / f"raw{i}.bin"
            raw.append(await raw_snapshot(vm, raw_file, vm.snapshot_bandwidth))
            raw_bytes.append(raw_file.stat().st_size)
            raw_file.unlink()
            await vm.exec(["true"])
            if kept is None:
                kept = snapshot
            else:
                shutil.rmtree(dest)
    finally:
        await vm.stop(force=True)
    assert kept is not None
    figures = {
        "kelpie_s": median(ours), "raw_qmp_s": median(raw),
        "ratio": median(ours) / median(raw),
        "kelpie_bytes": median(our_bytes), "raw_bytes": median(raw_bytes),
        "size_ratio": median(our_bytes) / median(raw_bytes),
        "kelpie_migration_s": median(migration),
        "max_bandwidth": vm.snapshot_bandwidth,
        "samples": {"kelpie_s": ours, "raw_qmp_s": raw, "kelpie_bytes": our_bytes,
                    "raw_bytes": raw_bytes, "kelpie_migration_s": migration},
    }
    return figures, kept


async def restore_figures(kit: GuestKit, tmp: Path, snapshot: VmSnapshot, runs: int,
                          ) -> dict[str, Any]:
    restored, cold = [], []
    for i in range(runs):
        vm = QemuVm(VmConfig(memory_mib=MEMORY_MIB), kit=kit, workdir=tmp / f"cold{i}")
        started = time.perf_counter()
        await vm.start()
        await vm.exec(["true"])
        cold.append(time.perf_counter() - started)
        await vm.stop(force=True)

        vm = QemuVm(VmConfig(memory_mib=MEMORY_MIB), kit=kit, workdir=tmp / f"rest{i}")
        started = time.perf_counter()
        await vm.restore(VmSnapshot.open(snapshot.path))  # verifies every blob, too
        await vm.exec(["true"])
        restored.append(time.perf_counter() - started)
        await vm.stop(force=True)
    ratio = median(restored) / median(cold)
    return {"restore_s": median(restored), "cold_boot_s": median(cold), "ratio": ratio,
            "goal_ratio": RESTORE_GOAL, "goal_met": ratio <= RESTORE_GOAL,
            "samples": {"restore_s": restored, "cold_boot_s": cold}}


async def timed(step: Awaitable[Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = await step
    return time.perf_counter() - started, result


async def throughput_figures(kit: GuestKit, data_dir: Path, runs: int) -> dict[str, Any]:
    os.environ["KELPIE_STATE_DIR"] = str(data_dir)  # where the QEMU backend puts VM dirs
    one_template, one_cold, batch_template, batch_cold = [], [], [], []
    async with Runtime(data_dir=data_dir, backend_options={"qemu": {"kit": kit}}) as rt:
        # A fresh state dir has no cached accelerator verdict: the first VM probes KVM.
        first_s, first = await timed(rt.create(backend="qemu", memory_mib=MEMORY_MIB))
        await rt.remove(first.id, force=True)
        template_s, _ = await timed(rt.create_template(name="bench", backend="qemu",
                                                       memory_mib=MEMORY_MIB))
        creators: dict[str, Callable[[], Awaitable[Any]]] = {
            "template": lambda: rt.create(template="bench"),
            "cold": lambda: rt.create(backend="qemu", memory_mib=MEMORY_MIB),
        }

        async def one(kind: str) -> float:
            seconds, info = await timed(creators[kind]())
            await rt.remove(info.id, force=True)
            return float(seconds)

        async def batch(kind: str) -> float:
            seconds, infos = await timed(asyncio.gather(
                *(creators[kind]() for _ in range(CONCURRENT))))
            for info in infos:
                await rt.remove(info.id, force=True)
            return float(seconds)

        for _ in range(runs):
            one_template.append(await one("template"))
            one_cold.append(await one("cold"))
        for _ in range(runs):
            batch_template.append(await batch("template"))
            batch_cold.append(await batch("cold"))
        await rt.delete_snapshot("bench")

    def per_minute(seconds: float, count: int = 1) -> float:
        return 60.0 * count / seconds

    seq_t, seq_c = per_minute(median(one_template)), per_minute(median(one_cold))
    con_t = per_minute(median(batch_template), CONCURRENT)
    con_c = per_minute(median(batch_cold), CONCURRENT)
    return {
        "first_create_fresh_state_dir_s": first_s,
        "create_template_s": template_s,
        "sequential": {"template_create_s": median(one_template),
                       "cold_create_s": median(one_cold),
                       "template_per_min": seq_t, "cold_per_min": seq_c, "ratio": seq_t / seq_c},
        "concurrent": {"n": CONCURRENT, "template_batch_s": median(batch_template),
                       "cold_batch_s": median(batch_cold),
                       "template_per_min": con_t, "cold_per_min": con_c, "ratio": con_t / con_c},
        "samples": {"template_create_s": one_template, "cold_create_s": one_cold,
                    "template_batch_s": batch_template, "cold_batch_s": batch_cold},
    }


async def main_async(runs: int) -> dict[str, Any]:
    kit = build_guestkit(progress=lambda m: print(m, file=sys.stderr))
    with tempfile.TemporaryDirectory(prefix="ks-", dir="/tmp") as name:  # short: sockets
        tmp = Path(name)
        warm = QemuVm(VmConfig(memory_mib=MEMORY_MIB), kit=kit, workdir=tmp / "warm")
        await warm.start()  # accelerator probe, page cache of the kit: not in any figure
        accel = warm.accel.accel if warm.accel else "?"
        await warm.stop(force=True)
        print("snapshots...", file=sys.stderr)
        snapshot, kept = await snapshot_figures(kit, tmp, runs)
        print("restores...", file=sys.stderr)
        restore = await restore_figures(kit, tmp, kept, runs)
        print("runtime creates...", file=sys.stderr)
        throughput = await throughput_figures(kit, tmp / "rt", runs)
    return {
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "accel": accel},
        "runs": runs, "memory_mib": MEMORY_MIB,
        "snapshot": snapshot, "restore": restore, "throughput": throughput,
    }


def table(results: dict[str, Any]) -> str:
    s, r, t = results["snapshot"], results["restore"], results["throughput"]
    seq, con = t["sequential"], t["concurrent"]
    mib = 1024 * 1024
    met = "met" if r["goal_met"] else "NOT met"
    rows = [
        ("full snapshot, running 512 MiB VM (paused for all of it)", f"{s['kelpie_s']:.2f} s",
         f"raw QMP stop+migrate+cont {s['raw_qmp_s']:.2f} s", f"{s['ratio']:.2f}x"),
        ("  of which QEMU's migration (query-migrate total-time)",
         f"{s['kelpie_migration_s']:.2f} s", "", ""),
        ("snapshot size", f"{s['kelpie_bytes'] / mib:.1f} MiB",
         f"raw migration stream {s['raw_bytes'] / mib:.1f} MiB", f"{s['size_ratio']:.2f}x"),
        ("restore to first exec", f"{r['restore_s']:.2f} s",
         f"cold boot to first exec {r['cold_boot_s']:.2f} s",
         f"{r['ratio']:.2f}x (goal <= {RESTORE_GOAL}x: {met})"),
        ("sandboxes/min, sequential (Runtime.create)", f"{seq['template_per_min']:.1f} from "
         f"template ({seq['template_create_s']:.2f} s each)",
         f"{seq['cold_per_min']:.1f} cold ({seq['cold_create_s']:.2f} s each)",
         f"{seq['ratio']:.2f}x"),
        (f"sandboxes/min, {con['n']} concurrent creates", f"{con['template_per_min']:.1f} from "
         f"template ({con['template_batch_s']:.2f} s per batch)",
         f"{con['cold_per_min']:.1f} cold ({con['cold_batch_s']:.2f} s per batch)",
         f"{con['ratio']:.2f}x"),
        ("create_template (boot + snapshot + remove), once", f"{t['create_template_s']:.2f} s",
         "", ""),
        ("first create in a fresh state dir (accelerator probe), once",
         f"{t['first_create_fresh_state_dir_s']:.2f} s", "", ""),
    ]
    lines = ["| figure | Kelpie | baseline (same run) | ratio |", "|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/snapshots.json")
    args = parser.parse_args()
    results = asyncio.run(main_async(args.runs))
    print(table(results))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.json} (accel {results['host']['accel']}, {args.runs} runs, medians)")


if __name__ == "__main__":
    main()
