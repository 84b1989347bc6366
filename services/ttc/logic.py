"""The transaction state machine of Transactional Tool Calls (seed 001 §3.5, §5.2).

Pure logic over the durable log: no processes, no sockets, no clock — every method takes ``now``
(wall-clock epoch seconds, because deadlines outlive processes) and returns what the caller must
do to the outside world (which runs to start, which process groups to kill).  The process side is
:mod:`services.ttc.runner`.

States of a call::

    PREPARED --commit--> COMMITTED --claim_run--> RUNNING --run_finished--> DONE | FAILED
       |                    |                        |  \\--lost, retriable--> COMMITTED (new attempt)
       +--abort/expire------+--abort/withdraw--------+--> ABORTED

Contracts:

* ``prepare`` validates (registered tool, the tool's own validator, the size cap, cost, timeout,
  consumers), reserves ``est_cost`` through the :class:`Gate`, and records PREPARED durably.
  Nothing heavy runs.
* Presumed abort: a PREPARED call not committed by ``prepared_at + timeout`` is ABORTED
  (``reason='timeout'``) — by ``expire``, by ``recover``, or by the late ``commit`` itself.
* ``commit`` decides COMMITTED only if some consumer is still active; otherwise the call is ABORTED
  with ``reason='no_consumer'`` and :class:`~services.ttc.errors.Aborted` is raised.  A repeated
  ``commit`` carrying the call's idempotency key returns the current outcome and never schedules a
  second run; one without it raises :class:`~services.ttc.errors.AlreadyCommitted`.
* ``abort`` and ``withdraw`` record ABORTED first and then return the runs to kill: if the caller
  dies between the two, recovery (and its tagged-process sweep) kills them.
* Invariant: at most one open run per call, and only its current attempt (``calls.attempts``) may
  set the call's result; a late result from an older attempt is logged and discarded.
* Results (DONE or FAILED) get one delivery record per active consumer; ``attach`` is the
  consumer's idempotent acknowledgement keyed by (call, consumer): it returns True exactly once.
* Every decision is written to the ``audit`` table in the same SQLite transaction as the state it
  decides, then forwarded to ``audit_sink`` (e.g. the kernel's decision log) after the commit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from kernel.gate import Gate, LocalGate
from services.ttc import errors
from services.ttc.store import Store, dumps
from services.ttc.tools import Tool, ToolRegistry

PREPARED, COMMITTED, RUNNING, DONE, FAILED, ABORTED = "PREPARED", "COMMITTED", "RUNNING", "DONE", "FAILED", "ABORTED"
LIVE_STATES = (PREPARED, COMMITTED, RUNNING)
TERMINAL_STATES = (DONE, FAILED, ABORTED)

#: Cap on the canonical JSON encoding of a call's inputs (bytes).
MAX_INPUT_BYTES = 256 * 1024
#: Bounds on ``prepare`` arguments.
MAX_TIMEOUT_S = 7 * 24 * 3600.0
MAX_CONSUMERS = 1024
MAX_NAME_LEN = 200
#: RLIMIT_CPU of a run is ceil(est_cost) + this allowance for interpreter start-up (seconds).
CPU_STARTUP_ALLOWANCE_S = 1
#: Wall deadline of a run: claim time + max(WALL_MIN_S, WALL_FACTOR * est_cost).
WALL_FACTOR = 4.0
WALL_MIN_S = 10.0


@dataclasses.dataclass(frozen=True)
class RunRef:
    """Enough to find and kill one run: its tag (in the process environment) and pid/pgid/token."""

    call_id: str
    attempt: int
    tag: str
    pid: int | None
    pgid: int | None
    start_token: int | None


@dataclasses.dataclass(frozen=True)
class RunTicket:
    """A claimed run the caller must start now."""

    call_id: str
    attempt: int
    tag: str
    tool: str
    entry: str
    inputs: dict
    cpu_limit_s: int
    mem_bytes: int
    wall_deadline: float


@dataclasses.dataclass(frozen=True)
class Outcome:
    """Where a call stands.  ``result`` is set once DONE/FAILED: ``{"ok", "value" | "error"}``."""

    call_id: str
    state: str
    reason: str | None = None
    result: dict | None = None
    attempts: int = 0


@dataclasses.dataclass(frozen=True)
class Delivery:
    call_id: str
    consumer: str
    ok: bool
    value: Any
    error: str | None
    delivered_count: int


@dataclasses.dataclass(frozen=True)
class RunFacts:
    """What the process side observed about an open run before recovery."""

    alive: bool
    result: dict | None = None
    end_status: str | None = None
    cpu_s: float | None = None


@dataclasses.dataclass
class RecoveryReport:
    kills: list[RunRef] = dataclasses.field(default_factory=list)
    aborted: list[str] = dataclasses.field(default_factory=list)
    retried: list[str] = dataclasses.field(default_factory=list)
    failed: list[str] = dataclasses.field(default_factory=list)
    ingested: list[str] = dataclasses.field(default_factory=list)


def inputs_digest(tool: str, encoded_inputs: str) -> str:
    return hashlib.sha256(f"{tool}\0{encoded_inputs}".encode()).hexdigest()


def _check_name(kind: str, value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_NAME_LEN:
        raise errors.PreconditionFailed(f"{kind} must be a non-empty string of at most {MAX_NAME_LEN} characters, "
                                        f"got {value!r}")
    return value


class TransactionManager:
    """The state machine over one :class:`Store`.  ``manager_id`` names the process that owns the runs
    it claims (the checker treats a run whose manager is dead as orphaned unless recovery ended it)."""

    def __init__(self, store: Store, tools: ToolRegistry, gate: Gate | None = None,
                 audit_sink: Callable[[dict], None] | None = None, manager_id: str | None = None,
                 max_input_bytes: int = MAX_INPUT_BYTES) -> None:
        self.store = store
        self.tools = tools
        self.gate: Gate = gate if gate is not None else LocalGate()
        self.audit_sink = audit_sink
        self.manager_id = manager_id or uuid.uuid4().hex[:12]
        self.max_input_bytes = max_input_bytes

    # ------------------------------------------------------------------------------ plumbing

    @contextlib.contextmanager
    def _write(self) -> Iterator[tuple[list[dict], list[tuple[str, float]]]]:
        """One durable transaction; gate releases and audit forwarding happen only after COMMIT."""
        events: list[dict] = []
        releases: list[tuple[str, float]] = []
        with self.store.tx():
            yield events, releases
        for resource, amount, call_id in releases:
            self.gate.release(resource, amount, call_id)
        if self.audit_sink is not None:
            for event in events:
                self.audit_sink(event)

    def audit(self, event: dict) -> None:
        """Append an external event (e.g. a kernel decision about this service) to the audit log."""
        if not isinstance(event, dict) or not isinstance(event.get("op"), str):
            raise errors.PreconditionFailed(f"an audit event must be a map with a string 'op', got {event!r}")
        with self._write() as (events, _):
            now = float(event.get("t", 0.0))
            events.append(self.store.audit(now, event["op"], event.get("call_id"),
                                           dict(event.get("inputs") or {}), dict(event.get("outputs") or {})))

    def _log(self, events: list[dict], now: float, op: str, call_id: str | None, inputs: dict, outputs: dict) -> None:
        events.append(self.store.audit(now, op, call_id, inputs, outputs))

    def _row(self, call_id: Any):
        if not isinstance(call_id, str):
            raise errors.UnknownCall(f"call id must be a string, got {call_id!r}", call_id=str(call_id))
        row = self.store.one("SELECT * FROM calls WHERE call_id=?", (call_id,))
        if row is None:
            raise errors.UnknownCall(f"no call {call_id!r}", call_id=call_id)
        return row

    def _active_consumers(self, call_id: str) -> list[str]:
        return [r["consumer"] for r in self.store.all(
            "SELECT consumer FROM consumers WHERE call_id=? AND active=1 ORDER BY consumer", (call_id,))]

    def _open_run(self, call_id: str):
        return self.store.one("SELECT * FROM runs WHERE call_id=? AND ended_at IS NULL", (call_id,))

    @staticmethod
    def _ref(run) -> RunRef:
        return RunRef(run["call_id"], run["attempt"], run["tag"], run["pid"], run["pgid"], run["start_token"])

    def _decide(self, events, releases, row, state: str, reason: str | None, now: float, op: str,
                inputs: dict | None = None) -> None:
        """Move a live call to a terminal ``state`` (inside a transaction), releasing its reservation."""
        self.store.conn.execute("UPDATE calls SET state=?, reason=?, decided_at=?, reserved=0 WHERE call_id=?",
                                (state, reason, now, row["call_id"]))
        if row["reserved"]:
            releases.append((row["resource"], row["est_cost"], row["call_id"]))
        self._log(events, now, op, row["call_id"], inputs or {}, {"state": state, "reason": reason,
                                                                  "from": row["state"]})

    def _abort_live(self, events, releases, row, reason: str, now: float, op: str) -> list[RunRef]:
        """Abort a live call and end its open run (if any); returns the run to kill."""
        kills = []
        run = self._open_run(row["call_id"])
        if run is not None:
            self.store.conn.execute("UPDATE runs SET ended_at=?, end_status=? WHERE call_id=? AND attempt=?",
                                    (now, "killed:" + reason, run["call_id"], run["attempt"]))
            kills.append(self._ref(run))
        self._decide(events, releases, row, ABORTED, reason, now, op)
        return kills

    def _result(self, call_id: str) -> dict | None:
        r = self.store.one("SELECT * FROM results WHERE call_id=?", (call_id,))
        if r is None:
            return None
        out = {"ok": bool(r["ok"]), "attempt": r["attempt"], "cpu_s": r["cpu_s"]}
        if r["ok"]:
            out["value"] = json.loads(r["value"])
        else:
            out["error"] = r["error"]
        return out

    def outcome(self, call_id: str) -> Outcome:
        row = self._row(call_id)
        return Outcome(call_id, row["state"], row["reason"], self._result(call_id), row["attempts"])

    def consumers(self, call_id: str) -> list[str]:
        self._row(call_id)
        return self._active_consumers(call_id)

    def calls(self, state: str | None = None) -> list[str]:
        if state is None:
            return [r[0] for r in self.store.all("SELECT call_id FROM calls ORDER BY prepared_at, call_id")]
        return [r[0] for r in self.store.all(
            "SELECT call_id FROM calls WHERE state=? ORDER BY prepared_at, call_id", (state,))]

    # ------------------------------------------------------------------------------ prepare

    def prepare(self, tool: str, inputs: Any, est_cost: float, consumers: Iterable[str], timeout: float,
                idem_key: str | None = None, *, now: float) -> str:
        """Validate and record a PREPARED call; returns its id.  Raises UnknownTool, PreconditionFailed,
        TooLarge, IdempotencyConflict or BudgetRefused; on error nothing is recorded or reserved."""
        spec: Tool = self.tools.get(tool)
        if isinstance(est_cost, bool) or not isinstance(est_cost, (int, float)) or not math.isfinite(est_cost) \
                or est_cost <= 0:
            raise errors.PreconditionFailed(f"est_cost must be a positive finite number, got {est_cost!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) \
                or not 0 < timeout <= MAX_TIMEOUT_S:
            raise errors.PreconditionFailed(f"timeout must lie in (0, {MAX_TIMEOUT_S:g}] seconds, got {timeout!r}")
        if isinstance(consumers, str):
            raise errors.PreconditionFailed("consumers must be a list of names, not a string")
        names = sorted({_check_name("consumer", c) for c in consumers})
        if not names or len(names) > MAX_CONSUMERS:
            raise errors.PreconditionFailed(f"a call needs 1..{MAX_CONSUMERS} consumers, got {len(names)}")
        if idem_key is not None:
            _check_name("idem_key", idem_key)
        try:
            encoded = dumps(inputs)
        except (TypeError, ValueError) as exc:
            raise errors.PreconditionFailed(f"inputs must be JSON-encodable without NaN: {exc}") from exc
        if len(encoded.encode()) > self.max_input_bytes:
            raise errors.TooLarge(f"inputs encode to {len(encoded.encode())} bytes; the cap is {self.max_input_bytes}",
                                  size=len(encoded.encode()), cap=self.max_input_bytes)
        try:
            spec.validate(inputs)
        except (ValueError, TypeError, KeyError) as exc:
            raise errors.PreconditionFailed(f"{tool}: {exc}", tool=tool) from exc
        digest = inputs_digest(tool, encoded)
        if idem_key is not None:
            prior = self.store.one("SELECT call_id, inputs_hash FROM calls WHERE idem_key=?", (idem_key,))
            if prior is not None:
                if prior["inputs_hash"] != digest:
                    raise errors.IdempotencyConflict(f"idem_key {idem_key!r} was used for a different call",
                                                     call_id=prior["call_id"])
                with self._write() as (events, _):
                    self._log(events, now, "prepare_replayed", prior["call_id"], {"idem_key": idem_key}, {})
                return prior["call_id"]
        call_id = uuid.uuid4().hex[:16]
        if not self.gate.reserve(spec.resource, float(est_cost), call_id):
            with self._write() as (events, _):
                self._log(events, now, "prepare_refused", None,
                          {"tool": tool, "est_cost": est_cost, "resource": spec.resource}, {"code": "budget_refused"})
            raise errors.BudgetRefused(f"gate refused {est_cost:g} {spec.resource} for {tool}",
                                       resource=spec.resource, amount=est_cost)
        try:
            with self._write() as (events, _):
                self.store.conn.execute(
                    "INSERT INTO calls (call_id, idem_key, tool, inputs, inputs_hash, resource, est_cost, reserved,"
                    " state, prepared_at, prepare_deadline, max_attempts) VALUES (?,?,?,?,?,?,?,1,?,?,?,?)",
                    (call_id, idem_key, tool, encoded, digest, spec.resource, float(est_cost), PREPARED, now,
                     now + timeout, spec.max_attempts))
                self.store.conn.executemany("INSERT INTO consumers VALUES (?,?,1,?)",
                                            [(call_id, c, now) for c in names])
                self._log(events, now, "prepare", call_id,
                          {"tool": tool, "est_cost": est_cost, "consumers": names, "timeout": timeout,
                           "idem_key": idem_key, "inputs_sha": digest[:16]}, {"state": PREPARED})
        except BaseException:
            self.gate.release(spec.resource, float(est_cost), call_id)
            raise
        return call_id

    def subscribe(self, call_id: str, consumer: str, *, now: float) -> None:
        """Add a consumer to a live call (another plan step wants the same result)."""
        _check_name("consumer", consumer)
        with self._write() as (events, _):
            row = self._row(call_id)
            if row["state"] == ABORTED:
                raise errors.Aborted(f"call {call_id} was aborted ({row['reason']})", call_id=call_id,
                                     reason=row["reason"])
            if row["state"] not in LIVE_STATES:
                raise errors.AlreadyFinished(f"call {call_id} already finished ({row['state']})", call_id=call_id)
            self.store.conn.execute(
                "INSERT INTO consumers VALUES (?,?,1,?) ON CONFLICT(call_id, consumer) DO UPDATE SET active=1",
                (call_id, consumer, now))
            self._log(events, now, "subscribe", call_id, {"consumer": consumer}, {})

    # ------------------------------------------------------------------------------ commit / abort

    def commit(self, call_id: str, *, now: float, idem_key: str | None = None) -> Outcome:
        """Decide to run the call (see the module contract).  The returned state is COMMITTED when
        the caller must now start the run (``claim_run``); a retry returns the current state."""
        with self._write() as (events, releases):
            row = self._row(call_id)
            state = row["state"]
            if state == ABORTED:
                self._log(events, now, "commit_refused", call_id, {}, {"code": "aborted", "reason": row["reason"]})
                aborted = (row["reason"], None)
            elif state == PREPARED:
                if now >= row["prepare_deadline"]:
                    self._decide(events, releases, row, ABORTED, "timeout", now, "abort",
                                 {"trigger": "late_commit", "deadline": row["prepare_deadline"]})
                    aborted = ("timeout", None)
                elif not self._active_consumers(call_id):
                    self._decide(events, releases, row, ABORTED, "no_consumer", now, "abort", {"trigger": "commit"})
                    aborted = ("no_consumer", None)
                else:
                    self.store.conn.execute("UPDATE calls SET state=?, committed_at=? WHERE call_id=?",
                                            (COMMITTED, now, call_id))
                    self._log(events, now, "commit", call_id, {"consumers": self._active_consumers(call_id)},
                              {"state": COMMITTED})
                    aborted = None
            elif idem_key is not None and idem_key == row["idem_key"]:
                self._log(events, now, "commit_replayed", call_id, {"idem_key": idem_key}, {"state": state})
                aborted = None
            else:
                self._log(events, now, "commit_refused", call_id, {}, {"code": "already_committed", "state": state})
                aborted = ("already_committed", state)
        if aborted is not None:
            reason, current = aborted
            if reason == "already_committed":
                raise errors.AlreadyCommitted(f"call {call_id} is already {current}; retry with its idem_key "
                                              f"to read the outcome", call_id=call_id, state=current)
            raise errors.Aborted(f"call {call_id} is aborted ({reason})", call_id=call_id, reason=reason)
        return self.outcome(call_id)

    def abort(self, call_id: str, *, now: float, reason: str = "requested") -> list[RunRef]:
        """Abort a live call; returns the runs the caller must kill.  Idempotent on an ABORTED call
        (returns no runs); raises AlreadyFinished on DONE/FAILED."""
        with self._write() as (events, releases):
            row = self._row(call_id)
            if row["state"] == ABORTED:
                return []
            if row["state"] not in LIVE_STATES:
                raise errors.AlreadyFinished(f"call {call_id} already finished ({row['state']})", call_id=call_id,
                                             state=row["state"])
            return self._abort_live(events, releases, row, reason, now, "abort")

    def withdraw(self, consumer: str, *, now: float) -> tuple[list[str], list[RunRef]]:
        """The plan no longer needs ``consumer``: deactivate it everywhere, withdraw its pending
        deliveries, and abort every live call left without a consumer.  Returns (aborted ids, runs to kill)."""
        _check_name("consumer", consumer)
        aborted, kills = [], []
        with self._write() as (events, releases):
            touched = [r[0] for r in self.store.all(
                "SELECT c.call_id FROM consumers c JOIN calls k ON k.call_id=c.call_id"
                " WHERE c.consumer=? AND c.active=1", (consumer,))]
            self.store.conn.execute("UPDATE consumers SET active=0 WHERE consumer=?", (consumer,))
            self.store.conn.execute("UPDATE deliveries SET state='withdrawn' WHERE consumer=? AND state='pending'",
                                    (consumer,))
            self._log(events, now, "withdraw", None, {"consumer": consumer}, {"calls": touched})
            for call_id in touched:
                row = self._row(call_id)
                if row["state"] in LIVE_STATES and not self._active_consumers(call_id):
                    kills += self._abort_live(events, releases, row, "no_consumer", now, "abort")
                    aborted.append(call_id)
        return aborted, kills

    def expire(self, *, now: float) -> list[RunRef]:
        """Presumed abort of PREPARED calls past their deadline; FAILED('run_timeout') for runs past
        their wall deadline.  Returns the runs to kill."""
        kills = []
        with self._write() as (events, releases):
            for row in self.store.all("SELECT * FROM calls WHERE state=? AND prepare_deadline<=?", (PREPARED, now)):
                self._decide(events, releases, row, ABORTED, "timeout", now, "abort",
                             {"trigger": "expire", "deadline": row["prepare_deadline"]})
            for run in self.store.all("SELECT * FROM runs WHERE ended_at IS NULL AND wall_deadline<=?", (now,)):
                row = self._row(run["call_id"])
                self.store.conn.execute("UPDATE runs SET ended_at=?, end_status='killed:run_timeout'"
                                        " WHERE call_id=? AND attempt=?", (now, run["call_id"], run["attempt"]))
                kills.append(self._ref(run))
                if row["state"] == RUNNING and row["attempts"] == run["attempt"]:
                    self._finish(events, releases, row, run["attempt"], None, "run_timeout", None, now)
        return kills

    # ------------------------------------------------------------------------------ runs

    def runnable(self) -> list[str]:
        """COMMITTED calls waiting for a run, oldest commit first."""
        return [r[0] for r in self.store.all(
            "SELECT call_id FROM calls WHERE state=? ORDER BY committed_at, call_id", (COMMITTED,))]

    def claim_run(self, call_id: str, *, now: float) -> RunTicket | None:
        """COMMITTED -> RUNNING with a new attempt owned by this manager; None if the call is not
        COMMITTED any more (aborted or claimed meanwhile).  The run is durable before any process
        exists, so a crash after spawning is found by its tag."""
        with self._write() as (events, _):
            row = self._row(call_id)
            if row["state"] != COMMITTED:
                return None
            spec = self.tools.get(row["tool"])
            attempt = row["attempts"] + 1
            tag = f"{self.store.store_id}/{call_id}/{attempt}"
            wall_deadline = now + max(WALL_MIN_S, WALL_FACTOR * row["est_cost"])
            self.store.conn.execute("UPDATE calls SET state=?, attempts=? WHERE call_id=?", (RUNNING, attempt, call_id))
            self.store.conn.execute(
                "INSERT INTO runs (call_id, attempt, manager_id, tag, claimed_at, wall_deadline) VALUES (?,?,?,?,?,?)",
                (call_id, attempt, self.manager_id, tag, now, wall_deadline))
            self._log(events, now, "run_claimed", call_id, {"attempt": attempt, "manager": self.manager_id},
                      {"state": RUNNING, "tag": tag})
        return RunTicket(call_id, attempt, tag, row["tool"], spec.entry, json.loads(row["inputs"]),
                         math.ceil(row["est_cost"]) + CPU_STARTUP_ALLOWANCE_S, spec.mem_bytes, wall_deadline)

    def run_started(self, call_id: str, attempt: int, pid: int, pgid: int, start_token: int | None, *,
                    now: float) -> None:
        with self._write() as (events, _):
            self.store.conn.execute("UPDATE runs SET pid=?, pgid=?, start_token=? WHERE call_id=? AND attempt=?",
                                    (pid, pgid, start_token, call_id, attempt))
            self._log(events, now, "run_started", call_id, {"attempt": attempt},
                      {"pid": pid, "pgid": pgid, "start_token": start_token})

    def run_finished(self, call_id: str, attempt: int, *, now: float, result: dict | None, end_status: str,
                     cpu_s: float | None = None) -> Outcome:
        """Record the end of one attempt, atomically with its result.

        ``result`` is the worker's ``{"ok": True, "value": ...}`` / ``{"ok": False, "error": ...}``, or
        None when the process ended without one: then ``end_status == 'cpu_limit'`` fails the call, any
        other status is a lost run, retried if the tool is retriable and attempts remain."""
        with self._write() as (events, releases):
            row = self._row(call_id)
            run = self.store.one("SELECT * FROM runs WHERE call_id=? AND attempt=?", (call_id, attempt))
            if run is None:
                raise errors.UnknownCall(f"no run {attempt} of call {call_id}", call_id=call_id)
            if run["ended_at"] is None:
                self.store.conn.execute("UPDATE runs SET ended_at=?, end_status=?, cpu_s=? WHERE call_id=? AND attempt=?",
                                        (now, end_status, cpu_s, call_id, attempt))
            elif cpu_s is not None:
                self.store.conn.execute("UPDATE runs SET cpu_s=? WHERE call_id=? AND attempt=?", (cpu_s, call_id, attempt))
            if row["state"] != RUNNING or row["attempts"] != attempt:
                self._log(events, now, "late_run_end", call_id, {"attempt": attempt, "end_status": end_status},
                          {"state": row["state"], "discarded": result is not None})
            else:
                self._finish(events, releases, row, attempt, result, end_status, cpu_s, now)
        return self.outcome(call_id)

    def _finish(self, events, releases, row, attempt: int, result: dict | None, end_status: str,
                cpu_s: float | None, now: float) -> None:
        """Decide a RUNNING call from its current attempt's end (inside a transaction)."""
        call_id = row["call_id"]
        if result is None and end_status not in ("cpu_limit", "run_timeout"):
            spec = self.tools.get(row["tool"])
            if spec.retriable and attempt < row["max_attempts"] and self._active_consumers(call_id):
                self.store.conn.execute("UPDATE calls SET state=? WHERE call_id=?", (COMMITTED, call_id))
                self._log(events, now, "retry", call_id, {"attempt": attempt, "end_status": end_status},
                          {"state": COMMITTED})
                return
            result = {"ok": False, "error": f"run_lost: {end_status}"}
        elif result is None:
            result = {"ok": False, "error": end_status}
        ok = bool(result.get("ok"))
        value = dumps(result.get("value")) if ok else None
        error = None if ok else str(result.get("error", "error"))
        self.store.conn.execute("INSERT INTO results VALUES (?,?,?,?,?,?,?)",
                                (call_id, attempt, int(ok), value, error, cpu_s, now))
        consumers = self._active_consumers(call_id)
        self.store.conn.executemany(
            "INSERT INTO deliveries (call_id, consumer, state, created_at) VALUES (?,?,'pending',?)",
            [(call_id, c, now) for c in consumers])
        self._decide(events, releases, row, DONE if ok else FAILED, None if ok else error.split(":")[0], now,
                     "finish", {"attempt": attempt, "end_status": end_status, "cpu_s": cpu_s,
                                "consumers": consumers})

    # ------------------------------------------------------------------------------ delivery

    def deliver(self, consumer: str, *, now: float) -> list[Delivery]:
        """The consumer's unattached results (each counted as one delivery).  Returned again after a
        crash until the consumer attaches them."""
        _check_name("consumer", consumer)
        with self._write() as (events, _):
            rows = self.store.all(
                "SELECT d.call_id, d.delivered_count, r.ok, r.value, r.error FROM deliveries d"
                " JOIN results r ON r.call_id=d.call_id WHERE d.consumer=? AND d.state='pending'"
                " ORDER BY d.created_at, d.call_id", (consumer,))
            out = []
            for r in rows:
                self.store.conn.execute("UPDATE deliveries SET delivered_count=delivered_count+1"
                                        " WHERE call_id=? AND consumer=?", (r["call_id"], consumer))
                self._log(events, now, "deliver", r["call_id"], {"consumer": consumer},
                          {"delivered_count": r["delivered_count"] + 1})
                out.append(Delivery(r["call_id"], consumer, bool(r["ok"]),
                                    json.loads(r["value"]) if r["ok"] else None, r["error"],
                                    r["delivered_count"] + 1))
        return out

    def attach(self, call_id: str, consumer: str, *, now: float) -> bool:
        """The consumer's acknowledgement: True the first time (the result is now attached), False
        for a repeat.  Raises NotDelivered if (call, consumer) has no result to attach."""
        _check_name("consumer", consumer)
        with self._write() as (events, _):
            self._row(call_id)
            d = self.store.one("SELECT state FROM deliveries WHERE call_id=? AND consumer=?", (call_id, consumer))
            if d is None or d["state"] == "withdrawn":
                raise errors.NotDelivered(f"call {call_id} has no result for consumer {consumer!r}",
                                          call_id=call_id, consumer=consumer)
            if d["state"] == "attached":
                self._log(events, now, "attach_repeat", call_id, {"consumer": consumer}, {"attached": False})
                return False
            self.store.conn.execute("UPDATE deliveries SET state='attached', attached_at=? WHERE call_id=? AND consumer=?",
                                    (now, call_id, consumer))
            self._log(events, now, "attached", call_id, {"consumer": consumer}, {"attached": True})
            return True

    # ------------------------------------------------------------------------------ recovery

    def open_runs(self) -> list[RunRef]:
        return [self._ref(r) for r in self.store.all("SELECT * FROM runs WHERE ended_at IS NULL ORDER BY claimed_at")]

    def recover(self, *, now: float, facts: Mapping[str, RunFacts], rereserve: bool = True) -> RecoveryReport:
        """Decide every call after a manager restart.

        Policy (the new manager never adopts a run it did not start: it cannot reap or time it):
        * an open run of another manager is ended; if its process is alive it is killed;
        * if the worker left a result (``facts[tag].result``) it is ingested — the run finished,
          only its recording was lost;
        * otherwise the run is lost: a retriable tool with attempts left and a live consumer goes
          back to COMMITTED (re-run; the diffusion tool resumes from its checkpoint), anything else
          is FAILED with ``reason='run_lost'``;
        * PREPARED past its deadline -> ABORTED('timeout'); COMMITTED without consumers -> ABORTED;
        * ``rereserve``: the gate is assumed fresh (in-process), so live calls reserve again; a call
          the gate now refuses is ABORTED('budget_lost').
        """
        report = RecoveryReport()
        with self._write() as (events, releases):
            for run in self.store.all("SELECT * FROM runs WHERE ended_at IS NULL AND manager_id!=?",
                                      (self.manager_id,)):
                f = facts.get(run["tag"], RunFacts(alive=False))
                if f.alive:
                    report.kills.append(self._ref(run))
                row = self._row(run["call_id"])
                status = f.end_status or ("killed:recovery" if f.alive else "lost")
                self.store.conn.execute("UPDATE runs SET ended_at=?, end_status=?, cpu_s=? WHERE call_id=? AND attempt=?",
                                        (now, status, f.cpu_s, run["call_id"], run["attempt"]))
                if row["state"] == RUNNING and row["attempts"] == run["attempt"]:
                    self._finish(events, releases, row, run["attempt"], f.result, "manager_lost"
                                 if f.result is None else "recovered", f.cpu_s, now)
                    after = self._row(run["call_id"])["state"]
                    {COMMITTED: report.retried, FAILED: report.failed}.get(
                        after, report.ingested).append(run["call_id"])
            for row in self.store.all("SELECT * FROM calls WHERE state=?", (RUNNING,)):
                if self._open_run(row["call_id"]) is None:  # defensive: a RUNNING call always has an open run
                    self._finish(events, releases, row, row["attempts"], None, "manager_lost", None, now)
            for row in self.store.all("SELECT * FROM calls WHERE state=? AND prepare_deadline<=?", (PREPARED, now)):
                self._decide(events, releases, row, ABORTED, "timeout", now, "abort", {"trigger": "recover"})
                report.aborted.append(row["call_id"])
            for row in self.store.all("SELECT * FROM calls WHERE state IN (?, ?)", (PREPARED, COMMITTED)):
                if not self._active_consumers(row["call_id"]):
                    self._decide(events, releases, row, ABORTED, "no_consumer", now, "abort", {"trigger": "recover"})
                    report.aborted.append(row["call_id"])
            self._log(events, now, "recover", None, {"open_runs_seen": len(facts)},
                      {"kills": len(report.kills), "aborted": len(report.aborted), "retried": len(report.retried),
                       "failed": len(report.failed), "ingested": len(report.ingested)})
        if rereserve:
            for row in self.store.all("SELECT * FROM calls WHERE reserved=1 AND state IN (?,?,?)", LIVE_STATES):
                if not self.gate.reserve(row["resource"], row["est_cost"], row["call_id"]):
                    with self._write() as (events, releases):
                        row = self._row(row["call_id"])
                        self.store.conn.execute("UPDATE calls SET reserved=0 WHERE call_id=?", (row["call_id"],))
                        row = self._row(row["call_id"])
                        report.kills += self._abort_live(events, releases, row, "budget_lost", now, "abort")
                        report.aborted.append(row["call_id"])
        return report
