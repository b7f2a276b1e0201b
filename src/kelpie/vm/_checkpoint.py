"""Checkpoints through the file hooks: a workspace directory, the env and the agent's state.

A checkpoint (:attr:`SnapshotKind.CHECKPOINT`) is what survives a move to another machine,
whatever its architecture or backend: not memory or disks, but the files a sandbox works
on. Any backend that implements the file hooks (``_do_list_dir``, ``_do_read_file``,
``_do_write_file``, ``_do_remove``, ``_do_mkdir``, ``_do_readlink``, ``_do_symlink``) gets
checkpoints from this module; the mock keeps its own native format and reads this one too.

Blobs of a checkpoint::

    workspace.tar     the workspace tree: an uncompressed POSIX (pax) tar of directories,
                      regular files and symbolic links with their permission bits; names
                      relative to the workspace, each directory before what it holds
    env.json          {"env": {...}}: the VM configuration's environment variables
    agent-state.json  what the guest agent reported (host name, commands it holds...),
                      carried as it is: nothing on the host interprets it

and ``extra["checkpoint"]`` in the manifest records the workspace path, counts, and what
was left out (``skipped``).

Which directory is the workspace
    The ``workspace`` argument, else the VM's :attr:`~VmInstance.checkpoint_workspace`,
    else :data:`DEFAULT_WORKSPACE` (``/workspace``). A capture fails when that directory
    does not exist: the image root is never taken instead, since it holds the image's own,
    architecture-specific programs. A restore writes into the same choice, falling back
    to the path the checkpoint was taken from.

What a capture keeps, and what it leaves out (listed in ``skipped``)
    Directories, regular files and symbolic links, with their permission bits. Owners and
    times are not kept (the restored files belong to the agent's user, root). Device
    nodes, FIFOs and sockets are left out, so are shared directories (``VmConfig.mounts``:
    host files, not guest state), files that vanish while the walk runs, and symbolic
    links whose target leaves the workspace (absolute, or climbing above it with ``..``):
    the workspace is all a checkpoint carries, so such a link would dangle or point at
    another system's files after a restore. The guest keeps running during the capture
    (the agent must answer), so a checkpoint is not atomic: quiesce the workload first
    for a consistent one.

What a restore does
    Boot a fresh VM from the restoring VM's own configuration (image, CPUs, memory), with
    the checkpoint's environment variables added under its own (its own win on a clash),
    empty the workspace (shared directories inside it are left alone), then write the tree
    back: directories, then files, then symbolic links. Setuid, setgid and sticky bits are
    not restored, nor the mode of a workspace directory the fresh guest already has (one
    it lacks is created with the captured mode). A stopped VM restored in place starts
    from its image again, like a new one: nothing of its earlier disk is kept.

The archive comes from a guest, so a restore trusts nothing in it: every entry is checked
before the VM boots, and :class:`SnapshotCorrupted` names the first unsafe one (an
absolute name, ``..``, a name that is not canonical, a duplicate, an entry before its
directory or below a non-directory, a hard link, a device, a link leaving the workspace).
The restore never writes through a symbolic link of the archive: links are created last,
and no entry can lie below one.

Portability: :meth:`SnapshotManifest.incompatibilities` accepts checkpoints for any
architecture and backend. Every backend that restores checkpoints with this module (QEMU,
the mock) can restore one taken by any other; a mock checkpoint in its native format
(no ``extra["checkpoint"]``) can only go back into a mock.
"""

from __future__ import annotations

import dataclasses
import io
import json
import posixpath
import tarfile
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from kelpie._exceptions import (
    ConfigError,
    GuestFileError,
    InvalidStateError,
    SnapshotCorrupted,
    SnapshotError,
    SnapshotIncompatible,
    SnapshotTooLarge,
)
from kelpie.vm._config import VmConfig
from kelpie.vm._snapshot import SnapshotKind, SnapshotManifest, SnapshotWriter, VmSnapshot
from kelpie.vm._state import VmState
from kelpie.vm._storage import Storage

if TYPE_CHECKING:
    from kelpie.vm._instance import VmInstance

