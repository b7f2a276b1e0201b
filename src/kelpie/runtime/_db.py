"""The runtime's state: one SQLite database (WAL mode, foreign keys on) under the data dir.

The schema is versioned with ``PRAGMA user_version`` and an ordered list of migrations:
migration *N* (1-based) brings a database from version *N - 1* to *N*, each in its own
transaction, so an interrupted upgrade leaves a database at a consistent earlier version.
Every write runs in a transaction (``BEGIN IMMEDIATE``).

The calls are made directly on the event loop's thread, not offloaded to a worker thread:
each statement touches a few rows of a small local file (well under a millisecond in WAL
mode), cheaper than a thread hop, and it keeps a single connection on a single thread.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from kelpie.runtime._errors import SandboxNameInUse, SnapshotNameInUse, StateDatabaseError
from kelpie.runtime._info import EventKind, SandboxEvent, SandboxInfo, SnapshotInfo
from kelpie.runtime._restart import RestartPolicy
from kelpie.vm import ConfigError, SnapshotKind, VmConfig, VmState

DB_FILENAME = "runtime.db"
BUSY_TIMEOUT_SECONDS = 5.0

_STATES = ", ".join(f"'{s.value}'" for s in VmState)

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: the sandboxes themselves
    (
        f"""
        CREATE TABLE sandboxes (
            id           TEXT PRIMARY KEY,
            name         TEXT NOT NULL UNIQUE,
            backend      TEXT NOT NULL,
            image        TEXT,
            image_digest TEXT,
            config       TEXT NOT NULL,
            state        TEXT NOT NULL CHECK (state IN ({_STATES})),
            crash_reason TEXT,
            last_error   TEXT,
            vm_dir       TEXT,
            labels       TEXT NOT NULL DEFAULT '{{}}',
            created_at   REAL NOT NULL,
            updated_at   REAL NOT NULL
        )
        """,
    ),
    # 2: a history of state changes, removed with its sandbox
    (
        """
        CREATE TABLE sandbox_events (
            seq        INTEGER PRIMARY KEY AUTOINCREMENT,
            sandbox_id TEXT NOT NULL REFERENCES sandboxes(id) ON DELETE CASCADE,
            at         REAL NOT NULL,
            state      TEXT NOT NULL,
            reason     TEXT
        )
        """,
        "CREATE INDEX sandbox_events_by_sandbox ON sandbox_events (sandbox_id, seq)",
    ),
    # 3: how the sandbox's main command (if any) ended
    (
        "ALTER TABLE sandboxes ADD COLUMN main_exit_code INTEGER",
    ),
    # 4: snapshots (and templates, which are snapshots sandboxes are created from)
    (
        """
        CREATE TABLE snapshots (
            id           TEXT PRIMARY KEY,
            name         TEXT NOT NULL UNIQUE,
            kind         TEXT NOT NULL,
            template     INTEGER NOT NULL DEFAULT 0,
            sandbox_id   TEXT,
            sandbox_name TEXT,
            backend      TEXT NOT NULL,
            image        TEXT,
            image_digest TEXT,
            sandbox      TEXT NOT NULL,
            size         INTEGER NOT NULL,
            created_at   REAL NOT NULL
        )
        """,
    ),
    # 5: the backend's id of the running main command, to follow it after a restart
    (
        "ALTER TABLE sandboxes ADD COLUMN main_exec_id TEXT",
    ),
    # 6: how often the restart policy restarted the main command; one event log for every
    # sandbox that outlives them (a removal is an event too), each event with its kind
    (
        "ALTER TABLE sandboxes ADD COLUMN restart_count INTEGER NOT NULL DEFAULT 0",
        """
        CREATE TABLE events (
            seq        INTEGER PRIMARY KEY AUTOINCREMENT,
            sandbox_id TEXT NOT NULL,
            name       TEXT NOT NULL,
            at         REAL NOT NULL,
            kind       TEXT NOT NULL,
            state      TEXT NOT NULL,
            reason     TEXT
        )
        """,
        """
        INSERT INTO events (seq, sandbox_id, name, at, kind, state, reason)
        SELECT e.seq, e.sandbox_id, s.name, e.at, 'state', e.state, e.reason
        FROM sandbox_events e JOIN sandboxes s ON s.id = e.sandbox_id
        """,
        "DROP TABLE sandbox_events",
        "CREATE INDEX events_by_sandbox ON events (sandbox_id, seq)",
    ),
    # 7: how much of the running main command's output its log holds, so that following
    # it again (after a restart, or on the host it moved to) replays what was in flight
    (
        "ALTER TABLE sandboxes ADD COLUMN main_output_offset INTEGER",
    ),
)
"""Schema migrations, in order; append new ones, never edit a released one."""

SCHEMA_VERSION = len(MIGRATIONS)

_COLUMNS = (
    "id, name, backend, image, image_digest, config, state, crash_reason, last_error, "
    "vm_dir, labels, created_at, updated_at, main_exit_code, main_exec_id, restart_count, "
    "main_output_offset"
)

_EVENT_COLUMNS = "seq, sandbox_id, name, at, kind, state, reason"

MAX_EVENTS = 100_000
"""The event log keeps this many of the newest events (older ones go at each removal)."""


_SNAPSHOT_COLUMNS = (
    "id, name, kind, template, sandbox_id, sandbox_name, backend, image, image_digest, "
    "sandbox, size, created_at"
)


class IdInUse(Exception):
    """Internal: a generated sandbox id collided with an existing one (generate another)."""


def schema_version(conn: sqlite3.Connection) -> int:
    """The schema version recorded in the database file."""
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def migrate(conn: sqlite3.Connection, *, target: int = SCHEMA_VERSION) -> int:
    """Apply the migrations the database lacks, up to ``target``; return the new version."""
    current = schema_version(conn)
    if current > SCHEMA_VERSION:
        raise StateDatabaseError(
            f"the runtime state database is at schema version {current}, newer than this "
            f"Kelpie knows ({SCHEMA_VERSION}); upgrade Kelpie, or use another KELPIE_STATE_DIR"
        )
    for version in range(current + 1, target + 1):
        with _transaction(conn):
            for statement in MIGRATIONS[version - 1]:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version}")
    return schema_version(conn)


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction: committed on success, rolled back on any exception."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def connect(path: Path) -> sqlite3.Connection:
    """Open (creating if needed) the database at ``path`` in WAL mode, foreign keys on."""
    try:
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA synchronous = NORMAL")  # durable across process crashes in WAL
    except sqlite3.Error as exc:
        raise StateDatabaseError(f"cannot open the runtime state database {path}: {exc}") from exc
    return conn


class StateDb:
    """Typed access to the ``sandboxes`` table (and its event history)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.on_event: Callable[[], None] | None = None
        """Called (in the writing transaction) whenever an event is recorded."""
        self._conn = connect(path)
        try:
            migrate(self._conn)
        except sqlite3.Error as exc:
            self._conn.close()
            raise StateDatabaseError(f"cannot migrate the runtime state database {path}: "
                                     f"{exc}") from exc
        except BaseException:
            self._conn.close()
            raise

    def close(self) -> None:
        """Close the connection (pending WAL content is checkpointed by SQLite)."""
        self._conn.close()

    @property
    def version(self) -> int:
        """The schema version of the open database."""
        return schema_version(self._conn)

    # ---- writes -------------------------------------------------------------------------
    def insert(self, info: SandboxInfo) -> None:
        """Record a new sandbox; :class:`SandboxNameInUse` if the name is taken."""
        try:
            with _transaction(self._conn):
                self._conn.execute(
                    f"INSERT INTO sandboxes ({_COLUMNS}) VALUES "
                    "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    _row_values(info),
                )
                self._event(info.id, info.created_at, EventKind.STATE, info.state, None)
        except sqlite3.IntegrityError as exc:
            if "sandboxes.name" in str(exc):
                owner = self.find_by_name(info.name)
                raise SandboxNameInUse(info.name, owner.id if owner else None) from None
            if "sandboxes.id" in str(exc):
                raise IdInUse(info.id) from None
            raise

    def set_state(
        self, sandbox_id: str, state: VmState, at: float, *, reason: str | None = None,
    ) -> None:
        """Record a state change; ``reason`` is kept as ``crash_reason`` when crashed."""
        crash_reason = reason if state is VmState.CRASHED else None
        clear_error = state is VmState.RUNNING
        with _transaction(self._conn):
            cursor = self._conn.execute(
                "UPDATE sandboxes SET state = ?, crash_reason = ?, updated_at = ?,"
                " last_error = CASE WHEN ? THEN NULL ELSE last_error END WHERE id = ?",
                (state.value, crash_reason, at, clear_error, sandbox_id),
            )
            if cursor.rowcount:
                self._event(sandbox_id, at, EventKind.STATE, state, reason)

    def set_error(self, sandbox_id: str, error: str, at: float) -> None:
        """Remember the last failed operation of a sandbox."""
        with _transaction(self._conn):
            self._conn.execute(
                "UPDATE sandboxes SET last_error = ?, updated_at = ? WHERE id = ?",
                (error, at, sandbox_id),
            )

    def set_config(self, info: SandboxInfo, at: float) -> None:
        """Replace the recorded settings of a sandbox (its VM config, workdir, command...)
        with those of ``info``."""
        with _transaction(self._conn):
            self._conn.execute("UPDATE sandboxes SET config = ?, updated_at = ? WHERE id = ?",
                               (_config_json(info), at, info.id))

    def set_name(self, sandbox_id: str, name: str, at: float) -> None:
        """Rename a sandbox; :class:`SandboxNameInUse` if the name is taken."""
        try:
            with _transaction(self._conn):
                old = self._conn.execute("SELECT name, state FROM sandboxes WHERE id = ?",
                                         (sandbox_id,)).fetchone()
                self._conn.execute("UPDATE sandboxes SET name = ?, updated_at = ? WHERE id = ?",
                                   (name, at, sandbox_id))
                if old is not None and old[0] != name:
                    self._event(sandbox_id, at, EventKind.RENAMED, VmState(old[1]),
                                f"renamed from {old[0]}")
        except sqlite3.IntegrityError as exc:
            if "sandboxes.name" in str(exc):
                owner = self.find_by_name(name)
                raise SandboxNameInUse(name, owner.id if owner else None) from None
            raise

    def set_vm_dir(self, sandbox_id: str, vm_dir: Path) -> None:
        """Remember where the backend keeps this sandbox's VM directory."""
        with _transaction(self._conn):
            self._conn.execute(
                "UPDATE sandboxes SET vm_dir = ? WHERE id = ?", (str(vm_dir), sandbox_id)
            )

    def set_main_exec(self, sandbox_id: str, exec_id: str | None) -> None:
        """Remember the backend's id of the running main command (none of its output
        is in the log yet)."""
        with _transaction(self._conn):
            self._conn.execute(
                "UPDATE sandboxes SET main_exec_id = ?, main_output_offset = 0 WHERE id = ?",
                (exec_id, sandbox_id),
            )

    def set_main_output_offset(self, sandbox_id: str, offset: int | None) -> None:
        """Remember how many bytes of the running main command's output its log holds
        (None: unknown)."""
        with _transaction(self._conn):
            self._conn.execute(
                "UPDATE sandboxes SET main_output_offset = ? WHERE id = ?", (offset, sandbox_id),
            )

    def main_started(self, sandbox_id: str, at: float, *, restart: str | None = None) -> None:
        """Record that the main command runs (again): by a start (its restart count back to
        0), or by the restart policy (``restart`` says why; counted, and an event)."""
        with _transaction(self._conn):
            row = self._conn.execute(
                "UPDATE sandboxes SET main_exit_code = NULL, main_exec_id = NULL,"
                " main_output_offset = NULL, updated_at = ?,"
                " restart_count = CASE WHEN ? THEN restart_count + 1 ELSE 0 END"
                " WHERE id = ? RETURNING state", (at, restart is not None, sandbox_id),
            ).fetchone()
            if row is not None and restart is not None:
                self._event(sandbox_id, at, EventKind.RESTARTED, VmState(row[0]), restart)

    def main_exited(self, sandbox_id: str, exit_code: int | None, at: float) -> None:
        """Record how the main command ended, as its exit code and as an event."""
        with _transaction(self._conn):
            row = self._conn.execute(
                "UPDATE sandboxes SET main_exit_code = ?, main_exec_id = NULL,"
                " main_output_offset = NULL, updated_at = ?"
                " WHERE id = ? RETURNING state", (exit_code, at, sandbox_id),
            ).fetchone()
            if row is not None:
                how = "unknown" if exit_code is None else str(exit_code)
                self._event(sandbox_id, at, EventKind.MAIN_EXITED, VmState(row[0]),
                            f"exit code {how}")

    def delete(self, sandbox_id: str, at: float) -> None:
        """Forget a sandbox; its events stay in the log, with a last one saying so."""
        with _transaction(self._conn):
            row = self._conn.execute("SELECT state FROM sandboxes WHERE id = ?",
                                     (sandbox_id,)).fetchone()
            if row is None:
                return
            self._event(sandbox_id, at, EventKind.REMOVED, VmState(row[0]), None)
            self._conn.execute("DELETE FROM sandboxes WHERE id = ?", (sandbox_id,))
            self._conn.execute("DELETE FROM events WHERE seq <= "
                               "(SELECT max(seq) FROM events) - ?", (MAX_EVENTS,))

    def _event(self, sandbox_id: str, at: float, kind: EventKind, state: VmState,
               reason: str | None) -> None:
        self._conn.execute(
            "INSERT INTO events (sandbox_id, name, at, kind, state, reason) "
            "SELECT id, name, ?, ?, ?, ? FROM sandboxes WHERE id = ?",
            (at, kind.value, state.value, reason, sandbox_id),
        )
        if self.on_event is not None:
            self.on_event()

    # ---- reads --------------------------------------------------------------------------
    def get(self, sandbox_id: str) -> SandboxInfo | None:
        """The sandbox with exactly this id."""
        return self._one("WHERE id = ?", (sandbox_id,))

    def find_by_name(self, name: str) -> SandboxInfo | None:
        """The sandbox with exactly this name."""
        return self._one("WHERE name = ?", (name,))

    def find_by_id_prefix(self, prefix: str) -> list[SandboxInfo]:
        """Sandboxes whose id starts with ``prefix`` (lowercase hex only; else none)."""
        if not prefix or any(c not in "0123456789abcdef" for c in prefix):
            return []
        return self._many("WHERE substr(id, 1, ?) = ? ORDER BY id", (len(prefix), prefix))

    def all(self) -> list[SandboxInfo]:
        """Every sandbox, oldest first."""
        return self._many("ORDER BY created_at, id", ())

    def events(self, sandbox_id: str) -> list[SandboxEvent]:
        """The recorded events of a sandbox, oldest first."""
        return self._events("WHERE sandbox_id = ? ORDER BY seq", (sandbox_id,))

    def events_after(self, seq: int, *, since: float | None = None,
                     limit: int = 1000) -> list[SandboxEvent]:
        """Every sandbox's events after event ``seq`` (and at or after ``since``), oldest
        first, at most ``limit``."""
        return self._events("WHERE seq > ? AND at >= ? ORDER BY seq LIMIT ?",
                            (seq, -1.0 if since is None else since, limit))

    def last_event_seq(self) -> int:
        """The sequence number of the newest event (0 when there is none)."""
        return int(self._conn.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0])

    def _events(self, where: str, params: Sequence[Any]) -> list[SandboxEvent]:
        rows = self._conn.execute(f"SELECT {_EVENT_COLUMNS} FROM events {where}", params)
        return [SandboxEvent(sandbox_id=r[1], at=r[3], state=VmState(r[5]), reason=r[6],
                             seq=r[0], name=r[2], kind=EventKind(r[4]))
                for r in rows.fetchall()]

    def _one(self, where: str, params: Sequence[Any]) -> SandboxInfo | None:
        rows = self._many(where, params)
        return rows[0] if rows else None

    def _many(self, where: str, params: Sequence[Any]) -> list[SandboxInfo]:
        rows = self._conn.execute(f"SELECT {_COLUMNS} FROM sandboxes {where}", params)
        return [_from_row(row, self.path) for row in rows.fetchall()]


