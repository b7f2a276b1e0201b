"""Following the runtime's event log live: every sandbox's events as they are recorded."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable, Collection

from kelpie.runtime._db import StateDb
from kelpie.runtime._info import EventKind, SandboxEvent
from kelpie.vm import ConfigError, VmState

BATCH = 500


@dataclasses.dataclass(frozen=True)
class EventFilter:
    """Which events a watcher wants: all of them unless narrowed. ``sandboxes`` match an
    event's sandbox id, an id prefix or its name at the time; within one field any value
    matches, across fields all must (Docker's rule)."""

    sandboxes: Collection[str] = ()
    kinds: Collection[EventKind] = ()
    states: Collection[VmState] = ()

    @classmethod
    def of(cls, *, sandboxes: Collection[str] = (), kinds: Collection[str] = (),
           states: Collection[str] = ()) -> EventFilter:
        """A filter from the values users type; unknown kinds or states are refused."""
        def members(kind: type[EventKind] | type[VmState], values: Collection[str],
                    field: str) -> list[str]:
            allowed = {m.value for m in kind}
            wrong = [v for v in values if v not in allowed]
            if wrong:
                raise ConfigError([f"{field} {wrong[0]!r} is not known; allowed: "
                                   f"{', '.join(sorted(allowed))}"], what="event filter")
            return list(values)
        return cls(tuple(sandboxes),
                   tuple(EventKind(k) for k in members(EventKind, kinds, "event kind")),
                   tuple(VmState(s) for s in members(VmState, states, "state")))

    def matches(self, event: SandboxEvent) -> bool:
        if self.kinds and event.kind not in self.kinds:
            return False
        if self.states and event.state not in self.states:
            return False
        return not self.sandboxes or any(
            ref in (event.sandbox_id, event.name)
            or (len(ref) >= 3 and event.sandbox_id.startswith(ref))
            for ref in self.sandboxes)


class EventFeed:
    """Wakes the watchers of the event log when an event is recorded (the database calls
    :meth:`notify`); :meth:`watch` reads the log from where each watcher is."""

    def __init__(self, db: Callable[[], StateDb], clock: Callable[[], float]) -> None:
        self._db = db
        self._clock = clock
        self._recorded: asyncio.Event | None = None

    def notify(self) -> None:
        if self._recorded is not None:
            self._recorded.set()
            self._recorded = None

    async def watch(self, *, since: float | None = None, until: float | None = None,
                    where: EventFilter | None = None) -> AsyncIterator[SandboxEvent]:
        """The events that match ``where``: from ``since`` (Unix time; None: only those
        recorded from now on) and then live, until ``until`` (None: until cancelled).

        Every event written is seen exactly once, in order: the log is read by sequence
        number, and a watcher waits only after it has read everything recorded so far
        (the database is written on this thread, so nothing lands in between).
        """
        where = where or EventFilter()
        cursor = self._db().last_event_seq() if since is None else 0
        while True:
            batch = self._db().events_after(cursor, since=since, limit=BATCH)
            for event in batch:
                if until is not None and event.at > until:
                    return
                cursor = event.seq
                if where.matches(event):
                    yield event
            if len(batch) == BATCH:
                continue
            if until is not None and self._clock() >= until:
                return
            if self._recorded is None:
                self._recorded = asyncio.Event()
            recorded = self._recorded
            timeout = None if until is None else until - self._clock()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(recorded.wait(), timeout)
