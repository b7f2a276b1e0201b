"""Kelpie's E2B API driven by E2B's own SDK (e2b 2.63.0, in .venv-e2b): a program written
only against E2B's documented API (tests/e2b_program.py) runs unchanged on real QEMU
sandboxes of a real daemon, pointed there by E2B's connection settings: E2B_DOMAIN (HTTPS
to api.DOMAIN and PORT-ID.DOMAIN, with a wildcard certificate from a test CA and a
loopback CONNECT proxy standing in for DNS), and the deprecated E2B_API_URL +
E2B_SANDBOX_URL."""

from __future__ import annotations

import base64
import os
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import real_part_missing
from daemon_env import KelpieHome
from e2b_image import write_e2b_image
from test_cli_e2e import ok
from tls_proxy import connect_proxy, write_certificates

ROOT = Path(__file__).resolve().parent.parent
E2B_PYTHON = ROOT / ".venv-e2b" / "bin" / "python"
PROGRAM = Path(__file__).resolve().parent / "e2b_program.py"
IMAGE = "kelpie/e2b-base:latest"
DOMAIN = "kelpie.test"

pytestmark = pytest.mark.vm


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class E2bDaemon:
    """A daemon serving E2B's API on loopback, with the E2B test image as ``base``."""

    def __init__(self) -> None:
        self.home = KelpieHome()
        self.port = _free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.token = os.urandom(16).hex()
        self.token_file = self.home.root / "token"
        self.token_file.write_text(self.token + "\n")
        self.token_file.chmod(0o600)
        self.ca, self.cert, self.key = write_certificates(self.home.root, DOMAIN)

    def start(self) -> None:
        layout = self.home.root / "e2b-layout"
        write_e2b_image(layout)
        ok(self.home.kelpie("image", "import", str(layout), "--reference", IMAGE))
        ok(self.home.kelpie("daemon", "start", "--tcp", f"127.0.0.1:{_free_port()}",
                            "--token-file", str(self.token_file), "--e2b",
                            f"127.0.0.1:{self.port}", "--e2b-template", IMAGE,
                            "--e2b-domain", DOMAIN, "--e2b-tls-cert", str(self.cert),
                            "--e2b-tls-key", str(self.key)))

    def sdk_env(self, **settings: str) -> dict[str, str]:
        """E2B's documented settings, pointing its SDK at this daemon; the test CA is
        the only one it trusts."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("E2B_") and k.lower() not in (
                   "http_proxy", "https_proxy", "all_proxy", "no_proxy")}
        return {**env, "E2B_API_KEY": self.token, "SSL_CERT_FILE": str(self.ca), **settings}

    def api(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120,
                            verify=ssl.create_default_context(cafile=str(self.ca)))


@pytest.fixture(scope="module")
def daemon(guestkit: object) -> Iterator[E2bDaemon]:
    if not E2B_PYTHON.exists():
        real_part_missing(f"E2B's SDK is not installed in {E2B_PYTHON.parent.parent} "
                          "(scripts/setup installs it)")
    served = E2bDaemon()
    try:
        served.start()
        yield served
    finally:
        served.home.close()


def _run_program(env: dict[str, str], *args: str) -> str:
    run = subprocess.run([str(E2B_PYTHON), str(PROGRAM), *args], env=env, check=False,
                         capture_output=True, text=True, timeout=900)
    print(run.stdout)
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}"
    assert run.stdout.rstrip().endswith("all done"), run.stdout
    return run.stdout


def test_a_program_written_for_e2b_runs_unchanged_on_kelpie(daemon: E2bDaemon) -> None:
    # E2B_DOMAIN: https://api.kelpie.test and https://49983-<id>.kelpie.test, reached
    # through the proxy (as DNS would), the daemon's wildcard certificate checked
    with connect_proxy(DOMAIN, daemon.port) as proxy:
        out = _run_program(daemon.sdk_env(E2B_DOMAIN=DOMAIN,
                                          HTTPS_PROXY=f"http://127.0.0.1:{proxy}"))
    assert "ok pause" in out and "ok async watch_dir stream" in out
    # the program's sandboxes are all gone (killed, or removed at their timeout)
    assert "e2b" not in ok(daemon.home.kelpie("ps", "-a"))


def test_the_deprecated_url_settings_work_too(daemon: E2bDaemon) -> None:
    # E2B_API_URL + E2B_SANDBOX_URL: one URL, sandboxes told apart by E2b-Sandbox-Id
    _run_program(daemon.sdk_env(E2B_API_URL=daemon.url, E2B_SANDBOX_URL=daemon.url),
                 "--quick")
    assert "e2b" not in ok(daemon.home.kelpie("ps", "-a"))


def test_errors_come_in_e2bs_shape(daemon: E2bDaemon) -> None:
    with daemon.api() as api:
        for headers in ({}, {"X-API-Key": "wrong"}):
            reply = api.get("/v2/sandboxes", headers=headers)
            assert reply.status_code == 401
            assert reply.json()["code"] == 401 and "E2B_API_KEY" in reply.json()["message"]
            assert reply.headers["should-retry"] == "false"
        key = {"X-API-Key": daemon.token}
        missing = api.get("/sandboxes/0123456789ab", headers=key)
        assert missing.status_code == 404 and missing.json() == {
            "code": 404, "message": "sandbox 0123456789ab not found"}
        unsupported = api.post("/sandboxes/0123456789ab/snapshots", headers=key, json={})
        assert unsupported.status_code == 404 and "not part of" in unsupported.json()["message"]
        bad = api.post("/v2/sandboxes", headers=key, json={"timeout": "soon"})
        assert bad.status_code == 400 and "templateID" in bad.json()["message"]
        envd = api.get("/health", headers={"E2b-Sandbox-Id": "0123456789ab",
                                           "E2b-Sandbox-Port": "49983"})
        assert envd.status_code == 502 and "was not found" in envd.json()["message"]


def test_envd_wants_the_sandboxes_own_access_token(daemon: E2bDaemon) -> None:
    key = {"X-API-Key": daemon.token}
    with daemon.api() as api:
        created = api.post("/v2/sandboxes", headers=key, json={"templateID": "base"})
        assert created.status_code == 201, created.text
        sandbox = created.json()
        routed = {"E2b-Sandbox-Id": sandbox["sandboxID"], "E2b-Sandbox-Port": "49983"}
        try:
            assert sandbox["envdAccessToken"] not in ok(daemon.home.kelpie(
                "inspect", sandbox["sandboxID"]))  # derived, never stored or listed
            for token in (None, "wrong", daemon.token):
                headers = routed if token is None else {**routed, "X-Access-Token": token}
                assert api.get("/health", headers=headers).status_code == 401
            good = {**routed, "X-Access-Token": sandbox["envdAccessToken"]}
            assert api.get("/health", headers=good).status_code == 204
            bad_user = {**good, "Authorization": "Basic " + base64.b64encode(b"../x:").decode()}
            assert api.get("/health", headers=bad_user).status_code == 401
            other_port = {**good, "E2b-Sandbox-Port": "8080"}
            refused = api.get("/health", headers=other_port)
            assert refused.status_code == 502 and "port 8080" in refused.json()["message"]
        finally:
            assert api.delete(f"/sandboxes/{sandbox['sandboxID']}",
                              headers=key).status_code == 204
        assert api.delete(f"/sandboxes/{sandbox['sandboxID']}", headers=key).status_code == 404

