"""``ttc``: Transactional Tool Calls behind the kernel (the process shell of :mod:`services.ttc`).

The state machine (:mod:`services.ttc.logic`) and the worker side (:mod:`services.ttc.runner`) are
synchronous and own one SQLite connection, so every operation on them runs on *one* dedicated
thread (``self._exec``, a one-thread executor): the event loop stays free for heartbeats and for
the many requests that wait for results, and SQLite's one-owner rule holds.  That thread also
starts the tool workers, which matters because ``PR_SET_PDEATHSIG`` fires when the *thread* that
spawned a worker exits — here it lives as long as the process.

Ops (the payload is a map with ``op``):

``prepare``  ``{tool, inputs, est_cost, consumers, timeout?, idem?}`` -> ``{call_id, state}``.
             The budget (``est_cost`` of the tool's resource, ``cpu_s`` for the built-ins) is
             reserved through the kernel's gate (``mmi.gate.reserve``, held, under the request's
             job); nothing runs.
``commit``   ``{call_id, idem?, wait?, timeout?}`` -> the outcome.  With ``wait`` the state is
             streamed as PARTIALs and the FINAL carries the result once the call is decided.
``abort``    ``{call_id, reason?}``; ``withdraw`` ``{consumer}``; ``subscribe`` ``{call_id, consumer}``.
``status``   ``{call_id}``; ``result`` ``{call_id, wait?, timeout?}`` (fetch, optionally waiting).
``deliver``  ``{consumer}`` -> the consumer's unattached results; ``attach`` ``{call_id, consumer}``
             -> ``{attached: bool}`` (True exactly once per (call, consumer)).
``audit``    ``{call_id?, since?}`` -> decisions from the durable audit table; ``stats``.

**Principals** (issue 24): a call belongs to the principal that prepared it (the kernel's word,
``ctx.principal``); consumers and idempotency keys are named within the caller's principal
(stored as ``<tag>/<name>``, ``tag`` a digest of the principal, so a name may be 13 characters
shorter than ``MAX_NAME_LEN``).  Another principal's call id answers ``unknown_call`` exactly as
an id that never existed, and ``audit`` lists only the caller's calls (and the manager's own
decisions, which carry no call).

Errors are the typed :mod:`services.ttc.errors` (codes ``unknown_tool``, ``precondition_failed``,
``too_large``, ``unknown_call``, ``aborted``, ``already_committed``, ...) or ``bad_request``.

A pump task reaps workers (woken by their pidfds becoming readable), applies presumed abort and
run deadlines (``Coordinator.step``) every ``STEP_INTERVAL_S``, and sweeps tagged orphans every
``SWEEP_INTERVAL_S``.  At start-up the service takes the log's lock and recovers it
(``Coordinator.recover(rereserve=False)``: the kernel's gate outlives this process, and a
reservation whose holder died is returned by the kernel when its lease runs out).  The pump also
renews this process's reservations every third of a lease (``mmi.gate.renew``), so a call that
lives longer than one lease keeps its budget while a dead manager's units return within one lease.

Every decision is written to the log's ``audit`` table in the transaction that makes it, then
forwarded to the kernel's decision log (``mmi.audit``, source ``ttc:<store_id>``) by a forwarder
task that keeps a durable high-water mark (``meta.audit_forwarded``): at least once, in order,
each record carrying its ``seq`` so a reader can drop the duplicates a crash between the kernel's
answer and the mark's write can leave.  The kernel's log lags the SQLite log by at most one
forwarding round while the kernel is up; while it is down the records wait in SQLite.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import hashlib
import logging
import os
import time
from typing import Any, Callable

from clients.sync import Client
from kernel import errors
from kernel.gate import KernelGate
from kernel.config import runtime_dir
from kernel import protocol as P
from services.base import Context, Service
from services.ttc import errors as ttc_errors
from services.ttc import logic
from services.ttc.runner import Coordinator, ManagerBusy

log = logging.getLogger("reca.ttc")

#: How often the pump reaps, expires and starts runs when no worker exit wakes it (seconds).
STEP_INTERVAL_S = 0.25
#: How often the pump sweeps the process table for tagged orphans (seconds).
SWEEP_INTERVAL_S = 2.0
#: Bound on waiting for a previous manager (still dying) to release the log's lock (seconds).
LOCK_WAIT_S = 10.0
#: Bound on one kernel round trip of the gate adapter and the audit forwarder (seconds).
GATE_TIMEOUT_S = 5.0
#: Default lease of this service's kernel reservations (renewed every third of it), seconds.
GATE_LEASE_S = 30.0
#: Audit records per ``mmi.audit`` call (at most, and about this many bytes); pause of the
#: forwarder after a failed call, and after a kernel that keeps no decision log (seconds).
AUDIT_BATCH = 256
AUDIT_BATCH_BYTES = 1 << 20
AUDIT_RETRY_S = 1.0
AUDIT_NOT_LOGGED_RETRY_S = 30.0
#: Default ``timeout`` of a prepared call (presumed abort after it) and bound on ``wait``.
DEFAULT_PREPARE_TIMEOUT_S = 60.0
DEFAULT_WAIT_S = 60.0
MAX_WAIT_S = 3600.0

OPS = ("prepare", "commit", "abort", "withdraw", "subscribe", "status", "result", "deliver", "attach",
       "audit", "stats")


class KernelGateAdapter(KernelGate):
    """:class:`kernel.gate.KernelGate` in hold mode, as the transaction manager uses it: ``reserve``
    holds ``amount`` of ``resource`` under ``job`` and remembers the reservation by call id (the
    key); ``release`` gives that one back; :meth:`renew` keeps them alive (taking again any the
    kernel lost).  After a restart ``held`` is empty: reservations of the dead process are
    reclaimed by the kernel's lease (presumed abort there too).  Used from one thread only (the
    blocking client's socket)."""

    def __init__(self, client_factory: Callable[[], Client]) -> None:
        super().__init__(client_factory, "default", hold=True, lease_s=GATE_LEASE_S)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()  # type: ignore[attr-defined]
            self._client = None


