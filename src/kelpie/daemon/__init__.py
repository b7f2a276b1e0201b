"""The Kelpie daemon: the runtime served over a REST API (FastAPI + uvicorn).

``kelpie daemon run`` serves in the foreground; the CLI starts one in the background
(:func:`start_daemon`) when none answers. See :mod:`kelpie.api` for the wire format and
``docs/openapi.json`` for the OpenAPI document.
"""

from kelpie.daemon._app import TokenAuth, create_app
from kelpie.daemon._server import (
    LOG_FILE,
    PID_FILE,
    DaemonError,
    DaemonOptions,
    E2bOptions,
    default_options,
    serve,
)
from kelpie.daemon._spawn import start_daemon

__all__ = [
    "LOG_FILE",
    "PID_FILE",
    "DaemonError",
    "DaemonOptions",
    "E2bOptions",
    "TokenAuth",
    "create_app",
    "default_options",
    "serve",
    "start_daemon",
]
