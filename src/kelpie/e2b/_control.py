"""E2B's control-plane API (``https://api.{domain}``) over Kelpie's runtime: create, list,
inspect, time out, pause, resume and kill sandboxes, as e2b's SDK calls them. Errors come
as E2B's ``{"code", "message"}`` with ``Should-Retry: false`` (the SDK retries a 503
otherwise, create included)."""

from __future__ import annotations

import datetime
import hmac
import json
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from kelpie.api import error_body, error_status
from kelpie.e2b._caller import access_token
from kelpie.runtime import (
    Runtime,
    SandboxInfo,
    SnapshotInfo,
    SnapshotNotFound,
)
from kelpie.vm import KelpieError, VmState

ENVD_VERSION = "0.5.7"
"""The envd version Kelpie's envd reports: the SDK's features up to it are served (CloseStdin,
octet-stream uploads), the later ones (file metadata, watch entries) are not."""
DEFAULT_TIMEOUT_S = 300
"""E2B's default sandbox timeout (when create or connect give none)."""
TEMPLATE_LABEL = "kelpie.e2b.template"
"""The label keeping the E2B template a sandbox was created from."""
STATES = {VmState.RUNNING: "running", VmState.PAUSED: "paused"}
"""The sandboxes E2B lists: running or paused; others (stopped, crashed) are not E2B's."""
LIST_LIMIT = 100


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class NewSandbox(_Body):
    """``POST /v2/sandboxes`` (fields Kelpie does not serve are ignored, see the README)."""

    template_id: str = Field(alias="templateID", min_length=1, max_length=256)
    timeout: int | None = Field(None, ge=1, le=30 * 24 * 3600)
    auto_pause: bool | None = Field(None, alias="autoPause")
    metadata: dict[str, str] = Field(default_factory=dict)
    env_vars: dict[str, str] = Field(default_factory=dict, alias="envVars")
    allow_internet_access: bool | None = None


class TimeoutBody(_Body):
    timeout: int = Field(ge=0, le=30 * 24 * 3600)


class ConnectBody(_Body):
    timeout: int | None = Field(None, ge=1, le=30 * 24 * 3600)


