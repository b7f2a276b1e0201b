"""Pull + unpack of one image from a local registry: Kelpie vs `skopeo copy` + `umoci unpack`.

A real ``docker-registry`` on 127.0.0.1 holds an image of several layers (random and
compressible files, a few MiB each). Each run pulls it into an empty store and unpacks it
to a directory, once with Kelpie and once with skopeo + umoci, alternating; the figures are
medians with their same-run ratio.

    python benchmarks/images.py [--runs 5] [--json benchmarks/results/images.json]
"""

from __future__ import annotations

import argparse
import asyncio
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fixtures.images import tarbuild
from kelpie.images import ImageStore, RegistryAuth, RegistryClient, rootfs_dir
from registry_server import start_registry


def layers() -> list[list[tarbuild.Entry]]:
    """Three layers: random data, text-like data, many small files."""
    random = [tarbuild.file(f"data/random{i}.bin", os.urandom(4 << 20)) for i in range(2)]
    text = [tarbuild.file(f"share/doc{i}.txt", ("kelpie " * 150_000).encode()) for i in range(3)]
    small = [tarbuild.file(f"lib/f{i:04}.py", f"VALUE = {i}\n" * 20) for i in range(2000)]
    return [random, text, small]


async def kelpie_pull(reference: str, work: Path) -> float:
    started = time.perf_counter()
    store = ImageStore(work / "store")
    async with RegistryClient(auth=RegistryAuth(use_docker_config=False)) as client:
        image = await client.pull(reference, store)
    await asyncio.to_thread(rootfs_dir, store, image)
    return time.perf_counter() - started


def skopeo_umoci(reference: str, work: Path) -> float:
    started = time.perf_counter()
    work.mkdir(parents=True)
    subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false",
                    f"docker://{reference}", f"oci:{work / 'layout'}:bench"], check=True)
    subprocess.run(["umoci", "--log", "error", "unpack", "--image", f"{work / 'layout'}:bench",
                    str(work / "bundle")], check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/images.json"))
    args = parser.parse_args()
    ours, theirs = [], []
    with tempfile.TemporaryDirectory(prefix="kelpie-img-bench-") as tmp:
        root = Path(tmp)
        tarbuild.write_oci_layout(root / "layout", layers(), tag="bench")
        registry = start_registry(root / "registry")
        try:
            registry.push(root / "layout", "bench", "bench/image")
            reference = f"{registry.address}/bench/image:bench"
            for i in range(args.runs):
                theirs.append(skopeo_umoci(reference, root / f"s{i}"))
                ours.append(asyncio.run(kelpie_pull(reference, root / f"k{i}")))
                shutil.rmtree(root / f"s{i}")
                shutil.rmtree(root / f"k{i}")
        finally:
            registry.stop()
    result: dict[str, Any] = {
        "runs": args.runs,
        "kelpie_s": statistics.median(ours),
        "skopeo_umoci_s": statistics.median(theirs),
        "ratio": statistics.median(ours) / statistics.median(theirs),
        "runs_kelpie": ours,
        "runs_skopeo_umoci": theirs,
    }
    print("| figure | Kelpie | skopeo copy + umoci unpack (same run) | ratio |")
    print("|---|---|---|---|")
    print(f"| pull + unpack, 3 layers (~17 MB) | {result['kelpie_s']:.2f} s | "
          f"{result['skopeo_umoci_s']:.2f} s | {result['ratio']:.2f}x |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.json} ({args.runs} runs, medians)")


if __name__ == "__main__":
    main()
