"""The source's side of a teleport: the coordinator that moves a sandbox to a target.

:class:`Teleporter` runs the steps prepare -> transfer -> switch -> commit (or abort)
against a :class:`TeleportPeer`, recording each in the :class:`TeleportJournal` before it
starts (see :mod:`._journal` for the phases and the commit point). It takes its clock, id
source, storage (the runtime's) and transport (``connect``) as parameters, so the
simulator drives this very code over simulated links, crashing either host at any step.

What it guarantees, at every instant: the sandbox runs in at most one place (the source's
copy stays paused and *held* from the capture until the target answers whether it owns the
sandbox), and at least one copy is recoverable (the source lets its copy go only after the
target has acknowledged ``owned``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from kelpie._exceptions import (
    KelpieError,
    PeerUnreachable,
    TeleportAborted,
    TeleportInDoubt,
)
from kelpie._fsutil import sparse_digest
from kelpie.api import (
    TeleportBlob,
    TeleportLive,
    TeleportMode,
    TeleportOffer,
    TeleportProgress,
    TeleportReport,
    TeleportState,
    TeleportSwitch,
)
from kelpie.runtime import Runtime, SandboxInfo
from kelpie.teleport import _basedisk as basedisk
from kelpie.teleport._flights import Flight, Flights
from kelpie.teleport._journal import Outgoing, SourcePhase, TeleportJournal
from kelpie.teleport._modes import ModeChoice, choose_mode
from kelpie.teleport._peer import TeleportPeer
from kelpie.teleport._relay import relayed
from kelpie.teleport._target import Offload, _to_thread
from kelpie.teleport._transfer import ATTEMPTS, CHUNK_SIZE, Blob, BlobSender, Retry, sha256_of
from kelpie.vm import (
    HostInfo,
    LiveMigrationDidNotConverge,
    LiveProgress,
    SnapshotKind,
    Storage,
    VmState,
)

T = TypeVar("T")

CONVERGE_TIMEOUT = 60.0
"""Seconds a live migration may take to converge before the teleport falls back to full."""

Progress = Callable[[TeleportProgress], None]
Connect = Callable[[str, str | None], TeleportPeer]


class Teleporter:
    """Moves sandboxes of ``runtime`` to other hosts (the source's coordinator).

    ``connect(url, token)`` opens the peer of a target; ``clock`` gives Unix seconds (journal
    and downtime); ``new_id`` gives teleport ids; ``sleep`` waits between retries;
    ``offload`` runs blocking work (hashing) off the event loop; ``flights`` hears of each
    step (what watchers of the teleports in flight read).
    """

    def __init__(
        self, runtime: Runtime, journal: TeleportJournal, *, connect: Connect,
        clock: Callable[[], float], new_id: Callable[[], str],
        sleep: Callable[[float], Any] = asyncio.sleep, offload: Offload[Any] = _to_thread,
        chunk_size: int = CHUNK_SIZE, attempts: int = ATTEMPTS,
        converge_timeout: float = CONVERGE_TIMEOUT, flights: Flights | None = None,
    ) -> None:
        self._runtime = runtime
        self._journal = journal
        self._connect = connect
        self._clock = clock
        self._new_id = new_id
        self._offload = offload
        self._chunk_size = chunk_size
        self._retry = Retry(attempts, sleep)
        self._converge_timeout = converge_timeout
        self.flights = flights or Flights(clock)
        """Teleports this process is running now (the others unfinished are stuck)."""

    @property
    def _storage(self) -> Storage:
        return self._runtime.storage

    def dir(self, teleport_id: str) -> Path:
        return self._runtime.data_dir / "teleports" / "out" / teleport_id

    # ---- the teleport -------------------------------------------------------------------
    async def teleport(
        self, ref: str, *, to: str, token: str | None = None,
        mode: TeleportMode | str = TeleportMode.AUTO, without_volumes: bool = False,
        progress: Progress | None = None, converge_timeout: float | None = None,
        arch: str | None = None,
    ) -> TeleportReport:
        """Move sandbox ``ref`` to the daemon at ``to``; the report says which mode ran, why,
        the downtime and the bytes sent. ``arch``: the guest architecture it should have
        there (another one than its own moves it as a checkpoint).

        Raises what stopped it before anything paused (:class:`TeleportRefused`, an
        unreachable target...: the sandbox is untouched), :class:`TeleportAborted` when it
        was rolled back later (the sandbox runs here as before), or
        :class:`TeleportInDoubt` when the target stopped answering after the switch (the
        sandbox stays paused here until the target can be asked again).
        """
        say = progress or (lambda _: None)
        started = self._clock()
        converge = self._converge_timeout if converge_timeout is None else converge_timeout
        info = await self._runtime.inspect(ref)
        if info.state not in (VmState.RUNNING, VmState.PAUSED):
            from kelpie.runtime import SandboxStateError

            raise SandboxStateError(f"{info.name} ({info.short_id})", "teleport", info.state,
                                    [VmState.RUNNING, VmState.PAUSED])
        peer = self._connect(to, token)
        try:
            return await self._teleport(info, peer, to, token, TeleportMode(mode),
                                        without_volumes, say, started, converge, arch)
        finally:
            await _close(peer)

    async def _teleport(self, info: SandboxInfo, peer: TeleportPeer, to: str,
                        token: str | None, mode: TeleportMode, without_volumes: bool,
                        say: Progress, started: float, converge: float,
                        arch: str | None = None) -> TeleportReport:
        say(TeleportProgress(phase="prepare", message=f"asking {to} what it offers"))
        target_facts = await self._retry(peer.facts)
        choice = choose_mode(
            mode, backend=info.backend, config=info.config,
            source=await self._runtime.host_facts(), target=target_facts,
            without_volumes=without_volumes,
            guestkit_digest=self._runtime.moves.guestkit_of(info.id),
            live_ready=self._runtime.moves.live_ready(info.id), target_label=to, arch=arch,
        )
        try:
            return await self._attempt(info, peer, to, token, choice, say, started, converge)
        except LiveMigrationDidNotConverge as exc:
            # The attempt was rolled back (the guest never stopped running here): move it
            # in full mode instead, and say so.
            fallback = ModeChoice(TeleportMode.FULL, f"live did not converge within "
                                  f"{converge:g} s ({exc}); fell back to full",
                                  choice.target_backend, choice.target_arch)
            return await self._attempt(info, peer, to, token, fallback, say, started, converge)

    async def _attempt(self, info: SandboxInfo, peer: TeleportPeer, to: str,
                       token: str | None, choice: ModeChoice, say: Progress,
                       started: float, converge: float) -> TeleportReport:
        say(TeleportProgress(phase="prepare", message=f"mode {choice.mode.value}: "
                                                      f"{choice.reason}"))
        teleport_id = self._new_id()
        now = self._clock()
        # no await between the hold (refused if another move holds the sandbox) and the
        # record: two teleports of one sandbox cannot both start
        self._runtime.moves.hold(info.id, f"teleport {teleport_id} to {to}")
        record = Outgoing(teleport_id, info.id, info.name, to, token, choice.mode.value,
                          choice.reason, SourcePhase.PREPARING,
                          info.state is VmState.RUNNING, None, now, now)
        try:
            self._journal.begin_outgoing(record)
        except BaseException:
            self._runtime.moves.unhold(info.id)
            raise
        def tracked(step: TeleportProgress) -> None:
            self.flights.step(teleport_id, step)
            say(step)

        sender = BlobSender(self._storage, peer, teleport_id, retry=self._retry,
                            chunk_size=self._chunk_size, progress=tracked)
        run = _Run(record, peer, choice, tracked, converge, sender)
        self.flights.start(Flight(teleport_id, info.id, info.name, to, choice.mode, started,
                                  lambda: sender.bytes_sent))
        try:
            return await self._run(run, info, started)
        except TeleportInDoubt:
            raise
        except BaseException as exc:
            now_record = self._journal.outgoing(teleport_id)
            if now_record is not None and now_record.phase in (SourcePhase.COMMITTED,
                                                               SourcePhase.DONE):
                raise  # past the commit point: the target owns it; recovery tidies up
            await self._roll_back(run, exc)
            if isinstance(exc, LiveMigrationDidNotConverge) or \
                    (isinstance(exc, KelpieError) and run.paused_at is None):
                raise  # nothing was paused: the error as it is
            raise TeleportAborted(
                f"teleport of {info.name} to {to} was rolled back ({type(exc).__name__}: "
                f"{exc}); the sandbox runs here as before") from exc
        finally:
            self.flights.end(teleport_id)

    async def _run(self, run: _Run, info: SandboxInfo, started: float) -> TeleportReport:
        runtime = self._runtime
        tid, peer, say = run.record.id, run.peer, run.say
        offer_record = self._record_for_target(info, run.choice)
        base_digest = await self._base_digest(info, run.choice)
        offer = TeleportOffer(
            id=tid, mode=run.choice.mode, sandbox=offer_record,
            image_digest=offer_record.get("image_digest"), base_disk_digest=base_digest,
            arch=run.choice.target_arch or info.config.arch or (await runtime.host_facts()).arch,
            guestkit_digest=self._runtime.moves.guestkit_of(info.id),
            size_bytes=info.config.memory_mib * (1 << 20) * 2,
        )
        say(TeleportProgress(phase="prepare", message=f"reserving on {peer.address}"))
        accepted = await self._retry(lambda: peer.prepare(offer))
        # What does not change while the guest runs goes first: the image and base disk.
        early = self._image_blobs(info, accepted.needs_image and offer.image_digest is not None)
        if accepted.needs_base_disk and info.config.root_disk is not None:
            base, packed = info.config.root_disk, self.dir(tid) / basedisk.PACKED_NAME
            self._storage.mkdir(packed.parent)
            await self._offload(lambda: basedisk.pack(base, packed))
            early.append(await self._blob(basedisk.PACKED_NAME, packed))
        await run.sender.send(early)

        if run.choice.mode is TeleportMode.LIVE:
            media_type = self._image_media_type(info) if accepted.needs_image else None
            paused_at, state = await self._move_live(run, info, media_type)
        else:
            paused_at, state = await self._move_captured(run, info, early,
                                                         accepted.needs_image)
        running_at = self._clock()
        state = await self._commit(run.record, peer, state)
        say(TeleportProgress(phase="commit", message="the target owns the sandbox"))
        await self._finish(run.record)
        assert state.sandbox is not None
        return TeleportReport(
            id=tid, mode=run.choice.mode, reason=run.choice.reason, target=peer.address,
            downtime_s=running_at - paused_at, total_s=self._clock() - started,
            bytes_sent=run.sender.bytes_sent, sandbox=state.sandbox,
        )

    async def _move_captured(self, run: _Run, info: SandboxInfo, early: list[Blob],
                             needs_image: bool) -> tuple[float, TeleportState]:
        """Full and checkpoint modes: pause and capture, send, restore on the target.
        When the guest paused, and the target's answer to the switch."""
        runtime, journal = self._runtime, self._journal
        tid, peer, say = run.record.id, run.peer, run.say
        journal.set_outgoing(tid, SourcePhase.CAPTURING, self._clock())
        say(TeleportProgress(phase="capture", message="pausing and capturing the sandbox"))
        kind = SnapshotKind.CHECKPOINT if run.choice.mode is TeleportMode.CHECKPOINT \
            else SnapshotKind.FULL
        snapshot_dir = self.dir(tid) / "snapshot"
        self._storage.mkdir(snapshot_dir.parent)
        paused_at = self._clock()
        run.pause(paused_at, self.flights)
        capture = await runtime.moves.capture(info.id, snapshot_dir, kind)
        journal.set_outgoing(tid, SourcePhase.SENDING, self._clock())
        vouched = capture.snapshot.manifest.blobs  # their sha256 was taken as written
        blobs = [Blob(f"snapshot-{name}", snapshot_dir / name, vouched[name].size,
                       vouched[name].sha256) if name in vouched
                 else await self._blob(f"snapshot-{name}", snapshot_dir / name)
                 for name in sorted(self._storage.list_dir(snapshot_dir))]
        log = runtime.output_log(info.id)
        if self._storage.exists(log):
            blobs.append(await self._blob("log-output.log", log))
        await run.sender.send(blobs)

        journal.set_outgoing(tid, SourcePhase.SWITCHING, self._clock())
        say(TeleportProgress(phase="switch", message="restoring on the target"))
        switch = TeleportSwitch(
            blobs=[TeleportBlob(name=b.name, size=b.size, sha256=b.sha256)
                   for b in [*early, *blobs]],
            sandbox=self._record_for_target(capture.info, run.choice),
            image_media_type=self._image_media_type(info) if needs_image else None,
        )
        try:
            state = await self._retry(lambda: peer.switch(tid, switch))
        except PeerUnreachable:
            state = await self._settle(run.record, peer)
        return paused_at, state

    async def _move_live(self, run: _Run, info: SandboxInfo,
                         media_type: str | None) -> tuple[float, TeleportState]:
        """Live mode: the target's VM waits, the source's QEMU migrates to it through the
        relay while the guest runs, then pauses for the last dirty pages. When the guest
        paused, and the target's answer to the switch."""
        runtime, journal = self._runtime, self._journal
        tid, peer, say = run.record.id, run.peer, run.say
        journal.set_outgoing(tid, SourcePhase.SENDING, self._clock())
        plan = await runtime.moves.live_plan(info.id)
        record = self._record_for_target(info, run.choice)
        say(TeleportProgress(phase="live", message="starting the target's VM"))
        start = TeleportLive(sandbox=record, plan=plan, image_media_type=media_type)
        await self._retry(lambda: peer.live_start(tid, start))

        def progress(step: LiveProgress) -> None:
            say(TeleportProgress(phase="live", message=step.phase, done=step.done,
                                 total=step.done + step.remaining))

        directory = self.dir(tid)
        self._storage.mkdir(directory)
        async with relayed(lambda name: peer.open_channel(tid, name), directory) as endpoints:
            stats = await runtime.moves.send_live(info.id, endpoints,
                                            converge_timeout=run.converge_timeout,
                                            progress=progress)
        paused_at = self._clock() - stats.switchover_ms / 1000
        run.pause(paused_at, self.flights)
        run.sender.bytes_sent += stats.ram_transferred + stats.disk_mirrored
        log = runtime.output_log(info.id)  # complete now: the guest is paused
        logs = [await self._blob("log-output.log", log)] if self._storage.exists(log) else []
        await run.sender.send(logs)
        journal.set_outgoing(tid, SourcePhase.SWITCHING, self._clock())
        say(TeleportProgress(phase="switch", message="running the guest on the target"))
        switch = TeleportSwitch(
            blobs=[TeleportBlob(name=b.name, size=b.size, sha256=b.sha256) for b in logs],
            sandbox=self._record_for_target(await runtime.inspect(info.id), run.choice),
            live=True)
        try:
            state = await self._retry(lambda: peer.switch(tid, switch))
        except PeerUnreachable:
            state = await self._settle(run.record, peer)
        return paused_at, state

    # ---- the commit point and its two ways out ------------------------------------------
    async def _commit(self, record: Outgoing, peer: TeleportPeer,
                      state: TeleportState) -> TeleportState:
        """Ask the target to own the restored copy; settle if it does not answer."""
        if state.phase != "owned":
            try:
                state = await self._retry(lambda: peer.commit(record.id))
            except PeerUnreachable:
                state = await self._settle(record, peer)
        if state.phase != "owned":
            raise TeleportAborted(f"the target did not take the sandbox (it is "
                                  f"{state.phase} there)")
        self._journal.set_outgoing(record.id, SourcePhase.COMMITTED, self._clock())
        return state

    async def _settle(self, record: Outgoing, peer: TeleportPeer) -> TeleportState:
        """After a switch or commit went unanswered: ask the target where it stands, and
        commit a restored copy. Raises TeleportInDoubt if it cannot be asked (the source
        copy stays held and paused), TeleportAborted if the target has discarded it."""
        try:
            state = await self._retry(lambda: peer.state(record.id))
            if state.phase == "restored":
                state = await self._retry(lambda: peer.commit(record.id))
        except PeerUnreachable as exc:
            message = (f"teleport {record.id} of {record.sandbox_name} to {record.target}: "
                       f"the target stopped answering after the switch ({exc}); the sandbox "
                       "stays paused here until the target can be asked whether it took it")
            self._journal.set_outgoing(record.id, SourcePhase.SWITCHING, self._clock(),
                                       error=message)
            raise TeleportInDoubt(message) from None
        if state.phase == "owned":
            return state
        raise TeleportAborted(f"the target discarded the sandbox (it is {state.phase} there)")

    async def _finish(self, record: Outgoing) -> None:
        """After the commit point: let the local copy go, then close the record."""
        await self._runtime.moves.let_go(record.sandbox_id)
        self._journal.set_outgoing(record.id, SourcePhase.DONE, self._clock())
        with contextlib.suppress(Exception):
            self._storage.remove_tree(self.dir(record.id))

    async def _roll_back(self, run: _Run, cause: BaseException) -> None:
        """Before the commit point: the target discards, the sandbox resumes here.

        Before the switch the target cannot have restored anything, so an unanswered
        abort is no reason to wait (its lease ends the reservation). After it, only the
        target's answer decides: discarded rolls back, owned rolls forward, silence leaves
        the teleport in doubt."""
        record = self._journal.outgoing(run.record.id) or run.record
        try:
            state = await self._retry(lambda: run.peer.abort(record.id))
        except (PeerUnreachable, KelpieError) as exc:
            if record.phase is SourcePhase.SWITCHING:
                message = (f"teleport {record.id}: the target did not answer the abort "
                           f"({exc}); the sandbox stays paused here until it can be asked")
                self._journal.set_outgoing(record.id, SourcePhase.SWITCHING, self._clock(),
                                           error=message)
                raise TeleportInDoubt(message) from cause
            state = None
        if state is not None and state.phase == "owned":
            self._journal.set_outgoing(record.id, SourcePhase.COMMITTED, self._clock())
            await self._finish(record)
            return
        await self._give_back(record, f"{type(cause).__name__}: {cause}")

    async def _give_back(self, record: Outgoing, why: str) -> None:
        await self._runtime.moves.give_back(record.sandbox_id, was_running=record.was_running)
        self._journal.set_outgoing(record.id, SourcePhase.ABORTED, self._clock(), error=why)
        with contextlib.suppress(Exception):
            self._storage.remove_tree(self.dir(record.id))

    # ---- recovery -----------------------------------------------------------------------
    async def recover(self) -> list[str]:
        """Finish or roll back what a crash interrupted (see :mod:`._journal`); the ids of
        teleports still in doubt (their sandboxes stay held and paused)."""
        doubtful = []
        for record in self._journal.unfinished_outgoing():
            try:
                self._runtime.moves.hold(record.sandbox_id,
                                         f"teleport {record.id} to {record.target}")
                await self.settle(record)
            except KelpieError:  # in doubt, or failed this time: the upkeep tries again
                doubtful.append(record.id)
        return doubtful

    async def settle(self, record: Outgoing) -> None:
        """Finish one interrupted teleport: roll forward after the commit point, back
        before it, and ask the target when this side cannot know."""
        peer = self._connect(record.target, record.token)
        try:
            await self._settle_with(record, peer)
        finally:
            await _close(peer)

    async def _settle_with(self, record: Outgoing, peer: TeleportPeer) -> None:
        if record.phase is SourcePhase.COMMITTED:
            await self._finish(record)
            return
        if record.phase is SourcePhase.SWITCHING:
            try:
                await self._settle(record, peer)
            except TeleportAborted as exc:
                await self._give_back(record, str(exc))
                return
            self._journal.set_outgoing(record.id, SourcePhase.COMMITTED, self._clock())
            await self._finish(record)
            return
        # Before the switch: the target cannot have restored anything.
        with contextlib.suppress(PeerUnreachable, KelpieError):
            await self._retry(lambda: peer.abort(record.id))
        await self._give_back(record, "the source restarted before the switch")

    def stuck(self) -> list[Outgoing]:
        """Teleports not finished and not in progress here: in doubt, or whose roll-back
        failed part-way (their sandboxes stay held until :meth:`settle` ends them)."""
        return [r for r in self._journal.unfinished_outgoing() if r.id not in self.flights]

    # ---- what is sent ---------------------------------------------------------------------
    async def _blob(self, name: str, path: Path) -> Blob:
        storage = self._storage
        sha: str = await self._offload(lambda: sha256_of(storage, path))
        return Blob(name, path, storage.size(path), sha)

    def _image_blobs(self, info: SandboxInfo, needed: bool) -> list[Blob]:
        if not needed or info.image_digest is None:
            return []
        store = self._runtime.images
        image = store.get(info.image_digest)
        digests = [image.digest, image.manifest.config.digest,
                   *(layer.digest for layer in image.manifest.layers)]
        blobs = []
        for digest in digests:
            path = store.blobs.path(digest)
            hex_digest = digest.removeprefix("sha256:")
            blobs.append(Blob(f"image-{hex_digest}", path, path.stat().st_size, hex_digest))
        return blobs

    def _image_media_type(self, info: SandboxInfo) -> str | None:
        if info.image_digest is None:
            return None
        return self._runtime.images.get(info.image_digest).media_type

    async def _base_digest(self, info: SandboxInfo, choice: ModeChoice) -> str | None:
        disk = info.config.root_disk
        if disk is None or choice.mode is TeleportMode.CHECKPOINT:
            return None
        digest: str = await self._offload(lambda: sparse_digest(disk))
        return digest

    def _record_for_target(self, info: SandboxInfo, choice: ModeChoice) -> dict[str, Any]:
        """The sandbox's record as the target keeps it (a checkpoint may change backend
        and leaves host volumes behind)."""
        record = self._runtime.moves.record(info.id)
        if choice.mode is TeleportMode.CHECKPOINT:
            record["backend"] = choice.target_backend
            record["vm"] = {**record["vm"], "mounts": []}
            record["base_disk_mib"] = None  # it boots afresh: a base of the disk's size
            guest = record["vm"].get("arch") or HostInfo.current_arch()
            if choice.target_arch and choice.target_arch != guest:
                # another architecture: the target boots its own variant of the image,
                # found by the image's name (this one's digest names this arch's variant)
                record["vm"]["arch"] = choice.target_arch
                record["image_digest"] = None
        return record


@dataclasses.dataclass
class _Run:
    """One teleport in progress in this process."""

    record: Outgoing
    peer: TeleportPeer
    choice: ModeChoice
    say: Progress
    converge_timeout: float
    sender: BlobSender
    paused_at: float | None = None

    def pause(self, at: float, flights: Flights) -> None:
        """The guest stopped running here at ``at`` (the downtime starts)."""
        self.paused_at = at
        flights.paused(self.record.id, at)


async def _close(peer: TeleportPeer) -> None:
    close = getattr(peer, "close", None)
    if close is not None:
        with contextlib.suppress(Exception):
            await close()





