"""Serving the MCP server: on stdio (an agent starts ``kelpie mcp`` itself), or over
streamable HTTP, where every request must carry the operator's bearer token, like every
TCP listener of Kelpie's."""

from __future__ import annotations

import hmac
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import uvicorn
from mcp.server.mcpserver import MCPServer

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Asgi = Callable[[Scope, Receive, Send], Awaitable[None]]

MCP_PATH = "/mcp"


def require_bearer(app: Asgi, token: str) -> Asgi:
    """``app`` answering 401 to any HTTP request without ``Authorization: Bearer TOKEN``
    (compared in constant time); lifespan events pass through."""
    expected = f"Bearer {token}".encode()

    async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            given = dict(scope.get("headers") or ()).get(b"authorization", b"")
            if not hmac.compare_digest(given, expected):
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"www-authenticate", b"Bearer"),
                                        (b"content-length", b"0")]})
                await send({"type": "http.response.body", "body": b""})
                return
        await app(scope, receive, send)

    return guarded


def http_app(server: MCPServer, token: str, host: str) -> Asgi:
    """The server's streamable HTTP app at ``/mcp`` behind the bearer check (requests
    must name ``host``, as MCP's DNS-rebinding protection wants)."""
    return require_bearer(server.streamable_http_app(streamable_http_path=MCP_PATH,
                                                     host=host), token)


async def serve_http(server: MCPServer, host: str, port: int, token: str,
                     ready: Callable[[int], None] | None = None) -> None:
    """Serve ``server`` over streamable HTTP on ``host:port`` until cancelled;
    ``ready(port)`` once it listens (the port the system chose when ``port`` is 0)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(128)
    config = uvicorn.Config(http_app(server, token, host), log_level="warning", lifespan="on")
    if ready is not None:
        ready(listener.getsockname()[1])
    with listener:
        await uvicorn.Server(config).serve(sockets=[listener])


async def serve_stdio(server: MCPServer) -> None:
    """Serve ``server`` on this process's stdin and stdout (nothing else may write there)."""
    await server.run_stdio_async()