class E2bError(Exception):
    """An error answered in E2B's shape."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def error(code: int, message: str) -> JSONResponse:
    return JSONResponse({"code": code, "message": message}, status_code=code,
                        headers={"Should-Retry": "false"})


def _time(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).isoformat().replace(
        "+00:00", "Z")


class ControlPlane:
    """The control-plane app: ``api_key`` (a Kelpie daemon token) lets callers in;
    ``base`` is what E2B's default template ``base`` starts (a Kelpie template or image)."""

    def __init__(self, runtime: Runtime, *, api_key: str, base: str | None,
                 domain: str | None = None,
                 on_remove: Callable[[str], None] = lambda sandbox_id: None) -> None:
        self.runtime = runtime
        self.api_key = api_key
        self.base = base
        self.domain = domain
        self.on_remove = on_remove
        self.app = self._app()

    # ---- what E2B says about a sandbox --------------------------------------------------
    def _template(self, info: SandboxInfo) -> str:
        return info.labels.get(TEMPLATE_LABEL) or info.image or "base"

    def created(self, info: SandboxInfo) -> dict[str, Any]:
        """The ``Sandbox`` answer of create and connect (with its envd access token)."""
        template = self._template(info)
        return {"templateID": template, "alias": template, "sandboxID": info.id,
                "clientID": "kelpie", "envdVersion": ENVD_VERSION,
                "envdAccessToken": access_token(self.api_key, info.id),
                "trafficAccessToken": None, "domain": self.domain}

    def listed(self, info: SandboxInfo) -> dict[str, Any]:
        """The ``ListedSandbox``/``SandboxDetail`` of a running or paused sandbox."""
        template = self._template(info)
        return {
            "templateID": template, "alias": template, "sandboxID": info.id,
            "clientID": "kelpie", "startedAt": _time(info.created_at),
            "endAt": _time(info.expires_at if info.expires_at is not None else info.updated_at),
            "cpuCount": info.config.vcpus, "memoryMB": info.config.memory_mib,
            "diskSizeMB": info.config.disk_mib or 0, "state": STATES[info.state],
            "envdVersion": ENVD_VERSION, "domain": self.domain,
            "metadata": {k: v for k, v in info.labels.items() if not k.startswith("kelpie.")},
            "lifecycle": {"onTimeout": "pause" if info.on_timeout == "pause" else "kill",
                          "autoResume": False},
        }

    def template(self, snapshot: SnapshotInfo) -> dict[str, Any]:
        """A Kelpie template as E2B's ``Template`` (``base`` among its aliases when it is
        what E2B's default template starts)."""
        config = snapshot.sandbox.config
        aliases = [snapshot.name, *(["base"] if self.base in (snapshot.name, snapshot.id)
                                    else [])]
        created = _time(snapshot.created_at)
        return {
            "templateID": snapshot.name, "buildID": snapshot.id, "cpuCount": config.vcpus,
            "memoryMB": config.memory_mib, "diskSizeMB": config.disk_mib or 0,
            "public": False, "aliases": aliases, "names": aliases, "createdAt": created,
            "updatedAt": created, "createdBy": None, "lastSpawnedAt": None,
            "spawnCount": 0, "buildCount": 1, "envdVersion": ENVD_VERSION,
            "buildStatus": "ready",
        }

    async def _e2b_sandbox(self, sandbox_id: str) -> SandboxInfo:
        """A sandbox E2B can see (running or paused), by its id; 404 otherwise."""
        try:
            info = await self.runtime.inspect(sandbox_id)
        except LookupError:  # none, or a prefix of several: E2B ids are whole ids
            raise E2bError(404, f"sandbox {sandbox_id} not found") from None
        if info.id != sandbox_id or info.state not in STATES:
            raise E2bError(404, f"sandbox {sandbox_id} not found")
        return info

    # ---- the routes ---------------------------------------------------------------------
    def _app(self) -> FastAPI:
        app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
        app.middleware("http")(self._authenticate)
        app.add_exception_handler(E2bError, _e2b_error)  # type: ignore[arg-type]
        app.add_exception_handler(KelpieError, _kelpie_error)
        app.add_exception_handler(RequestValidationError, _invalid)
        app.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]

        @app.post("/v2/sandboxes", status_code=201)
        async def create(body: NewSandbox) -> dict[str, Any]:
            return self.created(await self.create(body))

        @app.get("/v2/sandboxes")
        async def list_(request: Request, response: Response) -> list[dict[str, Any]]:
            return self.list(request.query_params, response)

        @app.get("/sandboxes")
        async def list_v1(request: Request, response: Response) -> list[dict[str, Any]]:
            return self.list(request.query_params, response)

        @app.get("/sandboxes/{sandbox_id}")
        async def get(sandbox_id: str) -> dict[str, Any]:
            return self.listed(await self._e2b_sandbox(sandbox_id))

        @app.delete("/sandboxes/{sandbox_id}", status_code=204)
        async def kill(sandbox_id: str) -> None:
            info = await self._e2b_sandbox(sandbox_id)
            await self.runtime.remove(info.id, force=True)
            self.on_remove(info.id)

        @app.post("/sandboxes/{sandbox_id}/timeout", status_code=204)
        async def set_timeout(sandbox_id: str, body: TimeoutBody) -> None:
            info = await self._e2b_sandbox(sandbox_id)
            await self.runtime.set_timeout(info.id, max(body.timeout, 1))

        @app.post("/sandboxes/{sandbox_id}/pause", status_code=204)
        async def pause(sandbox_id: str) -> None:
            info = await self._e2b_sandbox(sandbox_id)
            if info.state is VmState.PAUSED:
                raise E2bError(409, f"sandbox {sandbox_id} is already paused")
            await self.runtime.pause(info.id)

        @app.post("/v2/sandboxes/{sandbox_id}/connect")
        async def connect(sandbox_id: str, body: ConnectBody | None = None) -> JSONResponse:
            info = await self._e2b_sandbox(sandbox_id)
            resumed = info.state is VmState.PAUSED
            if resumed:
                info = await self.runtime.resume(info.id)
            seconds = (body.timeout if body and body.timeout else None) or DEFAULT_TIMEOUT_S
            info = await self.runtime.set_timeout(info.id, seconds, extend_only=True)
            return JSONResponse(self.created(info), status_code=201 if resumed else 200)

        @app.get("/templates")
        async def templates() -> list[dict[str, Any]]:
            return [self.template(t) for t in await self.runtime.list_snapshots(templates=True)]

        @app.get("/templates/aliases/{alias:path}")
        async def template_alias(alias: str) -> dict[str, Any]:
            if alias != "base" and not await self._is_template(alias):
                raise E2bError(404, f"template {alias} not found")
            return {"templateID": alias, "public": False}

        @app.api_route("/{anything:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
        async def unsupported(request: Request) -> None:
            raise E2bError(404, f"{request.method} /{request.path_params['anything']} is not "
                                "part of Kelpie's E2B API (see the README's support table)")

        return app

    async def _authenticate(self, request: Request,
                            call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        given = request.headers.get("x-api-key", "")
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            return error(401, "missing or wrong X-API-Key: give the Kelpie daemon's token "
                              "as E2B_API_KEY")
        return await call_next(request)

    # ---- what the routes do -------------------------------------------------------------
    async def create(self, body: NewSandbox) -> SandboxInfo:
        target = self.base if body.template_id == "base" else body.template_id
        if target is None:
            raise E2bError(400, "template 'base' is not configured on this daemon: start it "
                                "with --e2b-template TEMPLATE_OR_IMAGE, or name a template")
        fields: dict[str, Any] = {
            "env": body.env_vars,
            "labels": {**body.metadata, TEMPLATE_LABEL: body.template_id},
            "timeout": float(body.timeout or DEFAULT_TIMEOUT_S),
            "on_timeout": "pause" if body.auto_pause else "remove",
        }
        if await self._is_template(target):
            fields["template"] = target
        else:
            fields["image"] = target
            if body.allow_internet_access:
                fields["network"] = "nat"
        return await self.runtime.create(**fields)

    async def _is_template(self, name: str) -> bool:
        try:
            await self.runtime.inspect_snapshot(name, template=True)
        except SnapshotNotFound:
            return False
        return True

    def list(self, query: Mapping[str, str], response: Response) -> list[dict[str, Any]]:
        wanted = set((query.get("state") or "running,paused").split(","))
        metadata = _metadata_filter(query.get("metadata"))
        try:
            limit = min(max(int(query.get("limit") or LIST_LIMIT), 1), LIST_LIMIT)
        except ValueError:
            raise E2bError(400, f"limit {query.get('limit')!r} is not a number") from None
        start = query.get("nextToken") or ""
        found = sorted((i for i in self.runtime.db.all()
                        if i.state in STATES and STATES[i.state] in wanted
                        and all(i.labels.get(k) == v for k, v in metadata.items())
                        and i.id > start), key=lambda i: i.id)
        page = found[:limit]
        if len(found) > limit:
            response.headers["x-next-token"] = page[-1].id
        return [self.listed(i) for i in page]


def _metadata_filter(raw: str | None) -> dict[str, str]:
    """The SDK's metadata query: urlencode({quote(k): quote(v)}), one more level encoded."""
    if not raw:
        return {}
    return {urllib.parse.unquote(k): urllib.parse.unquote(v)
            for k, v in urllib.parse.parse_qsl(raw, keep_blank_values=True)}


async def _e2b_error(request: Request, exc: E2bError) -> JSONResponse:
    return error(exc.code, exc.message)


async def _kelpie_error(request: Request, exc: Exception) -> JSONResponse:
    body = error_body(exc)
    status = error_status(body.types)
    return error(status if status < 500 or status == 501 else 500, body.message)


async def _invalid(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}"
                         for e in exc.errors())
    return error(400, f"invalid request: {problems or json.dumps(str(exc))}")


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return error(exc.status_code, str(exc.detail))
