"""A stand-in for Firecracker's API that holds every request to Firecracker's own contract.

Routes and request bodies come from the API document Kelpie vendors
(``kelpie/backends/firecracker/firecracker-v1.16.1.yaml``): a request to a path or method the
document lacks, or whose body its schema refuses (unknown fields included: Firecracker's
structures deny them), is answered 400 with a ``fault_message``, as Firecracker answers. On
top of the schema it keeps the ordering rules the document states in prose: configuration
only before ``InstanceStart`` (which needs a boot source), ``PATCH /vm`` only after it,
``/snapshot/create`` only while paused, ``/snapshot/load`` only in a fresh process.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import dataclasses
import http.server
import io
import json
import os
import re
import signal
import socket
import socketserver
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import yaml

from fake_guest import agent_argv, scratch_root
from kelpie.backends.firecracker import API_DOCUMENT

PRE_BOOT = ("/machine-config", "/boot-source", "/drives/", "/vsock", "/network-interfaces/")


def _strict(schema: Any) -> Any:
    """The schema with ``additionalProperties: false`` on every object that lists its
    properties and says nothing else (Firecracker refuses unknown fields)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@dataclasses.dataclass
class Route:
    method: str
    pattern: re.Pattern[str]
    template: str
    body: dict[str, Any] | None


class FakeFirecracker:
    """One Firecracker process's API: ``transport`` for httpx; ``requests`` seen (method,
    path, body) and ``state``: fresh, configured, running, paused."""

    def __init__(self) -> None:
        document = yaml.safe_load(API_DOCUMENT.read_text())
        definitions = _strict(document["definitions"])
        self.routes: list[Route] = []
        for template, operations in document["paths"].items():
            pattern = re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", template) + "$")
            for method, operation in operations.items():
                body = next((p["schema"] for p in operation.get("parameters", [])
                             if p.get("in") == "body"), None)
                schema = None if body is None else {**body, "definitions": definitions}
                self.routes.append(Route(method.upper(), pattern, template, schema))
        self.requests: list[tuple[str, str, Any]] = []
        self.state = "fresh"
        self.configured: set[str] = set()
        self.transport = httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        body = json.loads(request.content) if request.content else None
        self.requests.append((request.method, path, body))
        route = next((r for r in self.routes
                      if r.method == request.method and r.pattern.match(path)), None)
        if route is None:
            return _fault(400, f"Invalid request method and/or path: {request.method} {path}")
        if route.body is not None:
            try:
                jsonschema.Draft4Validator(route.body).validate(body)
            except jsonschema.ValidationError as exc:
                return _fault(400, f"An error occurred when deserializing the json body of a "
                                   f"request: {exc.message}")
        refused = self._out_of_order(request.method, path, body)
        if refused:
            return _fault(400, refused)
        return self._carry_out(request.method, path, body)

    def _out_of_order(self, method: str, path: str, body: Any) -> str | None:
        if method == "PUT" and path.startswith(PRE_BOOT) and self.state not in ("fresh",
                                                                                 "configured"):
            return "The requested operation is not supported after starting the microVM."
        if path == "/actions" and body["action_type"] == "InstanceStart":
            if self.state not in ("fresh", "configured"):
                return "The microVM is already running."
            if "/boot-source" not in self.configured:
                return "Cannot start microvm without kernel configuration."
        if path == "/vm" and self.state not in ("running", "paused"):
            return "The requested operation is not supported before starting the microVM."
        if path == "/snapshot/create" and self.state != "paused":
            return "Cannot save the microVM state: the microVM must be paused."
        if path == "/snapshot/load" and self.state != "fresh":
            return ("Loading a microVM snapshot not allowed after configuring boot-specific "
                    "resources.")
        return None

    def _carry_out(self, method: str, path: str, body: Any) -> httpx.Response:
        if method == "GET" and path == "/":
            return httpx.Response(200, json={"id": "anonymous-instance", "app_name":
                                             "Firecracker", "vmm_version": "1.16.1",
                                             "state": {"fresh": "Not started", "configured":
                                                       "Not started", "running": "Running",
                                                       "paused": "Paused"}[self.state]})
        if method == "PUT" and path.startswith(PRE_BOOT):
            self.configured.add("/drives/" if path.startswith("/drives/") else path)
            self.state = "configured"
        elif path == "/actions" and body["action_type"] == "InstanceStart":
            self.state = "running"
        elif path == "/vm":
            self.state = "paused" if body["state"] == "Paused" else "running"
        elif path == "/snapshot/load":
            self.state = "running" if body.get("resume_vm") else "paused"
        return httpx.Response(204)


def _fault(status: int, message: str) -> httpx.Response:
    return httpx.Response(status, json={"fault_message": message})


