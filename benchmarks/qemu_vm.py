"""QEMU backend benchmarks, each figure a median of several runs with a same-run baseline.

- boot: QemuVm start to the first exec result, vs a raw ``qemu-system-x86_64`` boot of the
  same kernel and initramfs to a busybox shell prompt (``rdinit=/bin/sh``). Goal <= 1.3x.
- exec: round trip of ``true`` through Kelpie, vs its floor: a raw ping over the same
  virtio-serial channel plus the guest's own time to spawn and reap ``true`` (measured
  inside the guest). Goal <= 1.3x. Sampled in rounds, the in-guest spawns between the
  timed execs: a change of the machine's speed during the run moves both sides alike.
- files: 64 MiB written then read back through the agent (MB/s each way).
- rss: host RSS of one idle VM's QEMU process (MiB).
- idle CPU: the host CPU one idle VM's QEMU process uses (% of one core, over 10 s): what
  packing many sandboxes on a host costs before they do anything.
- phases: where boot time goes, host steps timed on the host, guest steps from init's
  marks in /run/kelpie/init.log (guest uptime, put on the host's clock); where exec time
  goes: the same exec through the agent client, of which the ping and the guest's spawn
  and reap of ``true`` by the agent's own spawn code (timed inside the guest), and the VM
  layer's share. Each exec and ping is timed with the agent idle before it (a ping not
  counted goes first), so that no figure carries the guest's work for the one before.

``--arch aarch64`` measures an emulated guest (QEMU ``virt`` under TCG on an x86_64 host),
its baseline a raw ``qemu-system-aarch64`` boot of the same kernel and initramfs.

    python benchmarks/qemu_vm.py [--runs 5] [--arch x86_64|aarch64]
        [--json benchmarks/results/latest.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kelpie import VmConfig
from kelpie.backends.qemu._accel import choose_accel
from kelpie.backends.qemu._vm import QemuVm
from kelpie.guestkit import GuestKit, build_guestkit, guest_arch, host_arch, kernel_cmdline
from kelpie.guestkit._bootcheck import boot, qemu_binary, qemu_command

#: The in-guest floor and its agent-style twin, alternated in one process: a plain
#: posix_spawn + waitpid of /bin/true, and the same command started by the agent's own spawn
#: code as it starts `true` for an exec (the PATH search, pipes for stdout and stderr made
#: ahead as the agent does, the agent's stdin, its own session and signals at their
#: defaults). The guest holds the agent's package as /kelpie/guest. Prints the nanoseconds
#: of each, one line per kind.
SPAWN_PROBE = """
import os, sys, time
sys.path.append("/kelpie")
from guest._common import DEFAULT_PATH
from guest._spawn import OutputPipes, SpawnPlan, spawn
env = {"PATH": DEFAULT_PATH, "HOME": "/root", "USER": "root", "LOGNAME": "root"}
plan = SpawnPlan(argv=["true"], env=env, cwd="/", root="/", user=None, pty=False)
plain, agent = [], []
for i in range(%d):
    t = time.perf_counter_ns()
    pid = os.posix_spawn("/bin/true", ["true"], {})
    os.waitpid(pid, 0)
    plain.append(time.perf_counter_ns() - t)
    OutputPipes.prepare()
    t = time.perf_counter_ns()
    ex = spawn(plan, i, False, 24, 80)
    os.waitpid(ex.pid, 0)
    agent.append(time.perf_counter_ns() - t)
    ex.close_fds()
print(*plain)
print(*agent)
"""
#: Spawns of each kind per round of the exec figures.
SPAWNS_PER_ROUND = 20


def raw_shell_boot(kit: GuestKit) -> float:
    """Seconds from QEMU start to the busybox prompt, no Kelpie involved."""
    with tempfile.TemporaryDirectory(prefix="kelpie-bench-") as tmp:
        arch = guest_arch(kit.arch)
        cmdline = kernel_cmdline(  # the same kernel arguments as ours
            console=arch.console, tsc_khz=None if kit.arch == "x86_64" else 0,
            extra=["rdinit=/bin/sh"])
        command = qemu_command(kit, Path(tmp), cmdline=cmdline)
        with boot(command, Path(tmp)) as run:
            return run.wait_console(" # ", 120)


class PhasedQemuVm(QemuVm):
    """A QemuVm whose boot steps on the host are timed (``marks``: perf_counter seconds)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.marks: dict[str, float] = {}
        hello = self.agent.hello

        async def timed_hello(*a: Any, **k: Any) -> Any:
            info = await hello(*a, **k)
            self.marks.setdefault("hello", time.perf_counter())
            return info

        self.agent.hello = timed_hello  # type: ignore[method-assign]

    async def _spawn_qemu(self, launch: Any) -> None:
        self.marks["spawn"] = time.perf_counter()
        await super()._spawn_qemu(launch)


