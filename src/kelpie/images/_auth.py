"""Registry credentials and the authentication a registry asks for in its 401 challenge.

A registry answers an unauthenticated request with ``401`` and a ``WWW-Authenticate``
header naming a scheme:

- ``Basic realm="..."``: send ``Authorization: Basic base64(user:password)``; without
  credentials the registry cannot be used.
- ``Bearer realm="https://auth.example/token",service="...",scope="..."`` (Docker token
  authentication): ``GET realm?service=...&scope=...`` -- anonymously, or with Basic
  credentials when there are any -- returns JSON ``{"token": ..., "expires_in": ...}``
  (some servers say ``access_token``); the token then goes in ``Authorization: Bearer``.
  Tokens are cached per registry and scope until shortly before they expire.

Credentials come from the caller or from Docker's ``~/.docker/config.json`` (``auths`` ->
``{"auth": base64("user:password")}`` or ``username``/``password``). Credential helpers
(``credsStore``/``credHelpers``) run external programs and are not supported.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from kelpie.images._errors import RegistryError

DOCKER_HUB_AUTH_KEY = "https://index.docker.io/v1/"
"""The key under which ``docker login`` stores Docker Hub credentials."""

DEFAULT_TOKEN_LIFETIME = 60.0
"""Seconds a token lives when the token server does not say (the spec's default)."""

TOKEN_EXPIRY_MARGIN = 10.0
"""Seconds before its expiry a cached token is no longer used."""

_PARAM = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?')
_HUB_NAMES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})


@dataclass(frozen=True, slots=True)
class Credentials:
    """A username and password (or identity token) for one registry.

    The password never appears in ``repr``, so credentials are safe to log by accident.
    """

    username: str
    password: str = field(repr=False)

    def basic_header(self) -> str:
        """The ``Authorization`` value for HTTP Basic authentication."""
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


@dataclass(frozen=True, slots=True)
class Challenge:
    """A parsed ``WWW-Authenticate`` header: the scheme (lowercase) and its parameters."""

    scheme: str
    params: Mapping[str, str]

    @classmethod
    def parse(cls, header: str) -> Challenge:
        """Parse ``Scheme k="v",k2=v2``; raise :class:`RegistryError` if it has no scheme."""
        scheme, _, rest = header.strip().partition(" ")
        if not scheme:
            raise RegistryError(f"registry sent an empty WWW-Authenticate header: {header!r}")
        params: dict[str, str] = {}
        for match in _PARAM.finditer(rest):
            quoted, bare = match.group(2), match.group(3)
            value = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else bare
            params[match.group(1).lower()] = value
        return cls(scheme.lower(), params)


def registry_host_key(registry: str) -> str:
    """Normalise a registry name or an ``auths`` key (maybe a URL) to ``host[:port]``."""
    text = registry.strip()
    if "://" in text:
        text = urlsplit(text).netloc
    host = text.split("/", 1)[0].lower()
    return "docker.io" if host in _HUB_NAMES else host


def default_docker_config() -> Path:
    """``$DOCKER_CONFIG/config.json``, or ``~/.docker/config.json``."""
    base = os.environ.get("DOCKER_CONFIG")
    return Path(base) / "config.json" if base else Path.home() / ".docker" / "config.json"


