"""File requests: streamed reads and atomic writes, stat, list, mkdir and remove."""

from __future__ import annotations

# contextlib is outside the guest's import budget: keep try/except/pass.
# ruff: noqa: SIM105
import os
import stat

from ._common import FT, HIGH_WATER, OpError, file_type, protocol
from ._layer import LayerStream, Marks

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Final

    from ._common import Handler
    from ._exec import Exec
    from ._link import HostLink
    from ._rootfs import RootFS

#: Entries per ``list`` message (each entry is at most ~350 bytes of JSON).
LIST_BATCH: Final = 512
FILE_CHUNK: Final = protocol.MAX_FRAME_PAYLOAD


class Upload:
    """A write_file in progress: chunks go to a temp file renamed at the end."""

    def __init__(self, request_id: int, path: str, final: str, tmp: str, fd: int) -> None:
        self.request_id = request_id
        self.path = path
        self.final = final
        self.tmp = tmp
        self.fd: int | None = fd
        self.size = 0

    def write(self, data: bytes) -> None:
        """Append a chunk to the temp file."""
        assert self.fd is not None
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]
        self.size += len(data)

    def commit(self) -> None:
        """Make the file durable and move it into place."""
        assert self.fd is not None
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = None
        os.rename(self.tmp, self.final)

    def abort(self) -> None:
        """Drop the temp file."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        try:
            os.unlink(self.tmp)
        except OSError:
            pass


class Download:
    """A read_file (or a layer: ``stream``) in progress."""

    def __init__(self, request_id: int, fd: int, stream: LayerStream | None = None) -> None:
        self.request_id = request_id
        self.fd = fd
        self.stream = stream
        self.size = 0

    def read(self, size: int) -> bytes:
        """The next chunk; b"" at the end."""
        return self.stream.read(size) if self.stream is not None else os.read(self.fd, size)

    def reply(self) -> dict[str, Any]:
        """The REPLY that ends the transfer."""
        if self.stream is None:
            return {"size": self.size}
        return {"size": self.size, "mark": self.stream.mark, "entries": self.stream.entries}

    def abort(self) -> None:
        """Close the file."""
        if self.stream is not None:
            self.stream.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def remove_tree(top: str) -> None:
    """Delete a directory tree without following symlinks (no recursion limit)."""
    stack = [(top, False)]
    while stack:
        path, emptied = stack.pop()
        if emptied:
            os.rmdir(path)
            continue
        stack.append((path, True))
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append((entry.path, False))
                else:
                    os.unlink(entry.path)


class FileService:
    """Serves the file ops inside the image root; transfers stay in ``requests``.

    ``requests`` is the session's table of requests in flight, shared with the
    session (which cancels and ends transfers) and the exec manager.
    """

    def __init__(
        self, rootfs: RootFS, link: HostLink, requests: dict[int, Exec | Upload | Download]
    ) -> None:
        self.rootfs = rootfs
        self.link = link
        self.requests = requests
        self.marks = Marks(rootfs)

    def handlers(self) -> dict[str, Handler]:
        """The ops this service serves."""
        return {
            "read_file": self.op_read_file,
            "write_file": self.op_write_file,
            "stat": self.op_stat,
            "list": self.op_list,
            "mkdir": self.op_mkdir,
            "remove": self.op_remove,
            "mark": self.marks.op_mark,
            "layer": self.op_layer,
        }

    def op_read_file(self, rid: int, f: dict[str, Any]) -> None:
        """Start streaming a regular file to the host."""
        path = f["path"]
        try:
            fd = os.open(self.rootfs.resolve(path), os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise OpError.from_os(exc, f"cannot open {path}") from None
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            if stat.S_ISDIR(mode):
                raise OpError("EISDIR", f"cannot read {path}: it is a directory")
            raise OpError("EINVAL", f"cannot read {path}: not a regular file")
        os.set_blocking(fd, True)
        self.requests[rid] = Download(rid, fd)

    def op_layer(self, rid: int, f: dict[str, Any]) -> None:
        """Start streaming the changes since a mark as a layer tar."""
        self.requests[rid] = Download(rid, -1, self.marks.open_layer(f["mark"]))

    def downloads(self) -> list[Download]:
        """read_file transfers in progress."""
        return [r for r in self.requests.values() if isinstance(r, Download)]

    def pump_downloads(self) -> bool:
        """Send file chunks while the outgoing queue has room; True if transfers remain."""
        downloads = self.downloads()
        if not downloads:
            return False
        for dl in downloads:
            while self.link.queued < HIGH_WATER and self.link.connected:
                try:
                    chunk = dl.read(FILE_CHUNK)
                except OSError as exc:
                    err = OpError.from_os(exc, "read failed")
                    self.end_download(dl)
                    self.link.send_error(dl.request_id, err.code, err.message)
                    break
                if not chunk:
                    self.end_download(dl)
                    self.link.send_json(FT.REPLY, dl.request_id, dl.reply())
                    break
                dl.size += len(chunk)
                self.link.send(protocol.encode_frame(FT.FILE_DATA, dl.request_id, chunk))
        return bool(self.downloads())

    def end_download(self, dl: Download) -> None:
        """Close a finished or failed download."""
        dl.abort()
        self.requests.pop(dl.request_id, None)

    def op_write_file(self, rid: int, f: dict[str, Any]) -> None:
        """Open a temp file next to the target; FILE_DATA frames follow."""
        path = f["path"]
        final = self.rootfs.resolve(path)
        if os.path.isdir(final):
            raise OpError("EISDIR", f"cannot write {path}: it is a directory")
        parent, name = os.path.split(final)
        tmp = os.path.join(parent, f".{name}.kelpie-{os.urandom(4).hex()}.tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            fd = os.open(tmp, flags, 0o600)
        except OSError as exc:
            raise OpError.from_os(exc, f"cannot write {path}") from None
        os.fchmod(fd, f["mode"] & 0o7777)
        self.requests[rid] = Upload(rid, path, final, tmp, fd)

    def on_file_data(self, frame: protocol.Frame) -> None:
        """Append an upload chunk; an empty chunk commits the file."""
        up = self.requests.get(frame.request_id)
        if not isinstance(up, Upload):
            return  # cancelled or failed earlier: drop silently
        try:
            if frame.payload:
                up.write(frame.payload)
                return
            up.commit()
        except OSError as exc:
            up.abort()
            del self.requests[up.request_id]
            err = OpError.from_os(exc, f"cannot write {up.path}")
            self.link.send_error(up.request_id, err.code, err.message)
            return
        del self.requests[up.request_id]
        self.link.send_json(FT.REPLY, up.request_id, {"size": up.size})

    def op_stat(self, rid: int, f: dict[str, Any]) -> dict[str, Any]:
        """Describe one file."""
        path, follow = f["path"], f["follow_symlinks"]
        host = self.rootfs.resolve(path, follow_last=follow)
        try:
            st = os.stat(host, follow_symlinks=False)
            target = os.readlink(host) if stat.S_ISLNK(st.st_mode) else None
        except OSError as exc:
            raise OpError.from_os(exc, f"cannot stat {path}") from None
        info = {
            "type": file_type(st.st_mode),
            "size": st.st_size,
            "mode": stat.S_IMODE(st.st_mode),
            "uid": st.st_uid,
            "gid": st.st_gid,
            "mtime_ns": st.st_mtime_ns,
            "nlink": st.st_nlink,
        }
        if target is not None:
            info["target"] = target
        return info

    def op_list(self, rid: int, f: dict[str, Any]) -> dict[str, Any]:
        """List a directory; long listings arrive in EVENT batches before the REPLY."""
        path = f["path"]
        entries: list[dict[str, Any]] = []
        try:
            with os.scandir(self.rootfs.resolve(path)) as it:
                for entry in it:
                    st = entry.stat(follow_symlinks=False)
                    entries.append(
                        {
                            "name": entry.name,
                            "type": file_type(st.st_mode),
                            "size": st.st_size,
                            "mode": stat.S_IMODE(st.st_mode),
                        }
                    )
        except OSError as exc:
            raise OpError.from_os(exc, f"cannot list {path}") from None
        entries.sort(key=lambda e: str(e["name"]))
        while len(entries) > LIST_BATCH:
            self.link.send_json(FT.EVENT, rid, {"entries": entries[:LIST_BATCH]})
            del entries[:LIST_BATCH]
        return {"entries": entries}

    def op_mkdir(self, rid: int, f: dict[str, Any]) -> dict[str, Any]:
        """Create a directory (and its parents, like ``mkdir -p``)."""
        path, mode = f["path"], f["mode"] & 0o7777
        host = self.rootfs.resolve(path)
        existed = os.path.isdir(host)
        try:
            if f["parents"]:
                os.makedirs(host, mode, exist_ok=True)
            else:
                os.mkdir(host, mode)
            if not existed:
                os.chmod(host, mode)  # the agent's umask must not apply
        except OSError as exc:
            raise OpError.from_os(exc, f"cannot create directory {path}") from None
        return {}

    def op_remove(self, rid: int, f: dict[str, Any]) -> dict[str, Any]:
        """Remove a file, symlink or (empty, or with recursive) directory."""
        path = f["path"]
        host = self.rootfs.resolve(path, follow_last=False)
        if host.rstrip("/") in ("", self.rootfs.root.rstrip("/")):
            raise OpError("EBUSY", "refusing to remove the root directory")
        try:
            if not stat.S_ISDIR(os.lstat(host).st_mode):
                os.unlink(host)
            elif f["recursive"]:
                remove_tree(host)
            else:
                os.rmdir(host)
        except OSError as exc:
            raise OpError.from_os(exc, f"cannot remove {path}") from None
        return {}