def outcome_to_wire(out: logic.Outcome) -> dict:
    wire: dict[str, Any] = {"call_id": out.call_id, "state": out.state, "attempts": out.attempts}
    if out.reason is not None:
        wire["reason"] = out.reason
    if out.result is not None:
        wire["result"] = out.result
    return wire


def _need(payload: dict, key: str, kind: type | tuple) -> Any:
    value = payload.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise errors.BadRequest(f"ttc.{payload.get('op')}: '{key}' must be {getattr(kind, '__name__', kind)}, "
                                f"got {value!r}")
    return value


#: Characters a principal's tag adds to every consumer and idempotency key name.
_TAG_LEN = 13


def principal_tag(principal: str) -> str:
    """The prefix of ``principal``'s names in the store (fixed length, no LIKE wildcard)."""
    return hashlib.sha256(principal.encode("utf-8", "surrogatepass")).hexdigest()[:_TAG_LEN - 1] + "/"


def scoped_name(ctx: Context, kind: str, value: Any) -> str:
    """A client's consumer / idempotency-key name as stored: within the caller's principal."""
    if not isinstance(value, str) or not value or len(value) > logic.MAX_NAME_LEN - _TAG_LEN:
        raise ttc_errors.PreconditionFailed(f"{kind} must be a non-empty string of at most "
                                            f"{logic.MAX_NAME_LEN - _TAG_LEN} characters, got {value!r}")
    return principal_tag(ctx.principal) + value


def _wait_bound(payload: dict) -> float:
    t = payload.get("timeout", DEFAULT_WAIT_S)
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= MAX_WAIT_S:
        raise errors.BadRequest(f"'timeout' must be a number of seconds in [0, {MAX_WAIT_S:g}], got {t!r}")
    return float(t)


