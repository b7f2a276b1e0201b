"""Firecracker's API, as the Firecracker backend speaks it: one method per request.

Firecracker serves a REST API (``firecracker-v1.16.1.yaml`` beside this module) on a unix
socket. A VM is configured before ``InstanceStart`` (machine, boot source, drives, vsock,
network interfaces), paused and resumed with ``PATCH /vm``, snapshotted only while paused
(``PUT /snapshot/create``) and restored only into a fresh process (``PUT /snapshot/load``).
A request it refuses is answered 4xx with a ``fault_message``, which
:class:`FirecrackerApiError` carries as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import httpx

from kelpie._exceptions import VmError

API_DOCUMENT = Path(__file__).with_name("firecracker-v1.16.1.yaml")
"""The API document this client is written against (and tested with)."""
API_VERSION = "1.16.1"
REQUEST_TIMEOUT = 30.0


class FirecrackerApiError(VmError):
    """Firecracker refused a request: its status and its own ``fault_message``."""

    def __init__(self, method: str, path: str, status: int, fault: str) -> None:
        self.method = method
        self.path = path
        self.status = status
        self.fault = fault
        super().__init__(f"Firecracker refused {method} {path} ({status}): {fault}")


class FirecrackerApi:
    """The API of one Firecracker process, on the unix socket ``socket``.

    ``transport`` replaces the socket (tests give an in-process fake of the API).
    """

    def __init__(self, socket: Path, *, transport: httpx.AsyncBaseTransport | None = None,
                 timeout: float = REQUEST_TIMEOUT) -> None:
        self.socket = socket
        self._client = httpx.AsyncClient(
            transport=transport or httpx.AsyncHTTPTransport(uds=str(socket)),
            base_url="http://localhost", timeout=timeout)

    async def close(self) -> None:
        await self._client.aclose()

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None,
                    ) -> Any:
        try:
            reply = await self._client.request(method, path, json=body)
        except httpx.TransportError as exc:
            raise VmError(f"Firecracker's API on {self.socket} did not answer {method} "
                          f"{path}: {exc}") from exc
        if reply.status_code >= 400:
            raise FirecrackerApiError(method, path, reply.status_code, _fault(reply))
        return reply.json() if reply.content else None

    # ---- before InstanceStart -----------------------------------------------------------
    async def set_machine(self, *, vcpus: int, memory_mib: int) -> None:
        await self._call("PUT", "/machine-config",
                         {"vcpu_count": vcpus, "mem_size_mib": memory_mib, "smt": False})

    async def set_boot_source(self, kernel: Path, *, initrd: Path | None,
                              boot_args: str) -> None:
        body: dict[str, Any] = {"kernel_image_path": str(kernel), "boot_args": boot_args}
        if initrd is not None:
            body["initrd_path"] = str(initrd)
        await self._call("PUT", "/boot-source", body)

    async def add_drive(self, drive_id: str, path: Path, *, root: bool = False,
                        read_only: bool = False) -> None:
        await self._call("PUT", f"/drives/{drive_id}", {
            "drive_id": drive_id, "path_on_host": str(path), "is_root_device": root,
            "is_read_only": read_only})

    async def set_vsock(self, uds_path: Path, *, guest_cid: int = 3) -> None:
        """The guest's vsock device, reached from the host through the unix socket
        ``uds_path`` (hybrid vsock: ``CONNECT <port>`` then ``OK <port>``)."""
        await self._call("PUT", "/vsock", {"guest_cid": guest_cid, "uds_path": str(uds_path)})

    async def add_network(self, iface_id: str, tap: str, *, guest_mac: str | None = None,
                          ) -> None:
        body = {"iface_id": iface_id, "host_dev_name": tap}
        if guest_mac is not None:
            body["guest_mac"] = guest_mac
        await self._call("PUT", f"/network-interfaces/{iface_id}", body)

    async def start(self) -> None:
        await self._call("PUT", "/actions", {"action_type": "InstanceStart"})

    # ---- running ------------------------------------------------------------------------
    async def describe(self) -> dict[str, Any]:
        """``GET /``: the instance's id, state and Firecracker's version."""
        info: dict[str, Any] = await self._call("GET", "/")
        return info

    async def pause(self) -> None:
        await self._call("PATCH", "/vm", {"state": "Paused"})

    async def resume(self) -> None:
        await self._call("PATCH", "/vm", {"state": "Resumed"})

    async def ctrl_alt_del(self) -> None:
        """Ask the guest to reboot, which a guest booted with ``reboot=k`` takes as power off
        (x86 only)."""
        await self._call("PUT", "/actions", {"action_type": "SendCtrlAltDel"})

    async def create_snapshot(self, snapshot_path: Path, memory_path: Path, *,
                              kind: Literal["Full", "Diff"] = "Full") -> None:
        """Write the VM's state and memory (the VM must be paused)."""
        await self._call("PUT", "/snapshot/create", {
            "snapshot_path": str(snapshot_path), "mem_file_path": str(memory_path),
            "snapshot_type": kind})

    async def load_snapshot(self, snapshot_path: Path, memory_path: Path, *, resume: bool,
                            vsock_uds: Path | None = None,
                            taps: Sequence[tuple[str, str]] = ()) -> None:
        """Restore a snapshot into this fresh process (nothing configured yet): its memory
        from a file, its vsock on ``vsock_uds``, each (interface, tap) of ``taps`` on this
        host's tap."""
        body: dict[str, Any] = {
            "snapshot_path": str(snapshot_path),
            "mem_backend": {"backend_type": "File", "backend_path": str(memory_path)},
            "resume_vm": resume,
        }
        if vsock_uds is not None:
            body["vsock_override"] = {"uds_path": str(vsock_uds)}
        if taps:
            body["network_overrides"] = [{"iface_id": i, "host_dev_name": t} for i, t in taps]
        await self._call("PUT", "/snapshot/load", body)


def _fault(reply: httpx.Response) -> str:
    try:
        message = reply.json().get("fault_message")
    except (ValueError, AttributeError):
        message = None
    return str(message) if message else (reply.text.strip() or reply.reason_phrase)
