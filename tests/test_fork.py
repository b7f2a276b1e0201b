"""Fork through the runtime on the mock backend: names, what children inherit and what
not, refusals before anything is captured. The real thing (QEMU, shared memory) is in
``test_qemu_fork.py``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kelpie.images import ImageStore
from kelpie.runtime import Runtime, SandboxNameInUse
from kelpie.vm import ConfigError, VmFactory, VmState


@pytest.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[Runtime]:
    async with Runtime(data_dir=tmp_path / "data", images=ImageStore(tmp_path / "images"),
                       factory=VmFactory(environ={})) as rt:
        yield rt


async def test_children_are_named_and_copy_the_parent_at_the_fork(runtime: Runtime) -> None:
    parent = await runtime.create(name="web", backend="mock", env={"K": "v"},
                                  ports=["127.0.0.1:18080:80"], labels={"team": "a"})
    await runtime.write_file("web", "/root/state", b"before")
    children = await runtime.fork("web", 3)
    await runtime.write_file("web", "/root/state", b"after")  # not seen by the children
    assert [c.name for c in children] == ["web-1", "web-2", "web-3"]
    assert len({c.id for c in children} | {parent.id}) == 4
    for child in children:
        assert child.state is VmState.RUNNING and child.backend == "mock"
        assert child.config.ports == ()  # two children cannot bind one host port
        assert child.config.env["K"] == "v"
        assert child.labels == {"team": "a", "kelpie.fork-of": parent.id}
        assert await runtime.read_file(child.id, "/root/state") == b"before"
    assert (await runtime.inspect("web")).state is VmState.RUNNING
    named = await runtime.fork("web", 2, names=["left", "right"])
    assert [c.name for c in named] == ["left", "right"]
    prefixed = await runtime.fork("web", 1, name_prefix="try")
    assert [c.name for c in prefixed] == ["try-1"]
    assert not any((runtime.data_dir / "forks").iterdir())  # the capture is gone


async def test_refusals_come_before_the_parent_is_touched(runtime: Runtime,
                                                          tmp_path: Path) -> None:
    await runtime.create(name="box", backend="mock")
    await runtime.create(name="box-2", backend="mock")
    with pytest.raises(SandboxNameInUse):
        await runtime.fork("box", 2)
    with pytest.raises(ConfigError, match="1 to 100 children"):
        await runtime.fork("box", 0)
    with pytest.raises(ConfigError, match="2 names given for 3 children"):
        await runtime.fork("box", 3, names=["a", "b"])
    with pytest.raises(ConfigError, match="repeat"):
        await runtime.fork("box", 2, names=["a", "a"])
    shared = tmp_path / "shared"
    shared.mkdir()
    await runtime.create(name="vol", backend="mock", volumes=[f"{shared}:/data"])
    with pytest.raises(ConfigError, match=f"host volumes \\({shared}:/data\\)"):
        await runtime.fork("vol", 1)
    assert [s.name for s in await runtime.list_sandboxes(all=True)] == ["box", "box-2", "vol"]
    await runtime.stop("box")
    with pytest.raises(Exception, match="fork"):
        await runtime.fork("box", 1)
    assert (await runtime.inspect("box")).state is VmState.STOPPED