class SnapshotDb:
    """Typed access to the ``snapshots`` table (shares the state database's connection)."""

    def __init__(self, db: StateDb) -> None:
        self._db = db

    @property
    def _conn(self) -> sqlite3.Connection:
        return self._db._conn

    def insert(self, info: SnapshotInfo) -> None:
        """Record a complete snapshot; :class:`SnapshotNameInUse` if the name is taken."""
        try:
            with _transaction(self._conn):
                self._conn.execute(
                    f"INSERT INTO snapshots ({_SNAPSHOT_COLUMNS}) VALUES "
                    "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (info.id, info.name, info.kind.value, int(info.template), info.sandbox_id,
                     info.sandbox_name, info.backend, info.image, info.image_digest,
                     json.dumps(_sandbox_json(info.sandbox), sort_keys=True), info.size,
                     info.created_at),
                )
        except sqlite3.IntegrityError as exc:
            if "snapshots.name" in str(exc):
                raise SnapshotNameInUse(info.name) from None
            if "snapshots.id" in str(exc):
                raise IdInUse(info.id) from None
            raise

    def delete(self, snapshot_id: str) -> None:
        with _transaction(self._conn):
            self._conn.execute("DELETE FROM snapshots WHERE id = ?", (snapshot_id,))

    def get(self, snapshot_id: str) -> SnapshotInfo | None:
        rows = self._many("WHERE id = ?", (snapshot_id,))
        return rows[0] if rows else None

    def find_by_name(self, name: str) -> SnapshotInfo | None:
        rows = self._many("WHERE name = ?", (name,))
        return rows[0] if rows else None

    def find_by_id_prefix(self, prefix: str) -> list[SnapshotInfo]:
        if not prefix or any(c not in "0123456789abcdef" for c in prefix):
            return []
        return self._many("WHERE substr(id, 1, ?) = ? ORDER BY id", (len(prefix), prefix))

    def all(self) -> list[SnapshotInfo]:
        return self._many("ORDER BY created_at, id", ())

    def _many(self, where: str, params: Sequence[Any]) -> list[SnapshotInfo]:
        rows = self._conn.execute(f"SELECT {_SNAPSHOT_COLUMNS} FROM snapshots {where}", params)
        return [self._from_row(row) for row in rows.fetchall()]

    def _from_row(self, row: Sequence[Any]) -> SnapshotInfo:
        (sid, name, kind, template, sandbox_id, sandbox_name, backend, image, digest,
         sandbox_json, size, created_at) = row
        try:
            sandbox = _sandbox_from_json(json.loads(sandbox_json), backend, image, digest)
            snapshot_kind = SnapshotKind(kind)
        except (ValueError, KeyError, TypeError, ConfigError) as exc:
            raise StateDatabaseError(
                f"snapshot {sid} ({name}) has an unreadable record in {self._db.path}: {exc}"
            ) from exc
        return SnapshotInfo(
            id=sid, name=name, kind=snapshot_kind, template=bool(template),
            sandbox_id=sandbox_id, sandbox_name=sandbox_name, backend=backend, image=image,
            image_digest=digest, sandbox=sandbox, size=size, created_at=created_at,
        )


