"""The target's side of a teleport: reserve, receive blobs, restore, then own or discard.

:class:`TeleportReceiver` answers a source's steps (the :class:`TeleportPeer` protocol),
each recorded in the :class:`TeleportJournal` before it acts, each safe to repeat:

- ``prepare``: check the sandbox can run here (name, id, backend, ports, space), reserve;
- ``put_chunk``: append one chunk of a blob, its sha256 checked on arrival; a blob is
  complete when its whole sha256 matches (then renamed into place); a chunk for the wrong
  offset gets :class:`TransferOffsetMismatch` saying where to resume;
- ``switch``: restore the sandbox from the blobs and prove its agent answers; ``restored``;
- ``commit``: mark the teleport ``owned`` (the commit point), unless it was discarded;
- ``abort``: discard whatever arrived and the restored copy, unless it is owned.

A restored copy that is not committed within ``lease`` seconds, a reservation idle for
``idle`` seconds, and, after a restart, every copy restored but not owned are discarded:
before the commit point the source's copy is the one that counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from kelpie._exceptions import (
    ConfigError,
    KelpieError,
    SnapshotCorrupted,
    TeleportAborted,
    TeleportRefused,
    TransferOffsetMismatch,
)
from kelpie._fsutil import sparse_digest
from kelpie.api import (
    HostFacts,
    TeleportAccepted,
    TeleportLive,
    TeleportOffer,
    TeleportState,
    TeleportSwitch,
)
from kelpie.images import ImageError, Platform, parse_manifest_document
from kelpie.runtime import Runtime, SandboxNotFound, base_disk_mib
from kelpie.service import sandbox_record
from kelpie.teleport import _basedisk as basedisk
from kelpie.teleport._journal import Incoming, TargetPhase, TeleportJournal
from kelpie.vm import LiveEndpoints, PortMapping, Storage, VmConfig

T = TypeVar("T")

BLOB_NAME = re.compile(r"[a-z]+-[A-Za-z0-9][A-Za-z0-9_.:-]{0,200}\Z")
DEFAULT_LEASE = 300.0
"""Seconds a restored copy waits for the source's commit before it is discarded."""
DEFAULT_IDLE = 1800.0
"""Seconds a reservation may go without a chunk before it is discarded."""
SPACE_MARGIN = 1.1
LIVE_FINISH_TIMEOUT = 120.0
"""Seconds the switch of a live teleport waits for the migration into the VM to complete."""

Offload = Callable[[Callable[[], T]], Awaitable[T]]


async def _to_thread(function: Callable[[], T]) -> T:
    return await asyncio.to_thread(function)


