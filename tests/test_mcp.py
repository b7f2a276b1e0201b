"""``kelpie mcp`` driven by the ``mcp`` package's own client against real QEMU sandboxes
(the demo image) through a real daemon: over stdio (create, a command's output streamed as
progress, files, fork, snapshot, remove; the operator's limits refuse clearly; another
sandbox of the daemon is out of reach) and over streamable HTTP (the bearer token required;
the sandboxes get the operator's network policy). The policy's checks without a VM too."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import httpx2
import pytest
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

from daemon_env import KELPIE, KelpieHome
from kelpie.mcp import McpPolicy, PolicyError, require_bearer
from test_cli_e2e import DEMO
from vm_fixtures import demo_home

vm = pytest.mark.vm


# ---- without a VM -----------------------------------------------------------------------

def test_the_policy_refuses_what_the_operator_did_not_allow() -> None:
    policy = McpPolicy(max_sandboxes=2, max_memory_mib=1024, default_memory_mib=256,
                       images=("kelpie/*", "tpl-*"))
    policy.check_source("kelpie/demo", None)
    policy.check_source(None, "tpl-python")
    with pytest.raises(PolicyError, match="image 'ubuntu' is not allowed here; the "
                                          "operator allows kelpie/\\*, tpl-\\*"):
        policy.check_source("ubuntu", None)
    with pytest.raises(PolicyError, match="give exactly one of image and template"):
        policy.check_source("kelpie/demo", "tpl-python")
    assert (policy.memory(None), policy.memory(1024)) == (256, 1024)
    with pytest.raises(PolicyError, match="2048 MiB is over the operator's limit of 1024"):
        policy.memory(2048)
    policy.check_room(1, 1)
    with pytest.raises(PolicyError, match="at most 2 sandboxes at once and 2 exist"):
        policy.check_room(2, 1)
    with pytest.raises(ValueError, match="egress rules \\(--allow\\) need --network policy"):
        McpPolicy(allow=("pypi.org:443",))


async def test_http_needs_the_bearer_token() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"in"})

    transport = httpx.ASGITransport(app=require_bearer(app, "s3cret"))
    async with httpx.AsyncClient(transport=transport, base_url="http://mcp") as client:
        assert (await client.post("/mcp")).status_code == 401
        wrong = await client.post("/mcp", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        right = await client.post("/mcp", headers={"Authorization": "Bearer s3cret"})
        assert (right.status_code, right.text) == (200, "in")


# ---- against real sandboxes -------------------------------------------------------------

@pytest.fixture(scope="module")
def home(guestkit: object) -> Iterator[KelpieHome]:
    yield from demo_home()


def _data(result: Any) -> Any:
    """A tool's structured result (its ``result`` when it returned a plain value)."""
    assert not result.is_error, result.content[0].text
    content = result.structured_content
    return content["result"] if set(content) == {"result"} else content


def _error(result: Any) -> str:
    assert result.is_error, result.structured_content
    return str(result.content[0].text)


@asynccontextmanager
async def _stdio(home: KelpieHome, *options: str) -> AsyncIterator[ClientSession]:
    params = StdioServerParameters(command=KELPIE[0], args=[*KELPIE[1:], "mcp", *options],
                                   env=home.env)
    with (home.root / "mcp-stdio.log").open("w") as errlog:
        async with stdio_client(params, errlog=errlog) as (read, write), \
                ClientSession(read, write) as session:
            await session.initialize()
            yield session


