"""``COPY`` and ``ADD``: the layer they make, written on the host from the build context
or from another stage's (or image's) root directory.

Sources are resolved inside their root only (a symbolic link in the context or in a stage
that points outside it stops there); a directory source copies its contents; without
``--chown`` everything belongs to root, as in Docker; ``ADD`` of a local tar archive
(any compression) unpacks it at the destination, its member names checked (``..``,
device nodes and links out of the archive refused). Destinations go through the stage's
own symbolic links, and only missing directories are created. The layer is made
reproducibly (sorted entries, the sources' modification times, no owner names), so the
same inputs give the same digest and the build cache can rely on it.
"""

from __future__ import annotations

import glob
import os
import posixpath
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from e2b_dockerfile_utils import PatternMatcher

from kelpie.images import DockerfileError
from kelpie.runtime._build_tree import FsTree, follow_links, member_entry


class BuildContext:
    """The directory a build copies from, with its ``.dockerignore``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        ignore = root / ".dockerignore"
        patterns = ignore.read_text(errors="replace").splitlines() if ignore.is_file() else []
        try:
            self._ignore = PatternMatcher(patterns) if patterns else None
        except ValueError as exc:
            raise DockerfileError(0, f".dockerignore: {exc}") from None

    def ignored(self, rel: str) -> bool:
        return self._ignore is not None and self._ignore.matches(rel)


@dataclass(frozen=True)
class Owner:
    """Who copied entries belong to (``--chown``) and their mode (``--chmod``)."""

    uid: int = 0
    gid: int = 0
    chmod: int | None = None


def resolve_in_root(root: Path, rel: str) -> Path | None:
    """``rel`` inside ``root`` with symbolic links followed but never out of ``root``
    (an absolute target starts again at ``root``); None if it does not exist."""
    def target(candidate: str) -> str | None:
        host = root / candidate.lstrip("/")
        return os.readlink(host) if host.is_symlink() else None

    resolved = follow_links("/" + rel, target)
    if resolved is None:
        return None
    host = root / resolved.lstrip("/")
    return host if host.exists() or host.is_symlink() else None


def expand_sources(root: Path, pattern: str, context: BuildContext | None,
                   line: int) -> list[tuple[str, Path]]:
    """The (path in its root, host path) pairs a COPY source names: wildcards matched as Docker's
    ``filepath.Match`` does (hidden files too); paths ignored by ``.dockerignore`` are
    not there."""
    rel = posixpath.normpath("/" + pattern).lstrip("/") or "."
    if glob.has_magic(rel):
        names = sorted(glob.glob(rel, root_dir=root, include_hidden=True))
    else:
        names = [rel]
    found = []
    for name in names:
        if context is not None and name != "." and context.ignored(name):
            continue
        host = resolve_in_root(root, name)
        if host is not None:
            found.append((name, host))
    if not found:
        where = "the build context" if context is not None else "the source stage"
        raise DockerfileError(line, f"{pattern!r} is not in {where}"
                              + (" (or .dockerignore leaves it out)" if context else ""))
    return found


class LayerWriter:
    """Writes one COPY/ADD layer (a tar) and keeps the stage's tree in step with it."""

    def __init__(self, tar: tarfile.TarFile, tree: FsTree, owner: Owner, line: int) -> None:
        self._tar, self._tree, self._owner, self._line = tar, tree, owner, line

    def parents(self, path: str) -> None:
        """Create the missing directories up to and including ``path``."""
        for missing in self._tree.missing_dirs(path):
            info = tarfile.TarInfo(missing.lstrip("/"))
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            self._add(missing, info)

    def copy(self, host: Path, dest: str, context: BuildContext | None,
             context_rel: str) -> None:
        """Copy ``host`` (a file, link or directory) to ``dest``: a directory's contents
        go into ``dest``."""
        st = host.lstat()
        if stat.S_ISDIR(st.st_mode):
            self.parents(dest)
            for rel, path, entry_stat in _walk(host):
                if context is not None and context.ignored(
                        posixpath.join(context_rel, rel) if context_rel != "." else rel):
                    continue
                self._entry(path, entry_stat, posixpath.join(dest, rel))
        else:
            self.parents(posixpath.dirname(dest))
            self._entry(host, st, dest)

    def _entry(self, host: Path, st: os.stat_result, dest: str) -> None:
        parent = self._tree.resolve(posixpath.dirname(dest))
        dest = posixpath.join(parent, posixpath.basename(dest))
        info = tarfile.TarInfo(dest.lstrip("/"))
        info.mtime = int(st.st_mtime)
        info.mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISDIR(st.st_mode):
            info.type = tarfile.DIRTYPE
        elif stat.S_ISLNK(st.st_mode):
            info.type, info.linkname = tarfile.SYMTYPE, os.readlink(host)
            info.mode = 0o777
        elif stat.S_ISREG(st.st_mode):
            info.size = st.st_size
        else:
            raise DockerfileError(self._line, f"{host.name} is not a file, directory or "
                                  "symbolic link: only those can be copied")
        if self._owner.chmod is not None and not info.issym():
            info.mode = self._owner.chmod
        if info.isreg():
            with host.open("rb") as data:
                self._add(dest, info, data)
        else:
            self._add(dest, info)

    def unpack(self, archive: Path, dest: str) -> None:
        """``ADD`` of a local tar: its members under ``dest``, their names checked."""
        self.parents(dest)
        base = self._tree.resolve(dest)
        with tarfile.open(archive, "r:*") as source:
            for member in source:
                name = posixpath.normpath(member.name.lstrip("/"))
                if name == ".":
                    continue
                if name.startswith("../") or name == "..":
                    raise DockerfileError(self._line, f"ADD {archive.name}: member "
                                          f"{member.name!r} leaves the destination")
                if member.ischr() or member.isblk():
                    raise DockerfileError(self._line, f"ADD {archive.name}: member "
                                          f"{member.name!r} is a device node, which an "
                                          "image built by Kelpie does not carry")
                copy = tarfile.TarInfo(posixpath.join(base, name).lstrip("/"))
                copy.type, copy.mode, copy.mtime = member.type, member.mode, int(member.mtime)
                copy.uid, copy.gid, copy.size = member.uid, member.gid, member.size
                if member.islnk():
                    target = posixpath.normpath(member.linkname.lstrip("/"))
                    if target.startswith("../") or target == "..":
                        raise DockerfileError(self._line, f"ADD {archive.name}: hard link "
                                              f"{member.name!r} points out of the archive")
                    copy.linkname = posixpath.join(base, target).lstrip("/")
                else:
                    copy.linkname = member.linkname
                data = source.extractfile(member) if member.isreg() else None
                self._add("/" + copy.name, copy, data, keep_owner=True)

    def _add(self, path: str, info: tarfile.TarInfo, data: object = None, *,
             keep_owner: bool = False) -> None:
        if not keep_owner or self._owner != Owner():
            info.uid, info.gid = self._owner.uid, self._owner.gid
        info.uname = info.gname = ""
        self._tar.addfile(info, data)  # type: ignore[arg-type]
        self._tree.set(member_entry(path, info))


