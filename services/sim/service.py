"""``sim``: the simulation worker's process shell (see :mod:`services.sim`)."""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import logging
import os
import time
from typing import Any

from kernel import errors
from kernel import protocol as P
from kernel.config import runtime_dir
from services.base import Context, Service, WorkerRuntime
from services.sim.logic import (
    CACHEABLE_STATUS,
    FidelityOrder,
    RunState,
    cache_key,
    parse_order,
    parse_run,
    report_to_wire,
)
from sims import cases

log = logging.getLogger("reca.sim")

#: Finished runs whose summaries ``status`` can still report.
FINISHED_KEPT = 256
#: Results the result cache keeps (least recently used dropped first).
CACHE_KEPT = 512
#: Slice of a controlled run's wait for its order, between two safe points, seconds.
ORDER_POLL = 0.05


class _ControlFacade(Service):
    """The per-worker name (``sim@<pid>``): reaches exactly the worker holding a run, for fidelity
    orders and status (MDP routes by service name, and a run lives in one worker's memory)."""

    def __init__(self, owner: "SimService") -> None:
        self.owner = owner
        self.name = owner.control_name
        self.capacity = 64

    async def handle(self, ctx: Context, payload: Any) -> Any:
        op = payload.get("op") if isinstance(payload, dict) else None
        if op not in ("fidelity", "status"):
            raise errors.BadRequest(f"{self.name} takes 'fidelity' and 'status' ops, got {op!r}")
        return await self.owner.handle(ctx, payload)


