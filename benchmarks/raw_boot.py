"""Time a cold boot of the guest kit under QEMU TCG.

Two measurements, each repeated `--runs` times, from QEMU process start:

* shell: the kernel runs busybox sh directly (`rdinit=/bin/sh`), until its prompt shows on
  the serial console: the raw kernel + initramfs baseline.
* agent: the real /init, until the agent answers a `hello` on the virtio-serial port
  (sent as soon as QEMU accepts the connection).

    python benchmarks/raw_boot.py [--runs 5] [--kernel-arg ARG ...]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from kelpie.guestkit import GuestKit, build_guestkit, kernel_cmdline
from kelpie.guestkit._bootcheck import BootRun, boot, qemu_command


def _time_runs(
    kit: GuestKit, kernel_args: list[str], runs: int, wait: Callable[[BootRun], float]
) -> list[float]:
    times = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory(prefix="kelpie-boot-") as tmp:
            cmdline = kernel_cmdline(extra=kernel_args)
            command = qemu_command(kit, Path(tmp), cmdline=cmdline)
            with boot(command, Path(tmp)) as run:
                times.append(wait(run))
    return times


def _report(label: str, times: list[float]) -> None:
    shown = ", ".join(f"{t:.2f}" for t in times)
    print(f"{label}: median {statistics.median(times):.2f} s  min {min(times):.2f} s  [{shown}]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--kernel-arg", action="append", default=[], help="extra kernel arg")
    parser.add_argument("--skip-shell", action="store_true")
    args = parser.parse_args()

    started = time.monotonic()
    kit = build_guestkit(progress=print)
    elapsed = time.monotonic() - started
    print(f"kit {kit.digest[:12]} ready in {elapsed:.2f} s; sizes {dict(kit.sizes)}")

    if not args.skip_shell:
        shell = _time_runs(
            kit, ["rdinit=/bin/sh", *args.kernel_arg], args.runs,
            lambda run: run.wait_console(" # ", 60),
        )  # fmt: skip
        _report("boot to busybox shell prompt", shell)

    def agent_ready(run: BootRun) -> float:
        return run.agent_hello(60)[0]

    print(f"kernel command line: {kernel_cmdline(extra=args.kernel_arg)}")
    _report("boot to agent ready", _time_runs(kit, args.kernel_arg, args.runs, agent_ready))


if __name__ == "__main__":
    main()