def pack_context(root: Path, dockerfile: str, out: IO[bytes]) -> None:
    """The build context ``root`` as a tar into ``out``, without what its
    ``.dockerignore`` leaves out (the Dockerfile and ``.dockerignore`` always go: the
    builder reads them). Directories always go (a ``!`` pattern may want what is in
    them); sockets and device nodes never do."""
    if not root.is_dir():
        raise DockerfileError(0, f"the build context {root} is not a directory")
    context = BuildContext(root)
    keep = {posixpath.normpath(dockerfile.lstrip("/")), ".dockerignore"}
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for rel, path, st in _walk(root):
            kind = stat.S_IFMT(st.st_mode)
            if kind not in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK):
                continue
            if kind != stat.S_IFDIR and rel not in keep and context.ignored(rel):
                continue
            tar.add(path, rel, recursive=False)


def _walk(top: Path) -> Iterator[tuple[str, Path, os.stat_result]]:
    """Every entry under ``top`` (not following links), sorted, parents first."""
    pending = [("", top)]
    while pending:
        rel, directory = pending.pop()
        with os.scandir(directory) as entries:
            found = sorted(entries, key=lambda e: e.name)
        subdirs = []
        for entry in found:
            path = f"{rel}/{entry.name}" if rel else entry.name
            st = entry.stat(follow_symlinks=False)
            yield path, Path(entry.path), st
            if stat.S_ISDIR(st.st_mode):
                subdirs.append((path, Path(entry.path)))
        pending.extend(reversed(subdirs))
