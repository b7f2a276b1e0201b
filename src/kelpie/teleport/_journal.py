"""The teleport journal: every step of every teleport, recorded durably before it is acted on.

One SQLite file per daemon (``teleports.db`` in its data directory) with two tables:
``outgoing`` (this host is the source) and ``incoming`` (this host is the target). A row's
``phase`` is written in its own transaction *before* the step it names starts, so a daemon
that dies mid-step finds, on restart, exactly which step to finish or roll back.

Source phases::

    preparing -> capturing -> sending -> switching -> committed -> done
                 \\____________\\_________\\___> aborted

Target phases::

    reserved -> restoring -> restored -> owned
           \\__________\\___________\\___> discarded

**The commit point** is the target's ``owned`` mark: written by the target when the source
asks it to commit, and refused once the target has marked the teleport ``discarded``
(and vice versa). Before it, every recovery rolls back (the target discards its copy, the
source resumes its own); after it, every recovery rolls forward (the source removes its
copy). A source that cannot learn which side of that point it is on keeps its copy paused
(never two running) and asks again later.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kelpie._exceptions import StorageError


class SourcePhase(enum.StrEnum):
    PREPARING = "preparing"
    CAPTURING = "capturing"
    SENDING = "sending"
    SWITCHING = "switching"
    COMMITTED = "committed"
    DONE = "done"
    ABORTED = "aborted"


class TargetPhase(enum.StrEnum):
    RESERVED = "reserved"
    RESTORING = "restoring"
    RESTORED = "restored"
    OWNED = "owned"
    DISCARDED = "discarded"


SOURCE_FINAL = frozenset({SourcePhase.DONE, SourcePhase.ABORTED})
TARGET_FINAL = frozenset({TargetPhase.OWNED, TargetPhase.DISCARDED})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outgoing (
    id TEXT PRIMARY KEY, sandbox_id TEXT NOT NULL, sandbox_name TEXT NOT NULL,
    target TEXT NOT NULL, token TEXT, mode TEXT NOT NULL, reason TEXT NOT NULL,
    phase TEXT NOT NULL, was_running INTEGER NOT NULL DEFAULT 0, error TEXT,
    started_at REAL NOT NULL, updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS incoming (
    id TEXT PRIMARY KEY, sandbox_id TEXT NOT NULL, sandbox_name TEXT NOT NULL,
    phase TEXT NOT NULL, offer TEXT NOT NULL, error TEXT,
    created_at REAL NOT NULL, updated_at REAL NOT NULL
);
"""


@dataclasses.dataclass(frozen=True)
class Outgoing:
    """A teleport this host is the source of."""

    id: str
    sandbox_id: str
    sandbox_name: str
    target: str
    token: str | None
    mode: str
    reason: str
    phase: SourcePhase
    was_running: bool
    error: str | None
    started_at: float
    updated_at: float


@dataclasses.dataclass(frozen=True)
class Incoming:
    """A teleport this host is the target of."""

    id: str
    sandbox_id: str
    sandbox_name: str
    phase: TargetPhase
    offer: dict[str, Any]
    error: str | None
    created_at: float
    updated_at: float