class TeleportReceiver:
    """Takes sandboxes in from other hosts into ``runtime``, recorded in ``journal``.

    ``clock`` times leases; ``offload`` runs blocking work (hashing a blob) off the event
    loop (the simulator runs it inline); ``check_ports`` says whether published ports can be
    bound here (default: try to bind them).
    """

    def __init__(
        self, runtime: Runtime, journal: TeleportJournal, *, clock: Callable[[], float],
        lease: float = DEFAULT_LEASE, idle: float = DEFAULT_IDLE,
        offload: Offload[Any] = _to_thread,
        check_ports: Callable[[list[PortMapping]], list[str]] | None = None,
    ) -> None:
        self._runtime = runtime
        self._journal = journal
        self._clock = clock
        self._lease = lease
        self._idle = idle
        self._offload = offload
        self._check_ports = check_ports or unbindable_ports
        self._locks: dict[str, asyncio.Lock] = {}
        self._live: dict[str, LiveEndpoints] = {}
        self._hashing: dict[tuple[str, str], tuple[int, Any]] = {}
        """(teleport, blob) -> (bytes hashed, sha256 so far) of the blobs being received:
        a blob's whole digest is ready when its last chunk lands (after a restart the
        partial file is hashed once, on its next chunk)."""

    @property
    def _storage(self) -> Storage:
        return self._runtime.storage

    def dir(self, teleport_id: str) -> Path:
        return self._runtime.data_dir / "teleports" / "in" / teleport_id

    def _lock(self, teleport_id: str) -> asyncio.Lock:
        return self._locks.setdefault(teleport_id, asyncio.Lock())

    async def facts(self) -> HostFacts:
        """What this host offers (see :class:`kelpie.api.HostFacts`)."""
        return await self._runtime.host_facts()

    # ---- prepare ------------------------------------------------------------------------
    async def prepare(self, offer: TeleportOffer) -> TeleportAccepted:
        async with self._lock(offer.id):
            known = self._journal.incoming(offer.id)
            if known is not None:
                if known.phase is TargetPhase.DISCARDED:
                    raise TeleportAborted(f"teleport {offer.id} was discarded here: "
                                          f"{known.error or 'aborted'}")
                return await self._accepted(offer)
            record = offer.sandbox
            problems = await self._problems(offer, record)
            if problems:
                raise TeleportRefused(problems, target="this host")
            now = self._clock()
            self._journal.begin_incoming(Incoming(
                offer.id, str(record["id"]), str(record["name"]), TargetPhase.RESERVED,
                offer.model_dump(mode="json"), None, now, now))
            self._storage.mkdir(self.dir(offer.id))
            return await self._accepted(offer)

    async def _problems(self, offer: TeleportOffer, record: dict[str, Any]) -> list[str]:
        problems: list[str] = []
        runtime = self._runtime
        name, sandbox_id = str(record.get("name")), str(record.get("id"))
        for ref, what in ((name, "name"), (sandbox_id, "id")):
            with contextlib.suppress(SandboxNotFound):
                found = await runtime.inspect(ref)
                if (found.name if what == "name" else found.id) == ref:
                    problems.append(f"a sandbox with {what} {ref} already exists here")
        backend = str(record.get("backend"))
        try:
            spec = runtime.factory.registry.get(backend)
            probe = runtime.factory.registry.probe(spec.name)
            if not probe.available:
                problems.append(f"backend {backend} cannot run here: {probe.reason}")
        except ConfigError as exc:
            problems.append(str(exc))
        try:
            config = VmConfig.from_dict(record["vm"])
        except (ConfigError, KeyError, TypeError) as exc:
            problems.append(f"the sandbox's VM configuration is unusable here: {exc}")
        else:
            if config.mounts:
                problems.append("the sandbox has host volumes, which cannot move")
            problems += self._check_ports(list(config.ports))
        facts = await runtime.host_facts()
        if offer.size_bytes * SPACE_MARGIN > facts.free_disk_bytes:
            problems.append(f"not enough disk space: the teleport needs about "
                            f"{offer.size_bytes} bytes, {facts.free_disk_bytes} are free")
        runs = next((b.arches for b in facts.backends if b.name == backend), {})
        if offer.arch and offer.arch not in runs:
            problems.append(f"backend {backend} here runs no {offer.arch} guests (only "
                            f"{', '.join(sorted(runs)) or 'none'})")
        image = record.get("image")
        if offer.image_digest is None and isinstance(image, str) and offer.arch:
            try:
                runtime.images.resolve(image, architecture=Platform.for_arch(offer.arch)
                                       .architecture)
            except ImageError as exc:
                problems.append(f"the sandbox's image {image} is needed here for "
                                f"{offer.arch}: {exc}")
        return problems

    async def _accepted(self, offer: TeleportOffer) -> TeleportAccepted:
        images = self._runtime.images
        needs_image = offer.image_digest is not None and \
            offer.image_digest not in {i.digest for i in images.list()}
        needs_base = False
        if offer.base_disk_digest is not None and offer.image_digest is not None:
            cached = images.ext4_cache(offer.image_digest, _disk_mib(offer))
            needs_base = needs_image or not cached.exists() or \
                await self._offload(lambda: sparse_digest(cached)) != offer.base_disk_digest
        return TeleportAccepted(id=offer.id, needs_image=needs_image, needs_base_disk=needs_base)

    # ---- transfer -----------------------------------------------------------------------
    async def received(self, teleport_id: str, name: str) -> int:
        self._require(teleport_id, {TargetPhase.RESERVED, TargetPhase.RESTORING})
        final, part = self._blob_paths(teleport_id, name)
        if self._storage.exists(final):
            return self._storage.size(final)
        return self._storage.size(part) if self._storage.exists(part) else 0

    async def put_chunk(self, teleport_id: str, name: str, offset: int, data: bytes, *,
                        size: int, sha256: str, chunk_sha256: str | None = None) -> int:
        """Append ``data`` at ``offset`` of blob ``name`` (``size`` bytes, ``sha256`` whole)."""
        async with self._lock(teleport_id):
            # (restoring: a live teleport's VM waits while the main command's log comes)
            self._require(teleport_id, {TargetPhase.RESERVED, TargetPhase.RESTORING})
            storage = self._storage
            final, part = self._blob_paths(teleport_id, name)
            if storage.exists(final):
                return storage.size(final)
            received = storage.size(part) if storage.exists(part) else 0
            if offset != received:
                raise TransferOffsetMismatch(name, offset, received)
            if offset + len(data) > size:
                raise ConfigError([f"blob {name}: a chunk at {offset} of {len(data)} bytes "
                                   f"passes its size {size}"], what="teleport chunk")
            if chunk_sha256 is not None and hashlib.sha256(data).hexdigest() != chunk_sha256:
                raise SnapshotCorrupted(f"blob {name}: the chunk at offset {offset} does not "
                                        "match its sha256 (damaged in transit): send it again")
            key = (teleport_id, name)
            hashed, digest = self._hashing.get(key, (-1, None))
            if hashed != offset:
                digest = await self._offload(lambda: _stored_hash(storage, part, offset))
            with storage.open_append(part) as out:
                out.write(data)
            digest.update(data)
            received += len(data)
            self._hashing[key] = (received, digest)
            if received == size:
                del self._hashing[key]
                actual = digest.hexdigest()
                if actual != sha256:
                    storage.remove_tree(part)
                    raise SnapshotCorrupted(f"blob {name}: its {size} bytes hash to {actual}, "
                                            f"not {sha256}: send it again from the start")
                storage.write_bytes(final.with_name(f".{name}.sha256"), sha256.encode())
                storage.rename(part, final)
            self._journal.touch_incoming(teleport_id, self._clock())
            return received

    def _blob_paths(self, teleport_id: str, name: str) -> tuple[Path, Path]:
        if not BLOB_NAME.match(name):
            raise ConfigError([f"blob name {name!r} is not KIND-NAME of letters, digits and "
                               "_.:-"], what="teleport blob")
        directory = self.dir(teleport_id)
        return directory / name, directory / f".{name}.part"

    # ---- switch, commit, abort ----------------------------------------------------------
    async def switch(self, teleport_id: str, body: TeleportSwitch) -> TeleportState:
        """Restore the sandbox from the received blobs and prove its agent answers."""
        async with self._lock(teleport_id):
            incoming = self._require(teleport_id, {TargetPhase.RESERVED, TargetPhase.RESTORING,
                                                   TargetPhase.RESTORED, TargetPhase.OWNED})
            if incoming.phase in (TargetPhase.RESTORED, TargetPhase.OWNED):
                return await self._state(incoming)  # a repeated switch: it is restored
            if body.live != (incoming.phase is TargetPhase.RESTORING):
                raise ConfigError([f"teleport {teleport_id} is {incoming.phase.value}: a "
                                   f"{'live ' if body.live else ''}switch does not apply"],
                                  what="teleport switch")
            if not body.live:
                self._check_blobs(teleport_id, body)
                self._journal.move_incoming(teleport_id, frozenset({TargetPhase.RESERVED}),
                                            TargetPhase.RESTORING, self._clock())
                self._hold(incoming)
            try:
                if body.live:
                    self._check_blobs(teleport_id, body)
                    await self._finish_live(teleport_id, incoming, body)
                else:
                    await self._restore(teleport_id, incoming, body)
            except BaseException as exc:
                await self._discard(teleport_id, f"the restore failed: {exc}")
                raise
            self._journal.move_incoming(teleport_id, frozenset({TargetPhase.RESTORING}),
                                        TargetPhase.RESTORED, self._clock())
            return await self.state(teleport_id)

    async def live_start(self, teleport_id: str, body: TeleportLive) -> TeleportState:
        """Start a VM that waits for the source's live migration (phase ``restoring``);
        the source then reaches it through :meth:`live_socket`."""
        async with self._lock(teleport_id):
            incoming = self._require(teleport_id, {TargetPhase.RESERVED, TargetPhase.RESTORING})
            if incoming.phase is TargetPhase.RESTORING:
                if teleport_id in self._live:
                    return await self._state(incoming)  # a repeated start
                raise ConfigError([f"teleport {teleport_id} is restoring from blobs"],
                                  what="live teleport")
            self._journal.move_incoming(teleport_id, frozenset({TargetPhase.RESERVED}),
                                        TargetPhase.RESTORING, self._clock())
            self._hold(incoming)
            try:
                offer = TeleportOffer.model_validate(incoming.offer)
                await self._install_sent_image(teleport_id, offer, body.image_media_type)
                _, endpoints = await self._runtime.moves.arrive_live(body.sandbox, body.plan)
            except BaseException as exc:
                await self._discard(teleport_id, f"the live target could not start: {exc}")
                raise
            self._live[teleport_id] = endpoints
            return await self.state(teleport_id)

    def live_socket(self, teleport_id: str, channel: str) -> Path:
        """The unix socket of a live teleport's channel (``nbd`` or ``migration``)."""
        endpoints = self._live.get(teleport_id)
        if endpoints is None:
            raise ConfigError([f"teleport {teleport_id} has no live VM waiting here"],
                              what="live teleport channel")
        sockets = {"nbd": endpoints.nbd_socket, "migration": endpoints.migration_socket}
        if channel not in sockets:
            raise ConfigError([f"channel {channel!r} is not one of {sorted(sockets)}"],
                              what="live teleport channel")
        return sockets[channel]

    async def _finish_live(self, teleport_id: str, incoming: Incoming,
                           body: TeleportSwitch) -> None:
        if teleport_id not in self._live:
            raise ConfigError([f"teleport {teleport_id} has no live VM waiting here (the "
                               "target restarted?)"], what="live teleport")
        logs = [self.dir(teleport_id) / b.name for b in body.blobs if b.name.startswith("log-")]
        # finish_live ends with the guest's agent answering the resync: proof it runs
        await self._runtime.moves.finish_live_arrival(
            incoming.sandbox_id, LIVE_FINISH_TIMEOUT, main_log=logs[0] if logs else None,
            record=body.sandbox)
        self._live.pop(teleport_id, None)

    def _check_blobs(self, teleport_id: str, body: TeleportSwitch) -> None:
        storage = self._storage
        missing = []
        for blob in body.blobs:
            final, _ = self._blob_paths(teleport_id, blob.name)
            checked = final.with_name(f".{blob.name}.sha256")
            if not storage.exists(final) or storage.size(final) != blob.size or \
                    not storage.exists(checked) or \
                    storage.read_bytes(checked) != blob.sha256.encode():
                missing.append(blob.name)
        if missing:
            raise ConfigError([f"blob {name} has not arrived whole" for name in missing],
                              what="teleport switch")

    async def _restore(self, teleport_id: str, incoming: Incoming, body: TeleportSwitch) -> None:
        runtime = self._runtime
        storage = self._storage
        directory = self.dir(teleport_id)
        offer = TeleportOffer.model_validate(incoming.offer)
        snapshot_dir = directory / "snapshot"
        storage.mkdir(snapshot_dir)
        main_log = None
        for blob in body.blobs:
            kind, _, rest = blob.name.partition("-")
            path = directory / blob.name
            if kind == "snapshot":
                storage.rename(path, snapshot_dir / rest)
            elif kind == "log":
                main_log = path
        await self._install_sent_image(teleport_id, offer, body.image_media_type)
        # a restore ends with the guest's agent answering (its resync, or the checkpoint
        # written back through it): proof the sandbox runs
        await runtime.moves.arrive(body.sandbox, snapshot_dir, main_log=main_log)

    async def _install_sent_image(self, teleport_id: str, offer: TeleportOffer,
                                  media_type: str | None) -> None:
        """Put the image and base disk the source sent (if it did) into the image store."""
        directory = self.dir(teleport_id)
        storage = self._storage
        names = storage.list_dir(directory) if storage.is_dir(directory) else []
        image_blobs = {name.removeprefix("image-"): directory / name for name in names
                       if name.startswith("image-")}
        if image_blobs:
            await self._offload(lambda: self._install_image(offer, image_blobs, media_type))
        if basedisk.PACKED_NAME in names and offer.image_digest is not None \
                and offer.base_disk_digest is not None:
            cache = self._runtime.images.ext4_cache(offer.image_digest, _disk_mib(offer))
            if not cache.exists():
                cache.parent.mkdir(parents=True, exist_ok=True)
                packed, digest = directory / basedisk.PACKED_NAME, offer.base_disk_digest
                await self._offload(lambda: basedisk.unpack(packed, cache, digest))

    def _install_image(self, offer: TeleportOffer, blobs: dict[str, Path],
                       media_type: str | None) -> None:
        """Store a sent image's blobs (each verified against its digest), then the image."""
        assert offer.image_digest is not None
        store = self._runtime.images
        manifest_hex = offer.image_digest.removeprefix("sha256:")
        manifest_path = blobs.get(manifest_hex)
        if manifest_path is None or media_type is None:
            raise ConfigError(["the image's manifest and media type were not sent"],
                              what="teleport image")
        manifest = manifest_path.read_bytes()
        parse_manifest_document(manifest, media_type)  # refuses an index or garbage first
        for hex_digest, path in blobs.items():
            if hex_digest != manifest_hex:
                with path.open("rb") as data:
                    store.blobs.put(data, f"sha256:{hex_digest}")
        store.add_image(None, manifest, media_type)

    async def commit(self, teleport_id: str) -> TeleportState:
        """The commit point: ``restored`` becomes ``owned`` (unless it was discarded)."""
        async with self._lock(teleport_id):
            was = self._journal.move_incoming(teleport_id, frozenset({TargetPhase.RESTORED}),
                                              TargetPhase.OWNED, self._clock())
            if was is None or was is TargetPhase.DISCARDED:
                raise TeleportAborted(f"teleport {teleport_id} cannot be committed: it was "
                                      "discarded here (or never prepared)")
            if was not in (TargetPhase.RESTORED, TargetPhase.OWNED):
                raise ConfigError([f"teleport {teleport_id} is {was.value}: switch first"],
                                  what="teleport commit")
            incoming = self._journal.incoming(teleport_id)
            assert incoming is not None
            self._runtime.moves.unhold(incoming.sandbox_id)  # ours now
            with contextlib.suppress(Exception):
                self._storage.remove_tree(self.dir(teleport_id))
            return await self.state(teleport_id)

    async def abort(self, teleport_id: str) -> TeleportState:
        """Discard the teleport (a no-op once owned: the state then says ``owned``)."""
        async with self._lock(teleport_id):
            incoming = self._journal.incoming(teleport_id)
            if incoming is None:  # never prepared here: refuse a late prepare for good
                now = self._clock()
                self._journal.begin_incoming(Incoming(teleport_id, "", "",
                                                      TargetPhase.DISCARDED, {}, "aborted",
                                                      now, now))
            elif incoming.phase is not TargetPhase.OWNED:
                await self._discard(teleport_id, "aborted by the source")
            return await self.state(teleport_id)

    async def _discard(self, teleport_id: str, why: str) -> None:
        """Mark the teleport discarded (first: from then on it cannot be committed), then
        remove the restored copy and the received blobs."""
        was = self._journal.move_incoming(
            teleport_id, frozenset({TargetPhase.RESERVED, TargetPhase.RESTORING,
                                    TargetPhase.RESTORED}),
            TargetPhase.DISCARDED, self._clock(), error=why)
        self._live.pop(teleport_id, None)
        if was in (TargetPhase.RESTORING, TargetPhase.RESTORED):
            incoming = self._journal.incoming(teleport_id)
            assert incoming is not None
            await self._remove_arrival(incoming.sandbox_id)
        with contextlib.suppress(Exception):
            self._storage.remove_tree(self.dir(teleport_id))

    async def _remove_arrival(self, sandbox_id: str) -> None:
        """Remove the copy a teleport that did not complete brought here (if it is here)."""
        self._runtime.moves.unhold(sandbox_id)
        with contextlib.suppress(SandboxNotFound):
            info = await self._runtime.inspect(sandbox_id)
            if info.id == sandbox_id:
                await self._runtime.moves.abort_live_arrival(info.id)
                await self._runtime.remove(info.id, force=True)

    # ---- asking -------------------------------------------------------------------------
    async def state(self, teleport_id: str) -> TeleportState:
        incoming = self._journal.incoming(teleport_id)
        if incoming is None:
            return TeleportState(id=teleport_id, phase="unknown")
        return await self._state(incoming)

    async def _state(self, incoming: Incoming) -> TeleportState:
        sandbox = None
        if incoming.phase in (TargetPhase.RESTORED, TargetPhase.OWNED):
            with contextlib.suppress(SandboxNotFound):
                sandbox = sandbox_record(await self._runtime.inspect(incoming.sandbox_id))
        return TeleportState(id=incoming.id, phase=incoming.phase.value, sandbox=sandbox)

    def _hold(self, incoming: Incoming) -> None:
        """Until the commit point the arriving copy is not this host's: nothing may stop,
        remove or snapshot it here (its source may still take it back)."""
        self._runtime.moves.hold(incoming.sandbox_id, f"teleport {incoming.id} arriving")

    def _require(self, teleport_id: str, phases: set[TargetPhase]) -> Incoming:
        incoming = self._journal.incoming(teleport_id)
        if incoming is None:
            raise TeleportAborted(f"no teleport {teleport_id} here: prepare it first")
        if incoming.phase is TargetPhase.DISCARDED:
            raise TeleportAborted(f"teleport {teleport_id} was discarded here: "
                                  f"{incoming.error or 'aborted'}")
        if incoming.phase not in phases:
            raise ConfigError([f"teleport {teleport_id} is {incoming.phase.value} here"],
                              what="teleport step")
        return incoming

    # ---- recovery and leases ------------------------------------------------------------
    async def recover(self) -> None:
        """After a restart: a copy restored (or being restored) but not owned is discarded,
        and so is a copy left by a discard that a crash cut short; reservations stay (the
        source may resume sending). Goes on past a copy it cannot discard now."""
        failed: list[str] = []
        for incoming in self._journal.unfinished_incoming():
            if incoming.phase in (TargetPhase.RESTORING, TargetPhase.RESTORED):
                try:
                    await self._discard(incoming.id, "the target restarted before the commit")
                except KelpieError as exc:
                    failed.append(f"{incoming.id}: {exc}")
        for info in await self._runtime.list_sandboxes(all=True):
            latest = self._journal.last_incoming(info.id)
            if latest is not None and latest.phase is TargetPhase.DISCARDED:
                try:  # discarded, then the host died before the copy went
                    await self._remove_arrival(info.id)
                except KelpieError as exc:
                    failed.append(f"{latest.id}: {exc}")
        await self.expire()
        if failed:
            raise TeleportAborted("could not discard the copies of teleports that did not "
                                  "complete (the next recovery tries again): " +
                                  "; ".join(failed))

    async def expire(self) -> None:
        """Discard restored copies past their lease and reservations idle too long."""
        now = self._clock()
        for incoming in self._journal.unfinished_incoming():
            if incoming.phase is TargetPhase.RESTORED and now - incoming.updated_at > self._lease:
                await self._discard(incoming.id, "the source did not commit within the lease")
            elif incoming.phase is TargetPhase.RESERVED and \
                    now - incoming.updated_at > self._idle:
                await self._discard(incoming.id, "the source stopped sending")


