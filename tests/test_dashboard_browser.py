"""The dashboard in a real browser: headless Debian Chromium driven by Playwright, against a
real daemon with a real QEMU sandbox. Logs in with the one-time link, sees the sandbox
appear, follows its log, pauses and resumes it, runs a shell, takes a snapshot, browses,
uploads and downloads files, forks it, looks at a snapshot's and an image's details,
removes it; a wrong token is refused; axe-core finds no serious or critical accessibility
violation; a screenshot of the main page is written to ``test-artifacts/dashboard.png``."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import real_part_missing
from daemon_env import KelpieHome
from kelpie.api import model_json
from test_cli_e2e import DEMO, ok
from test_dashboard import _fleet_view
from vm_fixtures import demo_home

pytestmark = [pytest.mark.vm]

CHROMIUM = "/usr/bin/chromium"
AXE = Path(__file__).parent / "browser" / "node_modules" / "axe-core" / "axe.min.js"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def home(guestkit: object) -> Iterator[KelpieHome]:
    yield from demo_home()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        real_part_missing("Playwright (pip install playwright)")
    if not os.access(CHROMIUM, os.X_OK):
        real_part_missing("Debian's chromium (apt-get install chromium)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                              args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


def _link(home: KelpieHome) -> str:
    return ok(home.kelpie("dashboard", timeout=60)).strip()


def test_log_in_watch_a_sandbox_pause_resume_snapshot_and_remove_it(
        home: KelpieHome, browser: object) -> None:
    from playwright.sync_api import Browser, expect

    assert isinstance(browser, Browser)
    ok(home.kelpie("run", "-d", "--name", "web", "--memory", "256", DEMO, "--", "sh", "-c",
                   "i=0; while :; do i=$((i+1)); echo tick $i; sleep 0.5; done"))
    context = browser.new_context(bypass_csp=True)  # only so axe-core can be injected
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    try:
        page.goto(_link(home))
        row = page.locator("tr[data-sandbox='web']")
        expect(row).to_contain_text("running")
        assert "#token" not in page.url  # the one-time token leaves the address bar
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
        _no_serious_accessibility_violations(page)
        _a_fleet_controller_shows_its_view(home, page)

        row.get_by_role("button", name="web").click()
        expect(page.locator("#detail-title")).to_have_text("web")
        expect(page.locator("#log")).to_contain_text("tick 3")  # followed live
        page.get_by_role("button", name="Pause").click()
        expect(row).to_contain_text("paused")
        expect(page.locator("#history")).to_contain_text("paused")
        page.get_by_role("button", name="Resume").click()
        expect(row).to_contain_text("running")
        page.get_by_role("button", name="Open a shell").click()
        screen = page.locator("#terminal .xterm-rows")
        expect(screen).to_contain_text("#")  # the shell's prompt
        page.keyboard.type("echo $((6 * 7)); stty size")
        page.keyboard.press("Enter")
        expect(screen).to_contain_text(re.compile(r"size\s*42\s*\d+ \d+"))  # 42, stty size
        # the shell's size is the terminal's as fitted to the page, not the 24x80 default
        size = screen.inner_text().split("42", 1)[1].split()
        assert len(size) >= 2 and size[:2] != ["24", "80"], size
        page.get_by_role("button", name="Close the shell").click()
        page.get_by_role("button", name="Snapshot").click()
        expect(page.locator("#status")).to_contain_text("snapshot")
        expect(page.locator("#status")).to_contain_text("taken")
        expect(page.locator("#snapshot-rows")).to_contain_text("web")  # of web, listed
        _browse_upload_and_download_files(home, page)
        _fork(home, page)
        page.screenshot(path=str(ARTIFACTS / "dashboard-sandbox.png"), full_page=True)
        # what a snapshot needs of a host, and an image's layers and holders
        page.locator("#snapshot-rows button").first.click()
        expect(page.locator("#store-facts")).to_contain_text("Restores hereyes")
        expect(page.locator("#store-facts")).to_contain_text("x86_64")
        page.locator("#image-rows button").first.click()
        expect(page.locator("#store-detail-title")).to_contain_text("Image")
        expect(page.locator("#layer-rows tr")).not_to_have_count(0)
        expect(page.locator("#store-facts")).to_contain_text("sandbox")  # web holds it
        _no_serious_accessibility_violations(page)  # with the details open too
        page.once("dialog", lambda dialog: dialog.accept())  # "Remove web?"
        page.get_by_role("button", name="Remove").click()
        expect(row).to_have_count(0)
    finally:
        context.close()
        home.kelpie("rm", "-f", "web", "kid-1")
    snapshots = json.loads(ok(home.kelpie("snapshot", "ls", "--json")))
    assert any(s["sandbox_name"] == "web" for s in snapshots), snapshots
    assert "web" not in ok(home.kelpie("ps", "-a"))


def _a_fleet_controller_shows_its_view(home: KelpieHome, page: object) -> None:
    from playwright.sync_api import Page, expect

    assert isinstance(page, Page)
    expect(page.locator("#fleet")).to_be_hidden()  # in no fleet yet
    view = _fleet_view(2, ["rollout-1", "rollout-2"])  # what a controller sends each round
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(home.socket)),
                      base_url="http://kelpie") as daemon:
        assert daemon.put("/v1/fleet", json=model_json(view)).status_code == 204
    page.reload()  # (a page that found no fleet asks again only every 30 s)
    expect(page.locator("#fleet-rows")).to_contain_text("rollout-2 (running)")
    expect(page.locator("#fleet-rows tr")).to_have_count(2)
    expect(page.locator("#fleet-rows")).to_contain_text("3000 / 4096 MiB")


def _browse_upload_and_download_files(home: KelpieHome, page: object) -> None:
    from playwright.sync_api import Page, expect

    assert isinstance(page, Page)
    expect(page.locator("#files-path")).to_have_value("/root")  # the image's workdir
    page.set_input_files("#files-choose", files=[
        {"name": "hello.txt", "mimeType": "text/plain", "buffer": b"from the browser\n"}])
    page.get_by_role("button", name="Upload", exact=True).click()
    expect(page.locator("#status")).to_contain_text("uploaded 1 file to /root")
    assert ok(home.kelpie("exec", "web", "--", "cat", "/root/hello.txt")) == \
        "from the browser\n"
    with page.expect_download() as download:
        page.get_by_role("link", name="download hello.txt").click()
    assert Path(download.value.path()).read_bytes() == b"from the browser\n"
    page.get_by_role("button", name="Up", exact=True).click()
    expect(page.locator("#files-path")).to_have_value("/")
    page.get_by_role("button", name="open directory etc").click()
    expect(page.locator("#file-rows")).to_contain_text("os-release")


def _fork(home: KelpieHome, page: object) -> None:
    from playwright.sync_api import Page, expect

    assert isinstance(page, Page)
    page.locator("#fork-prefix").fill("kid")
    page.get_by_role("button", name="Fork", exact=True).click()
    expect(page.locator("#status")).to_contain_text("forked web into kid-1")
    expect(page.locator("tr[data-sandbox='kid-1']")).to_contain_text("running")
    assert ok(home.kelpie("exec", "kid-1", "--", "cat", "/root/hello.txt")) == \
        "from the browser\n"  # a copy of web as it was


def test_a_wrong_or_used_token_is_refused(home: KelpieHome, browser: object) -> None:
    from playwright.sync_api import Browser, expect

    assert isinstance(browser, Browser)
    link = _link(home)
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    try:
        page.goto(link.split("#")[0] + "#token=wrong")
        expect(page.locator("#login-error")).to_contain_text("refused")
        expect(page.locator("#sandboxes")).to_be_hidden()
        page.goto(link)  # the real one works...
        expect(page.locator("#sandboxes")).to_be_visible()
        other = browser.new_context().new_page()  # ...once
        other.goto(link)
        expect(other.locator("#login-error")).to_contain_text("already used")
        other.context.close()
    finally:
        context.close()


def _no_serious_accessibility_violations(page: object) -> None:
    from playwright.sync_api import Page

    assert isinstance(page, Page)
    if not AXE.exists():
        real_part_missing(f"axe-core ({AXE}; npm ci --prefix tests/browser)")
    page.add_script_tag(path=str(AXE))
    result = page.evaluate("async () => await axe.run(document, "
                           "{resultTypes: ['violations']})")
    serious = [{"id": v["id"], "impact": v["impact"], "help": v["help"],
                "nodes": [n["target"] for n in v["nodes"]]}
               for v in result["violations"] if v["impact"] in ("serious", "critical")]
    assert serious == [], json.dumps(serious, indent=2)

