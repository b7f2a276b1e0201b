"""The fleet's throughput and overhead on this machine: sandboxes per minute on 1 vs 3 Ray
nodes (each in its own network namespace; the nodes share the machine's 2 cores, so the
ratio shows the fleet's overhead, not more capacity), and what placement adds to a create.

For each cluster size, in one Ray cluster: a 128 MiB template made on every host, then

- ``fleet``: ``--count`` sandboxes created at once from Ray tasks through ``Fleet.create``
  (placement + the host's create), each running ``true``; sandboxes per minute;
- ``direct`` (the baseline, same run): the same number created at once straight on the
  hosts' daemons (``Sandbox.create(template=..., daemon=URL)``), round-robin;
- per-create latency, sequential, fleet vs direct (median of ``--runs``): the difference is
  what the fleet adds (controller + host agent hops, placement).

    python benchmarks/fleet.py [--count 12] [--runs 5] [--json benchmarks/results/fleet.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

from ray_cluster import RayCluster  # noqa: E402

DRIVER = """
import statistics, time
from kelpie.fleet import Fleet
from kelpie.sdk import Sandbox

fleet = Fleet.up(interval=2)
fleet.create_template("bench", memory="128m")
hosts = [h.report.address for h in fleet.hosts()]
token = fleet._token

@ray.remote(num_cpus=0)
def through_fleet(name):
    box = Fleet().create(template="bench", name=name)
    box.exec(["true"])
    return box.id

@ray.remote(num_cpus=0)
def direct(name, url):
    box = Sandbox.create(template="bench", name=name, daemon=url, token=token)
    box.exec(["true"])
    box.remove()

def clear():
    for s in fleet.list():
        fleet.remove(s.name)

# as many Ray workers up as tasks run at once (a cold worker costs seconds), for both
ray.get([through_fleet.remote(f"warm{{i}}") for i in range({count})])
clear()
started = time.monotonic()
ray.get([through_fleet.remote(f"f{{i}}") for i in range({count})])
fleet_s = time.monotonic() - started
clear()
started = time.monotonic()
ray.get([direct.remote(f"d{{i}}", hosts[i % len(hosts)]) for i in range({count})])
direct_s = time.monotonic() - started
one_fleet, one_direct = [], []
for i in range({runs}):
    t = time.monotonic(); box = fleet.create(template="bench", name=f"s{{i}}")
    one_fleet.append(time.monotonic() - t); fleet.remove(box.name)
    t = time.monotonic()
    box = Sandbox.create(template="bench", name=f"s{{i}}", daemon=hosts[0], token=token)
    one_direct.append(time.monotonic() - t); box.remove()
print(json.dumps({{"fleet_s": fleet_s, "direct_s": direct_s,
                  "create_fleet_s": statistics.median(one_fleet),
                  "create_direct_s": statistics.median(one_direct)}}))
"""


def measure(nodes: int, count: int, runs: int) -> dict[str, Any]:
    cluster = RayCluster(nodes)
    try:
        found = cluster.driver(DRIVER.format(count=count, runs=runs), timeout=1800)
    finally:
        cluster.close()
    found["nodes"] = nodes
    found["fleet_per_min"] = count / found["fleet_s"] * 60
    found["direct_per_min"] = count / found["direct_s"] * 60
    return dict(found)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=12)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = [measure(nodes, args.count, args.runs) for nodes in (1, 3)]
    print(f"{'nodes':>5} {'fleet /min':>11} {'direct /min':>12} {'ratio':>6} "
          f"{'create fleet':>13} {'create direct':>14} {'added':>7}")
    for row in rows:
        print(f"{row['nodes']:>5} {row['fleet_per_min']:>11.1f} {row['direct_per_min']:>12.1f} "
              f"{row['fleet_per_min'] / row['direct_per_min']:>6.2f} "
              f"{row['create_fleet_s']:>12.2f}s {row['create_direct_s']:>13.2f}s "
              f"{(row['create_fleet_s'] - row['create_direct_s']) * 1000:>5.0f}ms")
    print(f"3 nodes vs 1 (fleet): {rows[1]['fleet_per_min'] / rows[0]['fleet_per_min']:.2f}x "
          "(the nodes share one machine's 2 cores)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"count": args.count, "runs": args.runs,
                                         "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
