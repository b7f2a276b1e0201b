"""The libkrun backend, in progress: so far its ctypes binding (:class:`Libkrun`), checked
against libkrun's own header (v1.19.0, vendored beside it) by contract tests. The VM itself
(``LibkrunVm``: one cleanly spawned child process per VM) is not built yet, so the backend
is not registered (``kelpie.vm.BUILTIN_BACKENDS`` does not name it).
"""

from kelpie.backends.libkrun._binding import (
    FUNCTIONS,
    HEADER,
    LIBRARY_ENV,
    KrunError,
    Libkrun,
    find_library,
)

__all__ = ["FUNCTIONS", "HEADER", "LIBRARY_ENV", "KrunError", "Libkrun", "find_library"]
