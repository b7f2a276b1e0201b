"""Which daemon a client talks to: its address and bearer token, from arguments or the
environment. Standard library only, so the CLI's fast paths can read it cheaply."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from kelpie._exceptions import ConfigError
from kelpie._paths import daemon_socket

HOST_ENV = "KELPIE_HOST"
TOKEN_ENV = "KELPIE_TOKEN"


@dataclass(frozen=True)
class DaemonAddress:
    """``unix:///PATH`` (``socket_path`` set) or ``http(s)://HOST:PORT`` (``base`` set)."""

    url: str
    socket_path: Path | None
    base: str | None  # scheme://host:port, no trailing slash

    @classmethod
    def parse(cls, url: str | None = None) -> DaemonAddress:
        """``url``, else ``$KELPIE_HOST``, else the local daemon's socket."""
        url = url or os.environ.get(HOST_ENV) or f"unix://{daemon_socket()}"
        if url.startswith("unix://"):
            return cls(url, Path(url[len("unix://"):]), None)
        if url.startswith(("http://", "https://")):
            return cls(url, None, url.rstrip("/"))
        raise ConfigError([f"daemon address {url!r}: expected unix:///PATH or "
                           "http(s)://HOST:PORT"], what="daemon address")


def token_from_env(token: str | None = None) -> str | None:
    """``token``, else ``$KELPIE_TOKEN``, else None."""
    return token or os.environ.get(TOKEN_ENV) or None


def read_token_file(path: Path) -> str:
    """A bearer token from a file: its first non-blank line, at least 16 characters."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"cannot read the token file {path}: {exc}"], what="token") from None
    token = next((line.strip() for line in lines if line.strip()), "")
    if len(token) < 16:
        raise ConfigError([f"the token in {path} is {len(token)} characters; give at least 16 "
                           "(e.g. `openssl rand -hex 32 > FILE`)"], what="token")
    return token
