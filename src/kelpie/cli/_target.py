"""Which daemon the running command talks to (``--host``, ``--token-file``, environment).

Kept apart from :mod:`kelpie.cli._connect` so that reading the target costs no client imports.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import click

from kelpie._address import HOST_ENV, TOKEN_ENV, read_token_file


@dataclass(frozen=True)
class Target:
    """Which daemon the CLI talks to, and whether it may start the local one."""

    host: str | None
    token: str | None
    autostart: bool

    @property
    def local(self) -> bool:
        return self.host is None


def target_from(host: str | None, token_file: Path | None, autostart: bool) -> Target:
    """The target from the global options and the environment."""
    host = host or os.environ.get(HOST_ENV) or None
    token = read_token_file(token_file) if token_file else os.environ.get(TOKEN_ENV) or None
    return Target(host, token, autostart)


def current_target() -> Target:
    """The target of the running command (set by the ``kelpie`` group)."""
    ctx = click.get_current_context()
    found: Target = ctx.find_root().obj["target"]
    return found