def _sandbox_json(info: SandboxInfo) -> dict[str, Any]:
    """What a snapshot keeps of its sandbox: how to rebuild the same VM and exec defaults."""
    return {"vm": info.config.to_dict(), "workdir": info.workdir, "user": info.user,
            "command": None if info.command is None else list(info.command),
            "image_command": None if info.image_command is None else list(info.image_command),
            "image_entrypoint": list(info.image_entrypoint), "labels": dict(info.labels),
            **_main_settings(info)}


def _sandbox_from_json(
    data: dict[str, Any], backend: str, image: str | None, digest: str | None,
) -> SandboxInfo:
    command = data.get("command")
    image_command = data.get("image_command")
    return SandboxInfo(
        id="", name="", backend=backend, state=VmState.STOPPED,
        config=VmConfig.from_dict(data["vm"]), image=image, image_digest=digest,
        workdir=data.get("workdir"), user=data.get("user"),
        command=None if command is None else tuple(command),
        image_command=None if image_command is None else tuple(image_command),
        image_entrypoint=tuple(data.get("image_entrypoint") or ()),
        labels=dict(data.get("labels") or {}),
        restart=RestartPolicy.parse(data.get("restart") or "no"),
        stop_timeout=data.get("stop_timeout"),
    )


def _config_json(info: SandboxInfo) -> str:
    """The ``config`` column of a sandbox: its VM config and how commands run in it."""
    config = {"vm": info.config.to_dict(), "workdir": info.workdir, "user": info.user,
              "command": None if info.command is None else list(info.command),
              "image_command": None if info.image_command is None else list(info.image_command),
              "image_entrypoint": list(info.image_entrypoint), **_main_settings(info),
              "expires_at": info.expires_at, "on_timeout": info.on_timeout}
    return json.dumps(config, sort_keys=True)


