"""Restart policies of main commands, stop timeouts, and the event log (mock backend)."""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from kelpie.backends import MOCK
from kelpie.backends.mock import MockVm
from kelpie.runtime import (
    EventKind,
    MainCommandNotRunning,
    RestartMode,
    RestartPolicy,
    Runtime,
    SandboxEvent,
)
from kelpie.runtime._db import DB_FILENAME, StateDb, migrate
from kelpie.runtime._restart import FIRST_DELAY_SECONDS, MAX_DELAY_SECONDS, STEADY_SECONDS
from kelpie.vm import BackendRegistry, ConfigError, VmFactory, VmState
from waiting import wait_until


class Sleeps:
    """The runtime's sleep: records each wait; from ``block_at`` on, waits until released."""

    def __init__(self, block_at: int | None = None) -> None:
        self.delays: list[float] = []
        self.block_at = block_at
        self.blocked = asyncio.Event()

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        if self.block_at is not None and len(self.delays) >= self.block_at:
            self.blocked.set()
            await asyncio.Event().wait()  # until the task is cancelled (a stop)


@pytest.fixture
def make_runtime(tmp_path: Path) -> Callable[..., Runtime]:
    registry = BackendRegistry()
    registry.register(MOCK)

    def make(**kw: Any) -> Runtime:
        kw.setdefault("data_dir", tmp_path / "data")
        kw.setdefault("factory", VmFactory(registry, environ={}))
        kw.setdefault("clock", itertools.count(1_000).__next__)
        return Runtime(**kw)

    return make


# -- restart policies -------------------------------------------------------------------


@pytest.mark.parametrize(("text", "policy"), [
    ("no", RestartPolicy()),
    ("always", RestartPolicy(RestartMode.ALWAYS)),
    ("on-failure", RestartPolicy(RestartMode.ON_FAILURE)),
    ("on-failure:3", RestartPolicy(RestartMode.ON_FAILURE, 3)),
    ("on-failure:0", RestartPolicy(RestartMode.ON_FAILURE, 0)),
])
def test_policies_parse_and_print_as_docker_writes_them(text: str,
                                                        policy: RestartPolicy) -> None:
    assert RestartPolicy.parse(text) == policy
    assert str(policy) == text


@pytest.mark.parametrize("text", ["", "sometimes", "always:3", "no:1", "on-failure:",
                                  "on-failure:-1", "on-failure:x", "unless-stopped"])
def test_unknown_policies_are_refused_listing_the_allowed(text: str) -> None:
    with pytest.raises(ConfigError, match=r"no, always, on-failure|whole number"):
        RestartPolicy.parse(text)


def test_which_ends_restart() -> None:
    on_failure = RestartPolicy(RestartMode.ON_FAILURE, 2)
    assert on_failure.should_restart(1, 0) and on_failure.should_restart(137, 1)
    assert not on_failure.should_restart(1, 2)  # its N restarts are used up
    assert not on_failure.should_restart(0, 0)  # success is not a failure
    assert not on_failure.should_restart(None, 0)  # unknown: it may still be running
    assert RestartPolicy(RestartMode.ALWAYS).should_restart(0, 10_000)
    assert not RestartPolicy().should_restart(1, 0)


def test_back_off_doubles_to_a_minute_and_starts_again_after_a_steady_run() -> None:
    delay = RestartPolicy.delay
    assert delay(None, 0.0) == FIRST_DELAY_SECONDS
    assert delay(0.1, 1.0) == pytest.approx(0.2)
    assert delay(40.0, 1.0) == MAX_DELAY_SECONDS
    assert delay(MAX_DELAY_SECONDS, 1.0) == MAX_DELAY_SECONDS
    assert delay(6.4, STEADY_SECONDS) == FIRST_DELAY_SECONDS


