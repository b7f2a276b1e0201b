"""E2B's API on Kelpie: programs written against E2B's SDK run on Kelpie's sandboxes
unchanged, pointed at the daemon's E2B listener (``kelpie daemon --e2b HOST:PORT``).

The control plane (create, list, get, kill, timeout, pause, connect) maps onto the runtime;
E2B's in-sandbox daemon (envd: the ``process`` and ``filesystem`` Connect RPC services,
``/files``, ``/health``) is served host-side over Kelpie's guest agent. See the README's
"Using Kelpie from E2B's SDK" for the settings and what is supported.
"""

from kelpie.e2b._app import E2bApi
from kelpie.e2b._caller import access_token
from kelpie.e2b._control import ENVD_VERSION

__all__ = ["ENVD_VERSION", "E2bApi", "access_token"]