def unbindable_ports(ports: list[PortMapping]) -> list[str]:
    """The published ports this host cannot bind now (each as a problem line)."""
    problems = []
    for mapping in ports:
        kind = socket.SOCK_DGRAM if mapping.protocol == "udp" else socket.SOCK_STREAM
        try:
            with socket.socket(socket.AF_INET, kind) as probe:
                probe.bind((mapping.host_ip, mapping.host_port))
        except OSError as exc:
            problems.append(f"port {mapping.host_ip}:{mapping.host_port}/{mapping.protocol} "
                            f"cannot be bound here ({exc.strerror or exc}); free it, or "
                            "move the sandbox to a host where it is free")
    return problems


def _disk_mib(offer: TeleportOffer) -> int | None:
    """The size of the base of the offered sandbox's root disk (None: sized to its image);
    its configuration was checked when the offer was first prepared (see _problems)."""
    return base_disk_mib(offer.sandbox)


def _stored_hash(storage: Storage, path: Path, size: int) -> Any:
    """The sha256 object of the first ``size`` bytes of ``path`` (none: nothing yet)."""
    digest = hashlib.sha256()
    if size:
        with storage.open_read(path) as data:
            remaining = size
            while remaining > 0 and (chunk := data.read(min(1 << 20, remaining))):
                digest.update(chunk)
                remaining -= len(chunk)
    return digest