# ---- a stand-in Firecracker process: the API above on a unix socket, a host-run guest ----
#
# ``fake_firecracker.py --api-sock PATH --id ID`` serves the validated API and, where
# Firecracker would boot a guest kernel, runs Kelpie's real guest agent on the host
# (``fake_guest``: own namespaces, commands chrooted into a scratch busybox root) behind a
# hybrid-vsock socket that speaks Firecracker's CONNECT/OK handshake. What it models and
# how: pause is SIGSTOP of the guest's processes; the root drive holds the guest's files as
# a tar (written when the guest powers off or reboots, read when it starts; a drive that is
# not one yet, such as an image's ext4, starts an empty busybox root); a snapshot's memory
# file is that tar of the paused guest, its state file the configuration. Paths are
# resolved against the working directory, as Firecracker resolves them.

DISK_MAGIC = b"KELPIE-FAKE-FIRECRACKER-DISK\n"
PR_SET_CHILD_SUBREAPER = 36


class FakeMicroVm(FakeFirecracker):
    """The API with its effects: a guest (the agent) behind a hybrid-vsock socket."""

    def __init__(self, home: Path) -> None:
        super().__init__()
        self.home = home  # scratch space of this process: the guest's root lives here
        self.boot: dict[str, Any] = {}
        self.drives: dict[str, dict[str, Any]] = {}
        self.vsock_uds: str | None = None
        self.guest: subprocess.Popen[bytes] | None = None
        self.bridge: socketserver.UnixStreamServer | None = None
        self.lock = threading.Lock()
        self.spawner = concurrent.futures.ThreadPoolExecutor(max_workers=1)

    # ---- the API's effects --------------------------------------------------------------
    def _carry_out(self, method: str, path: str, body: Any) -> httpx.Response:
        try:
            self._effect(method, path, body)
        except _Fault as fault:
            return _fault(400, str(fault))
        return super()._carry_out(method, path, body)

    def _effect(self, method: str, path: str, body: Any) -> None:
        if path == "/boot-source":
            _must_exist(body["kernel_image_path"], "kernel")
            self.boot = body
        elif path.startswith("/drives/"):
            _must_exist(body["path_on_host"], "drive")
            self.drives[body["drive_id"]] = body
        elif path == "/vsock":
            self.vsock_uds = body["uds_path"]
        elif path == "/actions" and body["action_type"] == "InstanceStart":
            self._start_guest(self._disk_files())
        elif path == "/actions" and body["action_type"] == "SendCtrlAltDel":
            threading.Thread(target=self.power_off, daemon=True).start()  # after the reply
        elif path == "/vm":
            self._signal_guest(signal.SIGSTOP if body["state"] == "Paused" else signal.SIGCONT)
        elif path == "/snapshot/create":
            Path(body["snapshot_path"]).write_text(json.dumps({
                "boot": self.boot, "drives": self.drives, "vsock_uds": self.vsock_uds}))
            Path(body["mem_file_path"]).write_bytes(self._pack_guest())
        elif path == "/snapshot/load":
            state = json.loads(Path(body["snapshot_path"]).read_text())
            self.boot, self.drives = state["boot"], state["drives"]
            self.vsock_uds = body.get("vsock_override", {}).get("uds_path", state["vsock_uds"])
            for drive in self.drives.values():
                _must_exist(drive["path_on_host"], "snapshot's drive")
            memory = Path(body["mem_backend"]["backend_path"]).read_bytes()
            self._start_guest(memory)
            if not body.get("resume_vm"):
                self._signal_guest(signal.SIGSTOP)

    def _boot_arg(self, name: str) -> str | None:
        for word in self.boot.get("boot_args", "").split():
            if word.startswith(f"{name}="):
                return word.split("=", 1)[1]
        return None

    # ---- the guest ----------------------------------------------------------------------
    def _root_drive(self) -> Path | None:
        drive = next(iter(self.drives.values()), None)
        return None if drive is None else Path(drive["path_on_host"])

    def _disk_files(self) -> bytes:
        drive = self._root_drive()
        data = drive.read_bytes() if drive is not None else b""
        return data[len(DISK_MAGIC):] if data.startswith(DISK_MAGIC) else b""

    def _start_guest(self, files: bytes) -> None:
        where = self.home / "guest"
        subprocess.run(["rm", "-rf", str(where)], check=True)
        where.mkdir(parents=True)
        root = scratch_root(where)
        if files:
            with tarfile.open(fileobj=io.BytesIO(files)) as tar:
                tar.extractall(root, filter="tar")
        listen = where / "agent.sock"
        # From the one long-lived thread: the guest dies with the *thread* that started it
        # (PR_SET_PDEATHSIG), and request threads end with their connection.
        self.guest = self.spawner.submit(
            subprocess.Popen, agent_argv(listen, root, self._boot_arg("kelpie.hostname")),
            stdin=subprocess.DEVNULL).result()
        while not listen.exists():
            if self.guest.poll() is not None:
                raise _Fault("the guest (agent) exited while booting")
            time.sleep(0.01)
        self._serve_vsock(listen, int(self._boot_arg("kelpie.vsock") or 0))
        threading.Thread(target=self._watch_guest, args=(self.guest,), daemon=True).start()
        print(f"kelpie-init [0.00]: agent starting on vsock port {self._boot_arg('kelpie.vsock')}",
              flush=True)

    def _pack_guest(self) -> bytes:
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w") as tar:
            tar.add(self.home / "guest" / "root", arcname=".")
        return out.getvalue()

    def _signal_guest(self, signum: int) -> None:
        """Signal every process of the guest (the agent and what it runs): they are all
        descendants of this process, which is their subreaper."""
        seen: set[int] = set()
        while True:
            found = _descendants(os.getpid()) - seen
            if not found:
                return
            for pid in found:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signum)
            seen |= found

    def _watch_guest(self, guest: subprocess.Popen[bytes]) -> None:
        guest.wait()
        if guest is self.guest:  # the guest powered off (its agent was asked to)
            self.power_off()

    def power_off(self) -> None:
        """The guest ends: its files go to the root drive, then Firecracker exits."""
        with self.lock:
            guest, self.guest = self.guest, None
            if guest is not None:
                self._signal_guest(signal.SIGCONT)
                guest.kill()
                guest.wait()
                drive = self._root_drive()
                if drive is not None:
                    drive.write_bytes(DISK_MAGIC + self._pack_guest())
            print("fake firecracker: the guest powered off; exiting", flush=True)
            os._exit(0)

    def _serve_vsock(self, agent: Path, port: int) -> None:
        """The host end of the guest's vsock: ``CONNECT <port>`` to the agent's port is
        answered ``OK`` and carried to it; another port is closed (nothing listens)."""
        assert self.vsock_uds is not None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.vsock_uds)

        class Connect(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                line = self.rfile.readline()
                if line != f"CONNECT {port}\n".encode():
                    return
                inner = socket.socket(socket.AF_UNIX)
                try:
                    inner.connect(str(agent))
                except OSError:
                    return
                self.wfile.write(b"OK 1073741824\n")
                self.wfile.flush()
                _pipe_both(self.connection, self.rfile, inner)

        self.bridge = socketserver.ThreadingUnixStreamServer(self.vsock_uds, Connect)
        self.bridge.daemon_threads = True
        threading.Thread(target=self.bridge.serve_forever, daemon=True).start()


class _Fault(Exception):
    """A request Firecracker would refuse once it acted on it (a missing file, say)."""


def _must_exist(path: str, what: str) -> None:
    if not Path(path).exists():  # relative paths: against the working directory
        raise _Fault(f"Unable to open the {what} file {path}: No such file or directory "
                     f"(os error 2)")


def _descendants(parent: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
    found: set[int] = set()
    todo = [parent]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _pipe_both(outer: socket.socket, outer_reader: Any, inner: socket.socket) -> None:
    def inward() -> None:
        with contextlib.suppress(OSError):
            while data := outer_reader.read1(65536):
                inner.sendall(data)
        with contextlib.suppress(OSError):
            inner.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=inward, daemon=True)
    thread.start()
    with contextlib.suppress(OSError):
        while data := inner.recv(65536):
            outer.sendall(data)
    with contextlib.suppress(OSError):
        outer.shutdown(socket.SHUT_WR)
    thread.join()
    inner.close()


class _ApiHandler(http.server.BaseHTTPRequestHandler):
    """One HTTP request on the API socket, answered by the process's FakeMicroVm."""

    vm: FakeMicroVm
    protocol_version = "HTTP/1.1"

    def address_string(self) -> str:
        return "api.sock"

    def log_message(self, format: str, *args: Any) -> None:
        print("fake firecracker API:", format % args, flush=True)

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        content = self.rfile.read(length) if length else b""
        request = httpx.Request(self.command, f"http://localhost{self.path}", content=content)
        with self.vm.lock:
            reply = self.vm.handle(request)
        self.send_response(reply.status_code)
        self.send_header("Content-Length", str(len(reply.content)))
        if reply.content:
            self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(reply.content)

    do_GET = do_PUT = do_PATCH = _answer  # noqa: N815  (http.server names them so)


def main(argv: list[str]) -> int:
    if "--version" in argv:
        print("Firecracker v1.16.1 (Kelpie's stand-in for contract tests)")
        return 0
    options = dict(zip(argv[1::2], argv[2::2], strict=False))
    if "--api-sock" not in options:
        print("fake firecracker: only --api-sock PATH [--id ID] is modelled", file=sys.stderr)
        return 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # orphans of the guest stay ours
    api_socket = Path(options["--api-sock"])
    _ApiHandler.vm = FakeMicroVm(Path.cwd() / ".fake-firecracker")
    signal.signal(signal.SIGTERM, lambda *_: _ApiHandler.vm.power_off())
    server = socketserver.ThreadingUnixStreamServer(str(api_socket), _ApiHandler)
    server.daemon_threads = True
    print(f"fake firecracker {options.get('--id', '?')}: API on {api_socket}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
