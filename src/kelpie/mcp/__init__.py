"""``kelpie mcp``: Kelpie sandboxes for AI agents over the Model Context Protocol.

:func:`make_server` builds the server (tools to create sandboxes, run commands with their
output streamed, move files, snapshot, fork and remove) over a
:class:`~kelpie.service.SandboxService` within a :class:`McpPolicy`; :func:`serve_stdio`
and :func:`serve_http` serve it (HTTP only with a bearer token).
"""

from kelpie.mcp._policy import OWNER_LABEL, McpPolicy, PolicyError
from kelpie.mcp._serve import MCP_PATH, http_app, require_bearer, serve_http, serve_stdio
from kelpie.mcp._server import make_server

__all__ = [
    "MCP_PATH",
    "OWNER_LABEL",
    "McpPolicy",
    "PolicyError",
    "http_app",
    "make_server",
    "require_bearer",
    "serve_http",
    "serve_stdio",
]
