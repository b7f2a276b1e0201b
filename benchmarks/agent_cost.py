"""The guest agent's work per request, counted rather than timed.

The agent runs on this host (``--listen-unix``) under valgrind's callgrind, which counts the
instructions its process executes; counters are zeroed after a warm-up and dumped after
each batch. Figures: instructions per exec of ``true`` (the request, the spawn's parent
side, the output and exit frames) and per ping (the least a request costs: one frame in,
one out), in alternating batches, medians. Under TCG the guest runs the same code, so these
counts are what an exec costs the agent's CPU there, without this machine's timing noise:
two runs agree to within a fraction of a percent, where timings of the same build move by
tens of percent between minutes. Only user space is counted (the kernel's work for the
agent's system calls is not).

    python benchmarks/agent_cost.py --batch 200 --rounds 3

Needs valgrind (``apt-get install valgrind``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
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
            env={"PATH": DEFAULT_PATH},  # as the guest's init starts it
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


def table(results: dict[str, Any]) -> str:
    return "\n".join([
        "| figure | agent instructions | baseline (same run) | ratio |",
        "|---|---|---|---|",
        f"| exec `true` | {results['exec_true_instructions'] / 1e3:.0f}k | ping "
        f"{results['ping_instructions'] / 1e3:.1f}k | {results['exec_per_ping']:.1f}x |",
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=200, help="requests per counted batch")
    parser.add_argument("--rounds", type=int, default=3, help="alternating batches of each")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    options = parser.parse_args()
    missing = [tool for tool in ("valgrind", "callgrind_control") if not shutil.which(tool)]
    if missing:
        print(f"agent_cost.py needs {' and '.join(missing)}: apt-get install valgrind",
              file=sys.stderr)
        return 2
    results = asyncio.run(measure(options.batch, options.rounds))
    print(table(results))
    options.json.parent.mkdir(parents=True, exist_ok=True)
    options.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
