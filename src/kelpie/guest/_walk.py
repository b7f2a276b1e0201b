"""Every entry of a file system, for a commit: the host compares it with the image."""

from __future__ import annotations

import os
import stat

from ._common import FT, OpError, file_type

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any, Final

    from ._link import HostLink
    from ._rootfs import RootFS

#: Entries per EVENT frame (each about 150 bytes of JSON: well under a frame).
WALK_BATCH: Final = 512


def op_walk(rootfs: RootFS, link: HostLink, rid: int, f: dict[str, Any]) -> dict[str, Any]:
    """Every entry below ``path``, depth first, never into another mounted file system
    (``/proc``, ``/dev``, shares: their mount points are listed with ``mount``): its path,
    type, mode, owner, size, times and link target. Batches go out as EVENTs; the REPLY
    carries the last one."""
    batch: list[dict[str, Any]] = []
    for path, host, st, mount in walk_tree(rootfs, f["path"]):
        item: dict[str, Any] = {
            "path": path, "type": file_type(st.st_mode),
            "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid,
            "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
        }
        if mount:
            item["mount"] = True  # another file system mounted here: not this one's
        elif stat.S_ISLNK(st.st_mode):
            item["target"] = os.readlink(host)
        batch.append(item)
        if len(batch) >= WALK_BATCH:
            link.send_json(FT.EVENT, rid, {"entries": batch})
            batch = []
    return {"entries": batch}


def walk_tree(rootfs: RootFS, path: str) -> Iterator[tuple[str, str, os.stat_result, bool]]:
    """(guest path, agent path, lstat, is a mount point) of every entry below ``path``,
    depth first; mount points are named, not entered."""
    top = rootfs.resolve(path)
    try:
        device = os.lstat(top).st_dev
    except OSError as exc:
        raise OpError.from_os(exc, f"cannot walk {path}") from None
    prefix = "" if path == "/" else path.rstrip("/")
    pending = [(prefix, top)]
    while pending:
        guest, host = pending.pop()
        try:
            with os.scandir(host) as entries:
                found = [(e.name, e.path, e.stat(follow_symlinks=False)) for e in entries]
        except OSError as exc:
            raise OpError.from_os(exc, f"cannot walk {guest or '/'}") from None
        for name, entry_path, st in found:
            mount = st.st_dev != device
            if stat.S_ISDIR(st.st_mode) and not mount:
                pending.append((f"{guest}/{name}", entry_path))
            yield f"{guest}/{name}", entry_path, st, mount
