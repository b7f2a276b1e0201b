"""Commit's parts without a VM: what counts as changed between an image's tree and a
guest's, a guest's walk parsed as untrusted, and the agent's walk of a real directory."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kelpie.agent import AgentClient
from kelpie.runtime._commit import changes, host_tree
from kelpie.vm import TreeEntry
from test_agent import AgentProcess

BUILT = 1_000_000_000_000_000_000  # when the image's disk was built (ns)


def entry(path: str, kind: str = "file", *, ctime: int = BUILT - 5, mode: int = 0o644,
          size: int = 3, target: str | None = None, mount: bool = False) -> TreeEntry:
    return TreeEntry(path, kind, mode, 0, 0, size, BUILT - 10, ctime, target=target,
                     mount=mount)


BASE = {e.path: e for e in (
    entry("/etc", "dir", mode=0o755), entry("/etc/motd"), entry("/etc/hosts"),
    entry("/usr", "dir", mode=0o755), entry("/usr/lib", "dir", mode=0o755),
    entry("/usr/lib/a"), entry("/usr/lib/b"), entry("/bin", "dir", mode=0o755),
    entry("/bin/sh", "symlink", target="busybox"), entry("/proc", "dir", mode=0o555),
    entry("/proc/ghost"),
)}


def test_new_rewritten_chmodded_and_gone_entries_are_the_changes() -> None:
    current = [
        entry("/etc", "dir", mode=0o755, ctime=BUILT + 1),   # an entry was added to it
        entry("/etc/motd", ctime=BUILT + 2),                  # same size and mtime, rewritten
        entry("/etc/hosts", ctime=BUILT + 3, size=99),        # written by the runtime: left out
        entry("/etc/new", ctime=BUILT + 4),
        entry("/bin", "dir", mode=0o755),
        entry("/bin/sh", "symlink", target="dash"),           # retargeted, ctime not later
        entry("/proc", "dir", mode=0o555, mount=True),        # another file system
        entry("/usr", "dir", mode=0o700),                     # chmod: metadata differs
    ]
    found = changes(BASE, current, BUILT)
    assert [e.path for e in found.changed] == ["/bin/sh", "/etc", "/etc/motd", "/etc/new",
                                               "/usr"]
    # /usr/lib is gone with everything in it: one whiteout for the top; /proc is a mount
    assert found.deleted == ["/usr/lib"]


def test_an_untouched_guest_has_no_changes() -> None:
    current = [e for e in BASE.values() if not e.path.startswith("/proc/")]
    current = [TreeEntry(**{**e.__dict__, "mount": e.path == "/proc"}) for e in current]
    found = changes(BASE, current, BUILT)
    assert (found.changed, found.deleted) == ([], [])


@pytest.mark.parametrize(("item", "problem"), [
    ({"path": "relative"}, "not an absolute normalised path"),
    ({"path": "/a/../b"}, "not an absolute normalised path"),
    ({"path": "/a//b"}, "not an absolute normalised path"),
    ({"path": "/a\0b"}, "not an absolute normalised path"),
    ({"type": "weird"}, "type 'weird' is not one of"),
    ({"mode": -1}, "mode -1 is not a whole number"),
    ({"mode": 0o17777}, "is not a permission mode"),
    ({"uid": True}, "uid True is not a whole number"),
    ({"size": "3"}, "size '3' is not a whole number"),
    ({"type": "symlink"}, "a symlink's target None is not a path"),
    ({"mount": "yes"}, "mount 'yes' is not true or false"),
])
def test_a_guests_walk_is_checked_field_by_field(item: dict[str, object],
                                                 problem: str) -> None:
    good = {"path": "/a", "type": "file", "mode": 0o644, "uid": 0, "gid": 0, "size": 1,
            "mtime_ns": 1, "ctime_ns": 1}
    with pytest.raises(ValueError, match=problem):
        TreeEntry.from_reply({**good, **item})


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[AgentClient]:
    agent = AgentProcess(tmp_path / "agent.sock")
    try:
        connected = await AgentClient.connect_unix(str(agent.sock), timeout=5)
        await connected.hello(timeout=5)
        yield connected
        await connected.close()
    finally:
        agent.stop()


async def test_the_agent_walks_a_tree_as_the_host_sees_it(client: AgentClient,
                                                          tmp_path: Path) -> None:
    top = tmp_path / "tree"
    (top / "d" / "deep").mkdir(parents=True)
    (top / "d" / "deep" / "f").write_bytes(b"data")
    (top / "d" / "deep" / "f").chmod(0o640)
    (top / "link").symlink_to("d/deep/f")
    os.mkfifo(top / "pipe")
    for i in range(1200):  # more than one EVENT batch
        (top / "d" / f"n{i:04}").touch()
    walked = {e.path.removeprefix(str(top)): e for e in await client.walk(str(top))}
    on_host = host_tree(top)
    assert set(walked) == set(on_host) and len(walked) == 1205
    for path, seen in walked.items():  # same metadata, ctime included
        assert dataclasses.replace(seen, path=path) == on_host[path], path
    assert walked["/link"].target == "d/deep/f" and walked["/pipe"].type == "fifo"
    assert walked["/d/deep/f"].mode == 0o640 and walked["/d/deep/f"].size == 4