@vm
async def test_an_agent_uses_sandboxes_over_stdio(home: KelpieHome) -> None:
    other = home.kelpie("run", "-d", "--name", "not-mcp", DEMO, "--", "sleep", "1000")
    assert other.returncode == 0, other.stderr
    async with _stdio(home, "--max-sandboxes", "2", "--max-memory", "512m",
                      "--image", "kelpie/*") as mcp:
        tools = {t.name for t in (await mcp.list_tools()).tools}
        assert {"create_sandbox", "run_command", "read_file", "write_file", "list_files",
                "snapshot_sandbox", "fork_sandbox", "remove_sandbox"} <= tools

        assert "is over the operator's limit of 512 MiB" in _error(await mcp.call_tool(
            "create_sandbox", {"image": DEMO, "memory_mib": 1024}))
        assert "image 'alpine' is not allowed here" in _error(await mcp.call_tool(
            "create_sandbox", {"image": "alpine"}))
        box = _data(await mcp.call_tool("create_sandbox", {"image": DEMO, "name": "agent"}))
        assert (box["name"], box["state"]) == ("agent", "running")

        streamed: list[str] = []

        async def progress(done: float, total: float | None, message: str | None) -> None:
            streamed.append(message or "")

        ran = _data(await mcp.call_tool(
            "run_command", {"sandbox": "agent", "command": "echo one; sleep 0.2; echo two; "
                            "echo oops >&2; exit 3"}, progress_callback=progress))
        assert (ran["exit_code"], ran["stdout"], ran["stderr"]) == (3, "one\ntwo\n", "oops\n")
        assert "".join(streamed).count("one") == 1 and "two" in "".join(streamed)
        piped = _data(await mcp.call_tool("run_command", {
            "sandbox": "agent", "command": ["tr", "a-z", "A-Z"], "stdin": "quiet, then é\n"}))
        assert (piped["exit_code"], piped["stdout"]) == (0, "QUIET, THEN é\n")

        await mcp.call_tool("write_file", {"sandbox": "agent", "path": "/root/notes.txt",
                                           "content": "from the agent\n", "mode": "600"})
        raw = base64.b64encode(bytes(range(256))).decode()
        _data(await mcp.call_tool("write_file", {"sandbox": "agent", "path": "/root/blob",
                                                 "content": raw, "encoding": "base64"}))
        text = _data(await mcp.call_tool("read_file", {"sandbox": "agent",
                                                       "path": "/root/notes.txt"}))
        assert (text["encoding"], text["content"]) == ("utf-8", "from the agent\n")
        blob = _data(await mcp.call_tool("read_file", {"sandbox": "agent",
                                                       "path": "/root/blob"}))
        assert blob["encoding"] == "base64" and blob["content"] == raw
        listing = _data(await mcp.call_tool("list_files", {"sandbox": "agent",
                                                           "path": "/root"}))
        assert {"name": "notes.txt", "type": "file", "size": 15, "mode": "600"} in listing

        assert "was not made through this MCP server" in _error(await mcp.call_tool(
            "run_command", {"sandbox": "not-mcp", "command": "true"}))
        assert "no such" in _error(await mcp.call_tool(
            "read_file", {"sandbox": "agent", "path": "/nope"})).lower()

        snap = _data(await mcp.call_tool("snapshot_sandbox", {"sandbox": "agent",
                                                              "name": "agent-snap"}))
        assert snap["name"] == "agent-snap"
        [child] = _data(await mcp.call_tool("fork_sandbox", {"sandbox": "agent"}))
        forked = _data(await mcp.call_tool("run_command", {"sandbox": child["id"],
                                                           "command": "cat /root/notes.txt"}))
        assert forked["stdout"] == "from the agent\n"
        assert "at most 2 sandboxes at once and 2 exist" in _error(await mcp.call_tool(
            "create_sandbox", {"image": DEMO}))
        names = {s["name"] for s in _data(await mcp.call_tool("list_sandboxes", {}))}
        assert names == {"agent", child["name"]}  # not-mcp is not the agent's
        for ref in ("agent", child["id"]):
            _data(await mcp.call_tool("remove_sandbox", {"sandbox": ref}))
    assert home.kelpie("rm", "-f", "not-mcp").returncode == 0
    assert home.kelpie("snapshot", "rm", "agent-snap").returncode == 0


@vm
async def test_over_http_the_token_is_required_and_the_policy_applies(
        home: KelpieHome) -> None:
    token_file = home.root / "mcp.token"
    token_file.write_text("t0ken-for-the-mcp-tests\n")
    os.chmod(token_file, 0o600)
    server = await asyncio.create_subprocess_exec(
        *KELPIE, "mcp", "--http", "127.0.0.1:0", "--token-file", str(token_file),
        "--network", "policy", "--allow", "10.9.8.7:8080",
        env=home.env, stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL)
    try:
        assert server.stderr is not None
        line = (await asyncio.wait_for(server.stderr.readline(), 60)).decode()
        url = line.split("serving ", 1)[1].strip()
        async with httpx.AsyncClient() as plain:
            assert (await plain.post(url, json={})).status_code == 401
        headers = {"Authorization": "Bearer t0ken-for-the-mcp-tests"}
        async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=300)) \
                as http, streamable_http_client(url, http_client=http) as (read, write), \
                ClientSession(read, write) as mcp:
            await mcp.initialize()
            box = _data(await mcp.call_tool("create_sandbox", {"image": DEMO}))
            ran = _data(await mcp.call_tool("run_command", {"sandbox": box["id"],
                                                            "command": ["uname", "-s"]}))
            assert ran["stdout"] == "Linux\n"
            shown = await asyncio.to_thread(home.kelpie, "inspect", box["id"])
            [inspected] = json.loads(shown.stdout)
            assert inspected["network"] == "policy"
            assert inspected["allow"] == ["10.9.8.7/32:8080"]  # the rule, normalised
            _data(await mcp.call_tool("remove_sandbox", {"sandbox": box["id"]}))
    finally:
        server.terminate()
        await asyncio.wait_for(server.wait(), 30)
