"""The image root: guest paths resolved as a chroot would, and the image's users."""

from __future__ import annotations

import os
import stat

from ._common import OpError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, Final, TypeVar

    T = TypeVar("T")

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
            # lstat first: readlink of what is not a symlink (nearly every component)
            # raises, and an exception costs far more than a stat under TCG.
            try:
                is_link = stat.S_ISLNK(os.lstat(candidate).st_mode)
            except OSError:  # missing
                is_link = False
            if not is_link:
                resolved.append(name)
                continue
            try:
                target = os.readlink(candidate)
            except OSError:  # replaced meanwhile
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


class _Passwd:
    """/etc/passwd by name and by uid (the first valid row of each wins, as in libc)."""

    def __init__(self, rows: list[list[str]]) -> None:
        self.by_name: dict[str, tuple[str, int, int, str]] = {}
        self.by_uid: dict[int, tuple[str, int, int, str]] = {}
        for row in rows:
            if len(row) < 7 or not row[2].isdigit() or not row[3].isdigit():
                continue
            entry = (row[0], int(row[2]), int(row[3]), row[5] or "/")
            self.by_name.setdefault(entry[0], entry)
            self.by_uid.setdefault(entry[1], entry)


class _Groups:
    """/etc/group: each group's gid by name, and the gids each user is listed in."""

    def __init__(self, rows: list[list[str]]) -> None:
        self.gid_by_name: dict[str, int] = {}
        self.member_of: dict[str, list[int]] = {}
        for row in rows:
            if len(row) < 3 or not row[2].isdigit():
                continue
            gid = int(row[2])
            self.gid_by_name.setdefault(row[0], gid)
            if len(row) >= 4:
                for member in dict.fromkeys(row[3].split(",")):  # once per group
                    self.member_of.setdefault(member, []).append(gid)


#: The image's user databases by agent path, indexed, with the stat identity they were
#: read at.
_DB_CACHE: dict[str, tuple[tuple[int, int, int, int], Any]] = {}


def _read_db(rootfs: RootFS, path: str, index: Callable[[list[list[str]]], T]) -> T:
    """The index of a colon-separated database (/etc/passwd, /etc/group) of the image.

    Every exec looks its user up: the index is reused while the file's identity
    (inode, size, mtime, ctime) is unchanged, which costs one stat instead of an
    open, a read, a parse and a scan.
    """
    # Below "/" the kernel's own lookup resolves exactly as RootFS.resolve would.
    host = path if rootfs.root == "/" else rootfs.resolve(path)
    try:
        st = os.stat(host)
    except OSError:
        return index([])
    key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    cached = _DB_CACHE.get(host)
    if cached is not None and cached[0] == key:
        known: T = cached[1]  # built by this same index (one per database path)
        return known
    try:
        with open(host, encoding="utf-8", errors="replace") as db:
            rows = [line.rstrip("\n").split(":") for line in db if not line.startswith("#")]
    except OSError:
        return index([])
    built = index(rows)
    _DB_CACHE[host] = (key, built)
    return built


#: The agent's own uid (it never changes; commands run as it unless told otherwise).
AGENT_UID: Final = os.getuid()


def lookup_user(rootfs: RootFS, user: str | int | None, *, groups: bool = True) -> User:
    """Resolve a user name or uid, with Docker's ``USER user:group`` form too (the group a
    name or gid; then that is the user's only group), against the image's /etc/passwd and
    /etc/group (None: the agent's own user). Without ``groups`` the user's groups are
    only its primary group (for a command that runs as the agent: /etc/group unread)."""
    if isinstance(user, str) and ":" in user:
        name, _, group = user.partition(":")
        found = lookup_user(rootfs, name, groups=False)
        gid = _lookup_group(rootfs, group)
        return User(found.name, found.uid, gid, [gid], found.home)
    if user is None:
        user = AGENT_UID
    if isinstance(user, str) and user.isdigit():
        user = int(user)
    passwd = _read_db(rootfs, "/etc/passwd", _Passwd)
    entry = passwd.by_uid.get(user) if isinstance(user, int) else passwd.by_name.get(user)
    if entry is not None:
        name, uid, gid, home = entry
        listed = _read_db(rootfs, "/etc/group", _Groups).member_of.get(name, []) if groups else []
        return User(name, uid, gid, [gid, *listed], home)
    if isinstance(user, int):
        return User(str(user), user, user, [user], "/")
    raise OpError("EINVAL", f"no user named {user!r} in the sandbox's /etc/passwd")


def _lookup_group(rootfs: RootFS, group: str) -> int:
    if group.isdigit():
        return int(group)
    gid = _read_db(rootfs, "/etc/group", _Groups).gid_by_name.get(group)
    if gid is None:
        raise OpError("EINVAL", f"no group named {group!r} in the sandbox's /etc/group")
    return gid
