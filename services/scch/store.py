"""Backends of the subgoal cache: SQLite in WAL mode (the embedded default) and Redis (redis-py
against a real ``redis-server``).

Both hold two things: *entries* (canonical key -> artifact, verifier hash, digest, retention
score ``z``, hit count) and *observations* (canonical key -> retention score ``z`` of how often
the key was asked for, bounded in number).  Scores are stored as ``z`` (see
:mod:`services.scch.logic`), whose order does not change with time, so the eviction victim is the
entry with the least ``z``: an index scan in SQLite, ``ZRANGE 0 0`` in Redis.

Every write that changes more than one record is atomic (one SQLite transaction; one Redis
``MULTI``/``EXEC``), and every entry carries a digest of its content checked on read: a crash or a
lost server leaves no half-written entry that could be served.  A lost or unreachable server is
:class:`BackendUnavailable`; every network wait is bounded by :data:`REDIS_TIMEOUT_S`.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import json
import sqlite3
from typing import Any

#: Bound of every Redis socket operation and connect, seconds.
REDIS_TIMEOUT_S = 1.0


class BackendUnavailable(Exception):
    """The backend cannot be reached (a lost Redis server, a broken database file)."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """A cached artifact in canonical symbols.  ``artifact``: JSON text of the printed answer."""

    key: str
    kind: str
    artifact: str
    verifier: str
    how: str
    z: float = 0.0
    hits: int = 0
    digest: str = ""

    def content_digest(self) -> str:
        text = json.dumps([self.key, self.kind, self.artifact, self.verifier, self.how])
        return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()

    def sealed(self) -> "Entry":
        return dataclasses.replace(self, digest=self.content_digest())

    @property
    def intact(self) -> bool:
        return self.digest == self.content_digest()


@dataclasses.dataclass
class Scores:
    """Score updates of one key by ``get`` calls (:meth:`Backend.record`): its observation score
    and, when its entry was served, the entry's retention score and how many hits."""

    key: str
    observed_z: float
    hit_z: float | None = None
    hits: int = 0


class Backend(abc.ABC):
    name = "backend"

    @abc.abstractmethod
    def load(self, key: str) -> Entry | None: ...

    @abc.abstractmethod
    def store(self, entry: Entry, evict: str | None = None) -> None:
        """Insert or replace ``entry`` and delete ``evict`` (if given) atomically; the key's
        observation record is dropped (its score moves to the entry)."""

    @abc.abstractmethod
    def delete(self, key: str) -> None: ...

    @abc.abstractmethod
    def touch(self, key: str, z: float) -> None:
        """Record a served hit: new retention score, one more hit."""

    @abc.abstractmethod
    def observed(self, key: str) -> float | None: ...

    @abc.abstractmethod
    def observe(self, key: str, z: float, keep: int) -> None:
        """Set the key's observation score; keep at most ``keep`` observation records (the
        lowest-scored go first)."""

    @abc.abstractmethod
    def victim(self) -> tuple[str, float] | None:
        """The entry with the least retention score."""

    def read(self, key: str) -> tuple[float | None, Entry | None]:
        """``(observed(key), load(key))``: what a ``get`` reads, in one round trip where the
        backend can batch reads."""
        return self.observed(key), self.load(key)

    def record(self, scores: list[Scores], keep: int) -> None:
        """What ``get`` calls wrote (:class:`Scores`: each key's observation score, as
        :meth:`observe`, and for served hits the entry's retention score and the number of hits,
        as :meth:`touch`), in one write where the backend can (one SQLite transaction, one Redis
        ``MULTI``)."""
        for sc in scores:
            self.observe(sc.key, sc.observed_z, keep)
            for _ in range(sc.hits if sc.hit_z is not None else 0):
                self.touch(sc.key, sc.hit_z)

    @abc.abstractmethod
    def count(self) -> int: ...

    def close(self) -> None:
        """Release connections."""


# -- SQLite ---------------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY, kind TEXT NOT NULL, artifact TEXT NOT NULL, verifier TEXT NOT NULL,
    how TEXT NOT NULL, z REAL NOT NULL, hits INTEGER NOT NULL, digest TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS entries_z ON entries (z);
