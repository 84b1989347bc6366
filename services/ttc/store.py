"""The transaction manager's durable log: one SQLite database in WAL mode (standard library).

Every state change of the manager is one SQLite transaction (``BEGIN IMMEDIATE`` .. ``COMMIT``)
that writes the new state *and* its audit record together, so after a crash the log holds either
the whole decision or none of it.  ``synchronous=FULL`` makes a committed decision survive power
loss as well as a process crash (WAL with NORMAL survives process crashes only).

Tables (all times are wall-clock epoch seconds, because deadlines outlive processes):

``meta``       key/value; ``store_id`` is a random id fixed at creation, used to tag heavy runs;
               ``audit_forwarded`` the last audit ``seq`` the kernel's decision log acknowledged.
``calls``      one row per call: tool, canonical inputs, state, reason, deadlines, attempts.
``consumers``  (call, consumer) -> active flag; a call with no active consumer is never run.
``runs``       one row per attempt: owning manager, tag, pid, pgid, /proc start-time token, end.
``results``    one row per finished call: ok flag, value or error, CPU seconds.
``deliveries`` one row per (call, consumer): pending | attached | withdrawn; redelivery count.
``audit``      append-only decision log: time, op, call, inputs, outputs (JSON).
``managers``   one row per manager process that opened the log: pid and start-time token.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import uuid
from collections.abc import Iterator
from typing import Any

SCHEMA_VERSION = 1
#: Bound on waiting for SQLite's write lock held by another connection (seconds).
BUSY_TIMEOUT_S = 10.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS calls (
    call_id TEXT PRIMARY KEY,
    idem_key TEXT UNIQUE,
    tool TEXT NOT NULL,
    inputs TEXT NOT NULL,
    inputs_hash TEXT NOT NULL,
    resource TEXT NOT NULL,
    est_cost REAL NOT NULL,
    reserved INTEGER NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    prepared_at REAL NOT NULL,
    prepare_deadline REAL NOT NULL,
    committed_at REAL,
    decided_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS calls_state ON calls(state);
CREATE TABLE IF NOT EXISTS consumers (
    call_id TEXT NOT NULL REFERENCES calls(call_id),
    consumer TEXT NOT NULL,
    active INTEGER NOT NULL,
    added_at REAL NOT NULL,
    PRIMARY KEY (call_id, consumer)
);
CREATE INDEX IF NOT EXISTS consumers_by_name ON consumers(consumer, active);
CREATE TABLE IF NOT EXISTS runs (
    call_id TEXT NOT NULL REFERENCES calls(call_id),
    attempt INTEGER NOT NULL,
    manager_id TEXT NOT NULL,
    tag TEXT NOT NULL UNIQUE,
    pid INTEGER,
    pgid INTEGER,
    start_token INTEGER,
    claimed_at REAL NOT NULL,
    wall_deadline REAL NOT NULL,
    ended_at REAL,
    end_status TEXT,
    cpu_s REAL,
    PRIMARY KEY (call_id, attempt)
);
CREATE INDEX IF NOT EXISTS runs_open ON runs(ended_at);
CREATE TABLE IF NOT EXISTS results (
    call_id TEXT PRIMARY KEY REFERENCES calls(call_id),
    attempt INTEGER NOT NULL,
    ok INTEGER NOT NULL,
    value TEXT,
    error TEXT,
    cpu_s REAL,
    finished_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    call_id TEXT NOT NULL REFERENCES calls(call_id),
    consumer TEXT NOT NULL,
    state TEXT NOT NULL,
    delivered_count INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    attached_at REAL,
    PRIMARY KEY (call_id, consumer)
);
CREATE INDEX IF NOT EXISTS deliveries_pending ON deliveries(consumer, state);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    t REAL NOT NULL,
    op TEXT NOT NULL,
    call_id TEXT,
    inputs TEXT NOT NULL,
    outputs TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_call ON audit(call_id, op);
CREATE TABLE IF NOT EXISTS managers (
    manager_id TEXT PRIMARY KEY,
    pid INTEGER NOT NULL,
    start_token INTEGER,
    started_at REAL NOT NULL,
    ended_at REAL
);
"""


def dumps(obj: Any) -> str:
    """Canonical JSON: sorted keys, no whitespace, no NaN (equal inputs encode to equal text)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


class Store:
    """One connection to the log.  Not thread-safe: one owner (the manager) per process.

    Invariant: every write happens inside :meth:`tx`; reads outside a transaction see the last
    committed state.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_S)
        self.conn.row_factory = sqlite3.Row
        mode = self.conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise RuntimeError(f"SQLite refused WAL mode for {path!r} (got {mode!r})")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute("PRAGMA foreign_keys=ON")
        with self.tx():
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    self.conn.execute(stmt)
            row = self.conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                self.conn.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
                self.conn.execute("INSERT INTO meta VALUES ('store_id', ?)", (uuid.uuid4().hex[:16],))
            elif int(row[0]) != SCHEMA_VERSION:
                raise RuntimeError(f"{path!r} has schema {row[0]}, this code needs {SCHEMA_VERSION}")
        self.store_id: str = self.one("SELECT value FROM meta WHERE key='store_id'")["value"]

    @contextlib.contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One atomic write transaction (takes SQLite's write lock at once)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def one(self, sql: str, args: tuple = ()) -> sqlite3.Row | None:
        return self.conn.execute(sql, args).fetchone()

    def all(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        return self.conn.execute(sql, args).fetchall()

    def audit(self, t: float, op: str, call_id: str | None, inputs: dict, outputs: dict) -> dict:
        """Append one decision (inside the caller's transaction); returns it as an event dict."""
        self.conn.execute(
            "INSERT INTO audit (t, op, call_id, inputs, outputs) VALUES (?, ?, ?, ?, ?)",
            (t, op, call_id, dumps(inputs), dumps(outputs)),
        )
        return {"t": t, "op": op, "call_id": call_id, "inputs": inputs, "outputs": outputs}

    def audit_log(self, call_id: str | None = None) -> list[dict]:
        """The decisions in order (all, or one call's)."""
        if call_id is None:
            rows = self.all("SELECT * FROM audit ORDER BY seq")
        else:
            rows = self.all("SELECT * FROM audit WHERE call_id=? ORDER BY seq", (call_id,))
        return [_audit_row(r) for r in rows]

    def unforwarded(self, limit: int, max_bytes: int) -> list[dict]:
        """The decisions after the ``audit_forwarded`` mark, in order: at most ``limit`` rows
        and about ``max_bytes`` of recorded text (always at least one row)."""
        out, size = [], 0
        for r in self.all("SELECT * FROM audit WHERE seq>? ORDER BY seq LIMIT ?", (self.forwarded(), limit)):
            size += len(r["inputs"]) + len(r["outputs"]) + 64
            if out and size > max_bytes:
                break
            out.append(_audit_row(r))
        return out

    def forwarded(self) -> int:
        row = self.one("SELECT value FROM meta WHERE key='audit_forwarded'")
        return int(row["value"]) if row is not None else 0

    def mark_forwarded(self, seq: int) -> None:
        """Advance the ``audit_forwarded`` mark (never backwards)."""
        with self.tx():
            if seq > self.forwarded():
                self.conn.execute("INSERT OR REPLACE INTO meta VALUES ('audit_forwarded', ?)", (str(seq),))

    def close(self) -> None:
        self.conn.close()


def _audit_row(r: sqlite3.Row) -> dict:
    return {"seq": r["seq"], "t": r["t"], "op": r["op"], "call_id": r["call_id"],
            "inputs": json.loads(r["inputs"]), "outputs": json.loads(r["outputs"])}
