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

import dataclasses
import json
import re
from typing import Any

import httpx
import jsonschema
import yaml

from kelpie.backends.firecracker import SPEC

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
        document = yaml.safe_load(SPEC.read_text())
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