async def test_on_failure_3_restarts_a_failing_command_three_times_then_stops(
    make_runtime: Callable[..., Runtime],
) -> None:
    sleeps = Sleeps()
    async with make_runtime(sleep=sleeps) as rt:
        info = await rt.create(name="svc", backend="mock", restart="on-failure:3",
                               command=["sh", "-c", "echo try; exit 2"])
        assert await rt.wait_main("svc") == 2
        after = await rt.inspect("svc")
        assert (str(after.restart), after.restart_count, after.main_exit_code) == (
            "on-failure:3", 3, 2)
        assert after.state is VmState.RUNNING  # the sandbox outlives its command
        assert await rt.read_logs("svc") == b"try\n" * 4
        assert sleeps.delays == pytest.approx([0.1, 0.2, 0.4])
        kinds = [e.kind for e in await rt.events("svc")
                 if e.kind in (EventKind.MAIN_EXITED, EventKind.RESTARTED)]
        assert kinds == [EventKind.MAIN_EXITED, EventKind.RESTARTED] * 3 + [
            EventKind.MAIN_EXITED]
        restarts = [e.reason for e in await rt.events("svc") if e.kind is EventKind.RESTARTED]
        assert restarts[0] == "exit code 2; restart 1 (on-failure:3) after 0.1 s"
        # a start by the user begins the count afresh (Docker's rule)
        await rt.stop("svc")
        await rt.start("svc")
        assert await rt.wait_main("svc") == 2
        assert (await rt.inspect("svc")).restart_count == 3
        await rt.remove(info.id, force=True)


async def test_on_failure_leaves_a_command_that_succeeded(
    make_runtime: Callable[..., Runtime],
) -> None:
    sleeps = Sleeps()
    async with make_runtime(sleep=sleeps) as rt:
        await rt.create(name="ok", backend="mock", restart="on-failure",
                        command=["echo", "done"])
        assert await rt.wait_main("ok") == 0
        assert (await rt.inspect("ok")).restart_count == 0
        assert sleeps.delays == []
        await rt.remove("ok", force=True)


async def test_always_restarts_until_the_sandbox_is_stopped(
    make_runtime: Callable[..., Runtime],
) -> None:
    sleeps = Sleeps(block_at=3)
    async with make_runtime(sleep=sleeps) as rt:
        await rt.create(name="loop", backend="mock", restart="always",
                        command=["echo", "hi"])
        await asyncio.wait_for(sleeps.blocked.wait(), 10)
        await rt.stop("loop")  # cancels the back-off: no restart after a stop
        info = await rt.inspect("loop")
        assert (info.state, info.restart_count) == (VmState.STOPPED, 2)
        assert await rt.read_logs("loop") == b"hi\n" * 3
        await rt.remove("loop")


async def test_a_restart_policy_needs_a_main_command(
    make_runtime: Callable[..., Runtime],
) -> None:
    async with make_runtime() as rt:
        with pytest.raises(ConfigError, match="needs a main command"):
            await rt.create(name="x", backend="mock", restart="always")
        with pytest.raises(ConfigError, match="not known; allowed"):
            await rt.create(name="x", backend="mock", restart="sometimes", command=["true"])
        assert await rt.list_sandboxes(all=True) == []


async def test_stop_timeout_is_the_grace_a_stop_gives(
    make_runtime: Callable[..., Runtime],
) -> None:
    async with make_runtime() as rt:
        info = await rt.create(name="slow", backend="mock", stop_timeout=42)
        assert info.stop_timeout == 42.0
        vm = rt._vms[info.id]
        assert isinstance(vm, MockVm)
        await rt.stop("slow")
        assert vm.stop_grace == 42.0
        await rt.start("slow")
        vm = rt._vms[info.id]
        assert isinstance(vm, MockVm)
        await rt.stop("slow", timeout=3)  # the caller's timeout wins
        assert vm.stop_grace == 3.0
        with pytest.raises(ConfigError, match="stop timeout"):
            await rt.create(name="bad", backend="mock", stop_timeout=-1)
        await rt.remove("slow")


async def test_policy_and_timeout_survive_a_runtime_restart(
    make_runtime: Callable[..., Runtime],
) -> None:
    async with make_runtime() as rt:
        await rt.create(name="svc", backend="mock", restart="on-failure:2", stop_timeout=7.5,
                        command=["true"], start=False)
    async with make_runtime() as rt:
        info = await rt.inspect("svc")
        assert (str(info.restart), info.stop_timeout) == ("on-failure:2", 7.5)
        await rt.remove("svc")