class TtcService(Service):
    name = "ttc"
    capacity = 32

    def __init__(self) -> None:
        self.db_path: str | None = None
        self.workdir: str | None = None
        self.max_parallel = 2
        self._endpoint: str | None = None
        self._exec: concurrent.futures.ThreadPoolExecutor | None = None
        self.coord: Coordinator | None = None
        self.gate: KernelGateAdapter | None = None
        self.recovery: logic.RecoveryReport | None = None
        self.counters: collections.Counter[str] = collections.Counter()
        self._pump_task: asyncio.Task | None = None
        self._kick: asyncio.Event | None = None
        self._changed: asyncio.Event | None = None
        self._watched: list[int] = []
        self.gate_lease_s = GATE_LEASE_S
        self.runner = "local"
        self.ray_address: str | None = None
        self.ray_token: str | None = None
        self._audit_task: asyncio.Task | None = None
        self._audit_kick: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- process shell ------------------------------------------------------------------------------

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--db", required=True, help="the durable transaction log (SQLite file)")
        parser.add_argument("--workdir", help="request/result/checkpoint files (default DB.d)")
        parser.add_argument("--max-parallel", type=int, default=2, help="heavy runs at once")
        parser.add_argument("--gate-lease", type=float, default=GATE_LEASE_S,
                            help="lease of kernel reservations in seconds (renewed every third)")
        parser.add_argument("--runner", choices=("local", "ray"), default="local",
                            help="where tool runs go: local process groups, or Ray tasks (services/ttc/rayrun.py)")
        parser.add_argument("--ray-address", help="HOST:PORT of the Ray cluster's GCS (--runner ray)")
        parser.add_argument("--ray-token", help="Ray's token file (token authentication; --runner ray)")

    def configure(self, args: argparse.Namespace) -> None:
        self.db_path = os.path.abspath(args.db)
        self.workdir = args.workdir
        if args.max_parallel < 1:
            raise SystemExit("--max-parallel must be >= 1")
        self.max_parallel = args.max_parallel
        if not 0.3 <= args.gate_lease <= 3600:
            raise SystemExit("--gate-lease must lie in [0.3, 3600] seconds")
        self.gate_lease_s = args.gate_lease
        if args.runner == "ray" and not args.ray_address:
            raise SystemExit("--runner ray needs --ray-address")
        self.runner, self.ray_address, self.ray_token = args.runner, args.ray_address, args.ray_token
        self._endpoint = args.endpoint or f"ipc://{runtime_dir()}/kernel.sock"

    async def _call(self, fn: Callable, *args: Any, **kw: Any) -> Any:
        """Run ``fn`` on the manager thread (every use of the coordinator goes through here)."""
        assert self._exec is not None
        return await asyncio.get_running_loop().run_in_executor(self._exec, lambda: fn(*args, **kw))

    def _open_and_recover(self) -> logic.RecoveryReport:
        assert self.db_path is not None
        os.makedirs(os.path.dirname(self.db_path) or ".", exist_ok=True)
        endpoint = self._endpoint
        self.gate = KernelGateAdapter(lambda: Client(endpoint, timeout=GATE_TIMEOUT_S, retries=0))
        self.gate.lease_s = self.gate_lease_s
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                self.coord = Coordinator(self.db_path, gate=self.gate, audit_sink=self._on_audit,
                                         workdir=self.workdir, max_parallel=self.max_parallel,
                                         runner=self.runner, ray_address=self.ray_address,
                                         ray_token_path=self.ray_token)
                break
            except ManagerBusy:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)  # the previous manager is still exiting; its lock goes with it
        return self.coord.recover(rereserve=False)

    async def setup(self) -> None:
        if self.db_path is None:
            raise RuntimeError("TtcService needs --db")
        self._exec = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ttc-manager")
        self.recovery = await self._call(self._open_and_recover)
        r = self.recovery
        log.info("recovered %s: %d killed, %d aborted, %d retried, %d failed, %d ingested", self.db_path,
                 len(r.kills), len(r.aborted), len(r.retried), len(r.failed), len(r.ingested))
        self._kick = asyncio.Event()
        self._changed = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._audit_kick = asyncio.Event()
        self._audit_kick.set()  # forward what earlier managers left unforwarded
        # Owned: cancelled and awaited in teardown.
        self._pump_task = asyncio.get_running_loop().create_task(self._pump())
        self._audit_task = asyncio.get_running_loop().create_task(self._forward_audit())

    async def teardown(self) -> None:
        for task in (self._pump_task, self._audit_task):
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        self._unwatch()
        if self._exec is not None:
            if self.coord is not None:
                await self._call(self.coord.close)
            if self.gate is not None:
                await self._call(self.gate.close)
            self._exec.shutdown(wait=True)

    def _on_audit(self, event: dict) -> None:
        """Called on the manager thread after each decision commits: wake the forwarder."""
        self.counters["audit." + event["op"]] += 1
        if self._loop is not None and self._audit_kick is not None:
            self._loop.call_soon_threadsafe(self._audit_kick.set)

    async def _forward_audit(self) -> None:
        """Copy the durable audit table into the kernel's decision log, in order, at least once."""
        from clients.aio import AsyncClient

        assert self.coord is not None and self._audit_kick is not None
        store = self.coord.store
        source = f"ttc:{store.store_id}"
        client = AsyncClient(self._endpoint or "", timeout=GATE_TIMEOUT_S, retries=0)
        failing = False
        try:
            while True:
                await self._audit_kick.wait()
                self._audit_kick.clear()
                while True:
                    try:
                        rows = await self._call(store.unforwarded, AUDIT_BATCH, AUDIT_BATCH_BYTES)
                        if not rows:
                            break
                        out = await client.call(P.MMI_AUDIT, {"source": source, "events": rows})
                        if not isinstance(out, dict) or out.get("logged") != len(rows):
                            # The kernel keeps no decision log: the rows stay here (the source of
                            # truth) and are offered again later, never marked as forwarded.
                            self.counters["audit_not_logged"] += 1
                            log.warning("the kernel did not log %d audit record(s) (%r); retrying in %g s",
                                        len(rows), out, AUDIT_NOT_LOGGED_RETRY_S)
                            await asyncio.sleep(AUDIT_NOT_LOGGED_RETRY_S)
                            continue
                        await self._call(store.mark_forwarded, rows[-1]["seq"])
                    except Exception as exc:  # kernel away, SQLite busy: the rows wait, retried
                        self.counters["audit_forward_failures"] += 1
                        (log.debug if failing else log.warning)("audit forwarding failed (retrying): %s", exc)
                        failing = True
                        await asyncio.sleep(AUDIT_RETRY_S)
                        continue
                    failing = False
                    self.counters["audit_forwarded"] += len(rows)
        finally:
            await client.close()

    # -- the pump -----------------------------------------------------------------------------------

    def _unwatch(self) -> None:
        loop = asyncio.get_event_loop()
        for fd in self._watched:
            loop.remove_reader(fd)
        self._watched = []

    def _watch(self) -> None:
        """Wake the pump when one of our workers exits.  Invariant: readers are removed before any
        step on the manager thread, which may reap (and close) a pidfd."""
        assert self.coord is not None and self._kick is not None
        loop = asyncio.get_running_loop()
        for proc in self.coord.running().values():
            if proc.pidfd is None:  # a Ray task: the pump's STEP_INTERVAL_S polls it
                continue
            loop.add_reader(proc.pidfd, self._kick.set)
            self._watched.append(proc.pidfd)

    async def _pump(self) -> None:
        assert self.coord is not None and self._kick is not None
        assert self.gate is not None
        last_sweep = last_renew = time.monotonic()
        while True:
            self._unwatch()
            self._kick.clear()
            try:
                await self._call(self.coord.step)
                if time.monotonic() - last_sweep >= SWEEP_INTERVAL_S:
                    self.counters["orphans_killed"] += await self._call(self.coord.sweep_orphans)
                    last_sweep = time.monotonic()
                if time.monotonic() - last_renew >= self.gate.lease_s / 3:
                    await self._call(self.gate.renew)
                    last_renew = time.monotonic()
            except Exception:  # keep serving; the next step retries (the log holds every decision)
                log.exception("ttc pump step failed")
            self._watch()
            changed, self._changed = self._changed, asyncio.Event()
            assert changed is not None
            changed.set()
            try:
                await asyncio.wait_for(self._kick.wait(), STEP_INTERVAL_S)
            except asyncio.TimeoutError:
                pass

    async def _wait_decided(self, ctx: Context, call_id: str, timeout: float, stream: bool) -> logic.Outcome:
        """Wait (bounded) until the call is DONE/FAILED/ABORTED and its worker reaped; streams each
        new state as a PARTIAL when ``stream``.  Returns the outcome as it stands at the bound."""
        assert self.coord is not None
        deadline = time.monotonic() + timeout
        last = None
        while True:
            out = await self._call(self.coord.outcome, call_id)
            if stream and out.state != last:
                await ctx.partial(outcome_to_wire(out))
                last = out.state
            if out.state in logic.TERMINAL_STATES:
                return out
            left = deadline - time.monotonic()
            if left <= 0:
                return out
            changed = self._changed
            assert changed is not None
            try:
                await asyncio.wait_for(changed.wait(), min(left, 1.0))
            except asyncio.TimeoutError:
                pass
            await ctx.checkpoint()

    # -- principals ---------------------------------------------------------------------------------

    async def _own(self, ctx: Context, call_id: str) -> str:
        """``call_id`` when it is the caller's; another principal's raises exactly what an id
        that never existed does (logic's ``unknown_call``)."""
        coord = self.coord
        assert coord is not None
        row = await self._call(coord.store.one, "SELECT consumer FROM consumers WHERE call_id=? LIMIT 1", (call_id,))
        if row is not None and not row["consumer"].startswith(principal_tag(ctx.principal)):
            raise ttc_errors.UnknownCall(f"no call {call_id!r}", call_id=call_id)
        return call_id

    async def _owned_ids(self, ctx: Context) -> set[str]:
        coord = self.coord
        assert coord is not None
        rows = await self._call(coord.store.all, "SELECT DISTINCT call_id FROM consumers WHERE consumer LIKE ?",
                                (principal_tag(ctx.principal) + "%",))
        return {r["call_id"] for r in rows}

    # -- ops ----------------------------------------------------------------------------------------

    async def handle(self, ctx: Context, payload: Any) -> Any:
        if not isinstance(payload, dict) or payload.get("op") not in OPS:
            op = payload.get("op") if isinstance(payload, dict) else None
            raise errors.BadRequest(f"ttc takes a map with 'op' in {list(OPS)}, got op {op!r}")
        op = payload["op"]
        self.counters["op." + op] += 1
        coord = self.coord
        assert coord is not None
        if op == "prepare":
            job = ctx.job or "default"
            idem = payload.get("idem")
            if idem is not None and not isinstance(idem, str):
                raise errors.BadRequest(f"'idem' must be a string, got {idem!r}")
            if idem is not None:
                idem = scoped_name(ctx, "idem_key", idem)
            consumers = payload.get("consumers", ())
            if isinstance(consumers, (list, tuple)):  # logic refuses anything else with its own message
                consumers = [scoped_name(ctx, "consumer", c) for c in consumers]

            def prepare() -> str:
                assert self.gate is not None
                self.gate.job = job
                return coord.prepare(payload.get("tool"), payload.get("inputs"), payload.get("est_cost"),
                                     consumers, payload.get("timeout", DEFAULT_PREPARE_TIMEOUT_S), idem)

            call_id = await self._call(prepare)
            return outcome_to_wire(await self._call(coord.outcome, call_id))
        if op == "commit":
            call_id = await self._own(ctx, _need(payload, "call_id", str))
            idem = payload.get("idem")
            if idem is not None and not isinstance(idem, str):
                raise errors.BadRequest(f"'idem' must be a string, got {idem!r}")
            if idem is not None:
                idem = scoped_name(ctx, "idem_key", idem)
            wait = bool(payload.get("wait", False))
            bound = _wait_bound(payload)
            out = await self._call(coord.commit, call_id, idem)
            if self._kick is not None:
                self._kick.set()
            if wait:
                out = await self._wait_decided(ctx, call_id, bound, stream=True)
            return outcome_to_wire(out)
        if op == "abort":
            call_id = await self._own(ctx, _need(payload, "call_id", str))
            reason = payload.get("reason", "requested")
            if not isinstance(reason, str) or not reason or len(reason) > 200:
                raise errors.BadRequest(f"'reason' must be a short string, got {reason!r}")
            await self._call(coord.abort, call_id, reason)
            return outcome_to_wire(await self._call(coord.outcome, call_id))
        if op == "withdraw":
            consumer = scoped_name(ctx, "consumer", _need(payload, "consumer", str))
            return {"aborted": await self._call(coord.withdraw, consumer)}
        if op == "subscribe":
            call_id = await self._own(ctx, _need(payload, "call_id", str))
            await self._call(coord.subscribe, call_id, scoped_name(ctx, "consumer", _need(payload, "consumer", str)))
            return {"ok": True}
        if op == "status":
            return outcome_to_wire(await self._call(coord.outcome, await self._own(ctx, _need(payload, "call_id", str))))
        if op == "result":
            call_id = await self._own(ctx, _need(payload, "call_id", str))
            if payload.get("wait"):
                return outcome_to_wire(await self._wait_decided(ctx, call_id, _wait_bound(payload), stream=False))
            return outcome_to_wire(await self._call(coord.outcome, call_id))
        if op == "deliver":
            deliveries = await self._call(coord.deliver, scoped_name(ctx, "consumer", _need(payload, "consumer", str)))
            return {"deliveries": [{"call_id": d.call_id, "ok": d.ok, "value": d.value, "error": d.error,
                                    "delivered_count": d.delivered_count} for d in deliveries]}
        if op == "attach":
            call_id = await self._own(ctx, _need(payload, "call_id", str))
            attached = await self._call(coord.attach, call_id, scoped_name(ctx, "consumer", _need(payload, "consumer", str)))
            return {"attached": attached}
        if op == "audit":
            call_id = payload.get("call_id")
            since = payload.get("since", 0)
            if call_id is not None and not isinstance(call_id, str) or isinstance(since, bool) \
                    or not isinstance(since, int):
                raise errors.BadRequest("audit takes an optional string 'call_id' and an integer 'since'")
            if call_id is not None:
                try:
                    await self._own(ctx, call_id)
                except ttc_errors.UnknownCall:
                    return {"events": []}  # what an id that never existed lists
            rows = await self._call(coord.store.audit_log, call_id)
            mine = await self._owned_ids(ctx)
            # The manager's own decisions (recover, sweeps: no call id) and the caller's calls'.
            return {"events": [r for r in rows if r["seq"] > since and (r.get("call_id") is None
                                                                       or r["call_id"] in mine)]}
        # stats
        r = self.recovery or logic.RecoveryReport()
        return {"pid": os.getpid(), "manager_id": coord.manager_id, "running": len(coord.running()),
                "counters": dict(self.counters),
                "recovery": {"kills": len(r.kills), "aborted": len(r.aborted), "retried": len(r.retried),
                             "failed": len(r.failed), "ingested": len(r.ingested)},
                "gate": {"held": len(self.gate.held) if self.gate else 0,
                         "refusals": self.gate.refusals if self.gate else 0,
                         "retaken": self.gate.retaken if self.gate else 0,
                         "leases_lost": self.gate.leases_lost if self.gate else 0},
                "audit_forwarded_seq": await self._call(coord.store.forwarded)}
