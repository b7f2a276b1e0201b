"""Who calls the in-sandbox API (envd): which sandbox, as which user, and the secret that
lets them in (E2B's per-sandbox access token, derived so that none is ever stored)."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import hmac
from collections.abc import Mapping

DEFAULT_USER = "user"
"""The user commands run as when the caller names none (envd >= 0.4.0's default)."""
SANDBOX_HEADER = "kelpie-e2b-sandbox"
"""Set by the router on requests it let in (any such header a client sent is dropped)."""


@dataclasses.dataclass(frozen=True)
class Caller:
    """A request to a sandbox's envd, authenticated: its sandbox and its user."""

    sandbox_id: str
    user: str = DEFAULT_USER

    @property
    def home(self) -> str:
        """The user's home, where relative paths and commands start (as envd)."""
        return "/root" if self.user == "root" else f"/home/{self.user}"

    def path(self, path: str) -> str:
        """``path`` made absolute against the user's home."""
        if not path:
            return self.home
        return path if path.startswith("/") else f"{self.home}/{path}"


def access_token(key: str, sandbox_id: str) -> str:
    """The sandbox's envd access token: an HMAC of its id under the daemon's token, so
    that it is never stored or listed, and changes when the daemon's token does."""
    return hmac.new(key.encode(), f"e2b-envd:{sandbox_id}".encode(), hashlib.sha256).hexdigest()


def user_of(authorization: str | None) -> str | None:
    """The user of an ``Authorization: Basic base64(user:)`` header (None: none given);
    ValueError for a malformed one."""
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "basic":
        raise ValueError(f"Authorization scheme {scheme!r} is not Basic")
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise ValueError("Authorization Basic is not base64 of 'user:'") from None
    return check_user(decoded.partition(":")[0])


def check_user(user: str) -> str:
    """``user`` if it can name a user (a name or uid); ValueError saying why not."""
    if not user or "\0" in user or "/" in user or user in (".", "..") or len(user) > 64:
        raise ValueError(f"user {user!r} is not a user name (letters, digits, '_', '-'; at "
                         "most 64)")
    return user


def caller_of(headers: Mapping[str, str]) -> Caller:
    """The caller of a request the router let in (it set the sandbox header)."""
    return Caller(headers[SANDBOX_HEADER], user_of(headers.get("authorization"))
                  or DEFAULT_USER)