async def test_a_crashed_vm_boots_again_as_its_policy_says_and_counts(
    make_runtime: Callable[..., Runtime],
) -> None:
    sleeps = Sleeps()
    async with make_runtime(sleep=sleeps) as rt:
        info = await rt.create(name="svc", backend="mock", restart="on-failure:2",
                               command=["sleep", "100000"])
        restarted = rt.watch_events(sandboxes=["svc"], kinds=["restarted"])
        for count in (1, 2):
            vm = rt._vms[info.id]
            assert isinstance(vm, MockVm)
            vm.crash("guest kernel panic")
            event = await anext(restarted)
            assert event.reason == (f"VM crashed (guest kernel panic); restart {count} "
                                    f"(on-failure:2) after {sleeps.delays[-1]:g} s")
            now = await rt.inspect("svc")
            assert (now.state, now.restart_count) == (VmState.RUNNING, count)
            assert rt._vms[info.id].state is VmState.RUNNING  # booted again
        assert sleeps.delays == pytest.approx([0.1, 0.2])
        rt._vms[info.id].crash("again")  # type: ignore[attr-defined]
        assert (await rt.inspect("svc")).state is VmState.CRASHED  # its 2 restarts used up
        assert len(sleeps.delays) == 2
        await restarted.aclose()

        await rt.create(name="plain", backend="mock", command=["sleep", "100000"])
        rt._vms[(await rt.inspect("plain")).id].crash("no policy")  # type: ignore[attr-defined]
        assert (await rt.inspect("plain")).state is VmState.CRASHED  # restart "no": stays


async def test_a_vm_that_died_while_no_runtime_watched_boots_again_at_open(
    make_runtime: Callable[..., Runtime],
) -> None:
    async with make_runtime() as rt:
        await rt.create(name="always", backend="mock", restart="always",
                        command=["sleep", "100000"])
        await rt.create(name="never", backend="mock", command=["sleep", "100000"])
    # mock VMs do not outlive their runtime: the next open finds them gone (crashed)
    async with make_runtime() as rt:
        restarted = rt.watch_events(since=0, sandboxes=["always"], kinds=["restarted"])
        event = await anext(restarted)
        assert event.reason is not None and event.reason.startswith("VM crashed (")
        assert (await rt.inspect("always")).state is VmState.RUNNING
        assert (await rt.inspect("never")).state is VmState.CRASHED
        await restarted.aclose()


async def test_kill_with_a_signal_reaches_the_main_command_not_the_vm(
    make_runtime: Callable[..., Runtime],
) -> None:
    async with make_runtime() as rt:
        await rt.create(name="svc", backend="mock", command=["sleep", "100000"])
        main = asyncio.create_task(rt.wait_main("svc"))
        await wait_until(lambda: rt._mains._running.get((rt.db.find_by_name("svc")
                                                         or pytest.fail("gone")).id),
                         5, "the main command to run")
        info = await rt.kill("svc", signal="SIGTERM")
        assert await main == 128 + 15  # ended by SIGTERM
        assert info.state is VmState.RUNNING  # the sandbox runs on
        assert (await rt.inspect("svc")).state is VmState.RUNNING
        with pytest.raises(MainCommandNotRunning, match=r"no main command running \(it "
                                                        r"ended with exit code 143\)"):
            await rt.kill("svc", signal=15)
        with pytest.raises(ConfigError, match="signal 'SIGNOPE' is not known"):
            await rt.kill("svc", signal="SIGNOPE")
        await rt.create(name="plain", backend="mock")
        with pytest.raises(MainCommandNotRunning, match="has no main command, so"):
            await rt.kill("plain", signal="INT")
        assert (await rt.kill("plain")).state is VmState.STOPPED  # no signal: the VM dies


# -- the event log ----------------------------------------------------------------------


async def _collect(stream: AsyncIterator[SandboxEvent], into: list[SandboxEvent]) -> None:
    async for event in stream:
        into.append(event)


