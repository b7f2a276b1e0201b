"""Bad exec requests are refused on the host, before any guest sees them (issue 10).

The checks live in the VM layer (:class:`kelpie.vm.ExecRequest`), so every backend refuses
the same requests with the same :class:`ConfigError`, and the daemon answers 400.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kelpie.backends import MOCK
from kelpie.backends.mock import MockVm
from kelpie.daemon import create_app
from kelpie.images import ImageStore
from kelpie.runtime import Runtime
from kelpie.vm import BackendRegistry, ConfigError, ExecRequest, VmConfig, VmFactory

BAD_REQUESTS: list[tuple[dict[str, Any], str]] = [
    ({"argv": ()}, "argv is empty"),
    ({"argv": ("",)}, "argv[0] is empty"),
    ({"argv": ("echo", "a\0b")}, "argv[1] contains NUL"),
    ({"argv": ("true",), "env": {"A": "x\0y"}}, "env 'A'"),
    ({"argv": ("true",), "env": {"": "x"}}, "env ''"),
    ({"argv": ("true",), "env": {"A=B": "x"}}, "env 'A=B'"),
    ({"argv": ("true",), "cwd": "relative"}, "cwd 'relative'"),
    ({"argv": ("true",), "cwd": "/a\0b"}, "cwd '/a\\x00b'"),
    ({"argv": ("true",), "user": ""}, "user ''"),
    ({"argv": ("true",), "timeout": 0}, "timeout is 0"),
    ({"argv": ("true",), "timeout": float("inf")}, "timeout is inf"),
    ({"argv": ("x" * 100_000,) * 3}, "fit in one request"),
]


@pytest.mark.parametrize(("fields", "named"), BAD_REQUESTS)
def test_exec_request_refuses_what_the_agent_would(fields: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError) as info:
        ExecRequest(**fields)
    assert any(named in problem for problem in info.value.problems), info.value.problems


def test_exec_request_lists_every_problem_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        ExecRequest(("",), {"": "x"}, cwd="rel")
    assert len(info.value.problems) == 3, info.value.problems


async def test_the_mock_refuses_an_empty_program_before_running_anything() -> None:
    vm = MockVm(VmConfig())
    await vm.start()
    try:
        with pytest.raises(ConfigError, match=r"argv\[0\] is empty"):
            await vm.exec([""])
        with pytest.raises(ConfigError, match="cwd"):
            await vm.exec(["true"], cwd="tmp")
        assert (await vm.exec(["echo", "fine"])).stdout == b"fine\n"
    finally:
        await vm.stop()


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    registry = BackendRegistry()
    registry.register(MOCK)
    runtime = Runtime(data_dir=tmp_path / "data", images=ImageStore(tmp_path / "images"),
                      factory=VmFactory(registry, environ={"KELPIE_BACKEND": "mock"}))
    async with runtime, httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(runtime)),
                                          base_url="http://kelpie/v1") as client:
        yield client


async def test_daemon_answers_400_naming_argv_for_an_empty_program(
    api: httpx.AsyncClient,
) -> None:
    created = await api.post("/sandboxes", json={"name": "box"})
    assert created.status_code == 201, created.text
    reply = await api.post("/sandboxes/box/exec", json={"argv": [""]})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "ConfigError"
    assert "argv" in error["message"]
    fine = await api.post("/sandboxes/box/exec", json={"argv": ["echo", "ok"]})
    assert fine.status_code == 200, fine.text
