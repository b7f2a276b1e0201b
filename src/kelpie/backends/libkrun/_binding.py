"""libkrun through ctypes: the functions the libkrun backend calls, declared as
``libkrun.h`` (v1.19.0, vendored beside this module) declares them.

Every function returns 0 (or a non-negative id) on success and ``-errno`` on failure;
:class:`Libkrun` turns a failure into :class:`KrunError` naming the function and the errno.
``krun_start_enter`` never returns on success: it becomes the VM, so it may only be called
in a process made for it (a fresh child, never a forked threaded parent).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kelpie._exceptions import BackendUnavailable, VmError

HEADER = Path(__file__).with_name("libkrun-v1.19.0.h")
"""The header this binding is written against (and checked with)."""
LIBRARY_ENV = "KELPIE_LIBKRUN"
"""A path to ``libkrun.so`` (``.dylib``) to use instead of the system's."""

_Strings = ctypes.POINTER(ctypes.c_char_p)

FUNCTIONS: dict[str, tuple[Any, tuple[Any, ...]]] = {
    # name: (restype, argtypes), as in libkrun.h
    "krun_set_log_level": (ctypes.c_int32, (ctypes.c_uint32,)),
    "krun_create_ctx": (ctypes.c_int32, ()),
    "krun_free_ctx": (ctypes.c_int32, (ctypes.c_uint32,)),
    "krun_set_vm_config": (ctypes.c_int32, (ctypes.c_uint32, ctypes.c_uint8, ctypes.c_uint32)),
    "krun_set_root": (ctypes.c_int32, (ctypes.c_uint32, ctypes.c_char_p)),
    "krun_add_virtiofs": (ctypes.c_int32, (ctypes.c_uint32, ctypes.c_char_p, ctypes.c_char_p)),
    "krun_add_virtiofs3": (ctypes.c_int32, (ctypes.c_uint32, ctypes.c_char_p, ctypes.c_char_p,
                                            ctypes.c_uint64, ctypes.c_bool)),
    "krun_disable_implicit_vsock": (ctypes.c_int32, (ctypes.c_uint32,)),
    "krun_add_vsock": (ctypes.c_int32, (ctypes.c_uint32, ctypes.c_uint32)),
    "krun_add_vsock_port2": (ctypes.c_int32, (ctypes.c_uint32, ctypes.c_uint32,
                                              ctypes.c_char_p, ctypes.c_bool)),
    "krun_set_workdir": (ctypes.c_int32, (ctypes.c_uint32, ctypes.c_char_p)),
    "krun_set_exec": (ctypes.c_int32, (ctypes.c_uint32, ctypes.c_char_p, _Strings, _Strings)),
    "krun_set_env": (ctypes.c_int32, (ctypes.c_uint32, _Strings)),
    "krun_set_console_output": (ctypes.c_int32, (ctypes.c_uint32, ctypes.c_char_p)),
    "krun_get_shutdown_eventfd": (ctypes.c_int32, (ctypes.c_uint32,)),
    "krun_start_enter": (ctypes.c_int32, (ctypes.c_uint32,)),
}


class KrunError(VmError):
    """A libkrun call failed: the function and the errno it returned."""

    def __init__(self, function: str, errno: int) -> None:
        self.function = function
        self.errno = errno
        super().__init__(f"libkrun: {function} failed: {os.strerror(errno)} (errno {errno})")


def find_library(environ: Mapping[str, str] = os.environ) -> str:
    """Where libkrun is: ``KELPIE_LIBKRUN``, else the system's; :class:`BackendUnavailable`
    saying how to get it."""
    given = environ.get(LIBRARY_ENV)
    if given:
        if not Path(given).is_file():
            raise BackendUnavailable(f"{LIBRARY_ENV}={given} is not a file",
                                     [("libkrun", f"{given} does not exist")])
        return given
    found = ctypes.util.find_library("krun")
    if found is None:
        raise BackendUnavailable(
            "libkrun is not installed", [("libkrun", "no libkrun.so found: install libkrun "
                                          f"(and libkrunfw) or set {LIBRARY_ENV} to its path")])
    return found


class Libkrun:
    """libkrun, loaded from ``path``, with the functions of :data:`FUNCTIONS` declared."""

    def __init__(self, path: str) -> None:
        try:
            self._lib = ctypes.CDLL(path)
        except OSError as exc:
            raise BackendUnavailable(f"cannot load libkrun from {path}",
                                     [("libkrun", str(exc))]) from exc
        missing = [name for name in FUNCTIONS if not hasattr(self._lib, name)]
        if missing:
            raise BackendUnavailable(f"{path} is not a libkrun Kelpie can use",
                                     [("libkrun", f"missing {', '.join(missing)}")])
        for name, (restype, argtypes) in FUNCTIONS.items():
            function = getattr(self._lib, name)
            function.restype = restype
            function.argtypes = argtypes

    def call(self, name: str, *args: Any) -> int:
        """Call ``name``; its result, or :class:`KrunError` when it is ``-errno``."""
        result: int = getattr(self._lib, name)(*args)
        if result < 0:
            raise KrunError(name, -result)
        return result

    @staticmethod
    def strings(values: Sequence[str]) -> Any:
        """A NULL-terminated ``const char *const []`` of ``values``."""
        array = (ctypes.c_char_p * (len(values) + 1))(*(v.encode() for v in values), None)
        return ctypes.cast(array, _Strings)
