"""``cpcs``: the critical-path compute scheduler as a service (the shell around
:class:`services.cpcs.logic.Scheduler`).

Request payload::

    {"dag": {...},                 # services.cpcs.dag document
     "policy": "cpcs",             # or "heft", "fifo" (the peers, on the same machinery)
     "tick_ms": 100,               # 50..1000
     "params": {...}}              # services.cpcs.logic.Params fields

Before anything runs the DAG is validated and every service it names is looked up in the
kernel (per-worker names ``<service>@<k>`` give exact placement; a plain service is placed by
the kernel up to its capacity); any defect is a ``bad_request`` and nothing is dispatched.  Then
every tick (and at once whenever a task ends) the scheduler decides; this shell carries its orders
out through the kernel: task requests charged to the caller's job (critical ones at a higher
kernel priority), ``mmi.preempt`` / ``mmi.resume`` by the task's kernel token, ``mmi.cancel``
of a straggling attempt the scheduler restarts (its late replies are dropped), ``mmi.proc.nice``
of worker processes.  Decisions stream to the caller as PARTIALs ``{"t", "decisions",
"critical_path", "eta_makespan_s"}`` and go to the kernel's decision log (``mmi.audit``, source
``cpcs``).  FINAL: the scheduler's summary, ``events`` (the whole timeline, from which
:mod:`services.cpcs.gantt` draws the chart), ``tick_cpu_s`` (process CPU time spent deciding) and
``results`` (task id -> the FINAL payload of its successful attempt: the caller needs no read-back)
and ``where`` (worker -> where its first task said it runs, ``{"placement", "host"}``).

Workers on a Ray cluster (``work`` with ``placement = "ray"``, services/cpcs/cluster.py) are
dispatched to exactly as local ones: they register as ``work@<r>`` over tcp:// + CURVE.  A worker
whose tasks report a placement other than ``local`` gets no OS-priority orders (renice, CPU
affinity act on this host's processes; the kernel refuses them for a remote child): they are
recorded as ``order_skipped`` events instead.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from typing import Any

from kernel import errors
from kernel import protocol as P
from services.base import Context
from services.common import BusService
from services.cpcs.dag import Dag, DagError, parse_dag
from services.cpcs.logic import POLICIES, Action, Params, Scheduler, Worker

log = logging.getLogger("reca.cpcs")

#: Bound on the silence of one task's reply stream (a paused task is silent), seconds.
TASK_SILENCE_S = 600.0
#: Decision-log batches: at most this many events per mmi.audit call, at least this often (s).
AUDIT_BATCH = 512
AUDIT_EVERY_S = 1.0
#: How often dead workers are looked up again (s).
REDISCOVER_S = 0.25
#: Error codes that are the infrastructure's fault (the attempt is re-run, not counted).
INFRA_CODES = frozenset({P.ErrorCode.WORKER_DIED.value, P.ErrorCode.UNAVAILABLE.value, P.ErrorCode.TIMEOUT.value})
#: Error codes that end the whole run (the job's budget, an operator's cancel).
FATAL_CODES = frozenset({P.ErrorCode.BUDGET_EXCEEDED.value, P.ErrorCode.CANCELLED.value,
                         P.ErrorCode.DEADLINE.value})


def parse_request(payload: Any) -> tuple[Dag, str, float, Params]:
    """Validate the request; :class:`DagError` (``bad_request``) on any defect."""
    if not isinstance(payload, dict):
        raise DagError("a cpcs request is a map with a 'dag'", reason="type")
    dag = parse_dag(payload.get("dag"))
    policy = payload.get("policy", "cpcs")
    if policy not in POLICIES:
        raise DagError(f"unknown policy {policy!r}; one of {', '.join(POLICIES)}", reason="policy")
    tick_ms = payload.get("tick_ms", 100)
    if isinstance(tick_ms, bool) or not isinstance(tick_ms, (int, float)) or not 10 <= tick_ms <= 1000:
        raise DagError("'tick_ms' must be a number in [10, 1000]", reason="range")
    raw = payload.get("params") or {}
    fields = {f.name for f in dataclasses.fields(Params)}
    if not isinstance(raw, dict) or set(raw) - fields:
        raise DagError(f"'params' may only set {sorted(fields)}", reason="params")
    if "all_cpus" not in raw and "off_path_cpus" not in raw:
        cpus = tuple(sorted(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else ()
        if len(cpus) >= 2:  # off-path work keeps one CPU; critical work may use all of them
            raw = {**raw, "all_cpus": cpus, "off_path_cpus": cpus[-1:]}
    try:
        params = Params(**{k: tuple(v) if k.endswith("cpus") and isinstance(v, list) else v for k, v in raw.items()})
    except TypeError as exc:
        raise DagError(f"bad params: {exc}", reason="params") from None
    return dag, policy, tick_ms / 1000.0, params


#: Most pages of ``mmi.stats`` read for one lookup (STATS_PAGE services each).
MAX_STATS_PAGES = 100


async def all_stats(client: Any) -> dict:
    """``mmi.stats`` with every page of services merged (issue 24: names made up by others sort
    before a DAG's service and pushed it off page 0, so it was refused as unserved)."""
    stats = await client.call(P.MMI_STATS, {"page": 0}, retries=0)
    pages = min(int(stats.get("summary", {}).get("pages", 1) or 1), MAX_STATS_PAGES)
    services = dict(stats.get("services", {}))
    for page in range(1, pages):
        more = await client.call(P.MMI_STATS, {"page": page}, retries=0)
        services.update(more.get("services", {}))
    return {**stats, "services": services}


def places(stats: dict, dag: Dag) -> tuple[list[Worker], dict[str, int]]:
    """Where each service the DAG names can run, from ``mmi.stats``: the service itself with its
    total capacity (the kernel places), else its per-worker names ``<service>@<k>`` (exact
    placement: a service registered only under such names, as ``work`` is).
    A service with neither is a :class:`DagError` (``unavailable_service``)."""
    services = stats.get("services", {})
    capacity: dict[str, int] = {}
    for w in stats.get("workers", []):
        capacity[w["service"]] = capacity.get(w["service"], 0) + int(w.get("capacity", 1))
    workers: list[Worker] = []
    pools: dict[str, int] = {}
    for svc in sorted(dag.services()):
        mine = sorted(n for n, s in services.items() if n.startswith(f"{svc}@") and s.get("workers", 0) > 0)
        if services.get(svc, {}).get("workers", 0) > 0:
            # served under its own name (``<svc>@<x>`` names, if any, are something else: sim's
            # per-process control facade): the kernel places its requests
            pools[svc] = capacity.get(svc, 1)
        elif mine:
            workers += [Worker(n, svc, hold=max(1, capacity.get(n, 1))) for n in mine]
        else:
            raise DagError(f"no worker serves {svc!r}: a task names an unavailable service",
                           reason="unavailable_service", service=svc)
    return workers, pools


class _Run:
    """One DAG run: the loop that ticks the scheduler and carries out its orders."""

    def __init__(self, svc: "CpcsService", ctx: Context, sch: Scheduler, tick_s: float) -> None:
        assert svc.client is not None
        self.client = svc.client
        self.ctx = ctx
        self.sch = sch
        self.tick_s = tick_s
        self.calls: dict[str, asyncio.Task] = {}
        self.tokens: dict[str, bytes] = {}  # task -> kernel token of its attempt in flight
        self.results: dict[str, Any] = {}
        self.wake = asyncio.Event()
        self.fatal: errors.RecaError | None = None
        self.audited = 0
        self.streamed = 0
        self.tick_cpu = 0.0
        self.last_audit = time.monotonic()
        self.auditing: asyncio.Future | None = None
        self.last_rediscover = 0.0
        self.where: dict[str, dict] = {}

    async def execute(self) -> dict:
        sch = self.sch
        try:
            while not sch.finished and self.fatal is None:
                await self.ctx.checkpoint()
                now = time.monotonic()
                c0 = time.process_time()
                actions = sch.tick(now)
                self.tick_cpu += time.process_time() - c0
                for a in actions:
                    await self._carry_out(a)
                await self._report(now)
                if any(not w.alive for w in sch.workers.values()) and now - self.last_rediscover > REDISCOVER_S:
                    await self._rediscover(now)
                self.wake.clear()
                try:
                    await asyncio.wait_for(self.wake.wait(), self.tick_s)
                except asyncio.TimeoutError:
                    pass
        finally:
            await self._stop_calls()
            if self.auditing is not None:
                await asyncio.gather(self.auditing, return_exceptions=True)
            await self._audit(force=True)
        if self.fatal is not None:
            raise self.fatal
        now = time.monotonic()
        out = sch.summary(now)
        out.update(events=sch.events, tick_cpu_s=self.tick_cpu, results=self.results, where=self.where)
        return out

    # -- orders -----------------------------------------------------------------------------------

    async def _carry_out(self, a: Action) -> None:
        t = self.sch.tasks.get(a.task)
        if a.op in ("nice", "affinity") and self.where.get(a.worker, {}).get("placement", "local") != "local":
            self.sch.events.append({"t": round(time.monotonic() - self.sch.t0, 6), "ev": "order_skipped",
                                    "op": a.op, "task": a.task, "worker": a.worker, "why": "remote"})
            return
        try:
            if a.op == "dispatch":
                self.calls[a.task] = asyncio.ensure_future(self._call(a.task, a.worker, a.attempt))
            elif a.op == "restart":
                await self._abandon(a.task)
            elif a.op in ("preempt", "resume") and t is not None and t.token:
                op = P.MMI_PREEMPT if a.op == "preempt" else P.MMI_RESUME
                await self.client.call(op, {"token": t.token, "service": a.worker}, retries=0)
            elif a.op == "nice":
                child = self.sch.workers[a.worker].child
                await self.client.call(P.MMI_PROC_NICE, {"child": child, "nice": a.nice}, retries=0)
            elif a.op == "affinity":
                child = self.sch.workers[a.worker].child
                await self.client.call(P.MMI_PROC_AFFINITY, {"child": child, "cpus": list(a.cpus)}, retries=0)
        except errors.RecaError as exc:  # the task ended meanwhile, or no such child: logged, not fatal
            self.sch.events.append({"t": round(time.monotonic() - self.sch.t0, 6), "ev": "order_failed",
                                    "op": a.op, "task": a.task, "worker": a.worker, "code": exc.code})

    async def _abandon(self, tid: str) -> None:
        """Cancel the attempt of ``tid`` in flight (the scheduler restarted it): by its kernel
        token, so its worker stops at its next safe point; the call's late replies are dropped
        (``_call`` checks the attempt)."""
        call = self.calls.pop(tid, None)
        token = self.tokens.pop(tid, b"")
        if call is not None:
            call.cancel()
        if token:
            await self.client.call(P.MMI_CANCEL, {"token": token}, retries=0)

    async def _call(self, tid: str, worker: str, attempt: int) -> None:
        sch = self.sch
        spec = sch.tasks[tid].spec
        me = asyncio.current_task()
        payload = spec.payload
        if isinstance(payload, dict) and isinstance(payload.get("attempts"), list):
            # A drawn outcome per attempt (workloads with failures): pick this attempt's.
            outcomes = payload["attempts"]
            payload = {**{k: v for k, v in payload.items() if k != "attempts"},
                       **outcomes[min(attempt, len(outcomes)) - 1]}
        priority = 10 if tid in sch.critical else 0
        started = False
        try:
            async for reply in self.client.stream(worker, payload, job=self.ctx.job, priority=priority,
                                                  timeout=TASK_SILENCE_S, retries=0,
                                                  on_behalf=self.ctx.principal or None):
                now = time.monotonic()
                if sch.tasks[tid].attempt != attempt or sch.tasks[tid].worker != worker:
                    return  # an abandoned (restarted) attempt: its replies no longer count
                body = reply.payload if isinstance(reply.payload, dict) else {}
                if not started:
                    started = True
                    token = body.get("kernel_token", b"")
                    if isinstance(token, bytes):
                        self.tokens[tid] = token
                    sch.on_started(tid, now, token=token if isinstance(token, bytes) else b"", worker=worker)
                    child = body.get("child")
                    if isinstance(child, str) and child and worker in sch.workers:
                        sch.workers[worker].child = child
                    where = body.get("where")
                    if isinstance(where, dict):
                        self.where[worker] = {k: str(where[k]) for k in ("placement", "host") if k in where}
                if reply.final:
                    if reply.status == P.STATUS_ERROR:
                        code = str((reply.raw.get(P.S_ERROR) or {}).get("code", "error"))
                        self._ended(tid, now, ok=False, code=code)
                    else:
                        self.results[tid] = reply.payload
                        self._ended(tid, now, ok=True)
                    return
                if reply.status == P.STATUS_PAUSED:
                    sch.on_paused(tid, now)
                elif reply.status == P.STATUS_RESUMED:
                    sch.on_resumed(tid, now)
                else:
                    frac = body.get("progress")
                    if frac is None and spec.steps and isinstance(body.get("i"), int):
                        frac = (body["i"] + 1) / spec.steps
                    hint = body.get("p_success")
                    if isinstance(frac, (int, float)) and not isinstance(frac, bool):
                        sch.on_progress(tid, float(frac), now,
                                        p_hint=float(hint) if isinstance(hint, (int, float)) else None)
        except errors.RecaError as exc:
            if sch.tasks[tid].attempt == attempt and sch.tasks[tid].worker == worker:
                self._ended(tid, time.monotonic(), ok=False, code=exc.code)
        finally:
            if self.calls.get(tid) is me:
                self.calls.pop(tid, None)

    def _ended(self, tid: str, now: float, *, ok: bool, code: str = "") -> None:
        if code in FATAL_CODES and self.fatal is None:
            self.fatal = errors.from_wire({"code": code, "message": f"task {tid} ended {code}: the run stops"})
        self.sch.on_finished(tid, now, ok=ok, code=code, infra=code in INFRA_CODES)
        self.wake.set()

    async def _stop_calls(self) -> None:
        for tid, task in list(self.calls.items()):
            t = self.sch.tasks[tid]
            if t.token:
                try:
                    await self.client.call(P.MMI_CANCEL, {"token": t.token}, retries=0)
                except errors.RecaError:
                    pass
            task.cancel()
        if self.calls:
            await asyncio.gather(*self.calls.values(), return_exceptions=True)

    async def _rediscover(self, now: float) -> None:
        self.last_rediscover = now
        try:
            stats = await all_stats(self.client)
        except errors.RecaError:
            return
        services = stats.get("services", {})
        for w in self.sch.workers.values():
            if not w.alive and services.get(w.name, {}).get("workers", 0) > 0:
                self.sch.worker_up(w.name)
                self.sch.events.append({"t": round(now - self.sch.t0, 6), "ev": "worker_up", "worker": w.name})

    # -- reporting --------------------------------------------------------------------------------

    async def _report(self, now: float) -> None:
        sch = self.sch
        new = sch.events[self.streamed:]
        if new:
            self.streamed = len(sch.events)
            await self.ctx.partial({"t": round(now - sch.t0, 6), "decisions": new,
                                    "critical_path": list(sch.critical),
                                    "eta_makespan_s": round(sch.expected_makespan(now), 6)})
        if now - self.last_audit >= AUDIT_EVERY_S and (self.auditing is None or self.auditing.done()):
            # in the background: a slow kernel answer must not hold up the next decision
            self.auditing = asyncio.ensure_future(self._audit())

    async def _audit(self, force: bool = False) -> None:
        self.last_audit = time.monotonic()
        while self.audited < len(self.sch.events):
            batch = self.sch.events[self.audited:self.audited + AUDIT_BATCH]
            try:
                await self.client.call(P.MMI_AUDIT, {"source": "cpcs", "events": batch}, retries=0)
            except errors.RecaError as exc:
                log.warning("decision log refused %d events: %s", len(batch), exc)
                if not force:
                    return
            self.audited += len(batch)


class CpcsService(BusService):
    name = "cpcs"
    capacity = 4
    call_timeout = 10.0

    def __init__(self) -> None:
        super().__init__()
        self.tick_ms = 100.0

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--tick-ms", type=float, default=self.tick_ms)

    def configure(self, args: Any) -> None:
        super().configure(args)
        self.tick_ms = args.tick_ms

    async def handle(self, ctx: Context, payload: Any) -> Any:
        if isinstance(payload, dict) and "tick_ms" not in payload:
            payload = {**payload, "tick_ms": self.tick_ms}
        dag, policy, tick_s, params = parse_request(payload)
        assert self.client is not None
        workers, pools = places(await all_stats(self.client), dag)
        for w in workers:
            if policy != "cpcs":
                w.hold = 1  # the peers never pause: one task per worker
        sch = Scheduler(dag, workers, time.monotonic(), policy=policy, pools=pools, params=params)
        return await _Run(self, ctx, sch, tick_s).execute()
