"""Exactly-once requests: the kernel's table of idempotency keys, without sockets (time passed in).

A reca request may carry an idempotency key (header ``idem``; the client library sets a fresh one
per call and resends it on every retry).  The kernel keys it by ``(principal, idem)`` — one
principal can never reach another's entry — and answers a request whose key it has seen:

* **in flight** (the first attempt is queued or running): the new attempt is *attached* to it.
  It is not admitted, queued or run; it receives every PARTIAL the first attempt receives from
  then on, and its FINAL.  Any number of attempts may attach (each is one ``Attempt``: the
  client's socket identity, its dialect and its own request id, which replaces the first
  attempt's id in what it is sent).
* **finished** with a FINAL its worker produced (success, or the service's own error) within
  ``ttl`` seconds: the stored FINAL is sent again at once; nothing runs and nothing is charged.
* **finished** with an error the kernel made (``worker_died``, ``deadline``, ``cancelled``,
  ``budget_exceeded``, a refusal at admission): not stored — those are the errors a retry is for —
  so the retry runs as a new request.

A key is bound to what it was first sent with: a digest of each part that decides what the request
does or what it is charged to -- the service, the body frames, and the header's ``job``,
``budget``, ``txn`` and ``for`` (:data:`BOUND`) -- is kept with it (not the body), and a request
that reuses a key in flight or finished with any of those different is answered ``idem_conflict``
naming the parts that differ (it neither attaches nor gets the stored FINAL: attaching a retry
sent for another job to the first attempt would answer it with work charged elsewhere).  The
request ``id`` (fresh on every retry by design), ``priority`` and ``deadline`` are not bound: they
shape how the one run is scheduled, and a retry that differs only in them attaches (the first
attempt's priority and deadline hold).

Bounds: at most ``max_entries`` stored FINALs and ``max_bytes`` of their bodies, and each
principal at most ``principal_entries`` and ``principal_bytes`` of them (its own oldest go first,
so one principal's flood never evicts another's entries; past the global bound the oldest entry of
the principal holding the most goes), a FINAL larger than ``max_final_bytes`` is remembered without its body (a retry then gets
``already_done``: it ran, its answer is too large to keep), and at most ``max_attached``
attempts per request (more are refused ``overloaded``).

Durability: every stored FINAL is a decision (``final``: principal, key, service, body in
base64 up to ``DEDUP_LOG_BODY_BYTES``, when it expires) and every snapshot holds its newest entries, so a
restarted kernel restores it from its decision log
(:meth:`Dedup.load` on what replay collected) and a retry after a restart still gets the stored
FINAL; the keys of requests that were in flight when the kernel died are the admission's
``interrupted`` set (refused ``kernel_restarted``: they may have run).

Invariants (:meth:`Dedup.check_invariants`): every attached attempt belongs to a key in flight;
``stored_bytes`` is the sum of the stored bodies and is at most ``max_bytes``; the expiry order
holds every stored key once.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import hashlib
from typing import Any, Final

#: How long a finished request's FINAL is kept for retries, seconds.
DEDUP_TTL_S: Final = 600.0
#: Most FINALs kept, and most bytes of their bodies.
DEDUP_MAX_ENTRIES: Final = 100_000
DEDUP_MAX_BYTES: Final = 64 * 1024 * 1024
#: Each principal's share of them (its flood evicts only its own entries).
DEDUP_PRINCIPAL_MAX_ENTRIES: Final = 10_000
DEDUP_PRINCIPAL_MAX_BYTES: Final = 8 * 1024 * 1024
#: A FINAL above this many bytes is remembered as done without its body.
DEDUP_MAX_FINAL_BYTES: Final = 64 * 1024
#: A stored FINAL's body goes into the decision log only up to this size (a larger one is logged
#: as done without its body: after a restart its retry gets ``already_done``).
DEDUP_LOG_BODY_BYTES: Final = 4096
#: Most stored FINALs a decision-log snapshot holds (the newest).
DEDUP_SNAPSHOT_ENTRIES: Final = 10_000
#: Most attempts attached to one request in flight.
DEDUP_MAX_ATTACHED: Final = 16

Key = tuple[str, str]  # (principal name, idempotency key)


#: The parts of a request an idempotency key is bound to, in the order of their digests.
BOUND: Final = ("service", "body", "job", "budget", "txn", "for")
#: Bytes of each part's digest.
PART_BYTES: Final = 8


def _part(*frames: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=PART_BYTES)
    for f in frames:  # each length-prefixed, so frame boundaries count
        h.update(len(f).to_bytes(8, "big"))
        h.update(f)
    return h.digest()


def _term(value: Any) -> bytes:
    """A header value as bytes for its digest: absent is not the empty string, and a budget's
    kinds are taken in order with their amounts as floats (``1`` and ``1.0`` are one budget)."""
    if value is None:
        return b"\x00"
    if isinstance(value, dict):
        value = sorted((str(k), float(v) if isinstance(v, (int, float)) else repr(v)) for k, v in value.items())
    return b"\x01" + repr(value).encode()


def digest(service: bytes, body: list[bytes], header: Any = None) -> bytes:
    """What a key is bound to: the digests of the parts in :data:`BOUND` -- the service, the
    request's frames, and ``header``'s (a checked :class:`kernel.mdp.Header`; None: an opaque
    body, no header terms) ``job``, ``budget``, ``txn`` and ``on_behalf`` -- concatenated, so a
    conflict can name the parts that differ (:func:`differing`)."""
    terms = [getattr(header, attr, None) for attr in ("job", "budget", "txn", "on_behalf")]
    return _part(service) + _part(*body) + b"".join(_part(_term(t)) for t in terms)


def differing(known: bytes | None, dig: bytes | None) -> list[str]:
    """The parts (names from :data:`BOUND`) in which two digests differ; [] when either is not
    known or they were made by another version (another length: an older log's digest is not
    checked)."""
    if known is None or dig is None or known == dig or len(known) != len(dig):
        return []
    if len(dig) != PART_BYTES * len(BOUND):
        return ["request"]
    return [
        name
        for i, name in enumerate(BOUND)
        if known[i * PART_BYTES : (i + 1) * PART_BYTES] != dig[i * PART_BYTES : (i + 1) * PART_BYTES]
    ]


@dataclasses.dataclass(frozen=True, slots=True)
class Attempt:
    """A retry waiting on the first attempt: where to send, in which dialect, under which id."""

    client: bytes
    form: Any
    rid: Any


@dataclasses.dataclass(slots=True)
class Stored:
    service: bytes
    body: list[bytes] | None  # None: too large to keep (the request ran)
    expires: float
    size: int
    digest: bytes | None = None  # :func:`digest` of what the key was sent with; None: not known (an old log)


class Dedup:
    """The table of idempotency keys: in flight (token of the first attempt, attached attempts)
    and finished (stored FINALs, bounded, expiring)."""

    def __init__(
        self,
        *,
        ttl: float = DEDUP_TTL_S,
        max_entries: int = DEDUP_MAX_ENTRIES,
        max_bytes: int = DEDUP_MAX_BYTES,
        max_final_bytes: int = DEDUP_MAX_FINAL_BYTES,
        max_attached: int = DEDUP_MAX_ATTACHED,
        principal_entries: int = DEDUP_PRINCIPAL_MAX_ENTRIES,
        principal_bytes: int = DEDUP_PRINCIPAL_MAX_BYTES,
    ) -> None:
        if (
            ttl <= 0
            or max_entries < 1
            or max_bytes < 1
            or max_final_bytes < 0
            or max_attached < 0
            or principal_entries < 1
            or principal_bytes < 1
        ):
            raise ValueError(
                "ttl > 0, max_entries >= 1, max_bytes >= 1, max_final_bytes >= 0, max_attached >= 0, "
                "principal_entries >= 1, principal_bytes >= 1"
            )
        self.ttl, self.max_entries, self.max_bytes = ttl, max_entries, max_bytes
        self.principal_entries, self.principal_bytes = principal_entries, principal_bytes
        self.max_final_bytes, self.max_attached = max_final_bytes, max_attached
        #: key -> token of the request running it; token -> key
        self.running: dict[Key, bytes] = {}
        self.key_of: dict[bytes, Key] = {}
        #: key in flight -> :func:`digest` of what it was first sent with
        self.digest_of: dict[Key, bytes | None] = {}
        #: token -> attempts attached to it
        self.attached: dict[bytes, list[Attempt]] = {}
        #: key -> stored FINAL, in insertion (= expiry) order
        self.done: collections.OrderedDict[Key, Stored] = collections.OrderedDict()
        self.stored_bytes = 0
        #: principal -> its stored keys (oldest first), and the bytes of their bodies
        self.by_principal: dict[str, collections.OrderedDict[Key, None]] = {}
        self.bytes_of: dict[str, int] = {}
        self.counters = {
            "attached": 0,
            "replayed": 0,
            "stores": 0,  # answers stored, ever ("stored" in stats: those kept now)
            "expired": 0,
            "evicted": 0,
            "too_large": 0,
            "attach_refused": 0,
            "conflicts": 0,
        }

    # -- lookups ------------------------------------------------------------------------------

    def seen(self, key: Key, now: float, digest: bytes | None = None) -> tuple[str, Any]:
        """What to do with a request carrying ``key`` (sent with ``digest``, :func:`digest`): ``("run", None)`` (new), ``("attach", token)`` (in flight), ``("replay", Stored)``
        (finished, within the TTL), ``("conflict", parts)`` (the key was sent with another
        service, body, job, budget, txn or ``for``: in flight or finished; ``parts`` names them)."""
        token = self.running.get(key)
        if token is not None:
            parts = self._differs(self.digest_of.get(key), digest)
            if parts:
                return "conflict", parts
            return "attach", token
        stored = self.done.get(key)
        if stored is not None:
            if stored.expires > now:
                parts = self._differs(stored.digest, digest)
                if parts:
                    return "conflict", parts
                return "replay", stored
            self._drop(key)
            self.counters["expired"] += 1
        return "run", None

    def _differs(self, known: bytes | None, digest: bytes | None) -> list[str]:
        parts = differing(known, digest)
        if parts:
            self.counters["conflicts"] += 1
        return parts

    def start(self, key: Key, token: bytes, digest: bytes | None = None) -> None:
        """The request ``token`` runs ``key`` (admitted), sent with ``digest``."""
        assert key not in self.running, "a key runs once at a time"
        self.running[key] = token
        self.key_of[token] = key
        self.digest_of[key] = digest

    def attach(self, token: bytes, attempt: Attempt) -> bool:
        """Attach a retry to the request ``token``; False when it already has ``max_attached``."""
        lst = self.attached.setdefault(token, [])
        if len(lst) >= self.max_attached:
            self.counters["attach_refused"] += 1
            return False
        lst.append(attempt)
        self.counters["attached"] += 1
        return True

    def attempts(self, token: bytes) -> list[Attempt]:
        """The retries attached to ``token`` (to receive its PARTIALs and FINAL too)."""
        return self.attached.get(token, [])

    # -- the end of a request -----------------------------------------------------------------

    def finish(
        self, token: bytes, now: float, body: list[bytes] | None, service: bytes
    ) -> tuple[list[Attempt], Stored | None]:
        """The request ``token`` has its FINAL: ``body`` when its worker made it (stored for
        retries), None for a kernel error (not stored: a retry runs again).  Returns the attached
        attempts (to send the FINAL to) and what was stored."""
        key = self.key_of.pop(token, None)
        attempts = self.attached.pop(token, [])
        if key is None:
            return attempts, None
        self.running.pop(key, None)
        dig = self.digest_of.pop(key, None)
        if body is None:
            return attempts, None
        return attempts, self.store(key, service, body, now + self.ttl, dig)

    def store(
        self, key: Key, service: bytes, body: list[bytes] | None, expires: float, digest: bytes | None = None
    ) -> Stored:
        size = sum(map(len, body)) if body is not None else 0
        if body is not None and size > self.max_final_bytes:
            body, size = None, 0
            self.counters["too_large"] += 1
        if key in self.done:
            self._drop(key)
        stored = Stored(service, body, expires, size, digest)
        self.done[key] = stored
        self.stored_bytes += size
        who = key[0]
        mine = self.by_principal.setdefault(who, collections.OrderedDict())
        mine[key] = None
        self.bytes_of[who] = self.bytes_of.get(who, 0) + size
        self.counters["stores"] += 1
        # its own share first: a principal's flood evicts only its own oldest entries
        while len(mine) > self.principal_entries or self.bytes_of.get(who, 0) > self.principal_bytes:
            self._drop(next(iter(mine)))
            self.counters["evicted"] += 1
        # then the global bound: the oldest entry of the principal holding the most
        while len(self.done) > self.max_entries or self.stored_bytes > self.max_bytes:
            if self.stored_bytes > self.max_bytes:
                top = max(self.bytes_of, key=self.bytes_of.__getitem__)
            else:
                top = max(self.by_principal, key=lambda p: len(self.by_principal[p]))
            self._drop(next(iter(self.by_principal[top])))
            self.counters["evicted"] += 1
        return stored

    def replayed(self) -> None:
        self.counters["replayed"] += 1

    def _drop(self, key: Key) -> None:
        stored = self.done.pop(key)
        self.stored_bytes -= stored.size
        who = key[0]
        mine = self.by_principal[who]
        del mine[key]
        if mine:
            self.bytes_of[who] -= stored.size
        else:
            del self.by_principal[who], self.bytes_of[who]

    def sweep(self, now: float) -> int:
        """Forget stored FINALs past their TTL (the oldest first; they are in expiry order)."""
        n = 0
        while self.done:
            key, stored = next(iter(self.done.items()))
            if stored.expires > now:
                break
            self._drop(key)
            n += 1
        self.counters["expired"] += n
        return n

    # -- durability ---------------------------------------------------------------------------

    @staticmethod
    def record(key: Key, service: bytes, stored: Stored) -> dict[str, Any]:
        """The decision-log inputs of a stored FINAL (JSON: bytes in base64; a body above
        ``DEDUP_LOG_BODY_BYTES`` is left out)."""
        body = stored.body if stored.body is not None and stored.size <= DEDUP_LOG_BODY_BYTES else None
        return {
            "principal": key[0],
            "idem": key[1],
            "service": base64.b64encode(service).decode(),
            "body": None if body is None else [base64.b64encode(f).decode() for f in body],
            "expires": stored.expires,
            "digest": None if stored.digest is None else stored.digest.hex(),
        }

    def load(self, records: list[Any], now: float, then: float | None = None) -> int:
        """Restore stored FINALs from decision-log records (:meth:`record`), skipping expired and
        malformed ones; returns how many were restored.  ``then``: the time of the log's last
        decision on the clock the records were written with (another process's monotonic clock):
        each entry keeps the TTL it had left then (the time the kernel was down does not count)."""
        shift = 0.0 if then is None else now - then
        n = 0
        for rec in sorted(records, key=lambda r: r.get("expires", 0) if isinstance(r, dict) else 0):
            try:
                key = (str(rec["principal"]), str(rec["idem"]))
                expires = min(float(rec["expires"]) + shift, now + self.ttl)
                service = base64.b64decode(rec["service"])
                body = None if rec["body"] is None else [base64.b64decode(f) for f in rec["body"]]
                dig = rec.get("digest")  # absent in older logs: the key is not checked against it
                dig = None if dig is None else bytes.fromhex(dig)
            except (KeyError, TypeError, ValueError):
                continue
            if expires > now:
                self.store(key, service, body, expires, dig)
                n += 1
        return n

    def dump(self, limit: int = DEDUP_SNAPSHOT_ENTRIES) -> list[dict[str, Any]]:
        """The ``limit`` newest stored FINALs as decision-log records (for a snapshot: a snapshot
        stays small; older entries logged before it are not restored after a restart, so their
        retries run again)."""
        items = list(self.done.items())[-limit:] if limit < len(self.done) else self.done.items()
        return [self.record(k, s.service, s) for k, s in items]

    def stats(self) -> dict[str, Any]:
        return {
            "in_flight": len(self.running),
            "stored": len(self.done),
            "stored_bytes": self.stored_bytes,
            "attached_waiting": sum(map(len, self.attached.values())),
            **self.counters,
        }

    def check_invariants(self) -> None:
        assert all(t in self.key_of for t in self.attached), "attempts attached to a request not in flight"
        assert all(self.running[k] == t for t, k in self.key_of.items()), "running and key_of disagree"
        assert len(self.running) == len(self.key_of) == len(self.digest_of)
        assert sum(map(len, self.by_principal.values())) == len(self.done), "per-principal index disagrees"
        assert all(k in self.by_principal.get(k[0], ()) for k in self.done)
        assert all(self.bytes_of[p] == sum(self.done[k].size for k in ks) for p, ks in self.by_principal.items())
        assert all(
            len(ks) <= self.principal_entries and self.bytes_of[p] <= self.principal_bytes
            for p, ks in self.by_principal.items()
        ), "a principal over its share"
        assert self.stored_bytes == sum(s.size for s in self.done.values())
        assert self.stored_bytes <= self.max_bytes and len(self.done) <= self.max_entries
        expiries = [s.expires for s in self.done.values()]
        assert expiries == sorted(expiries), "stored FINALs out of expiry order"
