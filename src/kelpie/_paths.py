"""Where Kelpie keeps its state on the host (one place, overridable by environment)."""

from __future__ import annotations

import os
from pathlib import Path

STATE_DIR_ENV = "KELPIE_STATE_DIR"


def state_dir() -> Path:
    """Per-user state: VM directories, probe caches. ``$KELPIE_STATE_DIR`` overrides it.

    Default ``${XDG_STATE_HOME:-~/.local/state}/kelpie``.
    """
    explicit = os.environ.get(STATE_DIR_ENV)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "kelpie"


def vms_dir() -> Path:
    """The directory holding one sub-directory per VM."""
    return state_dir() / "vms"


def images_dir() -> Path:
    """The image store: blobs, the tag index and cached root filesystems."""
    return state_dir() / "images"
