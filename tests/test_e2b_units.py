"""The pieces of Kelpie's E2B API that need no VM: who a caller is, their access token,
envd's end events, the SDK's metadata filter. (tests/test_e2b.py drives it all for real.)"""

from __future__ import annotations

import base64
import signal
import urllib.parse

import pytest

from kelpie.e2b._caller import Caller, access_token, caller_of, user_of
from kelpie.e2b._control import _metadata_filter
from kelpie.e2b._processes import _end
from kelpie.vm import ExecExit


def basic(user: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:".encode()).decode()


def test_the_user_comes_from_basic_auth_and_defaults_to_user() -> None:
    assert user_of(None) is None and user_of("") is None
    assert user_of(basic("root")) == "root"
    caller = caller_of({"kelpie-e2b-sandbox": "abc", "authorization": basic("root")})
    assert caller == Caller("abc", "root") and caller.home == "/root"
    plain = caller_of({"kelpie-e2b-sandbox": "abc"})
    assert plain.user == "user" and plain.path("a/b") == "/home/user/a/b"
    assert plain.path("/etc") == "/etc" and plain.path("") == "/home/user"
    for bad in ("Bearer x", "Basic !!!", basic("../x"), basic(""), basic("a/b")):
        with pytest.raises(ValueError):
            user_of(bad)


def test_access_tokens_are_per_sandbox_and_per_key() -> None:
    token = access_token("key", "abc")
    assert token == access_token("key", "abc") and len(token) == 64
    assert token != access_token("key", "abd") and token != access_token("other", "abc")


def test_end_events_say_what_envd_says() -> None:
    ok = _end(ExecExit(0, 0.1)).event
    assert ok is not None and ok.value.exit_code == 0 and ok.value.exited
    assert ok.value.status == "exit status 0" and not ok.value.has_field("error")
    failed = _end(ExecExit(3, 0.1)).event
    assert failed is not None and failed.value.error == "exit status 3"
    killed = _end(ExecExit(137, 0.1, signal.SIGKILL)).event
    assert killed is not None and killed.value.exit_code == -1 and not killed.value.exited
    assert killed.value.status == "signal: killed"


def test_the_sdks_metadata_query_is_decoded() -> None:
    # the SDK sends urlencode({quote(k): quote(v)}); the query string decodes it once
    sent = urllib.parse.urlencode({urllib.parse.quote("k y"): urllib.parse.quote("v w&x")})
    assert _metadata_filter(sent) == {"k y": "v w&x"}
    assert _metadata_filter(None) == {} and _metadata_filter("") == {}