async def test_a_watcher_sees_every_event_of_every_sandbox_in_order(
    make_runtime: Callable[..., Runtime],
) -> None:
    async with make_runtime() as rt:
        seen: list[SandboxEvent] = []
        watcher = asyncio.create_task(_collect(rt.watch_events(), seen))
        await asyncio.sleep(0)  # the watcher starts from "now": before anything happens
        a = await rt.create(name="a", backend="mock", command=["false"])
        await rt.wait_main("a")
        await rt.rename("a", "b")
        await rt.stop("b")
        await rt.remove("b")
        await wait_until(lambda: any(e.kind is EventKind.REMOVED for e in seen), 5,
                         "the removal to be seen")
        watcher.cancel()
        assert [(e.kind.value, e.state.value) for e in seen] == [
            ("state", "created"), ("state", "starting"), ("state", "running"),
            ("main-exited", "running"), ("renamed", "running"), ("state", "stopped"),
            ("removed", "stopped")]
        assert [e.name for e in seen] == ["a"] * 4 + ["b"] * 3
        assert {e.sandbox_id for e in seen} == {a.id}
        assert [e.seq for e in seen] == sorted({e.seq for e in seen})
        assert seen[3].reason == "exit code 1"
        assert seen[4].reason == "renamed from a"
        # the history outlives the sandbox
        assert [e.seq for e in rt.db.events(a.id)] == [e.seq for e in seen]


class Clock:
    """One second later at every reading; ``now`` may be moved on."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        self.now += 1
        return self.now


async def test_since_until_and_filters(make_runtime: Callable[..., Runtime]) -> None:
    clock = Clock()
    async with make_runtime(clock=clock) as rt:
        one = await rt.create(name="one", backend="mock")
        two = await rt.create(name="two", backend="mock")
        await rt.stop("two")
        clock.now = 20_000  # past every `until` below: each watch ends after its backlog
        everything = [e async for e in rt.watch_events(since=0, until=10_000)]
        assert len(everything) == 7
        only_two = [e async for e in rt.watch_events(since=0, until=10_000,
                                                      sandboxes=["two"])]
        assert {e.sandbox_id for e in only_two} == {two.id}
        by_prefix = [e async for e in rt.watch_events(since=0, until=10_000,
                                                       sandboxes=[one.id[:6]])]
        assert {e.sandbox_id for e in by_prefix} == {one.id}
        stopped = [e async for e in rt.watch_events(since=0, until=10_000,
                                                     states=["stopped"], kinds=["state"])]
        assert [(e.name, e.state) for e in stopped] == [("two", VmState.STOPPED)]
        later = [e async for e in rt.watch_events(since=everything[3].at, until=10_000)]
        assert later == everything[3:]
        early = [e async for e in rt.watch_events(since=0, until=everything[2].at)]
        assert early == everything[:3]
        with pytest.raises(ConfigError, match="event kind 'exploded' is not known"):
            rt.watch_events(kinds=["exploded"])
        with pytest.raises(ConfigError, match="state 'asleep' is not known"):
            rt.watch_events(states=["asleep"])
        await rt.remove("one", force=True)
        await rt.remove("two")


def test_migration_carries_the_old_history_into_the_event_log(tmp_path: Path) -> None:
    path = tmp_path / DB_FILENAME
    conn = sqlite3.connect(path, isolation_level=None)
    assert migrate(conn, target=5) == 5
    conn.execute(
        "INSERT INTO sandboxes (id, name, backend, config, state, created_at, updated_at)"
        " VALUES ('abc123', 'old', 'mock', ?, 'stopped', 1, 1)", ('{"vm": {"vcpus": 1}}',))
    conn.execute("INSERT INTO sandbox_events (sandbox_id, at, state, reason) VALUES "
                 "('abc123', 1, 'created', NULL), ('abc123', 2, 'stopped', 'gone')")
    conn.close()
    db = StateDb(path)
    assert [(e.seq, e.name, e.kind, e.state, e.reason) for e in db.events("abc123")] == [
        (1, "old", EventKind.STATE, VmState.CREATED, None),
        (2, "old", EventKind.STATE, VmState.STOPPED, "gone")]
    (old,) = db.all()
    assert (old.restart, old.restart_count, old.stop_timeout) == (RestartPolicy(), 0, None)
    db.set_state("abc123", VmState.STOPPED, 3)
    assert db.events("abc123")[-1].seq == 3  # numbering goes on after the copied rows
    db.close()