class SimService(Service):
    """Ops (``payload["op"]``, default ``run``):

    * ``run``: run a case step by step (keys: see :func:`services.sim.logic.parse_run`).  Every
      ``report_every`` steps (and on the last) a PARTIAL with the step's wire report; every step
      charges its cell updates as ``flops`` and passes a safe point, where preempt / resume /
      cancel apply.  ``controlled``: after each step wait (bounded) for an order of that step.  A
      run that goes unstable (NaN, negative depth) stops at once and answers
      ``status: "unstable"``.  The FINAL is the run's summary with a digest of its final state.
    * ``fidelity``: queue an order for a live run (``run``, ``step``, ``refine``, ``coarsen``,
      ``dt_factor``, ``halt``).  The same order may arrive on the control topic
      ``ctl/sim/fidelity`` (:meth:`on_control`).
    * ``status``: a live run's state or a finished run's summary.
    * ``cases``: the case names.

    **Result cache** (``"cache": true`` on an anonymous, uncontrolled ``run``): the same request
    never runs twice on this worker.  The key is the canonical request
    (:func:`services.sim.logic.cache_key`: every case parameter with defaults filled, the grid,
    the initial levels and state digest, end time, dt factor, step cap), so a request that differs
    in any parameter is never served another's result.  A hit answers the stored summary at once
    (``cached: true``, ``cached_from``: the run that computed it, ``run``: this request's id), sends
    no PARTIAL and charges no FLOPs: nothing was computed.  An identical request arriving while
    the first is running waits for it (single flight) and is served its summary; if the first ends
    uncacheably (preempted, cancelled, an order applied) the waiter runs itself.  Only a run that
    ended ``finished``, ``max_steps`` or ``unstable`` with no order applied is stored.  Counters:
    ``status`` with no run reports ``cache`` (hits, misses, stored).
    """

    name = "sim"
    capacity = 4

    def __init__(self) -> None:
        self.runs: dict[str, RunState] = {}
        self.finished: collections.OrderedDict[str, dict] = collections.OrderedDict()
        self.control_name = f"{self.name}@{os.getpid()}"
        self.rejected_controls = 0
        self._ids = itertools.count(1)
        self._endpoint: str | None = None
        self._heartbeat = P.HEARTBEAT_INTERVAL
        self._liveness = P.LIVENESS
        self._facade_task: asyncio.Task | None = None
        self._facade: WorkerRuntime | None = None
        self._wakers: dict[str, asyncio.Event] = {}
        self.cache: collections.OrderedDict[str, dict] = collections.OrderedDict()
        self._inflight: dict[str, asyncio.Future] = {}
        self.cache_stats = {"hits": 0, "misses": 0, "stored": 0}

    # -- process life -----------------------------------------------------------------------------

    def configure(self, args: argparse.Namespace) -> None:
        self.control_name = f"{self.name}@{os.getpid()}"
        self._endpoint = args.endpoint or f"ipc://{runtime_dir()}/kernel.sock"
        self._heartbeat, self._liveness = args.heartbeat, args.liveness

    async def setup(self) -> None:
        if self._endpoint is None:
            return  # in-process use (tests of the pure shell): no second registration
        self._facade = WorkerRuntime(_ControlFacade(self), self._endpoint, None,
                                     heartbeat=self._heartbeat, liveness=self._liveness)
        self._facade_task = asyncio.get_running_loop().create_task(self._facade.run())  # awaited in teardown

    async def teardown(self) -> None:
        if self._facade is not None and self._facade_task is not None:
            self._facade.stop()
            await asyncio.wait_for(self._facade_task, P.SHUTDOWN_TIMEOUT)

    # -- requests ---------------------------------------------------------------------------------

    async def handle(self, ctx: Context, payload: Any) -> Any:
        op = payload.get("op", "run") if isinstance(payload, dict) else None
        if op == "run":
            return await self._run(ctx, payload)
        if op == "fidelity":
            order = parse_order(payload, self._nblocks())
            self._submit(order)
            return {"queued": True, "run": order.run_id}
        if op == "status":
            return self._status(payload.get("run"))
        if op == "cases":
            return sorted(cases.CASES)
        raise errors.BadRequest(f"unknown op {op!r}; sim takes run, fidelity, status, cases")

    def on_control(self, op: str, message: dict) -> None:
        """``ctl/sim/fidelity`` orders: the same map as the ``fidelity`` op.  An order that names
        no run held here is ignored (another worker holds it); a malformed one is counted."""
        if op != P.ControlOp.FIDELITY.value:
            return
        try:
            order = parse_order(message, self._nblocks())
        except errors.Refused:
            return
        except errors.BadRequest as exc:
            self.rejected_controls += 1
            log.warning("fidelity control rejected: %s", exc.message)
            return
        self._submit(order)

    def _submit(self, order: FidelityOrder) -> None:
        self.runs[order.run_id].submit(order)
        waker = self._wakers.get(order.run_id)
        if waker is not None:
            waker.set()

    def _nblocks(self) -> dict[str, int]:
        return {rid: r.sim.spec.nblocks for rid, r in self.runs.items()}

    def _status(self, run_id: Any) -> dict:
        if run_id is None:
            return {"runs": sorted(self.runs), "cache": dict(self.cache_stats, size=len(self.cache))}
        if run_id in self.runs:
            r = self.runs[run_id]
            return r.summary("running") | {"pending_orders": len(r.pending)}
        if run_id in self.finished:
            return self.finished[run_id]
        raise errors.Refused(f"unknown run {run_id!r}", run=run_id)

    async def _run(self, ctx: Context, payload: dict) -> dict:
        run_id = payload.get("run") or f"{self.control_name}-{next(self._ids)}"
        if not isinstance(run_id, str):
            raise errors.BadRequest("run must be a string id")
        if run_id in self.runs or run_id in self.finished:
            raise errors.BadRequest(f"run id {run_id!r} already used on this worker")
        spec, sim = parse_run(payload, run_id)
        key = cache_key(payload, spec, sim)
        if key is None:
            return await self._execute(ctx, spec, sim)
        while True:
            hit = self.cache.get(key)
            if hit is not None:
                self.cache.move_to_end(key)
                self.cache_stats["hits"] += 1
                out = dict(hit, run=run_id, cached=True, cached_from=hit["run"])
                self._keep_finished(run_id, out)
                return out
            pending = self._inflight.get(key)
            if pending is None:
                break
            while not pending.done():  # the identical run in flight (then look again), waiting at
                await ctx.checkpoint()  # safe points: a cancel or budget ends the wait, not the worker
                await asyncio.wait({pending}, timeout=ORDER_POLL)
        self.cache_stats["misses"] += 1
        done = self._inflight[key] = asyncio.get_running_loop().create_future()
        try:
            summary = await self._execute(ctx, spec, sim)
            state_ok = summary.get("status") in CACHEABLE_STATUS and summary.get("orders_applied") == 0
            if state_ok:
                self.cache[key] = summary
                self.cache_stats["stored"] += 1
                while len(self.cache) > CACHE_KEPT:
                    self.cache.popitem(last=False)
            return summary
        finally:
            del self._inflight[key]
            done.set_result(None)  # waiters look again: a hit, or they run themselves

    async def _execute(self, ctx: Context, spec: Any, sim: Any) -> dict:
        run_id = spec.run_id
        state = self.runs[run_id] = RunState(spec, sim)
        self._wakers[run_id] = asyncio.Event()
        summary: dict | None = None
        try:
            summary = await self._loop(ctx, state)
            return summary
        finally:
            self.runs.pop(run_id, None)
            self._wakers.pop(run_id, None)
            self._keep_finished(run_id, summary or state.summary("aborted"))

    def _keep_finished(self, run_id: str, summary: dict) -> None:
        self.finished[run_id] = summary
        while len(self.finished) > FINISHED_KEPT:
            self.finished.popitem(last=False)

    async def _loop(self, ctx: Context, state: RunState) -> dict:
        spec, sim = state.spec, state.sim
        while True:
            await ctx.checkpoint()
            state.apply_pending()
            if state.halt_requested:
                return state.summary("halted", "halt ordered by the controller")
            if sim.finished:
                return state.summary("finished")
            if sim.steps >= spec.max_steps:
                return state.summary("max_steps", f"stopped after max_steps={spec.max_steps}")
            # The step runs in a thread so heartbeats continue; orders are applied only above.
            report = await asyncio.to_thread(sim.step)
            ctx.charge(flops=report.cell_updates)
            last = report.status != "ok"
            if spec.controlled or last or report.step % spec.report_every == 0:
                await ctx.partial(report_to_wire(spec.run_id, self.control_name, report))
            if report.status == "unstable":
                return state.summary("unstable", f"halted at step {report.step}, t={report.time:.6g}: "
                                                 f"{', '.join(report.breaches)}")
            if spec.controlled and report.status == "ok":
                await self._wait_order(ctx, state, report.step)

    async def _wait_order(self, ctx: Context, state: RunState, step: int) -> None:
        """Wait, passing a safe point every ``ORDER_POLL`` s, until the controller's order for
        ``step`` arrived; :class:`kernel.errors.Timeout` after the run's ``order_timeout``."""
        deadline = time.monotonic() + state.spec.order_timeout
        waker = self._wakers[state.spec.run_id]
        while state.acked_step < step:
            left = deadline - time.monotonic()
            if left <= 0:
                raise errors.Timeout(f"run {state.spec.run_id!r}: no fidelity order for step {step} within "
                                     f"{state.spec.order_timeout:g} s")
            await ctx.checkpoint()
            waker.clear()
            if state.acked_step >= step:
                break
            try:
                await asyncio.wait_for(waker.wait(), min(ORDER_POLL, left))
            except asyncio.TimeoutError:
                pass
