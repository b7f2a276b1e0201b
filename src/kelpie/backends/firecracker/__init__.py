"""The Firecracker backend, in progress: so far the client of Firecracker's API
(:class:`FirecrackerApi`), checked against Firecracker's own API document (v1.16.1,
vendored beside it) by contract tests. The VM itself (``FirecrackerVm``) is not built yet,
so the backend is not registered (``kelpie.vm.BUILTIN_BACKENDS`` does not name it).
"""

from kelpie.backends.firecracker._api import (
    API_VERSION,
    SPEC,
    FirecrackerApi,
    FirecrackerApiError,
)

__all__ = ["API_VERSION", "SPEC", "FirecrackerApi", "FirecrackerApiError"]