async def kelpie_boot(kit: GuestKit, workdir: Path) -> tuple[float, PhasedQemuVm]:
    vm = PhasedQemuVm(VmConfig(arch=kit.arch), kit=kit, workdir=workdir)
    vm.marks["start"] = time.perf_counter()
    await vm.start()
    await vm.exec(["true"])
    vm.marks["first exec"] = time.perf_counter()
    return vm.marks["first exec"] - vm.marks["start"], vm


async def boot_phases(vm: PhasedQemuVm) -> dict[str, float]:
    """Seconds per boot phase. The guest's steps (init.log, by guest uptime) are put on the
    host's clock through one reading of /proc/uptime, taken mid-way through an exec."""
    before = time.perf_counter()
    uptime = float((await vm.exec(["cat", "/proc/uptime"])).stdout.split()[0])
    kernel_start = (before + time.perf_counter()) / 2 - uptime
    log = (await vm.read_file("/run/kelpie/init.log")).decode()
    steps: dict[str, float] = {}
    for line in log.splitlines():  # "[UPTIME] step"
        stamp, _, step = line.partition("] ")
        steps.setdefault(step.split(" on ")[0], kernel_start + float(stamp.lstrip("[")))
    m = vm.marks
    points = [("start", m["start"]), ("spawn", m["spawn"]), ("kernel", kernel_start),
              ("init", steps["init started"]), ("modules", steps["kernel modules loaded"]),
              ("disks", steps["disks mounted"]), ("agent", steps["agent starting"]),
              ("hello", m["hello"]), ("exec", m["first exec"])]
    names = ["host: kit, accelerator, VM directory", "QEMU start and firmware",
             "kernel to init", "init: kernel modules", "init: host name, network, disks",
             "init to agent start", "agent start to hello", "first exec"]
    return {name: b[1] - a[1] for name, a, b in zip(names, points[:-1], points[1:], strict=True)}


async def exec_figures(vm: QemuVm, runs: int) -> dict[str, Any]:
    """The exec round trip against its floor, in ``runs`` rounds: each times ten execs
    (through the VM layer and through the agent client) and pings, then the in-guest
    spawns (SPAWN_PROBE)."""
    client = vm.agent.client
    assert client is not None
    for _ in range(5):  # warm up caches and the page cache of /bin/true
        await vm.exec(["true"])
    exec_times, ping_times, client_times, spawn_times, agent_spawn_times = [], [], [], [], []
    for _ in range(runs):
        for _ in range(10):
            await client.ping()  # not counted: the guest's work for the last request ends
            started = time.perf_counter()
            await vm.exec(["true"])
            exec_times.append(time.perf_counter() - started)
            await client.ping()
            ping_times.append(await client.ping())
            started = time.perf_counter()  # the same exec through the agent client
            handle = await client.exec(["true"])
            await handle.wait()
            client_times.append(time.perf_counter() - started)
        probe = await vm.exec(["python3", "-S", "-c", SPAWN_PROBE % SPAWNS_PER_ROUND])
        plain, agent = probe.stdout.decode().splitlines()
        spawn_times += [int(ns) / 1e9 for ns in plain.split()]
        agent_spawn_times += [int(ns) / 1e9 for ns in agent.split()]
    exec_s, ping_s = statistics.median(exec_times), statistics.median(ping_times)
    spawn_s, agent_spawn_s = statistics.median(spawn_times), statistics.median(agent_spawn_times)
    floor = ping_s + spawn_s
    client_s = statistics.median(client_times)
    phases = {
        "the agent client's exec round trip (`client.exec` + wait)": client_s,
        "- of which the channel both ways (the ping)": ping_s,
        "- of which the guest's spawn + waitpid of `true` by the agent's spawn code "
        "(PATH search, stdio pipes, own session, default signals)": agent_spawn_s,
        "- of which the rest: the agent's request, bookkeeping and reply":
            client_s - ping_s - agent_spawn_s,
        "the VM layer over the agent client (`QemuVm.exec` against `client.exec`)":
            exec_s - client_s,
    }
    return {"exec_true_ms": exec_s * 1e3, "ping_ms": ping_s * 1e3,
            "guest_spawn_ms": spawn_s * 1e3, "agent_spawn_ms": agent_spawn_s * 1e3,
            "floor_ms": floor * 1e3, "ratio": exec_s / floor, "client_exec_ms": client_s * 1e3,
            "phases_ms": {name: seconds * 1e3 for name, seconds in phases.items()}}


