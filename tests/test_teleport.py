"""Teleport between two runtimes in one process (mock backend), over a LocalPeer.

The coordinator and receiver are the real ones; the link between them is a hook that can
lose a request or its answer, the way a dropped connection does. Real daemons and QEMU
are in test_teleport_daemons.py.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from kelpie import (
    KelpieError,
    PeerUnreachable,
    TeleportAborted,
    TeleportInDoubt,
    TeleportRefused,
)
from kelpie.api import TeleportInFlight, TeleportMode, TeleportProgress
from kelpie.backends import MOCK
from kelpie.runtime import Runtime, SandboxMoving, SandboxNotFound
from kelpie.teleport import (
    LocalPeer,
    SourcePhase,
    TargetPhase,
    Teleporter,
    TeleportHost,
    TeleportJournal,
    TeleportReceiver,
)
from kelpie.vm import BackendRegistry, Mount, VmError, VmFactory, VmState


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def _ids(prefix: str) -> Callable[[], str]:
    counter = itertools.count(1)
    return lambda: f"{prefix}{next(counter):010x}"


class Host:
    """One side: a runtime, its journal, its coordinator and its receiver."""

    def __init__(self, root: Path, name: str, clock: Clock, id_prefix: str) -> None:
        registry = BackendRegistry()
        registry.register(MOCK)
        self.root = root / name
        self.clock = clock
        self.runtime = Runtime(data_dir=self.root, factory=VmFactory(registry),
                               clock=clock, new_id=_ids(id_prefix))
        self.journal = TeleportJournal(self.root / "teleports.db")
        self.receiver = TeleportReceiver(self.runtime, self.journal, clock=clock,
                                         check_ports=lambda ports: [])
        self.peers: dict[str, LocalPeer] = {}

    def teleporter(self, connect: Callable[[str, str | None], LocalPeer]) -> Teleporter:
        return Teleporter(self.runtime, self.journal, connect=connect, clock=self.clock,
                          new_id=_ids("7e1e"), sleep=_no_sleep, chunk_size=1024)


async def _no_sleep(seconds: float) -> None:
    return None


class Link:
    """Loses chosen requests (before delivery) or answers (after delivery)."""

    def __init__(self) -> None:
        self.lose: dict[tuple[str, bool], int] = {}
        self.seen: list[tuple[str, bool]] = []

    async def __call__(self, step: str, delivered: bool) -> None:
        self.seen.append((step, delivered))
        left = self.lose.get((step, delivered), 0)
        if left:
            self.lose[(step, delivered)] = left - 1
            raise PeerUnreachable(f"lost {'answer to' if delivered else 'request'} {step}")


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[Host, Host, Link]]:
    clock = Clock()
    source, target = Host(tmp_path, "a", clock, "aa"), Host(tmp_path, "b", clock, "bb")
    await source.runtime.open()
    await target.runtime.open()
    yield source, target, Link()
    for host in (source, target):
        for info in await host.runtime.list_sandboxes(all=True):
            host.runtime.moves.unhold(info.id)
            await host.runtime.remove(info.id, force=True)
        await host.runtime.close()
        host.journal.close()


def _connect(target: Host, link: Link) -> Callable[[str, str | None], LocalPeer]:
    return lambda url, token: LocalPeer(target.receiver, address=url, link=link)


async def _sandbox(host: Host, name: str = "box") -> str:
    info = await host.runtime.create(name=name, backend="mock", env={"GREETING": "hi"},
                                     labels={"team": "t"})
    await host.runtime.mkdir(info.id, "/workspace")
    await host.runtime.write_file(info.id, "/workspace/note.txt", b"written before")
    return info.id


async def test_full_teleport_moves_the_sandbox_with_its_identity(pair: tuple[Host, Host, Link],
                                                                 ) -> None:
    source, target, link = pair
    sandbox_id = await _sandbox(source)
    heard: list[TeleportProgress] = []
    report = await source.teleporter(_connect(target, link)).teleport(
        "box", to="b", progress=heard.append)

    assert report.mode is TeleportMode.FULL
    assert "full" in report.reason
    assert report.bytes_sent > 0
    assert report.sandbox.id == sandbox_id and report.sandbox.name == "box"
    moved = await target.runtime.inspect("box")
    assert moved.id == sandbox_id and moved.state is VmState.RUNNING
    assert moved.labels == {"team": "t"} and moved.config.env["GREETING"] == "hi"
    assert await target.runtime.read_file("box", "/workspace/note.txt") == b"written before"
    with pytest.raises(SandboxNotFound):
        await source.runtime.inspect("box")
    assert {p.phase for p in heard} >= {"prepare", "capture", "transfer", "switch", "commit"}
    assert source.journal.all_outgoing()[0].phase is SourcePhase.DONE
    assert target.journal.incoming(report.id).phase is TargetPhase.OWNED  # type: ignore[union-attr]


async def test_teleport_back_works(pair: tuple[Host, Host, Link]) -> None:
    source, target, link = pair
    sandbox_id = await _sandbox(source)
    await source.teleporter(_connect(target, link)).teleport("box", to="b")
    await target.runtime.write_file("box", "/workspace/there.txt", b"on b")
    back = await target.teleporter(_connect(source, link)).teleport("box", to="a")
    assert back.sandbox.id == sandbox_id
    assert await source.runtime.read_file("box", "/workspace/there.txt") == b"on b"
    assert await target.runtime.list_sandboxes(all=True) == []


async def test_checkpoint_mode_keeps_files_and_env(pair: tuple[Host, Host, Link]) -> None:
    source, target, link = pair
    await _sandbox(source)
    report = await source.teleporter(_connect(target, link)).teleport(
        "box", to="b", mode="checkpoint")
    assert report.mode is TeleportMode.CHECKPOINT
    assert await target.runtime.read_file("box", "/workspace/note.txt") == b"written before"
    result = await target.runtime.exec("box", ["env"])
    assert b"GREETING=hi" in result.stdout


async def test_refused_before_anything_pauses(pair: tuple[Host, Host, Link],
                                              tmp_path: Path) -> None:
    source, target, link = pair
    await _sandbox(source)
    await target.runtime.create(name="box", backend="mock")  # the name is taken there
    with pytest.raises(TeleportRefused, match="name box already exists"):
        await source.teleporter(_connect(target, link)).teleport("box", to="b")
    info = await source.runtime.inspect("box")
    assert info.state is VmState.RUNNING
    await source.runtime.pause("box")  # not held any more
    await source.runtime.resume("box")
    assert source.journal.all_outgoing()[0].phase is SourcePhase.ABORTED


async def test_volumes_are_refused_naming_them(pair: tuple[Host, Host, Link],
                                               tmp_path: Path) -> None:
    source, target, link = pair
    shared = tmp_path / "shared"
    shared.mkdir()
    await source.runtime.create(name="vol", backend="mock", volumes=[Mount(shared, "/data")])
    with pytest.raises(TeleportRefused, match=str(shared)):
        await source.teleporter(_connect(target, link)).teleport("vol", to="b")
    assert (await source.runtime.inspect("vol")).state is VmState.RUNNING
    report = await source.teleporter(_connect(target, link)).teleport(
        "vol", to="b", mode="checkpoint", without_volumes=True)
    assert report.mode is TeleportMode.CHECKPOINT
    assert (await target.runtime.inspect("vol")).config.mounts == ()


async def test_unreachable_target_leaves_the_sandbox_untouched(
    pair: tuple[Host, Host, Link],
) -> None:
    source, target, link = pair
    await _sandbox(source)
    link.lose[("facts", False)] = 99
    with pytest.raises(PeerUnreachable):
        await source.teleporter(_connect(target, link)).teleport("box", to="b")
    assert (await source.runtime.inspect("box")).state is VmState.RUNNING
    assert source.journal.all_outgoing() == []


async def test_lost_chunks_and_answers_are_resumed(pair: tuple[Host, Host, Link]) -> None:
    source, target, link = pair
    await _sandbox(source)
    link.lose = {("put_chunk", True): 3, ("put_chunk", False): 2, ("switch", True): 1,
                 ("commit", True): 1}
    report = await source.teleporter(_connect(target, link)).teleport("box", to="b")
    assert (await target.runtime.inspect("box")).state is VmState.RUNNING
    assert report.mode is TeleportMode.FULL
    assert ("state", True) in link.seen or ("switch", True) in link.seen
    with pytest.raises(SandboxNotFound):
        await source.runtime.inspect("box")


async def test_corrupted_chunks_are_sent_again(pair: tuple[Host, Host, Link]) -> None:
    source, target, link = pair
    await _sandbox(source)
    damaged = {"left": 2}

    def corrupt(data: bytes) -> bytes:
        if damaged["left"] and data:
            damaged["left"] -= 1
            return bytes([data[0] ^ 0xFF]) + data[1:]
        return data

    peer = LocalPeer(target.receiver, address="b", link=link, corrupt=corrupt)
    await source.teleporter(lambda url, token: peer).teleport("box", to="b")
    assert damaged["left"] == 0
    assert await target.runtime.read_file("box", "/workspace/note.txt") == b"written before"


async def test_commit_lost_for_good_leaves_it_in_doubt_then_settles(
    pair: tuple[Host, Host, Link],
) -> None:
    source, target, link = pair
    sandbox_id = await _sandbox(source)
    link.lose = {("commit", False): 99, ("state", False): 99, ("abort", False): 99}
    teleporter = source.teleporter(_connect(target, link))
    with pytest.raises(TeleportInDoubt):
        await teleporter.teleport("box", to="b")
    # never two running copies: the source's is paused and held
    assert (await source.runtime.inspect(sandbox_id)).state is VmState.PAUSED
    with pytest.raises(SandboxMoving):
        await source.runtime.resume(sandbox_id)
    assert (await target.runtime.inspect(sandbox_id)).state is VmState.RUNNING
    link.lose = {}
    assert await teleporter.recover() == []
    with pytest.raises(SandboxNotFound):
        await source.runtime.inspect(sandbox_id)
    assert (await target.runtime.inspect(sandbox_id)).state is VmState.RUNNING


async def test_target_lease_expiry_rolls_back_to_the_source(
    pair: tuple[Host, Host, Link],
) -> None:
    source, target, link = pair
    sandbox_id = await _sandbox(source)
    link.lose = {("commit", False): 99, ("state", False): 99, ("abort", False): 99}
    teleporter = source.teleporter(_connect(target, link))
    with pytest.raises(TeleportInDoubt):
        await teleporter.teleport("box", to="b")
    target.clock.now += 10_000  # past the lease: the target discards its copy
    await target.receiver.expire()
    with pytest.raises(SandboxNotFound):
        await target.runtime.inspect(sandbox_id)
    link.lose = {}
    await teleporter.recover()
    assert (await source.runtime.inspect(sandbox_id)).state is VmState.RUNNING
    await source.runtime.pause(sandbox_id)  # released


async def test_source_restart_before_switch_rolls_back(pair: tuple[Host, Host, Link]) -> None:
    source, target, link = pair
    sandbox_id = await _sandbox(source)
    link.lose = {("switch", False): 99}
    teleporter = source.teleporter(_connect(target, link))
    teleporter._retry.attempts = 1
    # the switch never arrives: a definite failure before the commit point rolls back
    with pytest.raises((TeleportAborted, TeleportInDoubt)):
        await teleporter.teleport("box", to="b")
    link.lose = {}
    await teleporter.recover()
    assert (await source.runtime.inspect(sandbox_id)).state is VmState.RUNNING
    with pytest.raises(SandboxNotFound):
        await target.runtime.inspect(sandbox_id)


async def test_two_teleports_of_one_sandbox_cannot_both_start(
    pair: tuple[Host, Host, Link],
) -> None:
    source, target, link = pair
    sandbox_id = await _sandbox(source)
    teleporter = source.teleporter(_connect(target, link))
    results = await asyncio.gather(teleporter.teleport("box", to="b"),
                                   teleporter.teleport("box", to="b"), return_exceptions=True)
    assert sorted(type(r).__name__ for r in results) == ["SandboxMoving", "TeleportReport"]
    assert (await target.runtime.inspect(sandbox_id)).state is VmState.RUNNING
    with pytest.raises(SandboxNotFound):
        await source.runtime.inspect(sandbox_id)


async def test_the_arriving_copy_is_held_until_the_commit(pair: tuple[Host, Host, Link]) -> None:
    source, target, link = pair
    sandbox_id = await _sandbox(source)
    link.lose = {("commit", False): 99, ("state", False): 99, ("abort", False): 99}
    with pytest.raises(TeleportInDoubt):
        await source.teleporter(_connect(target, link)).teleport("box", to="b")
    # restored on the target, not yet its own: nobody there may remove it meanwhile
    with pytest.raises(SandboxMoving):
        await target.runtime.remove(sandbox_id, force=True)
    link.lose = {}
    assert await source.teleporter(_connect(target, link)).recover() == []
    await target.runtime.pause(sandbox_id)  # owned now: released
    with pytest.raises(SandboxNotFound):
        await source.runtime.inspect(sandbox_id)


async def test_a_blob_whole_but_not_finished_is_finished_by_an_empty_chunk(
    pair: tuple[Host, Host, Link],
) -> None:
    source, target, link = pair
    await _sandbox(source)
    receiver = target.receiver
    real_put = receiver.put_chunk
    cut: list[str] = []

    async def put_without_finishing(teleport_id: str, name: str, offset: int, data: bytes,
                                    **kw: Any) -> int:
        if name not in cut and offset + len(data) == kw["size"] and data:
            # every byte lands, then the target dies before it checks and renames the blob
            cut.append(name)
            part = receiver.dir(teleport_id) / f".{name}.part"
            with part.open("ab") as out:
                out.write(data)
            raise PeerUnreachable("the target died after the last chunk landed")
        return await real_put(teleport_id, name, offset, data, **kw)

    receiver.put_chunk = put_without_finishing  # type: ignore[method-assign]
    report = await source.teleporter(_connect(target, link)).teleport("box", to="b")
    assert cut and report.mode is TeleportMode.FULL
    assert await target.runtime.read_file("box", "/workspace/note.txt") == b"written before"


async def test_recovery_removes_a_copy_a_crashed_discard_left(
    pair: tuple[Host, Host, Link], monkeypatch: pytest.MonkeyPatch,
) -> None:
    source, target, link = pair
    sandbox_id = await _sandbox(source)
    link.lose = {("commit", False): 99, ("state", False): 99, ("abort", False): 99}
    with pytest.raises(TeleportInDoubt):
        await source.teleporter(_connect(target, link)).teleport("box", to="b")
    record = source.journal.all_outgoing()[0]
    # the target marks the teleport discarded, then dies before its copy is removed
    target.journal.move_incoming(record.id, frozenset({TargetPhase.RESTORED}),
                                 TargetPhase.DISCARDED, target.clock())
    await target.receiver.recover()
    with pytest.raises(SandboxNotFound):
        await target.runtime.inspect(sandbox_id)
    link.lose = {}
    await source.teleporter(_connect(target, link)).recover()
    assert (await source.runtime.inspect(sandbox_id)).state is VmState.RUNNING


async def test_the_upkeep_settles_a_roll_back_that_failed_part_way(
    pair: tuple[Host, Host, Link], monkeypatch: pytest.MonkeyPatch,
) -> None:
    source, target, link = pair
    sandbox_id = await _sandbox(source)
    host = TeleportHost(source.runtime, connect=_connect(target, link), clock=source.clock,
                        sleep=_no_sleep, journal=source.journal,
                        check_ports=lambda ports: [])
    link.lose = {("switch", False): 99}
    failing = {"left": 1}
    real_give_back = source.runtime.moves.give_back

    async def give_back_once_failing(sandbox: str, *, was_running: bool) -> Any:
        if failing["left"]:
            failing["left"] -= 1
            raise VmError("resume failed (injected)")
        return await real_give_back(sandbox, was_running=was_running)

    monkeypatch.setattr(source.runtime.moves, "give_back", give_back_once_failing)
    with pytest.raises(KelpieError):
        await host.teleporter.teleport("box", to="b")
    stuck = host.teleporter.stuck()
    assert [r.sandbox_id for r in stuck] == [sandbox_id]
    link.lose = {}
    await host.upkeep_once()
    assert host.teleporter.stuck() == []
    assert (await source.runtime.inspect(sandbox_id)).state is VmState.RUNNING
    await source.runtime.pause(sandbox_id)  # released


async def test_a_teleport_in_flight_is_listed_with_its_phase_bytes_and_downtime(
        pair: tuple[Host, Host, Link]) -> None:
    source, target, link = pair
    await _sandbox(source)
    teleporter = source.teleporter(_connect(target, link))
    flights = teleporter.flights
    seen: list[tuple[TeleportProgress, list[TeleportInFlight], float]] = []

    def step(progress: TeleportProgress) -> None:
        seen.append((progress, flights.now(), source.clock.now))
        source.clock.now += 1.0  # each step takes a (virtual) second

    woken = asyncio.ensure_future(flights.changes.wait(flights.changes.version))
    started = source.clock.now
    await teleporter.teleport("box", to="b", mode="full", progress=step)

    assert woken.done() and woken.result() > 0
    listed = [(p, now[0]) for p, now, _ in seen if now]
    assert {p.phase for p, _ in listed} >= {"capture", "transfer", "switch", "commit"}
    for progress, now, at in seen:
        if not now:
            continue
        flight = now[0]
        assert (flight.sandbox_name, flight.target, flight.mode) == ("box", "b", "full")
        assert (flight.phase, flight.message) == (progress.phase, progress.message)
        assert flight.rate_bytes_per_s == pytest.approx(
            flight.bytes_sent / max(at - started, 1e-9))
    # the guest runs until the capture (which says so first), then the downtime grows
    capture = [p.phase for p, _ in listed].index("capture")
    assert all(f.paused_s is None for _, f in listed[:capture + 1])
    paused = [f.paused_s for _, f in listed[capture + 1:]]
    assert paused == sorted(p for p in paused if p is not None) and paused[-1]
    sent = [f.bytes_sent for p, f in listed if p.phase == "transfer"]
    assert sent == sorted(sent) and sent[-1] > 0
    assert flights.now() == []