def _main_settings(info: SandboxInfo) -> dict[str, Any]:
    """The restart policy and stop timeout, as records keep them."""
    return {"restart": str(info.restart), "stop_timeout": info.stop_timeout}


def _row_values(info: SandboxInfo) -> tuple[Any, ...]:
    return (
        info.id, info.name, info.backend, info.image, info.image_digest,
        _config_json(info), info.state.value, info.crash_reason,
        info.last_error, None if info.vm_dir is None else str(info.vm_dir),
        json.dumps(dict(info.labels), sort_keys=True), info.created_at, info.updated_at,
        info.main_exit_code, info.main_exec_id, info.restart_count, info.main_output_offset,
    )


def _from_row(row: Sequence[Any], path: Path) -> SandboxInfo:
    (sid, name, backend, image, digest, config_json, state, crash_reason, last_error,
     vm_dir, labels_json, created_at, updated_at, main_exit_code, main_exec_id,
     restart_count, main_output_offset) = row
    try:
        config = json.loads(config_json)
        vm_config = VmConfig.from_dict(config["vm"])
        labels = json.loads(labels_json)
        command = config.get("command")
        command = None if command is None else tuple(str(a) for a in command)
        image_command = config.get("image_command")
        image_command = None if image_command is None else tuple(str(a) for a in image_command)
        image_entrypoint = tuple(str(a) for a in config.get("image_entrypoint") or ())
        restart = RestartPolicy.parse(config.get("restart") or "no")
        stop_timeout = config.get("stop_timeout")
        if stop_timeout is not None:
            stop_timeout = float(stop_timeout)
        expires_at = config.get("expires_at")
        if expires_at is not None:
            expires_at = float(expires_at)
        on_timeout = str(config.get("on_timeout") or "remove")
    except (ValueError, KeyError, TypeError, ConfigError) as exc:
        raise StateDatabaseError(
            f"sandbox {sid} ({name}) has an unreadable record in {path}: {exc}"
        ) from exc
    return SandboxInfo(
        id=sid, name=name, backend=backend, state=VmState(state), config=vm_config,
        image=image, image_digest=digest, workdir=config.get("workdir"),
        user=config.get("user"), vm_dir=None if vm_dir is None else Path(vm_dir),
        labels=labels, crash_reason=crash_reason, last_error=last_error,
        created_at=created_at, updated_at=updated_at, command=command,
        main_exit_code=main_exit_code, image_command=image_command,
        image_entrypoint=image_entrypoint, main_exec_id=main_exec_id,
        restart=restart, restart_count=restart_count, stop_timeout=stop_timeout,
        main_output_offset=main_output_offset, expires_at=expires_at, on_timeout=on_timeout,
    )