async def file_figures(vm: QemuVm) -> dict[str, float]:
    data = os.urandom(64 * 1024 * 1024)
    started = time.perf_counter()
    await vm.write_file("/tmp/bench", data)
    write_s = time.perf_counter() - started
    started = time.perf_counter()
    back = await vm.read_file("/tmp/bench")
    read_s = time.perf_counter() - started
    assert back == data
    await vm.remove("/tmp/bench")
    mb = len(data) / 1e6
    return {"write_mb_s": mb / write_s, "read_mb_s": mb / read_s}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def idle_cpu_percent(pid: int, seconds: float = 10.0) -> float:
    before, started = cpu_seconds(pid), time.monotonic()
    await asyncio.sleep(seconds)
    return (cpu_seconds(pid) - before) / (time.monotonic() - started) * 100


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def main_async(runs: int, arch: str | None = None) -> dict[str, Any]:
    kit = build_guestkit(progress=lambda m: print(m, file=sys.stderr), arch=arch)
    qemu = qemu_binary(kit.arch)
    if kit.arch == host_arch() and qemu is not None:
        # Made once per kit and host, then cached (where /dev/kvm exists, a probe boot of
        # up to ~10 s): made here, untimed, so that no boot below pays it.
        choose_accel(qemu, kit.kernel, kit.initrd, kit.digest)
    raw_times, ours, phases = [], [], []
    with tempfile.TemporaryDirectory(prefix="kb-", dir="/tmp") as tmp:
        for i in range(runs):
            raw_times.append(raw_shell_boot(kit))
            seconds, vm = await kelpie_boot(kit, Path(tmp) / f"vm{i}")
            ours.append(seconds)
            phases.append(await boot_phases(vm))
            if i < runs - 1:
                await vm.stop()
        accel = vm.accel.accel if vm.accel else "?"
        await asyncio.sleep(2)  # let the guest settle before measuring idle memory
        assert vm.pid is not None
        rss = rss_mib(vm.pid)
        idle_cpu = await idle_cpu_percent(vm.pid)
        exec_result = await exec_figures(vm, runs)
        files = await file_figures(vm)
        await vm.stop()
    boot = {
        "kelpie_s": statistics.median(ours),
        "raw_qemu_shell_s": statistics.median(raw_times),
        "ratio": statistics.median(ours) / statistics.median(raw_times),
        "runs_kelpie": ours,
        "runs_raw": raw_times,
        "phases_s": {name: statistics.median(p[name] for p in phases) for name in phases[0]},
    }
    return {
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "accel": accel},
        "guest_arch": kit.arch,
        "runs": runs,
        "boot": boot,
        "exec": exec_result,
        "files": files,
        "idle_rss_mib": rss,
        "idle_cpu_percent": idle_cpu,
    }


def table(results: dict[str, Any]) -> str:
    b, e, f = results["boot"], results["exec"], results["files"]
    rows = [
        ("boot to first exec", f"{b['kelpie_s']:.2f} s",
         f"raw QEMU to shell {b['raw_qemu_shell_s']:.2f} s", f"{b['ratio']:.2f}x (goal <= 1.3x)"),
        ("exec `true` round trip", f"{e['exec_true_ms']:.2f} ms",
         f"ping {e['ping_ms']:.2f} + spawn {e['guest_spawn_ms']:.2f} ms",
         f"{e['ratio']:.2f}x (goal <= 1.3x)"),
        ("64 MiB write / read", f"{f['write_mb_s']:.0f} / {f['read_mb_s']:.0f} MB/s", "", ""),
        ("idle VM host RSS", f"{results['idle_rss_mib']:.0f} MiB", "", ""),
        ("idle VM host CPU", f"{results['idle_cpu_percent']:.1f}% of a core", "", ""),
    ]
    lines = ["| figure | Kelpie | baseline (same run) | ratio |", "|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    lines += ["", "| boot phase (medians) | seconds |", "|---|---|"]
    lines += [f"| {name} | {seconds:.3f} |" for name, seconds in b["phases_s"].items()]
    lines += ["", "| exec phase (medians) | ms |", "|---|---|"]
    lines += [f"| {name} | {ms:.2f} |" for name, ms in e["phases_ms"].items()]
    lines += [f"| baseline: ping (both ways over the channel) | {e['ping_ms']:.2f} |",
              f"| baseline: in-guest posix_spawn + waitpid of /bin/true | "
              f"{e['guest_spawn_ms']:.2f} |"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--arch", choices=["x86_64", "aarch64"], default=None,
                        help="guest architecture (default: the host's)")
    parser.add_argument("--json", type=Path, default=None,
                        help="where to write the figures (default: benchmarks/results/"
                             "latest.json, qemu_vm_ARCH.json for another guest architecture)")
    args = parser.parse_args()
    results = asyncio.run(main_async(args.runs, args.arch))
    print(table(results))
    if args.json is None:
        other = results["guest_arch"] != platform.machine()
        name = f"qemu_vm_{results['guest_arch']}.json" if other else "latest.json"
        args.json = Path("benchmarks/results") / name
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.json} (guest {results['guest_arch']}, accel "
          f"{results['host']['accel']}, {args.runs} runs, medians)")


if __name__ == "__main__":
    main()