def load_docker_credentials(path: Path | str | None = None) -> dict[str, Credentials]:
    """Credentials per registry (``host[:port]``) from a Docker ``config.json``.

    A missing file means no credentials. A file that is not valid JSON, or an entry whose
    ``auth`` is not base64 of ``user:password``, raises :class:`RegistryError` naming it.
    """
    config_path = Path(path) if path is not None else default_docker_config()
    try:
        document = json.loads(config_path.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise RegistryError(f"cannot read Docker credentials from {config_path}: {exc}") from exc
    auths = document.get("auths", {}) if isinstance(document, dict) else None
    if not isinstance(auths, dict):
        raise RegistryError(f"{config_path}: 'auths' must be an object of registry entries")
    found: dict[str, Credentials] = {}
    for key, entry in auths.items():
        credentials = _entry_credentials(entry, f"{config_path}: auths[{key!r}]")
        if credentials is not None:
            found[registry_host_key(key)] = credentials
    return found


def _entry_credentials(entry: object, where: str) -> Credentials | None:
    if not isinstance(entry, dict):
        raise RegistryError(f"{where} must be an object")
    if entry.get("auth"):
        try:
            decoded = base64.b64decode(str(entry["auth"]), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise RegistryError(f"{where}.auth is not base64 of 'user:password'") from exc
        username, colon, password = decoded.partition(":")
        if not colon:
            raise RegistryError(f"{where}.auth decodes to no 'user:password' pair")
        return Credentials(username, password)
    if entry.get("username") and entry.get("password") is not None:
        return Credentials(str(entry["username"]), str(entry["password"]))
    if entry.get("identitytoken"):
        # Docker's convention for OAuth identity tokens: a fixed username and the token.
        return Credentials("<token>", str(entry["identitytoken"]))
    return None


class RegistryAuth:
    """Answers registries' 401 challenges and remembers the result per registry and scope.

    ``credentials`` maps ``host[:port]`` to :class:`Credentials`; explicit ones win over
    the Docker config file (``docker_config``, default ``~/.docker/config.json``), which
    is read on first need unless ``use_docker_config`` is false.
    ``clock`` is injectable so token expiry can be tested without waiting.
    """

    def __init__(
        self,
        credentials: Mapping[str, Credentials] | None = None,
        *,
        docker_config: Path | str | None = None,
        use_docker_config: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._explicit = {registry_host_key(k): v for k, v in (credentials or {}).items()}
        self._docker_config = docker_config
        self._use_docker_config = use_docker_config
        self._from_file: dict[str, Credentials] | None = None
        self._clock = clock
        self._headers: dict[tuple[str, str], tuple[str, float]] = {}

    def credentials_for(self, registry: str) -> Credentials | None:
        """The credentials for ``registry``, explicit first, then the Docker config file."""
        key = registry_host_key(registry)
        if key in self._explicit:
            return self._explicit[key]
        if not self._use_docker_config:
            return None
        if self._from_file is None:
            self._from_file = load_docker_credentials(self._docker_config)
        return self._from_file.get(key)

    def header_for(self, registry: str, scope: str) -> str | None:
        """A cached ``Authorization`` value for ``registry`` and ``scope``, if still valid."""
        cached = self._headers.get((registry_host_key(registry), scope))
        if cached is None:
            return None
        value, expires = cached
        if self._clock() >= expires:
            del self._headers[(registry_host_key(registry), scope)]
            return None
        return value

    async def answer(
        self,
        client: httpx.AsyncClient,
        registry: str,
        scope: str,
        response: httpx.Response,
        *,
        allow_plain_http: bool,
    ) -> str:
        """Answer the 401 ``response`` of ``registry``; return the ``Authorization`` to send.

        Raises :class:`RegistryError` if the challenge cannot be met (credentials needed
        but absent, token server refuses, unknown scheme). ``allow_plain_http`` permits a
        token realm over plain HTTP (only for registries reached over plain HTTP anyway).
        """
        header = response.headers.get("www-authenticate")
        if not header:
            raise RegistryError(f"registry {registry} answered 401 without WWW-Authenticate")
        challenge = Challenge.parse(header)
        credentials = self.credentials_for(registry)
        if challenge.scheme == "basic":
            if credentials is None:
                raise RegistryError(
                    f"registry {registry} requires a username and password; pass credentials "
                    "or log in with 'docker login' so ~/.docker/config.json has them"
                )
            value, lifetime = credentials.basic_header(), float("inf")
        elif challenge.scheme == "bearer":
            value, lifetime = await self._fetch_token(
                client, registry, scope, challenge, credentials, allow_plain_http
            )
        else:
            raise RegistryError(
                f"registry {registry} asks for {challenge.scheme!r} authentication; "
                "only Basic and Bearer (token) authentication are supported"
            )
        expires = self._clock() + lifetime - TOKEN_EXPIRY_MARGIN
        self._headers[(registry_host_key(registry), scope)] = (value, expires)
        return value

    def forget(self, registry: str, scope: str) -> None:
        """Drop the cached header for ``registry`` and ``scope`` (it was refused)."""
        self._headers.pop((registry_host_key(registry), scope), None)

    async def _fetch_token(
        self,
        client: httpx.AsyncClient,
        registry: str,
        scope: str,
        challenge: Challenge,
        credentials: Credentials | None,
        allow_plain_http: bool,
    ) -> tuple[str, float]:
        realm = challenge.params.get("realm")
        if not realm:
            raise RegistryError(f"registry {registry} sent a Bearer challenge without a realm")
        _check_realm(registry, realm, allow_plain_http)
        params = {"scope": challenge.params.get("scope") or scope}
        if "service" in challenge.params:
            params["service"] = challenge.params["service"]
        headers = {"Authorization": credentials.basic_header()} if credentials else {}
        try:
            reply = await client.get(realm, params=params, headers=headers)
        except httpx.TransportError as exc:
            raise RegistryError(
                f"token server {realm} for {registry} is unreachable: {exc}", retriable=True
            ) from exc
        return _parse_token_reply(registry, realm, reply, credentials is not None)


def _check_realm(registry: str, realm: str, allow_plain_http: bool) -> None:
    scheme = urlsplit(realm).scheme
    if scheme == "https" or (scheme == "http" and allow_plain_http):
        return
    raise RegistryError(
        f"registry {registry} sent token realm {realm!r}; only an https:// realm is used "
        "(plain http only for registries marked insecure), so no credentials leak"
    )


def _parse_token_reply(
    registry: str, realm: str, reply: httpx.Response, with_credentials: bool
) -> tuple[str, float]:
    if reply.status_code in (401, 403):
        who = "the given credentials" if with_credentials else "anonymous access"
        raise RegistryError(
            f"token server {realm} for {registry} refused {who} ({reply.status_code}); "
            "check the credentials and that the repository exists"
        )
    if reply.status_code == 429 or reply.status_code >= 500:
        raise RegistryError(
            f"token server {realm} answered {reply.status_code}", retriable=True
        )
    if reply.status_code != 200:
        raise RegistryError(f"token server {realm} answered {reply.status_code}")
    try:
        body = reply.json()
    except ValueError as exc:
        raise RegistryError(f"token server {realm} sent a reply that is not JSON") from exc
    token = body.get("token") or body.get("access_token") if isinstance(body, dict) else None
    if not isinstance(token, str) or not token:
        raise RegistryError(f"token server {realm} sent no token")
    lifetime = body.get("expires_in", DEFAULT_TOKEN_LIFETIME)
    if not isinstance(lifetime, int | float) or lifetime <= 0:
        lifetime = DEFAULT_TOKEN_LIFETIME
    return f"Bearer {token}", float(lifetime)
