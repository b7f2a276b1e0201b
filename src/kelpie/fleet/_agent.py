"""A host's agent in the fleet: runs (or finds) the node's Kelpie daemon and answers the
coordinator. It knows nothing of Ray; :mod:`kelpie.fleet._ray` makes it an actor."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from kelpie._exceptions import KelpieError, TeleportAborted
from kelpie._paths import state_dir
from kelpie.api import FleetView, Sandbox, SandboxCreate, TemplateCreate
from kelpie.client import DaemonClient, DaemonUnreachable
from kelpie.fleet._coordinator import FleetError
from kelpie.fleet._model import (
    FLEET_LABEL,
    GENERATION_LABEL,
    RECOVER_LABEL,
    HostedSandbox,
    HostReport,
    Recovery,
    SavedState,
)
from kelpie.fleet._store import CHUNK, SharedStore, StoreConfig, StoredTemplate, StoreError
from kelpie.images import ImageReference, InvalidReference
from kelpie.runtime import SandboxNotFound
from kelpie.vm import LiveMigrationFailed

DAEMON_START_TIMEOUT = 180.0

log = logging.getLogger("kelpie.fleet")


class HostAgent:
    """The fleet's side of one host: the daemon listening on ``ip:port`` with the fleet's
    token, reported on and driven for the coordinator.

    ``memory_mib`` caps what the fleet places here (default: what the host has free);
    ``insecure_registries``: registries (HOST:PORT) pulled from over plain HTTP.
    """

    def __init__(self, host: str, ip: str, port: int, token: str, *,
                 memory_mib: int | None = None, store: StoreConfig | None = None,
                 insecure_registries: tuple[str, ...] = ()) -> None:
        self.host = host
        self.address = f"http://{ip}:{port}"
        self._listen = f"{ip}:{port}"
        self._token = token
        self._memory_mib = memory_mib
        self._client = DaemonClient(self.address, token=token)
        self._store_config = store
        self._insecure = frozenset(insecure_registries)

    async def start(self) -> str:
        """Make sure the daemon answers at :attr:`address` (start it if none runs here);
        its URL."""
        try:
            await self._client.version()
            return self.address
        except DaemonUnreachable:
            pass
        token_file = _write_token(self._token)
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "kelpie", "daemon", "start", "--tcp", self._listen,
            "--token-file", str(token_file), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        output, _ = await asyncio.wait_for(process.communicate(), DAEMON_START_TIMEOUT)
        if process.returncode != 0:
            raise FleetError(f"host {self.host}: `kelpie daemon start` failed "
                             f"(exit {process.returncode}): {output.decode(errors='replace')}")
        try:
            await self._client.version()
        except DaemonUnreachable as exc:
            raise FleetError(
                f"host {self.host}: a Kelpie daemon runs here without the fleet's listener "
                f"{self.address} ({output.decode(errors='replace').strip()}); stop it with "
                "`kelpie daemon stop` (its sandboxes keep running) and start the fleet "
                "again") from exc
        return self.address

    async def close(self) -> None:
        await self._client.close()

    async def report(self) -> HostReport:
        """This host's facts, what the fleet may still place here, and the fleet's
        sandboxes on it."""
        facts, sandboxes, templates, images = await asyncio.gather(
            self._client.host_facts(), self._client.list_sandboxes(all=True),
            self._client.list_snapshots(templates=True), self._client.list_images())
        backends = [backend for backend in facts.backends if backend.available]
        arches = sorted({arch for b in backends for arch in b.arches}) or [facts.arch]
        hosted = tuple(_hosted(s) for s in sandboxes if FLEET_LABEL in s.labels)
        free = facts.free_memory_mib
        if self._memory_mib is not None:
            used = sum(s.memory_mib for s in sandboxes if s.state in ("running", "paused"))
            free = min(free, self._memory_mib - used)
        return HostReport(
            host=self.host, address=self.address, arches=tuple(arches),
            backends=tuple(b.name for b in backends),
            accelerators=tuple(sorted({a for b in backends for a in b.arches.values()})),
            cpus=facts.cpus, free_vcpus=facts.free_vcpus,
            memory_mib=self._memory_mib or facts.memory_mib, free_memory_mib=free,
            free_disk_bytes=facts.free_disk_bytes,
            images=frozenset(facts.images) | {tag for i in images for tag in i.tags},
            templates={key: t.memory_mib for t in templates for key in (t.name, t.id)},
            guestkits=frozenset(facts.guestkits),
            sandboxes=hosted)

    async def show(self, view: FleetView) -> None:
        """Tell this host's daemon what the fleet looks like (for its dashboard)."""
        await self._client.show_fleet(view)

    async def create(self, request: SandboxCreate) -> HostedSandbox:
        return _hosted(await self._client.create(request))

    async def create_template(self, request: TemplateCreate) -> None:
        await self._client.create_template(request)

    async def push_template(self, name: str) -> StoredTemplate:
        """Export template ``name`` from this host's daemon into the shared store."""
        store = self._store()
        template = await self._client.inspect_snapshot(name)
        with tempfile.TemporaryDirectory(dir=_scratch(), prefix="push-") as scratch:
            archive = Path(scratch) / "template.tar"
            await self._export(template.id, archive)
            return await store.put(name, archive, image=template.image,
                                   image_digest=template.image_digest)

    async def pull_template(self, name: str) -> StoredTemplate:
        """Fetch template ``name`` from the shared store (verified) into this host's daemon,
        and the image it was made from (by digest, from its registry) if this host lacks
        it."""
        store = self._store()
        with tempfile.TemporaryDirectory(dir=_scratch(), prefix="pull-") as scratch:
            archive = Path(scratch) / "template.tar"
            stored = await store.get(name, archive)
            await self._ensure_image(stored)
            await self._client.import_snapshot(_read(archive), name=name)
        return stored

    async def _ensure_image(self, template: StoredTemplate) -> None:
        """Pull the exact image (manifest digest) ``template`` was made from, if missing."""
        digest = template.image_digest
        if digest is None or any(i.digest == digest for i in await self._client.list_images()):
            return
        if template.image is None:
            raise StoreError(f"template {template.name!r} needs image {digest}, which host "
                             f"{self.host} lacks; import that image there")
        try:
            reference = pinned(template.image, digest)
        except InvalidReference as exc:
            raise StoreError(f"template {template.name!r} needs image {digest}, which host "
                             f"{self.host} lacks and no registry serves by its name "
                             f"({exc}); import that image there") from exc
        try:
            await self._client.pull_image(str(reference),
                                          insecure=reference.registry in self._insecure)
        except KelpieError as exc:
            raise StoreError(f"template {template.name!r} needs image {reference}, which host "
                             f"{self.host} lacks, and pulling it failed: {exc}; import or "
                             "pull that image there, then share the template again") from exc

    async def save(self, name: str, kind: str, generation: int, keep: SavedState | None,
                   ) -> SavedState:
        """Snapshot sandbox ``name`` (checkpoint or full) into the shared store; delete its
        other saved states there but ``keep`` (the one the coordinator would recover from
        until it takes this one in)."""
        store = self._store()
        snapshot = await self._client.snapshot(name, name=_scratch_name("save"),
                                               kind=kind)
        try:
            with tempfile.TemporaryDirectory(dir=_scratch(), prefix="save-") as scratch:
                archive = Path(scratch) / "state.tar"
                await self._export(snapshot.id, archive)
                key, digest, size = await store.put_saved(name, generation, archive)
        finally:
            with contextlib.suppress(Exception):
                await self._client.delete_snapshot(snapshot.id)
        kept = frozenset({key} | ({keep.key} if keep is not None else set()))
        try:
            await store.forget_saved(name, keep=kept)
        except StoreError as exc:  # old states left behind; the new one is good
            log.warning("%s", exc)
        arch = None
        if kind == "full":  # a memory state restores only on the arch it ran on
            arch = (await self._client.host_facts()).arch
        return SavedState(name=name, generation=generation, kind=kind, key=key,
                          digest=digest, size=size, image_digest=snapshot.image_digest,
                          backend=snapshot.backend, arch=arch)

    async def recover(self, saved: SavedState, labels: dict[str, str]) -> HostedSandbox:
        """Restore sandbox ``saved.name`` here from ``saved`` (its archive verified first),
        labelled ``labels``."""
        store = self._store()
        with tempfile.TemporaryDirectory(dir=_scratch(), prefix="recover-") as scratch:
            archive = Path(scratch) / "state.tar"
            await store.get_saved(saved.key, saved.digest, saved.size, archive)
            snapshot = await self._client.import_snapshot(
                _read(archive), name=_scratch_name("recover"))
        try:
            sandbox = await self._client.restore(snapshot.id, name=saved.name, labels=labels)
        finally:
            # the restored VM no longer needs it (a full restore's RAM mapping outlives it)
            with contextlib.suppress(Exception):
                await self._client.delete_snapshot(snapshot.id)
        return _hosted(sandbox)

    async def _export(self, snapshot: str, archive: Path) -> None:
        """The daemon's archive of ``snapshot`` into the file ``archive``."""
        with archive.open("wb") as out:
            async for chunk in self._client.export_snapshot(snapshot):
                out.write(chunk)

    def _store(self) -> SharedStore:
        if self._store_config is None:
            raise StoreError("the fleet has no shared store: start it with one "
                             "(kelpie fleet up --store-endpoint URL --store-bucket NAME)")
        return SharedStore(self._store_config)

    async def remove(self, name: str, *, forget_saved: bool = False,
                     upto: int | None = None) -> None:
        with contextlib.suppress(SandboxNotFound):
            if upto is None or _hosted(await self._client.inspect(name)).generation <= upto:
                await self._client.remove(name, force=True)
        if forget_saved:
            await self._store().forget_saved(name)

    async def teleport(self, name: str, to: HostReport) -> HostedSandbox:
        """Move ``name`` to ``to``: live where the pair can, else (or when a live migration
        was rolled back) paused, with its full memory state."""
        try:
            report = await self._client.teleport(name, to.address, token=self._token)
        except (TeleportAborted, LiveMigrationFailed) as exc:  # rolled back: it runs here
            log.warning("teleport of %s to %s rolled back (%s); moving it in full mode",
                        name, to.host, exc)
            report = await self._client.teleport(name, to.address, token=self._token,
                                                 mode="full")
        return _hosted(report.sandbox)


