"""Fork benchmarks (QEMU, TCG): each figure against a baseline measured in the same run.

- fork: a running 512 MiB sandbox into 8 children, wall time from the call to 8 running
  children, vs 8 cold boots of the same sandbox (started together, like the children).
- memory: the host memory of the 8 idle children, as the sum of their QEMU processes' PSS
  (``/proc/PID/smaps_rollup``: shared pages are split between the processes sharing them),
  vs one normally booted VM's. Goal: <= 2x one VM (sharing works).
- templates: sandboxes per minute restored one after the other from a template whose
  memory is shared copy-on-write, vs from one whose memory is in the migration stream
  (each clone loading a private copy).

    python benchmarks/fork.py [--runs 3] [--json benchmarks/results/fork.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kelpie.backends.qemu._vm import QemuVm
from kelpie.guestkit import GuestKit, build_guestkit
from kelpie.runtime import Runtime
from kelpie.vm import VmConfig, VmSnapshot

CHILDREN = 8
MEMORY_MIB = 512
CLONES = 8


def pss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def qemu_pid(rt: Runtime, sandbox_id: str) -> int:
    return int((rt.data_dir / "vms" / sandbox_id / "qemu.pid").read_text())


async def fork_round(rt: Runtime, round_no: int) -> dict[str, float]:
    """One fork into CHILDREN and CHILDREN cold boots; memory of each set once idle."""
    parent = await rt.create(name=f"parent{round_no}", backend="qemu", memory_mib=MEMORY_MIB)
    started = time.perf_counter()
    children = await rt.fork(parent.id, CHILDREN)
    fork_s = time.perf_counter() - started
    started = time.perf_counter()
    cold = await asyncio.gather(*(rt.create(name=f"cold{round_no}-{i}", backend="qemu",
                                            memory_mib=MEMORY_MIB) for i in range(CHILDREN)))
    cold_s = time.perf_counter() - started
    await asyncio.sleep(3)  # idle: let the guests settle
    children_pss = sum(pss_mib(qemu_pid(rt, c.id)) for c in children)
    one_vm_pss = statistics.median(pss_mib(qemu_pid(rt, c.id)) for c in cold)
    for sandbox in [parent, *children, *cold]:
        await rt.remove(sandbox.id, force=True)
    return {"fork_s": fork_s, "cold_boots_s": cold_s, "children_pss_mib": children_pss,
            "one_vm_pss_mib": one_vm_pss}


async def template_rate(kit: GuestKit, where: Path, shareable: bool) -> float:
    """Clones per minute restored one after the other from a template snapshot."""
    source = QemuVm(VmConfig(memory_mib=MEMORY_MIB), kit=kit, workdir=where / "source")
    await source.start()
    snapshot = await source.snapshot(where / "template", shareable=shareable)
    await source.stop(force=True)
    clones = []
    started = time.perf_counter()
    for i in range(CLONES):
        clone = QemuVm(VmConfig(memory_mib=MEMORY_MIB), kit=kit, workdir=where / f"c{i}")
        await clone.restore(VmSnapshot.open(snapshot.path), verify=False)
        await clone.exec(["true"])
        clones.append(clone)
    elapsed = time.perf_counter() - started
    for clone in clones:
        await clone.stop(force=True)
    return CLONES / elapsed * 60


async def main_async(runs: int) -> dict[str, Any]:
    kit = build_guestkit(progress=lambda m: print(m, file=sys.stderr))
    rounds = []
    with tempfile.TemporaryDirectory(prefix="kf-", dir="/tmp") as tmp:
        os.environ["KELPIE_STATE_DIR"] = tmp  # the VM directories: short socket paths
        async with Runtime(data_dir=Path(tmp), backend_options={"qemu": {"kit": kit}}) as rt:
            for i in range(runs):
                rounds.append(await fork_round(rt, i))
                print(f"round {i}: {rounds[-1]}", file=sys.stderr)
        shared, stream = [], []
        for i in range(runs):
            shared.append(await template_rate(kit, Path(tmp) / f"s{i}", shareable=True))
            stream.append(await template_rate(kit, Path(tmp) / f"n{i}", shareable=False))
    median = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    return {
        "runs": runs, "children": CHILDREN, "memory_mib": MEMORY_MIB,
        "fork": {**median, "ratio": median["fork_s"] / median["cold_boots_s"]},
        "memory": {"children_pss_mib": median["children_pss_mib"],
                   "one_vm_pss_mib": median["one_vm_pss_mib"],
                   "ratio": median["children_pss_mib"] / median["one_vm_pss_mib"]},
        "templates": {"shared_per_min": statistics.median(shared),
                      "stream_per_min": statistics.median(stream),
                      "ratio": statistics.median(shared) / statistics.median(stream)},
        "rounds": rounds,
    }


def table(results: dict[str, Any]) -> str:
    f, m, t = results["fork"], results["memory"], results["templates"]
    n = results["children"]
    rows = [
        (f"fork a running {results['memory_mib']} MiB sandbox into {n}", f"{f['fork_s']:.2f} s",
         f"{n} cold boots {f['cold_boots_s']:.2f} s", f"{f['ratio']:.2f}x"),
        (f"host memory of the {n} idle children (PSS)", f"{m['children_pss_mib']:.0f} MiB",
         f"one booted VM {m['one_vm_pss_mib']:.0f} MiB", f"{m['ratio']:.2f}x (goal <= 2x)"),
        ("template sandboxes per minute", f"{t['shared_per_min']:.0f} shared memory",
         f"{t['stream_per_min']:.0f} private copies", f"{t['ratio']:.2f}x"),
    ]
    lines = ["| figure | Kelpie | baseline (same run) | ratio |", "|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/fork.json"))
    args = parser.parse_args()
    results = asyncio.run(main_async(args.runs))
    print(table(results))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.json} ({args.runs} runs, medians)")


if __name__ == "__main__":
    main()
