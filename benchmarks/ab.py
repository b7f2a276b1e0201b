"""Compare two checkouts of Kelpie with one benchmark, run alternately (A, B, A, B, ...).

Each round runs the benchmark script of each checkout with that checkout's ``src`` first on
``PYTHONPATH`` and its own ``--json`` file; every numeric figure the script writes is then
reduced to its median over the rounds, and the table gives new / old. Alternating spreads
the shared machine's noise over both sides instead of handing it to one.

    git worktree add /tmp/kelpie-old <old commit>
    python benchmarks/ab.py --old /tmp/kelpie-old --new . --script benchmarks/qemu_vm.py \
        --rounds 3 -- --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def figures(data: Any, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a benchmark's JSON, by dotted path (lists and samples left out)."""
    out: dict[str, float] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            if key in ("samples", "host"):
                continue
            out.update(figures(value, f"{prefix}{key}."))
    elif isinstance(data, int | float) and not isinstance(data, bool):
        out[prefix.rstrip(".")] = float(data)
    return out


def run_once(checkout: Path, script: str, args: list[str], out: Path) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(checkout / "src"))
    subprocess.run([sys.executable, str(checkout / script), *args, "--json", str(out)],
                   cwd=checkout, env=env, check=True, stdout=subprocess.DEVNULL)
    return figures(json.loads(out.read_text()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, required=True, help="checkout A (the baseline)")
    parser.add_argument("--new", type=Path, required=True, help="checkout B")
    parser.add_argument("--script", required=True, help="benchmark path inside each checkout")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the medians and ratios here")
    parser.add_argument("args", nargs="*", help="arguments for the benchmark (after --)")
    options = parser.parse_args()

    runs: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(options.rounds):
            for side in ("old", "new"):
                checkout = getattr(options, side).resolve()
                out = Path(tmp) / f"{side}-{round_}.json"
                runs[side].append(run_once(checkout, options.script, options.args, out))
                print(f"round {round_ + 1}/{options.rounds}: {side} done", file=sys.stderr)

    def median(side: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[side] if key in r)

    keys = [k for k in runs["old"][0] if all(k in r for r in runs["old"] + runs["new"])]
    rows = []
    print(f"{'figure':<40} {'old':>12} {'new':>12} {'new/old':>8}")
    for key in keys:
        old, new = median("old", key), median("new", key)
        ratio = new / old if old else float("nan")
        rows.append({"figure": key, "old": old, "new": new, "ratio": ratio})
        print(f"{key:<40} {old:>12.4g} {new:>12.4g} {ratio:>8.3f}")
    if options.json:
        options.json.write_text(json.dumps({"script": options.script, "rounds": options.rounds,
                                            "args": options.args, "figures": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
