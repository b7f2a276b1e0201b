"""The fleet for real: a 3-node Ray cluster, each node in its own network namespace joined
by veth, each a Kelpie host (host agent + daemon) running real QEMU sandboxes restored from
a 128 MiB template. Drivers run in the head's namespace, as Ray wants.

One cluster for the module, in this order: 32 sandboxes created at once from Ray tasks
(spread over the hosts, each running a command); a drain that teleports a running sandbox
whose counter goes on; guests that cannot open the cluster's own ports; and a raylet killed
with SIGKILL, whose sandboxes are reported lost within the bound, then reported back
(not destroyed) when the node rejoins.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from collections import Counter
from collections.abc import Iterator

import pytest

from conftest import real_part_missing
from ray_cluster import RayCluster

pytestmark = [pytest.mark.vm]

LOST_AFTER = 120.0
INTERVAL = 2.0
LOST_BOUND = 45.0
"""Ray declares a SIGKILLed raylet dead in ~15 s here; the fleet reacts at its next round."""
TEMPLATE = "t128"


@pytest.fixture(scope="module")
def cluster(guestkit: object) -> Iterator[RayCluster]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        real_part_missing("a Ray cluster in network namespaces needs root and iproute2")
    if importlib.util.find_spec("ray") is None:
        real_part_missing("the fleet needs Ray (pip install -e '.[fleet]')")
    nodes = RayCluster(3)
    try:
        hosts = nodes.driver(f"""
            from kelpie.fleet import Fleet
            fleet = Fleet.up(interval={INTERVAL}, lost_after={LOST_AFTER})
            made = fleet.create_template({TEMPLATE!r}, memory="128m")
            print(json.dumps({{"hosts": [h.host for h in fleet.hosts()], "made": made,
                              "problems": fleet.problems()}}))
        """)
        assert sorted(hosts["hosts"]) == sorted(node.ip for node in nodes.nodes), hosts
        assert sorted(hosts["made"]) == sorted(hosts["hosts"]), hosts
        yield nodes
    finally:
        nodes.close()


def test_32_sandboxes_from_ray_tasks_spread_over_the_hosts(cluster: RayCluster) -> None:
    result = cluster.driver(f"""
        from kelpie.fleet import Fleet

        @ray.remote(num_cpus=0)
        def rollout(i):
            box = Fleet().create(template={TEMPLATE!r}, name=f"r{{i:02d}}")
            done = box.exec(["sh", "-c", f"echo $(({{i}} * {{i}})) > /root/out; cat /root/out"])
            return box.name, done.exit_code, done.stdout.decode().strip()

        ran = ray.get([rollout.remote(i) for i in range(32)])
        fleet = Fleet()
        placed = {{s.name: s.host for s in fleet.list()}}
        ray.get([ray.remote(num_cpus=0)(lambda n: Fleet().remove(n)).remote(name)
                 for name, _, _ in ran])
        print(json.dumps({{"ran": ran, "placed": placed, "left": len(fleet.list())}}))
    """, timeout=900)
    assert sorted(result["ran"]) == [[f"r{i:02d}", 0, str(i * i)] for i in range(32)]
    per_host = Counter(result["placed"].values())
    assert sorted(per_host) == sorted(node.ip for node in cluster.nodes), per_host
    assert min(per_host.values()) >= 6, f"not spread by capacity: {per_host}"
    assert result["left"] == 0


def test_drain_teleports_a_running_sandbox_and_its_counter_goes_on(
        cluster: RayCluster) -> None:
    result = cluster.driver(f"""
        import time
        from kelpie.fleet import Fleet

        fleet = Fleet()
        box = fleet.create(template={TEMPLATE!r}, name="counter")
        box.exec(["sh", "-c", "i=0; while :; do i=$((i+1)); echo $i > /root/n; sleep 0.1; "
                              "done > /dev/null 2>&1 &"])
        def count(b):
            return int(b.files.read("/root/n").decode() or 0)
        deadline = time.monotonic() + 60
        while count(box) < 5 and time.monotonic() < deadline:
            time.sleep(0.2)
        before_host = fleet.info("counter").host
        before = count(box)
        moved = fleet.drain(before_host)
        after_box = fleet.get("counter")
        first = count(after_box)
        deadline = time.monotonic() + 60
        while count(after_box) <= first and time.monotonic() < deadline:
            time.sleep(0.2)
        later = count(after_box)
        fleet.undrain(before_host)
        info = fleet.info("counter")
        fleet.remove("counter")
        print(json.dumps({{"from": before_host, "to": info.host, "before": before,
                          "first": first, "later": later, "status": info.status.value,
                          "moved": [m.name for m in moved], "reason": info.reason}}))
    """)
    assert result["moved"] == ["counter"], json.dumps(result)
    assert result["to"] != result["from"], json.dumps(result)
    assert result["status"] == "running", json.dumps(result)
    # the guest's memory came along, and its process goes on counting
    assert result["first"] >= result["before"] >= 5, json.dumps(result)
    assert result["later"] > result["first"], json.dumps(result)


def test_a_guest_cannot_open_the_cluster_ports(cluster: RayCluster) -> None:
    # socket.connect, not create_connection: the guest's minimal Python has no idna codec
    probe = ("import socket, sys\n"
             "for target in sys.argv[1:]:\n"
             "    host, port = target.rsplit(':', 1)\n"
             "    try:\n"
             "        probe = socket.socket()\n"
             "        probe.settimeout(3)\n"
             "        probe.connect((host, int(port)))\n"
             "        print(target, 'open')\n"
             "    except OSError as exc:\n"
             "        print(target, 'closed', type(exc).__name__)\n")
    head = cluster.head.ip
    targets = [f"{head}:6379"] + [f"{node.ip}:7075" for node in cluster.nodes]
    result = cluster.driver(f"""
        from kelpie.fleet import Fleet

        fleet = Fleet()
        out = {{}}
        for name, options in (("walled", {{"network": "nat"}}),
                              ("allowed", {{"network": "policy",
                                            "allow": [{head!r} + ":6379"]}})):
            box = fleet.create(name=name, memory_mib=256, **options)
            done = box.exec(["python3", "-c", {probe!r}, *{targets!r}])
            out[name] = (done.stdout.decode() + done.stderr.decode()).split("\\n")
            fleet.remove(name)
        print(json.dumps(out))
    """)
    walled = [line for line in result["walled"] if line]
    assert len(walled) == len(targets), json.dumps(result)
    assert all(" closed " in line for line in walled), json.dumps(result)
    # the same probe does see an open port when a policy lets it through
    assert f"{head}:6379 open" in result["allowed"], json.dumps(result)


def test_a_killed_raylet_marks_its_sandboxes_lost_then_reports_them_back(
        cluster: RayCluster) -> None:
    victim = cluster.nodes[2]
    placed = cluster.driver(f"""
        from kelpie.fleet import Fleet

        fleet = Fleet()
        names = []
        for i in range(6):
            box = fleet.create(template={TEMPLATE!r}, name=f"keep{{i}}")
            box.files.write("/root/mark", f"kept {{i}}")
            names.append(box.name)
        print(json.dumps({{s.name: s.host for s in fleet.list()}}))
    """)
    on_victim = sorted(name for name, host in placed.items() if host == victim.ip)
    assert on_victim, f"nothing was placed on {victim.ip}: {placed}"
    cluster.kill_raylet(victim)
    lost = cluster.driver(f"""
        import time
        from kelpie.fleet import Fleet

        fleet = Fleet()
        started = time.monotonic()
        while time.monotonic() - started < {LOST_BOUND}:
            lost = {{s.name: s.reason for s in fleet.list() if s.status.value == "lost"}}
            if lost:
                break
            time.sleep(0.5)
        host = [h for h in fleet.hosts() if h.host == {victim.ip!r}][0]
        print(json.dumps({{"after": time.monotonic() - started, "lost": lost,
                          "host": host.status.value}}))
    """)
    assert sorted(lost["lost"]) == on_victim, lost
    assert lost["host"] == "dead", lost
    assert all("died" in reason for reason in lost["lost"].values()), lost
    cluster.start(victim)  # the raylet rejoins (a new Ray node id, the same host)
    back = cluster.driver(f"""
        import time
        from kelpie.fleet import Fleet

        fleet = Fleet()
        started = time.monotonic()
        while time.monotonic() - started < 120:
            mine = [s for s in fleet.list() if s.host == {victim.ip!r}]
            if mine and all(s.status.value == "running" for s in mine):
                break
            time.sleep(0.5)
        marks = {{name: Fleet().get(name).files.read("/root/mark").decode()
                 for name in {on_victim!r}}}
        events = [(e.kind, e.name) for e in fleet.events() if e.host == {victim.ip!r}]
        for s in fleet.list():
            fleet.remove(s.name)
        print(json.dumps({{"statuses": {{s.name: s.status.value for s in mine}},
                          "marks": marks, "events": events}}))
    """)
    assert back["statuses"] == {name: "running" for name in on_victim}, back
    assert back["marks"] == {name: f"kept {name[-1]}" for name in on_victim}, back
    assert ["returned", on_victim[0]] in back["events"], back
