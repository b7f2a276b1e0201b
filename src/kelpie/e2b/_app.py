"""One listener for the whole E2B-compatible API: the control plane and every sandbox's
envd, told apart the way E2B's SDK addresses them (``E2b-Sandbox-Id`` headers with
``E2B_SANDBOX_URL``, or ``{port}-{sandbox id}.{domain}`` hosts with ``E2B_DOMAIN``)."""

from __future__ import annotations

from starlette.types import Receive, Scope, Send

from kelpie.e2b._control import ControlPlane
from kelpie.e2b._envd import ENVD_PORT, Envd, envd_error
from kelpie.runtime import Runtime


class E2bApi:
    """The ASGI app of E2B's API over ``runtime``: ``api_key`` is the Kelpie daemon token
    callers give as ``E2B_API_KEY``; ``base`` is what E2B's default template ``base`` starts
    (a Kelpie template, or an image); ``domain`` the one sandboxes are addressed under."""

    def __init__(self, runtime: Runtime, *, api_key: str, base: str | None = None,
                 domain: str | None = None) -> None:
        self.domain = domain
        self.envd = Envd(runtime, api_key=api_key)
        self.control = ControlPlane(runtime, api_key=api_key, base=base, domain=domain,
                                    on_remove=self.envd.forget)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.control.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        host = headers.get("host", "").rsplit(":", 1)[0].lower()
        if self.domain and host.endswith(f".{self.domain}") and host != f"api.{self.domain}":
            port, _, sandbox = host[:-len(self.domain) - 1].partition("-")
            if not port.isdigit() or not sandbox:
                await envd_error(404, f"host {host} names no sandbox: expected "
                                      f"PORT-SANDBOX.{self.domain}")(scope, receive, send)
                return
            await self.envd.route(scope, receive, send, headers, sandbox, int(port))
            return
        sandbox = headers.get("e2b-sandbox-id")
        if sandbox:
            port = headers.get("e2b-sandbox-port", str(ENVD_PORT))
            if not port.isdigit():
                await envd_error(400, f"E2b-Sandbox-Port {port!r} is not a port")(
                    scope, receive, send)
                return
            await self.envd.route(scope, receive, send, headers, sandbox, int(port))
            return
        await self.control.app(scope, receive, send)
