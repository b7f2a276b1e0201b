"""The built-in backends. The VM layer's registry loads them by module name
(``kelpie.vm.BUILTIN_BACKENDS``); nothing here registers anything on import.

Real backends' modules import their heavy dependencies only when a VM is created on them, so
probing the host never pays for (or fails on) another backend's imports.
"""

from __future__ import annotations

from kelpie.backends.mock import SPEC as MOCK
from kelpie.backends.qemu import SPEC as QEMU

__all__ = ["MOCK", "QEMU"]