CREATE TABLE IF NOT EXISTS observations (key TEXT PRIMARY KEY, z REAL NOT NULL);
CREATE INDEX IF NOT EXISTS observations_z ON observations (z);
"""


class SQLiteBackend(Backend):
    """One SQLite file in WAL mode, ``synchronous=NORMAL`` (a cache: a crash may lose the last
    writes, never corrupt one)."""

    name = "sqlite"

    def __init__(self, path: str) -> None:
        try:
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise BackendUnavailable(f"sqlite {path}: {exc}") from exc

    def _run(self, sql: str, args: tuple = ()) -> list[tuple]:
        try:
            return self.db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise BackendUnavailable(f"sqlite: {exc}") from exc

    def load(self, key: str) -> Entry | None:
        rows = self._run("SELECT key, kind, artifact, verifier, how, z, hits, digest FROM entries WHERE key = ?", (key,))
        return Entry(*rows[0]) if rows else None

    def read(self, key: str) -> tuple[float | None, Entry | None]:
        rows = self._run("SELECT o.z, e.key, e.kind, e.artifact, e.verifier, e.how, e.z, e.hits, e.digest "
                         "FROM (SELECT ? AS k) AS q LEFT JOIN observations AS o ON o.key = q.k "
                         "LEFT JOIN entries AS e ON e.key = q.k", (key,))
        z, *entry = rows[0]
        return z, (Entry(*entry) if entry[0] is not None else None)

    def store(self, entry: Entry, evict: str | None = None) -> None:
        try:
            with self.db:
                self.db.execute("BEGIN IMMEDIATE")
                if evict is not None:
                    self.db.execute("DELETE FROM entries WHERE key = ?", (evict,))
                self.db.execute("INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                (entry.key, entry.kind, entry.artifact, entry.verifier, entry.how, entry.z,
                                 entry.hits, entry.digest))
                self.db.execute("DELETE FROM observations WHERE key = ?", (entry.key,))
        except sqlite3.Error as exc:
            raise BackendUnavailable(f"sqlite: {exc}") from exc

    def delete(self, key: str) -> None:
        self._run("DELETE FROM entries WHERE key = ?", (key,))

    def touch(self, key: str, z: float) -> None:
        self._run("UPDATE entries SET z = ?, hits = hits + 1 WHERE key = ?", (z, key))

    def observed(self, key: str) -> float | None:
        rows = self._run("SELECT z FROM observations WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def observe(self, key: str, z: float, keep: int) -> None:
        self.record([Scores(key, z)], keep)

    def record(self, scores: list[Scores], keep: int) -> None:
        try:
            with self.db:
                self.db.execute("BEGIN IMMEDIATE")
                for sc in scores:
                    self._observe(sc.key, sc.observed_z, keep)
                    if sc.hit_z is not None and sc.hits:
                        self.db.execute("UPDATE entries SET z = ?, hits = hits + ? WHERE key = ?",
                                        (sc.hit_z, sc.hits, sc.key))
        except sqlite3.Error as exc:
            raise BackendUnavailable(f"sqlite: {exc}") from exc

    def _observe(self, key: str, z: float, keep: int) -> None:
        """Inside a write transaction.  A key already observed is updated in place; the table is
        counted (``COUNT(*)`` walks its whole index, which every ``get`` paid before) only after an
        insert."""
        if self.db.execute("UPDATE observations SET z = ? WHERE key = ?", (z, key)).rowcount:
            return
        self.db.execute("INSERT INTO observations VALUES (?, ?)", (key, z))
        (n,) = self.db.execute("SELECT COUNT(*) FROM observations").fetchone()
        if n > keep:
            self.db.execute("DELETE FROM observations WHERE key IN "
                            "(SELECT key FROM observations ORDER BY z LIMIT ?)", (n - keep,))

    def victim(self) -> tuple[str, float] | None:
        rows = self._run("SELECT key, z FROM entries ORDER BY z LIMIT 1")
        return (rows[0][0], rows[0][1]) if rows else None

    def count(self) -> int:
        return self._run("SELECT COUNT(*) FROM entries")[0][0]

    def close(self) -> None:
        self.db.close()


# -- Redis ----------------------------------------------------------------------------------------


class RedisBackend(Backend):
    """Entries as hashes ``{prefix}e:{key}``, retention scores in the sorted set ``{prefix}z``,
    observations in the sorted set ``{prefix}o``.  ``url``: ``redis://host:port/db`` or
    ``unix:///path/to/redis.sock``."""

    name = "redis"

    def __init__(self, url: str, prefix: str = "scch:") -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self._errors: tuple[type[BaseException], ...] = (redis.exceptions.ConnectionError,
                                                         redis.exceptions.TimeoutError,
                                                         redis.exceptions.BusyLoadingError, OSError)
        self.prefix = prefix
        self.url = url
        self.r = redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S,
                                      retry=Retry(NoBackoff(), 0), decode_responses=True)
        self._call(self.r.ping)

    def _call(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except self._errors as exc:
            raise BackendUnavailable(f"redis {self.url}: {type(exc).__name__}: {exc}") from exc

    def _e(self, key: str) -> str:
        return f"{self.prefix}e:{key}"

    def load(self, key: str) -> Entry | None:
        return self._entry(key, self._call(self.r.hgetall, self._e(key)))

    @staticmethod
    def _entry(key: str, h: dict) -> Entry | None:
        if not h:
            return None
        try:
            return Entry(key, h["kind"], h["artifact"], h["verifier"], h["how"], float(h["z"]), int(h["hits"]),
                         h["digest"])
        except (KeyError, ValueError):
            return Entry(key, "", "", "", "", digest="partial")  # fails its digest check: never served

    def store(self, entry: Entry, evict: str | None = None) -> None:
        def tx() -> None:
            pipe = self.r.pipeline(transaction=True)
            if evict is not None:
                pipe.delete(self._e(evict))
                pipe.zrem(f"{self.prefix}z", evict)
            pipe.hset(self._e(entry.key), mapping={"kind": entry.kind, "artifact": entry.artifact,
                                                   "verifier": entry.verifier, "how": entry.how,
                                                   "z": repr(entry.z), "hits": entry.hits, "digest": entry.digest})
            pipe.zadd(f"{self.prefix}z", {entry.key: entry.z})
            pipe.zrem(f"{self.prefix}o", entry.key)
            pipe.execute()

        self._call(tx)

    def delete(self, key: str) -> None:
        def tx() -> None:
            pipe = self.r.pipeline(transaction=True)
            pipe.delete(self._e(key))
            pipe.zrem(f"{self.prefix}z", key)
            pipe.execute()

        self._call(tx)

    def touch(self, key: str, z: float) -> None:
        def tx() -> None:
            pipe = self.r.pipeline(transaction=True)
            self._touch(pipe, key, z)
            pipe.execute()

        self._call(tx)

    def _touch(self, pipe: Any, key: str, z: float, hits: int = 1) -> None:
        pipe.hset(self._e(key), "z", repr(z))
        pipe.hincrby(self._e(key), "hits", hits)
        pipe.zadd(f"{self.prefix}z", {key: z}, xx=True)

    def observed(self, key: str) -> float | None:
        return self._call(self.r.zscore, f"{self.prefix}o", key)

    def observe(self, key: str, z: float, keep: int) -> None:
        self.record([Scores(key, z)], keep)

    def read(self, key: str) -> tuple[float | None, Entry | None]:
        def both() -> list:
            pipe = self.r.pipeline(transaction=False)  # one round trip, two reads
            pipe.zscore(f"{self.prefix}o", key)
            pipe.hgetall(self._e(key))
            return pipe.execute()

        z, h = self._call(both)
        return z, self._entry(key, h)

    def record(self, scores: list[Scores], keep: int) -> None:
        if not scores:
            return

        def tx() -> None:
            pipe = self.r.pipeline(transaction=True)
            pipe.zadd(f"{self.prefix}o", {sc.key: sc.observed_z for sc in scores})
            pipe.zremrangebyrank(f"{self.prefix}o", 0, -keep - 1)
            for sc in scores:
                if sc.hit_z is not None and sc.hits:
                    self._touch(pipe, sc.key, sc.hit_z, sc.hits)
            pipe.execute()

        self._call(tx)

    def victim(self) -> tuple[str, float] | None:
        out = self._call(self.r.zrange, f"{self.prefix}z", 0, 0, False, True)
        return (out[0][0], float(out[0][1])) if out else None

    def count(self) -> int:
        return int(self._call(self.r.zcard, f"{self.prefix}z"))

    def close(self) -> None:
        self.r.close()


def open_backend(kind: str, *, path: str = "", url: str = "", prefix: str = "scch:") -> Backend:
    if kind == "sqlite":
        return SQLiteBackend(path or ":memory:")
    if kind == "redis":
        return RedisBackend(url, prefix)
    raise ValueError(f"backend must be sqlite or redis, got {kind!r}")