DEFAULT_WORKSPACE = "/workspace"
"""The guest directory a checkpoint carries when neither the call nor the VM names one."""
CHECKPOINT_FORMAT = 1
RECORD_KEY = "checkpoint"
WORKSPACE_BLOB = "workspace.tar"
ENV_BLOB = "env.json"
AGENT_STATE_BLOB = "agent-state.json"
MAX_ENTRIES = 500_000
"""Most entries a workspace archive may hold (a restore refuses more)."""
MAX_PATH = 4096
MAX_SKIPPED_LISTED = 100
"""How many left-out paths the manifest names (``skipped_count`` counts them all)."""
RESTORED_MODE_BITS = 0o777
"""Permission bits a restore applies: no setuid, setgid or sticky bit from an archive."""
_VANISHED = frozenset({"ENOENT", "ENOTDIR", "EISDIR", "EINVAL", "ELOOP"})
"""Error codes of an entry that changed while the capture walked past it."""

EntryType = Literal["dir", "file", "symlink"]


@dataclasses.dataclass(frozen=True)
class CheckpointEntry:
    """One entry of a workspace archive; ``path`` is relative to the workspace."""

    path: str
    type: EntryType
    mode: int
    data: bytes = b""
    target: str = ""


@dataclasses.dataclass(frozen=True)
class CheckpointContent:
    """A checkpoint read back and checked: what a restore writes into the guest."""

    workspace: str
    """The guest directory the checkpoint was taken from."""
    entries: tuple[CheckpointEntry, ...]
    env: Mapping[str, str]
    agent_state: bytes
    """The agent's state as captured (JSON), opaque to the host."""
    workspace_mode: int | None = None


def is_file_checkpoint(manifest: SnapshotManifest) -> bool:
    """Whether ``manifest`` is a checkpoint in this module's format (any backend's)."""
    return manifest.kind is SnapshotKind.CHECKPOINT and isinstance(
        manifest.extra.get(RECORD_KEY), dict
    )


def workspace_of(vm: VmInstance, workspace: str | None = None) -> str:
    """The workspace a capture of ``vm`` takes: the argument, the VM's, else the default."""
    return check_workspace(workspace or vm.checkpoint_workspace or DEFAULT_WORKSPACE)


def check_workspace(path: str) -> str:
    """``path`` if it can be a workspace (absolute, normalised, not ``/``); else ConfigError."""
    problems = []
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        problems.append(f"checkpoint workspace {path!r} must be an absolute guest path")
    elif posixpath.normpath(path) != path or path.startswith("//"):
        problems.append(f"checkpoint workspace {path!r} is not normalised (try "
                        f"{posixpath.normpath(path)!r})")
    elif path == "/":
        problems.append("checkpoint workspace '/' would carry the whole guest system, with "
                        "its architecture-specific programs: name the directory the work is in")
    elif len(path) > MAX_PATH:
        problems.append(f"checkpoint workspace is over {MAX_PATH} characters")
    if problems:
        raise ConfigError(problems, what="checkpoint workspace")
    return path


# ---- capture ------------------------------------------------------------------------------


