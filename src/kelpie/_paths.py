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


RUNTIME_DIR_ENV = "KELPIE_RUNTIME_DIR"
SOCKET_NAME = "kelpie.sock"


def runtime_dir() -> Path:
    """Per-user runtime files: the daemon's socket, pid file and log.

    ``$KELPIE_RUNTIME_DIR`` overrides it; else ``$KELPIE_STATE_DIR/run`` when the state dir
    is overridden (so one override isolates a whole installation), else
    ``$XDG_RUNTIME_DIR/kelpie``, else ``<state dir>/run``.
    """
    explicit = os.environ.get(RUNTIME_DIR_ENV)
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and not os.environ.get(STATE_DIR_ENV):
        return Path(xdg) / "kelpie"
    return state_dir() / "run"


def daemon_socket() -> Path:
    """The unix socket the local daemon listens on."""
    return runtime_dir() / SOCKET_NAME