def pinned(reference: str, digest: str) -> ImageReference:
    """``reference`` (any tag or digest it has dropped) pinned to ``digest``."""
    parsed = ImageReference.parse(reference)
    return ImageReference(parsed.registry, parsed.repository, None, digest)


def _hosted(sandbox: Sandbox) -> HostedSandbox:
    generation = sandbox.labels.get(GENERATION_LABEL, "1")
    return HostedSandbox(id=sandbox.id, name=sandbox.name,
                         generation=int(generation) if generation.isdigit() else 1,
                         state=sandbox.state, memory_mib=sandbox.memory_mib,
                         cpus=sandbox.cpus,
                         recover=Recovery.from_label(sandbox.labels.get(RECOVER_LABEL)))


def _scratch_name(what: str) -> str:
    """A name for the snapshot a save or recovery makes on the way (unique on a daemon;
    the sandbox's own name may be too long to go in it)."""
    return f"fleet-{what}-{os.urandom(6).hex()}"


def _scratch() -> Path:
    """Where archives to and from the store are kept meanwhile: next to the daemon's state
    (they are big; /tmp may be a small tmpfs)."""
    base = state_dir() / "fleet"
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    return base


async def _read(path: Path) -> AsyncIterator[bytes]:
    with path.open("rb") as file:
        while chunk := file.read(CHUNK):
            yield chunk


def _write_token(token: str) -> Path:
    """The fleet's token in a file only this user reads (what ``--token-file`` takes)."""
    path = state_dir() / "fleet" / "token"
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(token + "\n")
    return path