async def capture_checkpoint(
    vm: VmInstance,
    dest: Path,
    *,
    workspace: str | None = None,
    storage: Storage | None = None,
    max_bytes: int | None = None,
    created_at: str | None = None,
) -> VmSnapshot:
    """Write a checkpoint of the running ``vm`` to the new directory ``dest``.

    Meant for a backend's ``_do_snapshot``: it calls the VM's hooks directly (the public
    methods are guarded by the lifecycle lock the snapshot already holds). ``max_bytes``
    caps the blobs' total size (:class:`SnapshotTooLarge`).
    """
    if vm.state is not VmState.RUNNING:
        raise InvalidStateError(vm.id, "take a checkpoint", vm.state, [VmState.RUNNING])
    root = workspace_of(vm, workspace)
    try:
        listing_ok = await _is_dir(vm, root)
    except GuestFileError as exc:
        raise SnapshotError(f"VM {vm.id}: cannot read the checkpoint workspace: {exc}") from exc
    if not listing_ok:
        hint = (
            "create it in the guest, or set the VM's checkpoint_workspace to the directory "
            "the work is in" if root == DEFAULT_WORKSPACE else "check the path"
        )
        raise SnapshotError(
            f"VM {vm.id}: the checkpoint workspace {root} is not a directory in the guest; "
            f"a checkpoint carries one workspace directory: {hint}"
        )
    walk = _Walk(vm, root, max_bytes)
    tar_bytes = await walk.run()
    env_bytes = _canonical({"env": dict(vm.config.env)})
    state = await vm._do_agent_state()
    state_bytes = _canonical(state)
    host = vm.host_info()
    record: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "workspace": root,
        "workspace_mode": walk.root_mode,
        "image": vm.config.image,
        "dirs": walk.counts["dir"],
        "files": walk.counts["file"],
        "symlinks": walk.counts["symlink"],
        "file_bytes": walk.file_bytes,
        "skipped": walk.skipped[:MAX_SKIPPED_LISTED],
        "skipped_count": len(walk.skipped),
    }
    with SnapshotWriter(dest, storage=storage, max_bytes=max_bytes) as writer:
        writer.add_blob(WORKSPACE_BLOB, tar_bytes)
        writer.add_blob(ENV_BLOB, env_bytes)
        writer.add_blob(AGENT_STATE_BLOB, state_bytes)
        fields: dict[str, Any] = {}
        if created_at is not None:
            fields["created_at"] = created_at
        return writer.commit(
            kind=SnapshotKind.CHECKPOINT,
            backend=host.backend,
            backend_version=host.backend_version,
            arch=host.arch,  # where it was taken; a restore does not check it
            cpu_model=host.cpu_model,
            machine=host.machine,
            vcpus=vm.config.vcpus,
            memory_mib=vm.config.memory_mib,
            vm_id=vm.id,
            extra={RECORD_KEY: record},
            **fields,
        )


class _Walk:
    """One capture: walks the workspace through the hooks into a tar archive in memory."""

    def __init__(self, vm: VmInstance, root: str, max_bytes: int | None) -> None:
        self.vm = vm
        self.root = root
        self.max_bytes = max_bytes
        self.mounts = _mount_paths(vm.config)
        self.buffer = io.BytesIO()
        self.tar = tarfile.open(  # noqa: SIM115 - closed in run()
            fileobj=self.buffer, mode="w", format=tarfile.PAX_FORMAT
        )
        self.counts: dict[str, int] = {"dir": 0, "file": 0, "symlink": 0}
        self.file_bytes = 0
        self.skipped: list[dict[str, str]] = []
        self.root_mode: int | None = None

    async def run(self) -> bytes:
        try:
            await self._directory("")
        finally:
            self.tar.close()
        return self.buffer.getvalue()

    def _guest(self, rel: str) -> str:
        return self.root if not rel else f"{self.root}/{rel}"

    def _skip(self, rel: str, reason: str) -> None:
        self.skipped.append({"path": rel, "reason": reason})

    async def _directory(self, rel: str) -> None:
        stack = [rel]
        while stack:
            current = stack.pop()
            try:
                infos = await self.vm._do_list_dir(self._guest(current))
            except GuestFileError as exc:
                if current and exc.code in _VANISHED:
                    self._skip(current, "vanished during the checkpoint")
                    continue
                raise SnapshotError(
                    f"VM {self.vm.id}: cannot list {self._guest(current)} for a checkpoint: "
                    f"{exc}"
                ) from exc
            subdirs = []
            for info in infos:
                name = info.name
                if not name or name in (".", "..") or "/" in name or "\0" in name:
                    raise SnapshotError(
                        f"VM {self.vm.id}: the guest listed an invalid name {name!r} in "
                        f"{self._guest(current)}"
                    )
                child = f"{current}/{name}" if current else name
                if self._guest(child) in self.mounts:
                    self._skip(child, "a shared directory (mount), not guest state")
                elif info.type == "dir":
                    self._add(CheckpointEntry(child, "dir", info.mode & 0o7777))
                    subdirs.append(child)
                elif info.type == "file":
                    await self._file(child, info.mode & 0o7777)
                elif info.type == "symlink":
                    await self._symlink(child)
                else:
                    self._skip(child, f"a {info.type}: only files, directories and symbolic "
                                      f"links are carried")
            stack.extend(reversed(subdirs))  # a directory's entries, then its subdirectories

    async def _file(self, rel: str, mode: int) -> None:
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in self.vm._do_read_file(self._guest(rel)):
                size += len(chunk)
                self._check_budget(size)
                chunks.append(bytes(chunk))
        except GuestFileError as exc:
            if exc.code in _VANISHED:
                self._skip(rel, "vanished or changed type during the checkpoint")
                return
            raise SnapshotError(
                f"VM {self.vm.id}: cannot read {self._guest(rel)} for a checkpoint: {exc}"
            ) from exc
        self.file_bytes += size
        self._add(CheckpointEntry(rel, "file", mode, b"".join(chunks)))

    async def _symlink(self, rel: str) -> None:
        try:
            target = await self.vm._do_readlink(self._guest(rel))
        except GuestFileError as exc:
            if exc.code in _VANISHED:
                self._skip(rel, "vanished or changed type during the checkpoint")
                return
            raise SnapshotError(
                f"VM {self.vm.id}: cannot read the link {self._guest(rel)}: {exc}"
            ) from exc
        problem = link_problem(rel, target)
        if problem is not None:
            self._skip(rel, f"symbolic link to {target!r}: {problem}")
            return
        self._add(CheckpointEntry(rel, "symlink", 0o777, target=target))

    def _check_budget(self, pending: int) -> None:
        if self.max_bytes is not None:
            total = self.buffer.tell() + pending
            if total > self.max_bytes:
                raise SnapshotTooLarge(total, self.max_bytes)

    def _add(self, entry: CheckpointEntry) -> None:
        if sum(self.counts.values()) >= MAX_ENTRIES:
            raise SnapshotError(
                f"VM {self.vm.id}: the workspace {self.root} has over {MAX_ENTRIES} entries, "
                f"more than a checkpoint carries"
            )
        _add_to_tar(self.tar, entry)
        self.counts[entry.type] += 1
        self._check_budget(0)


