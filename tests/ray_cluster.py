"""A real multi-node Ray cluster on one machine: each node in its own network namespace,
joined to a bridge by veth (10.S.0.0/24, the first S from 99 down that no address or route
of this machine uses), each with its own Kelpie home, started with the
``kelpie_host`` resource. Drivers run inside the head's namespace (a Ray driver must be on
a node); programs outside reach the cluster through the Ray client (port 10001 on the head,
which ``ray start --head`` serves when ``ray[client]`` is installed). Closing kills every
process of every namespace (raylets, host agents, daemons, QEMU) and removes them."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

from daemon_env import KelpieHome

RAY = [sys.executable, "-c", "from ray.scripts.scripts import main; main()"]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def free_subnet_index(start: int = 99, stop: int = 60) -> int:
    """The first S from ``start`` down whose 10.S.0.0/24 no route of this machine covers
    (a bridge left behind by a killed run would otherwise take the cluster's traffic from
    this namespace: its route comes first, and ARP on it finds nobody)."""
    routes = subprocess.run(["ip", "-4", "-o", "route", "show", "table", "all"], check=True,
                            capture_output=True, text=True).stdout
    words = set(routes.split())
    for index in range(start, stop, -1):
        if not any(word.startswith(f"10.{index}.") for word in words):
            return index
    raise AssertionError(f"every subnet 10.{stop + 1}-{start}.0.0/24 is in use here")


class RayNode:
    """One node: its namespace, address and Kelpie home."""

    def __init__(self, cluster: RayCluster, index: int) -> None:
        self.index = index
        self.netns = f"{cluster.prefix}n{index}"
        self.ip = f"{cluster.subnet}.{11 + index}"
        self.home = KelpieHome()
        self.temp = Path(tempfile.mkdtemp(prefix=f"r{index}", dir="/tmp"))
        self.env = {**self.home.env, "RAY_USAGE_STATS_ENABLED": "0",
                    "PYTHONPATH": os.pathsep.join(sys.path)}

    def run(self, *command: str, timeout: float = 300, check: bool = True,
            ) -> subprocess.CompletedProcess[str]:
        """Run a command inside this node's namespace with its environment."""
        result = subprocess.run(["ip", "netns", "exec", self.netns, *command], check=False,
                                env=self.env,
                                text=True, capture_output=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{command} on node {self.index} failed "
                                 f"({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    def pids(self) -> list[int]:
        listed = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True,
                                text=True, check=False).stdout.split()
        return [int(pid) for pid in listed]

    def raylet_pid(self) -> int:
        for pid in self.pids():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == "raylet":
                    return pid
        raise AssertionError(f"no raylet runs on node {self.index}")


class RayCluster:
    """``nodes`` Ray nodes in namespaces; node 0 is the head."""

    def __init__(self, nodes: int = 3, *, subnet_index: int | None = None) -> None:
        self.prefix = f"kf{os.getpid() % 10000}"
        self.subnet = f"10.{subnet_index or free_subnet_index()}.0"
        self.bridge = f"{self.prefix}br"
        self.registry = ""
        """HOST:PORT of a registry a test started for the nodes, if any."""
        self.nodes: list[RayNode] = []
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for index in range(nodes):
                node = RayNode(self, index)
                self.nodes.append(node)
                _ip("netns", "add", node.netns)
                veth = f"{self.prefix}v{index}"
                _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns",
                    node.netns)
                _ip("link", "set", veth, "master", self.bridge, "up")
                _ip("-n", node.netns, "addr", "add", f"{node.ip}/24", "dev", "eth0")
                _ip("-n", node.netns, "link", "set", "eth0", "up")
                _ip("-n", node.netns, "link", "set", "lo", "up")
            for node in self.nodes:
                self.start(node)
        except BaseException:
            self.close()
            raise

    @property
    def head(self) -> RayNode:
        return self.nodes[0]

    @property
    def address(self) -> str:
        return f"{self.head.ip}:6379"

    def start(self, node: RayNode) -> None:
        """Start (or restart) the node's raylet (the head's GCS too)."""
        role = (["--head", "--port=6379", "--include-dashboard=false"] if node is self.head
                else [f"--address={self.address}"])
        node.run(*RAY, "start", *role, f"--node-ip-address={node.ip}", "--num-cpus=2",
                 "--resources", json.dumps({"kelpie_host": 1}), f"--temp-dir={node.temp}",
                 "--disable-usage-stats", timeout=180)

    def driver(self, code: str, *, timeout: float = 600) -> Any:
        """Run ``code`` as a Ray driver in the head's namespace; it must print one JSON
        line last, which is returned."""
        script = textwrap.dedent(f"""
            import json, ray, sys
            ray.init(address={self.address!r}, namespace="kelpie", log_to_driver=False)
        """) + textwrap.dedent(code)
        result = self.head.run(sys.executable, "-c", script, timeout=timeout)
        lines = [line for line in result.stdout.splitlines() if line.startswith(("{", "["))]
        if not lines:
            raise AssertionError(f"the driver printed nothing:\n{result.stderr}")
        return json.loads(lines[-1])

    def outside(self, code: str, *, timeout: float = 600) -> Any:
        """Run ``code`` on this machine's own network (outside every node, reaching them
        over the bridge), where it can only join the cluster through the Ray client; it
        must print one JSON line last, which is returned."""
        script = "import json\n" + textwrap.dedent(code)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path),
               "RAY_USAGE_STATS_ENABLED": "0"}
        result = subprocess.run([sys.executable, "-c", script], env=env, text=True,
                                capture_output=True, timeout=timeout, check=False)
        lines = [line for line in result.stdout.splitlines() if line.startswith(("{", "["))]
        if result.returncode != 0 or not lines:
            raise AssertionError(f"the program outside failed ({result.returncode}):\n"
                                 f"{result.stdout}\n{result.stderr}")
        return json.loads(lines[-1])

    def kill_raylet(self, node: RayNode) -> None:
        os.kill(node.raylet_pid(), signal.SIGKILL)

    def close(self) -> None:
        for node in self.nodes:
            for pid in node.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for node in self.nodes:
            node.home.close()
            subprocess.run(["ip", "netns", "del", node.netns], capture_output=True,
                           check=False)
            subprocess.run(["rm", "-rf", str(node.temp)], check=False)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, check=False)