class TeleportJournal:
    """Durable records of the teleports of one host (both directions).

    The token of an outgoing teleport is kept so that a restarted source can still ask
    its target how the teleport ended; the file is created readable by its owner only.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch(mode=0o600, exist_ok=True)
            self._conn = sqlite3.connect(path, isolation_level=None, timeout=30.0)
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.execute("PRAGMA synchronous = FULL")
            self._conn.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise StorageError(f"cannot open the teleport journal {path}: {exc}") from exc

    def close(self) -> None:
        self._conn.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            yield self._conn
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise StorageError(f"the teleport journal {self.path}: {exc}") from exc
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise

    # ---- outgoing -----------------------------------------------------------------------
    def begin_outgoing(self, record: Outgoing) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT INTO outgoing VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (record.id, record.sandbox_id, record.sandbox_name, record.target, record.token,
                 record.mode, record.reason, record.phase.value, int(record.was_running),
                 record.error, record.started_at, record.updated_at))

    def set_outgoing(self, teleport_id: str, phase: SourcePhase, at: float, *,
                     error: str | None = None, mode: str | None = None,
                     reason: str | None = None) -> None:
        with self._write() as conn:
            conn.execute(
                "UPDATE outgoing SET phase = ?, updated_at = ?, error = COALESCE(?, error), "
                "mode = COALESCE(?, mode), reason = COALESCE(?, reason) WHERE id = ?",
                (phase.value, at, error, mode, reason, teleport_id))

    def outgoing(self, teleport_id: str) -> Outgoing | None:
        rows = self._conn.execute("SELECT * FROM outgoing WHERE id = ?", (teleport_id,))
        row = rows.fetchone()
        return None if row is None else _outgoing(row)

    def unfinished_outgoing(self) -> list[Outgoing]:
        rows = self._conn.execute(
            "SELECT * FROM outgoing WHERE phase NOT IN (?, ?) ORDER BY started_at",
            tuple(p.value for p in SOURCE_FINAL))
        return [_outgoing(r) for r in rows.fetchall()]

    def all_outgoing(self) -> list[Outgoing]:
        rows = self._conn.execute("SELECT * FROM outgoing ORDER BY started_at")
        return [_outgoing(r) for r in rows.fetchall()]

    # ---- incoming -----------------------------------------------------------------------
    def begin_incoming(self, record: Incoming) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT INTO incoming VALUES (?,?,?,?,?,?,?,?)",
                (record.id, record.sandbox_id, record.sandbox_name, record.phase.value,
                 json.dumps(record.offer), record.error, record.created_at, record.updated_at))

    def move_incoming(self, teleport_id: str, allowed: frozenset[TargetPhase],
                      phase: TargetPhase, at: float, *, error: str | None = None,
                      ) -> TargetPhase | None:
        """Set the phase if it is one of ``allowed`` now (compare-and-set, in one
        transaction); the phase it was (None: no such teleport)."""
        with self._write() as conn:
            row = conn.execute("SELECT phase FROM incoming WHERE id = ?",
                               (teleport_id,)).fetchone()
            if row is None:
                return None
            current = TargetPhase(row[0])
            if current in allowed:
                conn.execute("UPDATE incoming SET phase = ?, updated_at = ?, "
                             "error = COALESCE(?, error) WHERE id = ?",
                             (phase.value, at, error, teleport_id))
            return current

    def touch_incoming(self, teleport_id: str, at: float) -> None:
        with self._write() as conn:
            conn.execute("UPDATE incoming SET updated_at = ? WHERE id = ?", (at, teleport_id))

    def incoming(self, teleport_id: str) -> Incoming | None:
        row = self._conn.execute("SELECT * FROM incoming WHERE id = ?",
                                 (teleport_id,)).fetchone()
        return None if row is None else _incoming(row)

    def last_incoming(self, sandbox_id: str) -> Incoming | None:
        """The latest teleport that brought (or tried to bring) ``sandbox_id`` here."""
        row = self._conn.execute(
            "SELECT * FROM incoming WHERE sandbox_id = ? ORDER BY created_at DESC, rowid DESC "
            "LIMIT 1", (sandbox_id,)).fetchone()
        return None if row is None else _incoming(row)

    def unfinished_incoming(self) -> list[Incoming]:
        rows = self._conn.execute(
            "SELECT * FROM incoming WHERE phase NOT IN (?, ?) ORDER BY created_at",
            tuple(p.value for p in TARGET_FINAL))
        return [_incoming(r) for r in rows.fetchall()]


def _outgoing(row: tuple[Any, ...]) -> Outgoing:
    (tid, sandbox_id, name, target, token, mode, reason, phase, was_running, error,
     started_at, updated_at) = row
    return Outgoing(tid, sandbox_id, name, target, token, mode, reason, SourcePhase(phase),
                    bool(was_running), error, started_at, updated_at)


def _incoming(row: tuple[Any, ...]) -> Incoming:
    tid, sandbox_id, name, phase, offer, error, created_at, updated_at = row
    return Incoming(tid, sandbox_id, name, TargetPhase(phase), json.loads(offer), error,
                    created_at, updated_at)
