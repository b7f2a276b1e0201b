"""A guest's file tree as its agent reports it (for a commit), parsed as untrusted input."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

ENTRY_TYPES = frozenset({"file", "dir", "symlink", "char", "block", "fifo", "socket", "other"})
MAX_PATH_BYTES = 4096


@dataclasses.dataclass(frozen=True)
class TreeEntry:
    """One entry of a guest file system: an absolute, normalised path and its metadata."""

    path: str
    type: str
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    ctime_ns: int
    target: str | None = None
    mount: bool = False
    """Another file system is mounted here (``/proc``, a share): not part of this one."""

    @classmethod
    def from_reply(cls, item: Mapping[str, Any]) -> TreeEntry:
        """An entry of a ``walk`` reply; ValueError naming the field a guest got wrong."""
        path = item.get("path")
        if not isinstance(path, str) or not _normal_path(path):
            raise ValueError(f"path {path!r} is not an absolute normalised path")
        kind = item.get("type")
        if kind not in ENTRY_TYPES:
            raise ValueError(f"{path}: type {kind!r} is not one of {sorted(ENTRY_TYPES)}")
        numbers = {}
        for name in ("mode", "uid", "gid", "size", "mtime_ns", "ctime_ns"):
            value = item.get(name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0 \
                    or value >= 1 << 64:
                raise ValueError(f"{path}: {name} {value!r} is not a whole number >= 0")
            numbers[name] = value
        if numbers["mode"] > 0o7777:
            raise ValueError(f"{path}: mode {numbers['mode']:o} is not a permission mode")
        target = item.get("target")
        if kind == "symlink" and not item.get("mount") and (not isinstance(target, str)
                                                             or not target
                                  or "\0" in target or len(target) > MAX_PATH_BYTES):
            raise ValueError(f"{path}: a symlink's target {target!r} is not a path")
        mount = item.get("mount", False)
        if not isinstance(mount, bool):
            raise ValueError(f"{path}: mount {mount!r} is not true or false")
        return cls(path, str(kind), target=target if kind == "symlink" and not mount else None,
                   mount=mount, **numbers)


def _normal_path(path: str) -> bool:
    if not path.startswith("/") or path == "/" or "\0" in path or len(path) > MAX_PATH_BYTES:
        return False
    return all(part not in ("", ".", "..") for part in path[1:].split("/"))
