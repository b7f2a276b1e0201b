"""The image root: guest paths resolved as a chroot would, and the image's users."""

from __future__ import annotations

import os

from ._common import OpError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

MAX_SYMLINKS: Final = 40


class RootFS:
    """Resolves guest paths to agent paths inside the image root."""

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)

    def host_path(self, parts: list[str]) -> str:
        """Join resolved components below the root."""
        prefix = "" if self.root == "/" else self.root
        return prefix + "/" + "/".join(parts)

    def resolve(self, path: str, follow_last: bool = True) -> str:
        """Map an absolute guest path to an agent path, following symlinks
        as the chroot would (absolute targets and ``..`` stay inside root).

        Missing components are kept verbatim: the caller's operation then
        reports ENOENT (or creates them).
        """
        if not path.startswith("/"):
            raise OpError("EINVAL", f"path must be absolute: {path!r}")
        pending = [p for p in reversed(path.split("/")) if p not in ("", ".")]
        resolved: list[str] = []
        links = 0
        while pending:
            name = pending.pop()
            if name in ("", "."):
                continue
            if name == "..":
                if resolved:
                    resolved.pop()
                continue
            candidate = self.host_path([*resolved, name])
            if not pending and not follow_last:
                resolved.append(name)
                continue
            try:
                target = os.readlink(candidate)
            except OSError:  # not a symlink, or missing
                resolved.append(name)
                continue
            links += 1
            if links > MAX_SYMLINKS:
                raise OpError("ELOOP", f"too many levels of symbolic links: {path}")
            if target.startswith("/"):
                resolved = []
            pending.extend(reversed(target.split("/")))
        return self.host_path(resolved)


class User:
    """Credentials a command runs with."""

    def __init__(self, name: str, uid: int, gid: int, groups: list[int], home: str) -> None:
        self.name = name
        self.uid = uid
        self.gid = gid
        self.groups = groups
        self.home = home


#: Parsed user databases by agent path, with the stat identity they were read at.
_DB_CACHE: dict[str, tuple[tuple[int, int, int, int], list[list[str]]]] = {}


def _read_db(rootfs: RootFS, path: str) -> list[list[str]]:
    """Read a colon-separated database (/etc/passwd, /etc/group) of the image.

    Every exec looks its user up: the parsed rows are reused while the file's
    identity (inode, size, mtime, ctime) is unchanged, which costs one stat
    instead of an open, a read and a parse.
    """
    # Below "/" the kernel's own lookup resolves exactly as RootFS.resolve would.
    host = path if rootfs.root == "/" else rootfs.resolve(path)
    try:
        st = os.stat(host)
    except OSError:
        return []
    key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    cached = _DB_CACHE.get(host)
    if cached is not None and cached[0] == key:
        return cached[1]
    try:
        with open(host, encoding="utf-8", errors="replace") as db:
            rows = [line.rstrip("\n").split(":") for line in db if not line.startswith("#")]
    except OSError:
        return []
    _DB_CACHE[host] = (key, rows)
    return rows


def lookup_user(rootfs: RootFS, user: str | int | None) -> User:
    """Resolve a user name or uid, with Docker's ``USER user:group`` form too (the group a
    name or gid; then that is the user's only group), against the image's /etc/passwd and
    /etc/group."""
    if isinstance(user, str) and ":" in user:
        name, _, group = user.partition(":")
        found = lookup_user(rootfs, name)
        gid = _lookup_group(rootfs, group)
        return User(found.name, found.uid, gid, [gid], found.home)
    if user is None:
        user = os.getuid()
    if isinstance(user, str) and user.isdigit():
        user = int(user)
    for row in _read_db(rootfs, "/etc/passwd"):
        if len(row) < 7 or not row[2].isdigit() or not row[3].isdigit():
            continue
        if row[0] == user or (isinstance(user, int) and int(row[2]) == user):
            name, uid, gid, home = row[0], int(row[2]), int(row[3]), row[5] or "/"
            return User(name, uid, gid, _groups_of(rootfs, name, gid), home)
    if isinstance(user, int):
        return User(str(user), user, user, [user], "/")
    raise OpError("EINVAL", f"no user named {user!r} in the sandbox's /etc/passwd")


def _lookup_group(rootfs: RootFS, group: str) -> int:
    if group.isdigit():
        return int(group)
    for row in _read_db(rootfs, "/etc/group"):
        if len(row) >= 3 and row[0] == group and row[2].isdigit():
            return int(row[2])
    raise OpError("EINVAL", f"no group named {group!r} in the sandbox's /etc/group")


def _groups_of(rootfs: RootFS, name: str, gid: int) -> list[int]:
    groups = [gid]
    for row in _read_db(rootfs, "/etc/group"):
        if len(row) >= 4 and row[2].isdigit() and name in row[3].split(","):
            groups.append(int(row[2]))
    return groups
