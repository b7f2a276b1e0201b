"""The guest agent's work per request, counted rather than timed.

The agent runs on this host (``--listen-unix``, with the PATH init gives it), and two
counts are taken per exec of ``true`` (the request, the spawn, the output and exit frames)
and per ping (the least a request costs: one frame in, one out):

- instructions its process executes in user space, under valgrind's callgrind (counters
  zeroed after a warm-up and dumped after each batch; alternating batches, medians);
- system calls, under ``strace -f``: the agent's own, and those of the command's process
  until its program starts (a failed execve counts: each sets up an address space first),
  from two agents serving the same warm-up and then none or ``--batch`` requests.

Both repeat to within a fraction of a percent, where timings of the same build move by
tens of percent between minutes. Neither is the time under TCG: a system call there costs
~1-12 us in a warm loop and 2-4x that between spawns, and Python runs slowest right after
a wakeup or a switch of address space (QEMU flushes its whole TLB), which no count shows.
Instructions alone missed a change that moved work into the kernel (posix_spawnp's PATH
search: fewer instructions, 5 failed execve per exec).

    python benchmarks/agent_cost.py --batch 200 --rounds 3

Needs valgrind and strace (``apt-get install valgrind strace``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kelpie.agent import AgentClient
from kelpie.guest._common import DEFAULT_PATH

AGENT = Path(__file__).resolve().parents[1] / "src" / "kelpie" / "guest" / "agent.py"
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "agent_cost.json"


class CountedAgent:
    """The agent under callgrind, with its instruction counter read per batch."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.sock = workdir / "agent.sock"
        self.proc = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={workdir}/cg.%p",
             sys.executable, "-S", str(AGENT), "--listen-unix", str(self.sock)],
            env={"PATH": DEFAULT_PATH}, cwd="/",  # as the guest's init starts it
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.dumps = 0

    def control(self, *args: str) -> None:
        subprocess.run(["callgrind_control", *args, str(self.proc.pid)], check=True,
                       capture_output=True)

    def instructions(self) -> int:
        """Instructions since the last call (or since zero())."""
        self.dumps += 1
        self.control("--dump")
        dump = self.workdir / f"cg.{self.proc.pid}.{self.dumps}"
        for line in dump.read_text().splitlines():
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
        raise RuntimeError(f"{dump} has no instruction total")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


async def wait_for_socket(agent: CountedAgent) -> None:
    for _ in range(600):  # valgrind starts Python slowly: up to a minute
        if agent.sock.exists():
            return
        if agent.proc.poll() is not None:
            raise RuntimeError("the agent exited under valgrind before it listened")
        await asyncio.sleep(0.1)
    raise RuntimeError(f"the agent did not listen on {agent.sock} within a minute")


async def exec_true(client: AgentClient) -> None:
    handle = await client.exec(["true"])
    async for _ in handle:
        pass


async def measure(batch: int, rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="kelpie-cost-") as tmp:
        agent = CountedAgent(Path(tmp))
        try:
            await wait_for_socket(agent)
            client = await AgentClient.connect_unix(str(agent.sock), timeout=60)
            await client.hello(timeout=60)
            for _ in range(20):  # warm-up: first calls, caches, lazily built tables
                await exec_true(client)
                await client.ping()
            agent.control("--zero")
            per_exec, per_ping = [], []
            for _ in range(rounds):
                for _ in range(batch):
                    await exec_true(client)
                per_exec.append(agent.instructions() / batch)
                for _ in range(batch):
                    await client.ping()
                per_ping.append(agent.instructions() / batch)
            await client.close()
        finally:
            agent.stop()
    exec_ir, ping_ir = statistics.median(per_exec), statistics.median(per_ping)
    return {"batch": batch, "rounds": rounds, "exec_true_instructions": exec_ir,
            "ping_instructions": ping_ir, "exec_per_ping": exec_ir / ping_ir,
            "samples": {"exec": per_exec, "ping": per_ping}}