def pack_workspace(entries: Sequence[CheckpointEntry]) -> bytes:
    """A workspace archive of ``entries``, as a capture writes it (for tests and tools)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            _add_to_tar(tar, entry)
    return buffer.getvalue()


def _add_to_tar(tar: tarfile.TarFile, entry: CheckpointEntry) -> None:
    info = tarfile.TarInfo(entry.path)
    info.mode = entry.mode
    info.mtime = 0  # not kept: the restore cannot set times through the file hooks
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if entry.type == "dir":
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
    elif entry.type == "symlink":
        info.type = tarfile.SYMTYPE
        info.linkname = entry.target
        tar.addfile(info)
    else:
        info.size = len(entry.data)
        tar.addfile(info, io.BytesIO(entry.data))


# ---- the archive's safety -----------------------------------------------------------------


def link_problem(path: str, target: str) -> str | None:
    """Why a symbolic link at workspace-relative ``path`` to ``target`` is unsafe, or None.

    Allowed: a relative target whose leading ``..`` components stay within the workspace
    (``../lib/x`` from ``bin/x``), with no ``..`` after a name (``a/../..`` could climb
    through a link named ``a``). The link's own directories are real directories of the
    archive, so its leading ``..`` resolve as written; by induction every link then
    resolves inside the workspace.
    """
    if not target or "\0" in target or len(target) > MAX_PATH:
        return "not a valid link target"
    if target.startswith("/"):
        return "absolute target: it leaves the workspace"
    depth = path.count("/")  # directories between the workspace and the link
    climbing = True
    for part in target.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not climbing:
                return "'..' after a name: it may climb out of the workspace through a link"
            depth -= 1
            if depth < 0:
                return "relative target climbs above the workspace"
        else:
            climbing = False
    return None


def _name_problem(name: str) -> str | None:
    if not name:
        return "empty name"
    if "\0" in name:
        return "NUL byte in the name"
    if len(name) > MAX_PATH:
        return f"name over {MAX_PATH} characters"
    if name.startswith("/"):
        return "absolute name"
    parts = name.split("/")
    if ".." in parts:
        return "'..' in the name"
    if any(part in ("", ".") for part in parts):
        return "not a canonical relative name (empty or '.' component)"
    return None


def _unsafe(name: str, why: str) -> SnapshotCorrupted:
    return SnapshotCorrupted(
        f"unsafe entry {name!r} in the checkpoint's workspace archive: {why}; a checkpoint "
        f"archive comes from a guest and is not trusted, so nothing of it was restored"
    )


def unpack_workspace(data: bytes) -> list[CheckpointEntry]:
    """Read and check a workspace archive; :class:`SnapshotCorrupted` names an unsafe entry.

    Nothing is extracted on the host: the entries come back in memory, each checked as
    described in the module docstring.
    """
    entries: list[CheckpointEntry] = []
    kinds: dict[str, EntryType] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:  # no decompression
            for member in tar:
                name = member.name
                problem = _name_problem(name)
                if problem is not None:
                    raise _unsafe(name, problem)
                if name in kinds:
                    raise _unsafe(name, "it appears twice")
                parent = name.rpartition("/")[0]
                if parent and kinds.get(parent) != "dir":
                    what = "below a non-directory" if parent in kinds else "before its directory"
                    raise _unsafe(name, f"it comes {what} ({parent!r})")
                if len(entries) >= MAX_ENTRIES:
                    raise _unsafe(name, f"the archive has over {MAX_ENTRIES} entries")
                mode = member.mode & 0o7777
                if member.type == tarfile.DIRTYPE:
                    entry = CheckpointEntry(name, "dir", mode)
                elif member.type in (tarfile.REGTYPE, tarfile.AREGTYPE) and not member.issparse():
                    stream = tar.extractfile(member)
                    assert stream is not None  # a regular file always has one
                    entry = CheckpointEntry(name, "file", mode, stream.read())
                elif member.type == tarfile.SYMTYPE:
                    link = link_problem(name, member.linkname)
                    if link is not None:
                        raise _unsafe(name, f"symbolic link to {member.linkname!r}: {link}")
                    entry = CheckpointEntry(name, "symlink", 0o777, target=member.linkname)
                elif member.type == tarfile.LNKTYPE:
                    raise _unsafe(name, f"hard link to {member.linkname!r} (never written by "
                                        f"a capture)")
                else:
                    raise _unsafe(name, f"{_type_name(member)}: only files, directories and "
                                        f"symbolic links are restored")
                kinds[name] = entry.type
                entries.append(entry)
    except tarfile.TarError as exc:
        raise SnapshotCorrupted(f"the checkpoint's workspace archive is not a valid tar: "
                                f"{exc}") from exc
    return entries


def _type_name(member: tarfile.TarInfo) -> str:
    if member.ischr() or member.isblk():
        return "a device node"
    if member.isfifo():
        return "a FIFO"
    if member.issparse():
        return "a sparse file"
    return f"an entry of tar type {member.type!r}"


# ---- restore ------------------------------------------------------------------------------


def read_checkpoint(snapshot: VmSnapshot, into: VmInstance | None = None) -> CheckpointContent:
    """Read every blob of a checkpoint and check it, before anything boots.

    :class:`SnapshotIncompatible` when it is not in this module's format (a mock's
    native checkpoint), or when VM ``into`` cannot take it (its workspace is in one of its
    shared directories); :class:`SnapshotCorrupted` when something in it is wrong or unsafe.
    """
    manifest = snapshot.manifest
    if manifest.kind is not SnapshotKind.CHECKPOINT:
        raise SnapshotIncompatible([f"{snapshot.path} is a {manifest.kind.value} snapshot, "
                                    f"not a checkpoint"])
    record = manifest.extra.get(RECORD_KEY)
    if not isinstance(record, dict):
        raise SnapshotIncompatible([
            f"checkpoint {snapshot.path} is in the {manifest.backend} backend's own format "
            f"(no workspace archive): only that backend can restore it"
        ])
    if record.get("format") != CHECKPOINT_FORMAT:
        raise SnapshotIncompatible([
            f"checkpoint format {record.get('format')!r} is not supported (this Kelpie reads "
            f"format {CHECKPOINT_FORMAT})"
        ])
    try:
        workspace = check_workspace(str(record.get("workspace")))
    except ConfigError as exc:
        raise SnapshotCorrupted(f"checkpoint {snapshot.path}: {exc}") from exc
    root_mode = record.get("workspace_mode")
    if root_mode is not None and not (isinstance(root_mode, int) and 0 <= root_mode <= 0o7777):
        raise SnapshotCorrupted(f"checkpoint {snapshot.path}: workspace_mode {root_mode!r} "
                                f"is not a permission mode")
    env = _read_env(snapshot)
    entries = unpack_workspace(snapshot.read_blob(WORKSPACE_BLOB))
    if into is not None:
        _replay_root(into, workspace)
    return CheckpointContent(
        workspace=workspace,
        entries=tuple(entries),
        env=env,
        agent_state=snapshot.read_blob(AGENT_STATE_BLOB),
        workspace_mode=root_mode,
    )


def _read_env(snapshot: VmSnapshot) -> dict[str, str]:
    try:
        body = json.loads(snapshot.read_blob(ENV_BLOB))
        env = body["env"]
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()
        ):
            raise ValueError("env is not an object of strings")
        VmConfig(env=env)  # the same checks as any VM's env
    except (ValueError, KeyError, TypeError, ConfigError) as exc:
        raise SnapshotCorrupted(f"checkpoint {snapshot.path}: {ENV_BLOB} is malformed: "
                                f"{exc}") from exc
    return env


def checkpoint_config(config: VmConfig, content: CheckpointContent) -> VmConfig:
    """``config`` with the checkpoint's env added (``config``'s own variables win)."""
    return dataclasses.replace(config, env={**content.env, **config.env})


async def replay_checkpoint(
    vm: VmInstance, content: CheckpointContent, *, workspace: str | None = None
) -> None:
    """Write a checkpoint's workspace into the freshly booted ``vm`` through its hooks.

    The workspace is ``workspace``, else the VM's ``checkpoint_workspace``, else where
    the checkpoint was taken. It is emptied first, except for shared directories in it.
    """
    root = _replay_root(vm, content.workspace, workspace)
    mounts = _mount_paths(vm.config)
    try:
        await _empty_workspace(vm, root, content.workspace_mode, mounts)
        links = []
        for entry in content.entries:
            path = f"{root}/{entry.path}"
            if any(_within(path, mount) for mount in mounts):
                continue  # a shared directory of this VM: host files, not ours to write
            mode = entry.mode & RESTORED_MODE_BITS
            if entry.type == "dir":
                await vm._do_mkdir(path, mode)
            elif entry.type == "file":
                await vm._do_write_file(path, _one_chunk(entry.data), mode)
            else:
                links.append((path, entry.target))
        for path, target in links:  # last: nothing is ever written through one
            await vm._do_symlink(target, path)
    except GuestFileError as exc:
        raise SnapshotError(
            f"VM {vm.id}: restoring the checkpoint's workspace into {root} failed: {exc}"
        ) from exc


def _replay_root(vm: VmInstance, recorded: str, workspace: str | None = None) -> str:
    """Where a restore into ``vm`` writes the workspace; refuses one in a shared directory."""
    root = check_workspace(workspace or vm.checkpoint_workspace or recorded)
    for mount in sorted(_mount_paths(vm.config)):
        if _within(root, mount):
            raise SnapshotIncompatible([
                f"the workspace {root} is in the shared directory {mount} of this VM: a "
                f"restore would overwrite host files; restore into a VM without that mount"
            ])
    return root


async def _empty_workspace(
    vm: VmInstance, root: str, mode: int | None, mounts: frozenset[str]
) -> None:
    if not await _is_dir(vm, root):
        await vm._do_mkdir(root, (mode if mode is not None else 0o755) & RESTORED_MODE_BITS)
        return
    pending = [root]
    while pending:
        directory = pending.pop()
        for info in await vm._do_list_dir(directory):
            path = f"{directory}/{info.name}"
            if path in mounts:
                continue
            if info.type == "dir" and any(_within(m, path) for m in mounts):
                pending.append(path)  # holds a shared directory: empty around it
            else:
                await vm._do_remove(path, True)


async def _is_dir(vm: VmInstance, path: str) -> bool:
    """Whether ``path`` lists as a directory in the guest (False if missing)."""
    try:
        await vm._do_list_dir(path)
    except GuestFileError as exc:
        if exc.code in ("ENOENT", "ENOTDIR"):
            return False
        raise
    return True


def _mount_paths(config: VmConfig) -> frozenset[str]:
    return frozenset(posixpath.normpath(m.guest_path) for m in config.mounts)


def _within(path: str, top: str) -> bool:
    """Whether guest path ``path`` is ``top`` or below it."""
    return path == top or path.startswith(top.rstrip("/") + "/")


async def _one_chunk(data: bytes) -> AsyncIterator[bytes]:
    yield data


def _canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode() + b"\n"
