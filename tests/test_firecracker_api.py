"""The Firecracker backend's API client against Firecracker's own API document (v1.16.1).

Every request goes to :class:`fake_firecracker.FakeFirecracker`, which validates it against
the vendored document (paths, methods, body schemas, no unknown fields) and Firecracker's
ordering rules, and answers as Firecracker does (204, or 400 with a ``fault_message``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fake_firecracker import FakeFirecracker
from kelpie.backends.firecracker import (
    API_DOCUMENT,
    API_VERSION,
    FirecrackerApi,
    FirecrackerApiError,
)
from kelpie.vm import VmError


@pytest.fixture
async def fake() -> FakeFirecracker:
    return FakeFirecracker()


def api(fake: FakeFirecracker) -> FirecrackerApi:
    return FirecrackerApi(Path("/run/fc.sock"), transport=fake.transport)


async def configure(client: FirecrackerApi, tmp: Path) -> None:
    await client.set_machine(vcpus=2, memory_mib=512)
    await client.set_boot_source(tmp / "vmlinux", initrd=tmp / "initrd",
                                 boot_args="console=ttyS0 reboot=k panic=1")
    await client.add_drive("rootfs", tmp / "rootfs.ext4", root=True, read_only=True)
    await client.add_drive("scratch", tmp / "overlay.ext4")
    await client.set_vsock(tmp / "vsock.sock")
    await client.add_network("eth0", "tap-kelpie0", guest_mac="06:00:ac:10:00:02")


def test_the_vendored_document_is_firecrackers_of_the_version_we_name() -> None:
    document = yaml.safe_load(API_DOCUMENT.read_text())
    assert document["swagger"] == "2.0"
    assert document["info"]["version"] == API_VERSION == "1.16.1"
    assert "github.com/firecracker-microvm/firecracker, tag v1.16.1" in API_DOCUMENT.read_text()


async def test_a_whole_life_is_accepted_in_order(fake: FakeFirecracker, tmp_path: Path) -> None:
    client = api(fake)
    await configure(client, tmp_path)
    await client.start()
    assert (await client.describe())["state"] == "Running"
    await client.pause()
    await client.create_snapshot(tmp_path / "vm.snap", tmp_path / "vm.mem")
    await client.create_snapshot(tmp_path / "vm.snap", tmp_path / "vm.mem", kind="Diff")
    await client.resume()
    await client.ctrl_alt_del()
    assert fake.state == "running"
    assert [(m, p) for m, p, _ in fake.requests][:7] == [
        ("PUT", "/machine-config"), ("PUT", "/boot-source"), ("PUT", "/drives/rootfs"),
        ("PUT", "/drives/scratch"), ("PUT", "/vsock"), ("PUT", "/network-interfaces/eth0"),
        ("PUT", "/actions")]
    await client.close()


async def test_a_snapshot_loads_into_a_fresh_process_with_its_overrides(
    fake: FakeFirecracker, tmp_path: Path,
) -> None:
    client = api(fake)
    await client.load_snapshot(tmp_path / "vm.snap", tmp_path / "vm.mem", resume=True,
                               vsock_uds=tmp_path / "new-vsock.sock",
                               taps=[("eth0", "tap-kelpie7")])
    _, _, body = fake.requests[-1]
    assert body == {
        "snapshot_path": str(tmp_path / "vm.snap"),
        "mem_backend": {"backend_type": "File", "backend_path": str(tmp_path / "vm.mem")},
        "resume_vm": True, "vsock_override": {"uds_path": str(tmp_path / "new-vsock.sock")},
        "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap-kelpie7"}],
    }
    assert fake.state == "running"
    await client.close()


@pytest.mark.parametrize(("before", "call", "fault"), [
    ("running", lambda c, t: c.set_machine(vcpus=1, memory_mib=128), "after starting"),
    ("running", lambda c, t: c.add_drive("late", t / "d.ext4"), "after starting"),
    ("running", lambda c, t: c.create_snapshot(t / "s", t / "m"), "must be paused"),
    ("configured", lambda c, t: c.load_snapshot(t / "s", t / "m", resume=True),
     "not allowed after configuring"),
    ("configured", lambda c, t: c.pause(), "before starting"),
    ("running", lambda c, t: c.start(), "already running"),
])
async def test_out_of_order_requests_fail_with_firecrackers_fault_message(
    fake: FakeFirecracker, tmp_path: Path, before: str, call: object, fault: str,
) -> None:
    client = api(fake)
    await configure(client, tmp_path)
    if before == "running":
        await client.start()
    with pytest.raises(FirecrackerApiError) as caught:
        await call(client, tmp_path)  # type: ignore[operator]
    assert fault in caught.value.fault and caught.value.status == 400
    assert fault in str(caught.value)
    await client.close()


async def test_start_without_a_kernel_is_refused(fake: FakeFirecracker) -> None:
    client = api(fake)
    with pytest.raises(FirecrackerApiError, match="without kernel configuration"):
        await client.start()
    await client.close()


async def test_the_fake_refuses_what_the_document_refuses(fake: FakeFirecracker) -> None:
    """The contract has teeth: wrong types, unknown fields and unknown paths are refused."""
    client = api(fake)
    for method, path, body in (
        ("PUT", "/machine-config", {"vcpu_count": "two", "mem_size_mib": 512}),
        ("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 512, "vcpus": 2}),
        ("PUT", "/snapshot/load", {"mem_backend": {"backend_type": "File"}}),
        ("PUT", "/no-such-thing", {}),
        ("DELETE", "/vm", None),
    ):
        with pytest.raises(FirecrackerApiError) as caught:
            await client._call(method, path, body)
        assert caught.value.status == 400, (method, path)
    await client.close()


async def test_every_path_the_client_uses_is_in_the_document(fake: FakeFirecracker,
                                                             tmp_path: Path) -> None:
    client = api(fake)
    await configure(client, tmp_path)
    await client.start()
    await client.pause()
    await client.create_snapshot(tmp_path / "s", tmp_path / "m")
    await client.resume()
    await FirecrackerApi(Path("/x"), transport=FakeFirecracker().transport).load_snapshot(
        tmp_path / "s", tmp_path / "m", resume=False)
    templates = {r.template for r in fake.routes}
    used = {p for _, p, _ in fake.requests}
    assert all(any(r.pattern.match(p) for r in fake.routes) for p in used)
    assert {"/machine-config", "/boot-source", "/vsock", "/actions", "/vm",
            "/snapshot/create"} <= templates
    await client.close()


async def test_a_missing_socket_is_a_clear_error(tmp_path: Path) -> None:
    client = FirecrackerApi(tmp_path / "absent.sock")
    with pytest.raises(VmError, match="did not answer PUT /actions") as caught:
        await client.start()
    assert not isinstance(caught.value, FirecrackerApiError)
    await client.close()
