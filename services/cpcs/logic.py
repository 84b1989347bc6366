"""The critical-path compute scheduler as a pure state machine (time passed in, no sockets).

:class:`Scheduler` holds one DAG run.  The shell feeds it observations (``on_started``,
``on_progress``, ``on_paused``, ``on_resumed``, ``on_finished``) and calls :meth:`tick` every
50-200 ms; ``tick`` answers the :class:`Action` list the shell carries out through the kernel
(dispatch a task to a worker, ``mmi.preempt`` / ``mmi.resume`` a running one, renice a worker
process and set its CPU affinity through ``mmi.proc``) and every decision is recorded as an event (:attr:`Scheduler.events`) for the kernel's
decision log, from which :mod:`services.cpcs.gantt` draws the run.

Policies (``policy``):

* ``fifo``: dispatch ready tasks in the planner's order to free workers; no preemption, no
  re-estimation (a plan-following agent).
* ``heft``: static list schedule by upward rank (HEFT on identical workers) computed once from
  the planner's ETAs; no preemption, no re-estimation.
* ``cpcs``: every tick, re-estimate each task's run time (from its own progress and from the
  observed bias of its kind) and success probability (per-kind Beta posterior, verifier hints),
  rank tasks by *expected* remaining bottom level (own expected work ``eta / p`` plus the longest
  expected path below it), take the dynamic critical path from the top-ranked frontier task, give
  free workers to the highest ranks, and preempt off-path work when a higher-ranked task would
  otherwise wait long enough to matter; restart a straggling attempt (its measured rate says it
  takes ``restart_factor`` times the slowest finished task of its kind) once, on a free worker.

Invariants: a worker runs at most one unpaused task and holds at most ``hold`` tasks (the rest
paused at a safe point; a paused task can continue only on its own worker, where its state is);
a task is dispatched only when all its deps are DONE; a task's attempts never exceed
``max_attempts`` (infrastructure failures -- a dead worker -- are retried without counting, at
most ``MAX_INFRA_RETRIES`` times); a restart is a new attempt, so it too stays within
``max_attempts``, and a task is restarted at most ``max_restarts`` times.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any

from services.cpcs.dag import Dag, TaskSpec

POLICIES = ("cpcs", "heft", "fifo")
#: Infrastructure retries (worker died, unavailable) per task before it is failed.
MAX_INFRA_RETRIES = 5
#: Progress fraction after which a task's own measured rate is trusted fully over its estimate.
F_TRUST = 0.1
#: A running task with no progress report is expected to run at least this factor of what it ran.
NO_PROGRESS_GROWTH = 1.25
#: Pseudo-count of the planner's p_success against observed outcomes of the same kind.
P_PRIOR_WEIGHT = 4.0


class St(str, enum.Enum):
    WAITING = "waiting"  # deps not done
    READY = "ready"
    DISPATCHED = "dispatched"  # sent; not yet started on a worker
    RUNNING = "running"
    PAUSED = "paused"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"  # an ancestor failed


ACTIVE = (St.DISPATCHED, St.RUNNING, St.PAUSED)


@dataclasses.dataclass
class Action:
    """One order for the shell: ``dispatch`` (task, worker, attempt), ``preempt`` / ``resume``
    (task), ``restart`` (task, worker, the attempt to cancel: its outcome is no longer wanted),
    ``nice`` (worker, nice), ``affinity`` (worker, cpus)."""

    op: str
    task: str = ""
    worker: str = ""
    attempt: int = 0
    nice: int = 0
    cpus: tuple[int, ...] = ()


@dataclasses.dataclass
class Worker:
    """A place tasks run: ``name`` is the service name the shell dispatches to (``work@0``);
    ``pool`` the service tasks name (``work``); ``child`` the supervised process (for renice)."""

    name: str
    pool: str
    child: str = ""
    hold: int = 1
    alive: bool = True
    nice: int = 0
    cpus: tuple[int, ...] = ()  # () = as started (every CPU)


@dataclasses.dataclass
class TaskState:
    spec: TaskSpec
    st: St = St.WAITING
    attempt: int = 0  # attempts started (counted ones)
    failures: int = 0
    infra: int = 0
    worker: str = ""
    token: bytes = b""
    dispatched_at: float = 0.0
    run_s: float = 0.0  # running time of the current attempt, pauses excluded
    run_mark: float | None = None  # when the current unpaused run segment began
    progress: float = 0.0
    progress_run: float = 0.0  # running time when ``progress`` was reported
    p_hint: float | None = None
    preemptions: int = 0
    finished_at: float = 0.0
    replanned: bool = False
    redo: bool = False
    restarts: int = 0

    def running_s(self, now: float) -> float:
        return self.run_s + (now - self.run_mark if self.run_mark is not None else 0.0)


@dataclasses.dataclass
class Params:
    """Tunable knobs of the ``cpcs`` policy (chosen on training DAGs, see bench/cpcs.py)."""

    #: Preempt only when the top ready task would otherwise wait at least this long (seconds)...
    min_wait_s: float = 0.05
    #: ...and at least this fraction of its own expected run time...
    min_wait_frac: float = 0.25
    #: ...and the victim's rank plus the waiting task's own run is below the waiting task's rank
    #: by this fraction of the latter (the victim has slack for the wait it is given).
    rank_margin: float = 0.1
    #: Never preempt a task more often than this.
    max_preemptions: int = 3
    #: Renice workers: critical-path hosts get ``nice_critical``, others ``nice_other``.
    renice: bool = True
    nice_critical: int = 0
    nice_other: int = 5
    #: CPU affinity: critical hosts on ``all_cpus``, the others on ``off_path_cpus`` (both empty:
    #: affinity left alone).  The shell fills them from the machine (the last CPU for off-path work).
    all_cpus: tuple[int, ...] = ()
    off_path_cpus: tuple[int, ...] = ()
    #: Use p_success (expected durations) in ranks; False ranks by ETA alone.
    expected: bool = True
    #: Restart a running attempt (cancel it, run the task again) when its measured rate says it
    #: takes more than this factor times the slowest finished task of its kind (scaled to its
    #: estimate), and its rest is longer than a fresh attempt (0: never)...
    restart_factor: float = 2.0
    #: ...once it has reported at least this much progress (a rate measured, not guessed)...
    restart_min_progress: float = 0.1
    #: ...and at most this many times per task, judged only once this many tasks of its kind
    #: have finished (their spread is what "slower than the slowest" is measured against).
    max_restarts: int = 1
    restart_min_seen: int = 3


class Scheduler:
    """One DAG run.  ``workers``: places with per-worker dispatch (exact placement);
    ``pools``: services placed by the kernel itself, with their capacity (no preemption)."""

    def __init__(self, dag: Dag, workers: list[Worker], now: float, *, policy: str = "cpcs",
                 pools: dict[str, int] | None = None, params: Params | None = None) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; one of {POLICIES}")
        self.dag = dag
        self.policy = policy
        self.params = params or Params()
        self.workers = {w.name: w for w in workers}
        self.pools = dict(pools or {})
        self.tasks = {tid: TaskState(spec) for tid, spec in dag.tasks.items()}
        self.order = {tid: i for i, tid in enumerate(dag.tasks)}
        self.free_res = dict(dag.resources)
        self.t0 = now
        self.events: list[dict[str, Any]] = []
        self.kind_logratio: dict[str, list[float]] = {}
        self.kind_outcomes: dict[str, list[int]] = {}  # kind -> [successes, attempts]
        self.critical: tuple[str, ...] = ()
        self.ranks: dict[str, float] = {}
        self.static_rank = self._static_ranks()
        self.ticks = 0
        self.preemptions = 0
        #: Preempt only tasks whose kernel token is known (the shell orders by token); the
        #: simulator and unit tests, which have no kernel, set this False.
        self.needs_token = True
        for tid, t in self.tasks.items():
            if not t.spec.deps:
                t.st = St.READY
        self._log(now, "submit", tasks=len(self.tasks), policy=policy,
                  workers=sorted(self.workers), pools=self.pools)

    # -- estimates --------------------------------------------------------------------------------

    def _static_ranks(self) -> dict[str, float]:
        if self.policy == "fifo":
            return {tid: -float(i) for tid, i in self.order.items()}
        rank: dict[str, float] = {}
        for tid in reversed(self.dag.topo):
            rank[tid] = self.dag.tasks[tid].eta_s + max((rank[s] for s in self.dag.succ[tid]), default=0.0)
        return rank

    def kind_factor(self, kind: str) -> float:
        """Observed bias (actual / estimated run time) of tasks of ``kind``: a geometric mean
        with one pseudo-observation at 1."""
        logs = self.kind_logratio.get(kind, [])
        return math.exp(sum(logs) / (len(logs) + 1))

    def p_estimate(self, t: TaskState) -> float:
        if t.p_hint is not None:
            return t.p_hint
        s, n = self.kind_outcomes.get(t.spec.kind, [0, 0])
        return min(1.0, max(0.02, (P_PRIOR_WEIGHT * t.spec.p_success + s) / (P_PRIOR_WEIGHT + n)))

    def eta_estimate(self, t: TaskState, now: float) -> float:
        """Estimated run time of one attempt of ``t`` (its current attempt if it runs)."""
        prior = t.spec.eta_s * self.kind_factor(t.spec.kind)
        if t.st not in (St.RUNNING, St.PAUSED):
            return prior
        ran = t.running_s(now)
        if t.progress <= 0.0:  # no progress reported (yet): at least what it has run, and more
            return max(prior, NO_PROGRESS_GROWTH * ran)
        w = min(1.0, t.progress / F_TRUST)
        measured = max(t.progress_run / t.progress, ran)  # the rate at the last report
        return (1.0 - w) * max(prior, ran) + w * measured

    def remaining_own(self, t: TaskState, now: float) -> float:
        """Expected remaining work of ``t`` (this attempt's rest plus expected re-attempts)."""
        if t.st in (St.DONE, St.FAILED, St.CANCELLED):
            return 0.0
        eta = self.eta_estimate(t, now)
        p = self.p_estimate(t) if self.params.expected else 1.0
        if t.st in (St.RUNNING, St.PAUSED):
            return max(eta - t.running_s(now), 0.0) + (1.0 - p) / p * eta
        return eta / p

    def _dynamic_ranks(self, now: float) -> dict[str, float]:
        rank: dict[str, float] = {}
        for tid in reversed(self.dag.topo):
            t = self.tasks[tid]
            below = max((rank[s] for s in self.dag.succ[tid]), default=0.0)
            rank[tid] = self.remaining_own(t, now) + (below if t.st is not St.CANCELLED else 0.0)
        return rank

    def expected_makespan(self, now: float) -> float:
        """Expected remaining makespan (s): the longer of the expected critical path from the
        frontier and the expected remaining work spread over the workers."""
        frontier = [self.ranks.get(tid, 0.0) for tid, t in self.tasks.items() if t.st in (St.READY, *ACTIVE)]
        cp = max(frontier, default=0.0)
        work = sum(self.remaining_own(t, now) for t in self.tasks.values())
        slots = max(1, len(self._live_workers()) + sum(self.pools.values()))
        return max(cp, work / slots)

    # -- observations -----------------------------------------------------------------------------

    def on_started(self, tid: str, now: float, *, token: bytes = b"", worker: str = "") -> None:
        t = self.tasks[tid]
        if t.st is not St.DISPATCHED:
            return
        t.st = St.RUNNING
        t.token = token or t.token
        t.run_mark = now
        self._log(now, "start", task=tid, worker=t.worker or worker, attempt=t.attempt)

    def on_progress(self, tid: str, frac: float, now: float, *, p_hint: float | None = None) -> None:
        t = self.tasks[tid]
        if t.st not in (St.RUNNING, St.PAUSED) or not math.isfinite(frac):
            return
        if frac > t.progress:
            t.progress = min(1.0, frac)
            t.progress_run = t.running_s(now)
        if p_hint is not None and math.isfinite(p_hint) and 0.0 < p_hint <= 1.0:
            t.p_hint = p_hint

    def on_paused(self, tid: str, now: float) -> None:
        t = self.tasks[tid]
        if t.st is St.RUNNING and t.run_mark is not None:
            t.run_s += now - t.run_mark
            t.run_mark = None
            t.st = St.PAUSED
            self._log(now, "paused", task=tid, worker=t.worker)

    def on_resumed(self, tid: str, now: float) -> None:
        t = self.tasks[tid]
        if t.st is St.PAUSED:
            t.st = St.RUNNING
            t.run_mark = now
            self._log(now, "resumed", task=tid, worker=t.worker)

    def on_finished(self, tid: str, now: float, *, ok: bool, code: str = "", infra: bool = False) -> None:
        """The attempt's FINAL: ``ok``; else ``infra`` (the worker died or was unavailable: not
        the task's fault, retried without counting) or a failed attempt."""
        t = self.tasks[tid]
        if t.st not in ACTIVE:
            return
        ran = t.running_s(now)
        worker = t.worker
        self._release(t)
        if ok:
            t.st, t.finished_at, t.progress = St.DONE, now, 1.0
            self._observe(t, ran, success=True)
            self._log(now, "done", task=tid, worker=worker, attempt=t.attempt, ran_s=round(ran, 6))
            for s in self.dag.succ[tid]:
                st = self.tasks[s]
                if st.st is St.WAITING and all(self.tasks[d].st is St.DONE for d in st.spec.deps):
                    st.st = St.READY
            return
        if infra:
            t.infra += 1
            if worker in self.workers:
                self.workers[worker].alive = False
            self._log(now, "lost", task=tid, worker=worker, attempt=t.attempt, code=code)
            if t.infra <= MAX_INFRA_RETRIES:
                t.st, t.redo = St.READY, True
                return
        else:
            t.failures += 1
            self._observe(t, ran, success=False)
            self._log(now, "failed", task=tid, worker=worker, attempt=t.attempt, code=code, ran_s=round(ran, 6))
            if t.attempt < t.spec.max_attempts:
                t.st = St.READY
                self._log(now, "retry", task=tid, attempt=t.attempt + 1)
                return
            if t.spec.fallback is not None and not t.replanned:
                t.spec, t.replanned, t.attempt, t.p_hint = t.spec.fallback, True, 0, None
                t.st = St.READY
                self._log(now, "replan", task=tid, service=t.spec.service)
                return
        t.st, t.finished_at = St.FAILED, now
        self._log(now, "gave_up", task=tid, attempts=t.attempt, code=code)
        self._cancel_below(tid, now)

    def _restart_stragglers(self, now: float, out: list[Action]) -> None:
        """Cancel an attempt whose own progress rate says it takes ``restart_factor`` times the
        slowest finished task of its kind (scaled to its estimate) and whose rest is longer than a
        fresh attempt (the estimate times the kind's observed bias, no prior pseudo-count) -- a
        straggler: a slow node, a bad draw -- and make the task ready again; its worker is free at
        once.  Only kinds with ``restart_min_seen`` finished tasks are judged: before that a slow
        attempt and a task the planner underestimated (or a long one of a kind that varies) look
        alike."""
        p = self.params
        if p.restart_factor <= 0.0:
            return
        for t in self.tasks.values():
            if t.st is not St.RUNNING or t.restarts >= p.max_restarts or t.attempt >= t.spec.max_attempts \
                    or t.progress < p.restart_min_progress or (self.needs_token and not t.token) \
                    or len(self.kind_logratio.get(t.spec.kind, ())) < p.restart_min_seen:
                continue  # a fresh attempt's time is known only once tasks of its kind have finished
            logs = self.kind_logratio[t.spec.kind]
            fresh = t.spec.eta_s * math.exp(sum(logs) / len(logs))  # the kind's observed bias alone
            slowest = t.spec.eta_s * math.exp(max(logs))  # its slowest finished task, scaled
            total = t.progress_run / t.progress
            rest = max(total - t.running_s(now), 0.0)
            # slower than restart_factor x the slowest of its kind (a long task of a kind whose
            # tasks vary is not a straggler), and a fresh attempt expected to end sooner
            if total <= p.restart_factor * slowest or rest <= fresh:
                continue
            worker, attempt = t.worker, t.attempt
            t.restarts += 1
            self._release(t)
            t.st = St.READY
            out.append(Action("restart", t.spec.id, worker, attempt))
            self._log(now, "restart", task=t.spec.id, worker=worker, attempt=attempt,
                      rest_s=round(rest, 6), fresh_s=round(fresh, 6))

    def worker_up(self, name: str) -> None:
        """The shell saw ``name`` registered again (a restarted worker)."""
        if name in self.workers:
            self.workers[name].alive = True

    def _observe(self, t: TaskState, ran: float, *, success: bool) -> None:
        if ran > 0.0 and success:
            self.kind_logratio.setdefault(t.spec.kind, []).append(math.log(ran / t.spec.eta_s))
        out = self.kind_outcomes.setdefault(t.spec.kind, [0, 0])
        out[0] += int(success)
        out[1] += 1

    def _cancel_below(self, tid: str, now: float) -> None:
        stack = list(self.dag.succ[tid])
        while stack:
            s = stack.pop()
            st = self.tasks[s]
            if st.st in (St.WAITING, St.READY):
                st.st = St.CANCELLED
                self._log(now, "cancelled", task=s, because=tid)
                stack.extend(self.dag.succ[s])

    def _release(self, t: TaskState) -> None:
        for res, amount in t.spec.needs:
            self.free_res[res] += amount
        t.worker, t.token, t.run_mark, t.run_s, t.progress, t.progress_run, t.p_hint = "", b"", None, 0.0, 0.0, 0.0, None

    # -- the decision -----------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return all(t.st in (St.DONE, St.FAILED, St.CANCELLED) for t in self.tasks.values())

    def _live_workers(self) -> list[Worker]:
        return [w for w in self.workers.values() if w.alive]

    def _on_worker(self, name: str) -> list[TaskState]:
        return [t for t in self.tasks.values() if t.worker == name and t.st in ACTIVE]

    def _fits(self, t: TaskState) -> bool:
        return all(self.free_res.get(r, 0.0) >= a for r, a in t.spec.needs)

    def _dispatch(self, t: TaskState, worker: str, now: float, out: list[Action]) -> None:
        for res, amount in t.spec.needs:
            self.free_res[res] -= amount
        t.st, t.worker, t.dispatched_at = St.DISPATCHED, worker, now
        if t.redo:
            t.redo = False  # the last attempt was lost with its worker: it is run again, not counted
        else:
            t.attempt += 1
        out.append(Action("dispatch", t.spec.id, worker, t.attempt))
        self._log(now, "dispatch", task=t.spec.id, worker=worker, attempt=t.attempt,
                  rank=round(self.ranks.get(t.spec.id, 0.0), 6), critical=t.spec.id in self.critical)

    def tick(self, now: float) -> list[Action]:
        """Recompute ranks and the critical path; return the orders to carry out now."""
        self.ticks += 1
        out: list[Action] = []
        dynamic = self.policy == "cpcs"
        if dynamic:  # a straggler's task is ready again before this tick's placement
            self._restart_stragglers(now, out)
        self.ranks = self._dynamic_ranks(now) if dynamic else self.static_rank
        self._critical_path()
        ready = sorted((t for t in self.tasks.values() if t.st is St.READY),
                       key=lambda t: (-self.ranks[t.spec.id], self.order[t.spec.id]))
        # 1. Pools placed by the kernel: fill their capacity in rank order.
        for pool, cap in self.pools.items():
            busy = sum(1 for t in self.tasks.values() if t.st in ACTIVE and t.spec.service == pool)
            for t in [t for t in ready if t.spec.service == pool]:
                if busy >= cap:
                    break
                if self._fits(t):
                    self._dispatch(t, pool, now, out)
                    ready.remove(t)
                    busy += 1
        # 2. Free placed workers: the best of (a paused task of its own, the top ready task).
        for w in sorted(self._live_workers(), key=lambda w: w.name):
            here = self._on_worker(w.name)
            if any(t.st in (St.RUNNING, St.DISPATCHED) for t in here):
                continue
            paused = max((t for t in here if t.st is St.PAUSED), key=lambda t: self.ranks[t.spec.id], default=None)
            cand = next((t for t in ready if t.spec.service == w.pool and self._fits(t)), None)
            if cand is not None and len(here) < w.hold and (
                    paused is None or self.ranks[cand.spec.id] > self.ranks[paused.spec.id]):
                self._dispatch(cand, w.name, now, out)
                ready.remove(cand)
            elif paused is not None:
                out.append(Action("resume", paused.spec.id, w.name))
                self._log(now, "resume", task=paused.spec.id, worker=w.name)
        # 3. Preempt off-path work for a higher-ranked task that would otherwise wait.
        if dynamic:
            self._preempt(ready, now, out)
            if self.params.renice:
                self._renice(now, out)
        return out

    def _critical_path(self) -> None:
        frontier = [tid for tid, t in self.tasks.items() if t.st in (St.READY, *ACTIVE)]
        if not frontier:
            self.critical = ()
            return
        tid = max(frontier, key=lambda x: (self.ranks[x], -self.order[x]))
        path = [tid]
        while True:
            nxt = [s for s in self.dag.succ[tid] if self.tasks[s].st not in (St.DONE, St.FAILED, St.CANCELLED)]
            if not nxt:
                break
            tid = max(nxt, key=lambda x: (self.ranks[x], -self.order[x]))
            path.append(tid)
        self.critical = tuple(path)

    def _preempt(self, ready: list[TaskState], now: float, out: list[Action]) -> None:
        p = self.params
        critical = set(self.critical)
        top = self.ranks[self.critical[0]] if self.critical else 0.0
        for cand in list(ready):
            if self.ranks[cand.spec.id] < (1.0 - p.rank_margin) * top or not self._fits(cand):
                continue  # only (near-)critical work takes a slot from running work
            running = [t for t in self.tasks.values() if t.st is St.RUNNING and t.worker in self.workers
                       and self.workers[t.worker].alive and self.workers[t.worker].pool == cand.spec.service]
            if not running:
                continue
            wait = min(max(self.eta_estimate(t, now) - t.running_s(now), 0.0) for t in running)
            if wait < max(p.min_wait_s, p.min_wait_frac * self.remaining_own(cand, now)):
                continue  # a worker frees soon enough: pausing someone would gain little
            r = self.ranks[cand.spec.id]
            own = self.remaining_own(cand, now)
            # A victim resumes only on its own worker, after the candidate: it is delayed by the
            # candidate's run, so it must have that much slack or it becomes the critical path.
            victims = [t for t in running
                       if t.spec.id not in critical and t.preemptions < p.max_preemptions
                       and (t.token or not self.needs_token)
                       and len(self._on_worker(t.worker)) < self.workers[t.worker].hold
                       and self.ranks[t.spec.id] + own <= r * (1.0 - p.rank_margin)]
            if not victims:
                continue
            v = min(victims, key=lambda t: self.ranks[t.spec.id])
            v.preemptions += 1
            self.preemptions += 1
            out.append(Action("preempt", v.spec.id, v.worker))
            self._log(now, "preempt", task=v.spec.id, worker=v.worker, for_task=cand.spec.id,
                      rank=round(self.ranks[v.spec.id], 6), for_rank=round(r, 6))
            self._dispatch(cand, v.worker, now, out)
            ready.remove(cand)

    def _renice(self, now: float, out: list[Action]) -> None:
        """OS priority follows the critical path: a worker hosting critical work runs at
        ``nice_critical`` on every CPU, the others at ``nice_other`` on ``off_path_cpus`` only."""
        p = self.params
        critical = set(self.critical)
        for w in self._live_workers():
            if not w.child:
                continue
            hosts = any(t.spec.id in critical and t.st in (St.RUNNING, St.DISPATCHED) for t in self._on_worker(w.name))
            want = p.nice_critical if hosts else p.nice_other
            if want != w.nice:
                w.nice = want
                out.append(Action("nice", worker=w.name, nice=want))
                self._log(now, "nice", worker=w.name, child=w.child, nice=want)
            if p.all_cpus and p.off_path_cpus:
                cpus = p.all_cpus if hosts else p.off_path_cpus
                if cpus != w.cpus:
                    w.cpus = cpus
                    out.append(Action("affinity", worker=w.name, cpus=cpus))
                    self._log(now, "affinity", worker=w.name, child=w.child, cpus=list(cpus))

    # -- records ----------------------------------------------------------------------------------

    def _log(self, now: float, ev: str, **fields: Any) -> None:
        self.events.append({"t": round(now - self.t0, 6), "ev": ev, **fields})

    def summary(self, now: float) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for t in self.tasks.values():
            counts[t.st.value] = counts.get(t.st.value, 0) + 1
        return {"policy": self.policy, "makespan_s": now - self.t0, "states": counts,
                "failed": sorted(tid for tid, t in self.tasks.items() if t.st is St.FAILED),
                "cancelled": sorted(tid for tid, t in self.tasks.items() if t.st is St.CANCELLED),
                "attempts": sum(t.attempt for t in self.tasks.values()),
                "preemptions": self.preemptions, "ticks": self.ticks,
                "kind_factors": {k: round(self.kind_factor(k), 4) for k in self.kind_logratio}}


# -- a discrete-time simulator of the same scheduler (unit tests, parameter choice) -------------

@dataclasses.dataclass(frozen=True)
class Truth:
    """What really happens to a task: its run time per attempt, how many first attempts fail, and
    how much slower its first attempt runs (``slow`` > 1: a straggling attempt)."""

    run_s: float
    fail_attempts: int = 0
    slow: float = 1.0

    def attempt_s(self, attempt: int) -> float:
        """Run time of attempt ``attempt`` (1-based)."""
        return self.run_s * (self.slow if attempt == 1 else 1.0)


def simulate(dag: Dag, truth: dict[str, Truth], n_workers: int, *, policy: str = "cpcs",
             tick_s: float = 0.05, dt: float = 0.005, params: Params | None = None,
             progress_every_s: float = 0.02, limit_s: float = 1e5) -> Scheduler:
    """Run ``dag`` on ``n_workers`` identical simulated workers of its (single) pool; a paused task
    makes no progress; decisions every ``tick_s`` and whenever a task ends, as in the shell.  Returns the finished scheduler (``summary(now)``, ``events``)."""
    pool = next(iter(dag.tasks.values())).service
    workers = [Worker(f"{pool}@{i}", pool, child=f"{pool}#{i}", hold=2 if policy == "cpcs" else 1)
               for i in range(n_workers)]
    sch = Scheduler(dag, workers, 0.0, policy=policy, params=params)
    sch.needs_token = False
    done_work: dict[str, float] = {}
    pending_pause: set[str] = set()
    now, next_tick, last_progress = 0.0, 0.0, 0.0
    while not sch.finished and now < limit_s:
        if now >= next_tick:
            for a in sch.tick(now):
                if a.op == "dispatch":
                    sch.on_started(a.task, now)
                    done_work[a.task] = 0.0
                elif a.op == "preempt":
                    pending_pause.add(a.task)
                elif a.op == "resume":
                    sch.on_resumed(a.task, now)
                elif a.op == "restart":
                    done_work.pop(a.task, None)
            next_tick += tick_s
        for tid in list(pending_pause):
            sch.on_paused(tid, now)
        pending_pause.clear()
        now += dt
        for tid, t in sch.tasks.items():
            if t.st is not St.RUNNING:
                continue
            tr = truth[tid]
            run_s = tr.attempt_s(t.attempt)
            done_work[tid] += dt
            if done_work[tid] >= run_s - 1e-12:
                sch.on_finished(tid, now, ok=t.attempt > tr.fail_attempts, code="service_error")
                next_tick = now  # the shell decides at once when a task ends
            elif now - last_progress >= progress_every_s:
                sch.on_progress(tid, done_work[tid] / run_s, now)
        if now - last_progress >= progress_every_s:
            last_progress = now
    return sch