async def serve(sock: Path, kind: str, count: int) -> int:
    """Connect, warm up, make ``count`` requests of ``kind``; the agent's pid."""
    client = await AgentClient.connect_unix(str(sock), timeout=60)
    info = await client.hello(timeout=60)
    request = exec_true if kind == "exec" else AgentClient.ping
    for _ in range(20 + count):
        await request(client)
    await client.close()
    return info.agent_pid


#: A system call's first line in ``strace -f`` output: "PID name(" (not "<... resumed>").
SYSCALL_LINE = re.compile(r"^(\d+) +([a-z_0-9]+)\(")
EXECVE_RESUMED = re.compile(r"^(\d+) +<\.\.\. execve resumed>")


def traced_calls(kind: str, count: int, workdir: Path) -> tuple[int, int]:
    """System calls of an agent serving the warm-up and ``count`` requests of ``kind``:
    (the agent's, its children's before their program starts)."""
    sock, trace = workdir / f"{kind}{count}.sock", workdir / f"{kind}{count}.trace"
    proc = subprocess.Popen(
        ["strace", "-f", "-qq", "-o", str(trace), sys.executable, "-S", str(AGENT),
         "--listen-unix", str(sock)],
        env={"PATH": DEFAULT_PATH}, cwd="/", stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):  # Python starts slowly under strace
            if sock.exists() or proc.poll() is not None:
                break
            time.sleep(0.1)
        agent_pid = asyncio.run(serve(sock, kind, count))
        os.kill(agent_pid, signal.SIGTERM)  # strace ends with it (a signal to strace detaches)
        proc.wait(60)
    finally:
        proc.kill()
        proc.wait(60)
    agent = children = 0
    started: set[str] = set()  # children whose program has started (a successful execve)
    lines = trace.read_text().splitlines()
    for line in lines:
        match = SYSCALL_LINE.match(line)
        if match is None:
            resumed = EXECVE_RESUMED.match(line)  # an execve strace showed in two parts
            if resumed is not None and line.rstrip().endswith("= 0"):
                started.add(resumed.group(1))
            continue
        pid, name = match.groups()
        if int(pid) == agent_pid:
            agent += 1
        elif pid not in started:
            children += 1
            if name == "execve" and line.rstrip().endswith("= 0"):
                started.add(pid)
    return agent, children


def measure_calls(batch: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="kelpie-calls-") as tmp:
        per: dict[str, float] = {}
        for kind in ("exec", "ping"):
            base = traced_calls(kind, 0, Path(tmp))
            full = traced_calls(kind, batch, Path(tmp))
            per[f"{kind}_agent_calls"] = (full[0] - base[0]) / batch
            per[f"{kind}_child_calls"] = (full[1] - base[1]) / batch
    return per


def table(results: dict[str, Any]) -> str:
    return "\n".join([
        "| figure | agent instructions | baseline (same run) | ratio |",
        "|---|---|---|---|",
        f"| exec `true` | {results['exec_true_instructions'] / 1e3:.0f}k | ping "
        f"{results['ping_instructions'] / 1e3:.1f}k | {results['exec_per_ping']:.1f}x |",
        "",
        "| system calls per request | the agent | the command before its program starts |",
        "|---|---|---|",
        f"| exec `true` | {results['exec_agent_calls']:.1f} | {results['exec_child_calls']:.1f} |",
        f"| ping | {results['ping_agent_calls']:.1f} | {results['ping_child_calls']:.1f} |",
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=200, help="requests per counted batch")
    parser.add_argument("--rounds", type=int, default=3, help="alternating batches of each")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    options = parser.parse_args()
    missing = [tool for tool in ("valgrind", "callgrind_control", "strace")
               if not shutil.which(tool)]
    if missing:
        print(f"agent_cost.py needs {' and '.join(missing)}: apt-get install valgrind strace",
              file=sys.stderr)
        return 2
    results = asyncio.run(measure(options.batch, options.rounds))
    results.update(measure_calls(options.batch))
    print(table(results))
    options.json.parent.mkdir(parents=True, exist_ok=True)
    options.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
