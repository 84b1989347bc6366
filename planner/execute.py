"""Modes: the same planner's plans, executed on a running kernel by reca or by the planner itself.

Every mode talks to the kernel as a client (``clients.aio.AsyncClient``) and uses the same
services' code where they do the work (``scch`` solves, ``ttc`` runs SAT tools, ``decode`` runs
the language model, ``sim`` runs simulations).  What differs is who decides:

* **reca** — the runtime decides.  One job per task with hard budgets (tokens, tool CPU seconds,
  one escalation, wall time) from the plan's estimates; every heavy tool step is a ``ttc``
  transaction prepared when the plan arrives (its budget reserved, nothing run), committed only
  when a consumer demands it, aborted when the plan drops it, and shared across tasks by its
  idempotency key; symbolic subgoals go through ``scch`` (canonical, verified reuse across tasks)
  behind an exact-text memo, as one ``cpcs`` DAG when more are ready than the machine has cores
  (:data:`CPCS_MIN_WIDTH`; cpcs's FINAL carries the answers); a chain the check flags is repaired
  by ``psccr`` (a verified continuation grafted, else an RoI-S splice of the flagged span only);
  on the algorithmic family the chain is decoded in one generate and a step the check rejects is
  rewound and replaced by the exact tool answer through ``ids`` (IDS), decoding resuming after it;
  an escalation must clear ``cswif``'s what-if gate (a decision already taken in the run is
  reused) and runs on ``sim`` through sim's result cache.  Lazy steps
  (a planner's speculative branches, escalations, thunks) wait until every eager step is done and
  the plan still needs them.
* **pic** (planner in control) — executes the plan as it writes it: every step whose inputs are
  ready starts at once, tool calls eagerly and concurrently (as agent frameworks run tools), steps
  the plan later drops keep running (their results go nowhere), a failed check regenerates the
  whole answer (a new decode, beam 4).
* **strong** — pic plus: cancel on plan change (``ttc abort``), an exact-string result cache
  across tasks, sim's result cache (as reca), and a HEFT order of at most :data:`STRONG_SLOTS`
  heavy steps at a time.
* **llmseq** — the language model's own order of steps (:class:`planner.scripted.LMPlanner`),
  one step at a time; a dropped step is never started.

Ablations: reca with one primitive off (:func:`mode`, ``reca-no-<primitive>``): its work then
goes the way pic does it (``scch`` without its cache, tools committed at once and not shared,
regeneration instead of repair, the escalation run without the gate, no budgets, no cpcs order);
sim's cache and the exact-text memo stay on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import re
import time
import uuid
from typing import Any

from clients.aio import AsyncClient
from kernel import errors
from kernel import protocol as P
from lm import chains, tokenizer
from lm import verifier as lmv
from planner.plan import Plan, Revision, Step
from planner.scripted import LMPlanner
from planner.tasks import Task

#: Bound on one call to a service (seconds).
CALL_TIMEOUT = 120.0
#: Heavy steps strong runs at once (the machine's cores).
STRONG_SLOTS = 2
#: reca hands ready subgoals to cpcs only when there are more of them than cores: with no more
#: than one per core they all run at once and no order can finish them sooner, while a cpcs run
#: costs CPU of its own (ticks, placement look-ups, the decision log; measured: reca without cpcs
#: was 0.16 CPU s cheaper over 18 held-out tasks whose plans have two subgoals each).
CPCS_MIN_WIDTH = (os.cpu_count() or 1) + 1
#: Tokens a chain decode may write per item (two steps of at most ~11 characters).
MAX_NEW_PER_ITEM = 26
#: The reca job's budgets, as multiples of the plan's estimates (and floors).
BUDGET_TOKENS_X, BUDGET_TOKENS_MIN = 4.0, 400
BUDGET_CPU_X, BUDGET_CPU_MIN = 6.0, 6.0
BUDGET_WALL_MS = 300_000
#: The simulation tool's step cap (a run stops at its case's end time first).
SIM_STEPS = 100_000

PRIMITIVES = ("cpcs", "ttc", "scch", "roi", "ids", "cswif", "budgets")


@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    runtime: bool = False  # lazy steps wait for demand; the runtime's primitives below
    sequential: bool = False  # one step at a time, in the plan's order
    cancel_on_drop: bool = False
    exact_cache: bool = False
    heft: bool = False
    sim_cache: bool = False  # the sim service's result cache (``cache: true``): reca and strong
    memo: bool = False  # reca: strong's exact-text memo in front of scch, and of the gate's decisions
    cpcs: bool = False
    ttc: bool = False
    scch: bool = False
    roi: bool = False
    ids: bool = False
    cswif: bool = False
    budgets: bool = False


MODES = {
    "reca": Mode("reca", runtime=True, cancel_on_drop=True, sim_cache=True, memo=True, **{p: True for p in PRIMITIVES}),
    "pic": Mode("pic"),
    "strong": Mode("strong", cancel_on_drop=True, exact_cache=True, heft=True, sim_cache=True),
    "llmseq": Mode("llmseq", sequential=True, cancel_on_drop=True),
}


def mode(name: str) -> Mode:
    """``reca``, ``pic``, ``strong``, ``llmseq`` or ``reca-no-<primitive>``."""
    if name in MODES:
        return MODES[name]
    m = re.fullmatch(r"reca-no-(\w+)", name)
    if m and m.group(1) in PRIMITIVES:
        return dataclasses.replace(MODES["reca"], name=name, **{m.group(1): False})
    raise ValueError(f"unknown mode {name!r}; one of {sorted(MODES)} or reca-no-<{'|'.join(PRIMITIVES)}>")


@dataclasses.dataclass
class HeavyRun:
    """One execution of a heavy step: ``key`` names what was computed (a canonical subgoal key,
    a tool's inputs); ``ran``: compute was spent on it (not a cache hit or a replay); ``used``:
    its result reached the answer; ``cancelled``: stopped on a plan change."""

    task: str
    step: str
    key: str
    ran: bool
    used: bool = True
    cancelled: bool = False


@dataclasses.dataclass
class TaskRun:
    task: Task
    mode: str
    job: str
    answer: dict
    events: list[dict]
    revisions: list[dict]
    spent: dict
    limits: dict
    refused: list[dict]
    wall_s: float
    correct: bool | None = None
    aborted: list[dict] = dataclasses.field(default_factory=list)


class RunState:
    """What one mode's run over many tasks shares: the client, strong's cache, the heavy runs,
    pic's runs left behind by plan changes."""

    def __init__(self, cl: AsyncClient, m: Mode, planner: Any) -> None:
        self.cl = cl
        self.mode = m
        self.planner = planner
        self.tag = uuid.uuid4().hex[:6]
        self.cache: dict[str, asyncio.Future] = {}
        self.heavy: list[HeavyRun] = []
        self.left_running: list[asyncio.Task] = []
        self.slots = asyncio.Semaphore(STRONG_SLOTS)

    async def drain(self) -> None:
        """Wait for the runs pic left behind (their compute is part of its bill)."""
        if self.left_running:
            await asyncio.gather(*self.left_running, return_exceptions=True)
            self.left_running.clear()

    async def settle(self, run: "TaskRun") -> None:
        """After :meth:`drain`: the task's spending from the kernel's ledger; close its job."""
        stats = await self.cl.call(P.MMI_JOB_STATS, {"job": run.job}, timeout=CALL_TIMEOUT, retries=0)
        run.spent = dict(stats.get("spent", {}))
        await self.cl.call(P.MMI_JOB_CLOSE, {"job": run.job}, timeout=CALL_TIMEOUT, retries=0)


def _key(obj: Any) -> str:
    return hashlib.blake2b(json.dumps(obj, sort_keys=True).encode(), digest_size=8).hexdigest()


def stated_values(text: str) -> dict[str, int]:
    """Item index -> the value the chain *states* for it (right or wrong), from its sum steps."""
    try:
        rep = lmv.verify(text)
    except lmv.VerifierInputError:
        return {}
    out: dict[str, int] = {}
    for s in rep.steps:
        if s.kind == "add":
            m = re.fullmatch(r"\d+\+\d+=(\d+)", s.text)
            if m:
                out[str(s.item)] = int(m.group(1))
    return out


class _Task:
    """The execution of one task in one mode."""

    def __init__(self, rs: RunState, task: Task) -> None:
        self.rs, self.m, self.cl, self.task = rs, rs.mode, rs.cl, task
        self.job = f"{rs.mode.name}-{task.id}-{rs.tag}"
        self.t0 = time.monotonic()
        self.events: list[dict] = []
        self.refused: list[dict] = []
        self.aborted: list[dict] = []
        self.prepared: dict[str, str] = {}  # step -> ttc call id (reca)
        self.idem: dict[str, str] = {}  # step -> its ttc idempotency key (reca)
        self.calls: dict[str, str] = {}  # step -> ttc call id of a committed run
        self.runs: dict[str, HeavyRun] = {}
        self.limits: dict = {}
        self._results: dict[str, Any] = {}
        self.plan: Plan

    async def call(self, service: str, payload: Any, **kw: Any) -> Any:
        return await self.cl.call(service, payload, job=self.job, timeout=CALL_TIMEOUT, retries=0, **kw)

    def note(self, sid: str, kind: str, t0: float, **what: Any) -> None:
        self.events.append(
            {
                "step": sid,
                "kind": kind,
                "t0": round(t0 - self.t0, 4),
                "t1": round(time.monotonic() - self.t0, 4),
                **what,
            }
        )

    def heavy(self, sid: str, key: str, ran: bool) -> HeavyRun:
        h = HeavyRun(self.task.id, sid, key, ran)
        self.rs.heavy.append(h)
        self.runs[sid] = h
        return h

    # -- the task -----------------------------------------------------------------------------------

    async def run(self) -> TaskRun:
        planner = self.rs.planner
        opened = False
        if isinstance(planner, LMPlanner) and "items" in self.task.spec:  # the model plans in the job
            await self.cl.call(P.MMI_JOB_OPEN, {"job": self.job, "budget": {}, "parent": None, "priority": 0})
            opened = True
            text = await self._lazy_chain(
                chains.prompt([chains.Item(*it) for it in self.task.spec["items"]], lazy=True)
            )
            planner.lazy_chain = lambda _prompt, _t=text: _t
        self.plan = plan = planner.plan(self.task)
        if self.m.budgets:
            cpu, tok = plan.est_total()
            self.limits = {
                "tokens": max(BUDGET_TOKENS_MIN, BUDGET_TOKENS_X * tok),
                "cpu_s": max(BUDGET_CPU_MIN, BUDGET_CPU_X * cpu),
                "escalations": 1,
                "wall_ms": BUDGET_WALL_MS,
            }
            if opened:  # the planning decode's job has no budget: the task's work goes to a new one
                await self.cl.call(P.MMI_JOB_CLOSE, {"job": self.job})
                self.job = self.job + "-b"
                opened = False
        if not opened:
            await self.cl.call(P.MMI_JOB_OPEN, {"job": self.job, "budget": self.limits, "parent": None, "priority": 0})
        if self.m.ttc:
            await self._prepare_all()
        results: dict[str, Any] = self._results
        running: dict[asyncio.Task, list[str]] = {}
        while "answer" not in results:
            for group in self._ready(results, running):
                running[asyncio.ensure_future(self._exec(group))] = group
            if not running:
                results["answer"] = self._assemble(results)
                break
            done, _ = await asyncio.wait(list(running), return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                group = running.pop(fut, None)
                if group is None:  # a revision handled in this same round dropped its step
                    continue
                try:
                    out = fut.result()
                except errors.RecaError as exc:
                    out = {sid: {"error": exc.code, "message": str(exc)} for sid in group}
                for sid in group:
                    if plan.steps[sid].dropped:
                        continue
                    results[sid] = out[sid]
                    for rev in self.rs.planner.revise(plan, sid, out[sid]):
                        await self._revise(rev, running)
        answer = results["answer"]
        for sid, h in self.runs.items():
            h.used = h.used and not plan.steps[sid].dropped
        for sid in list(self.prepared):
            if plan.steps[sid].dropped or sid not in results:
                await self._abort(sid, "not needed")
        return TaskRun(
            self.task,
            self.m.name,
            self.job,
            answer,
            self.events,
            plan.to_wire()["revisions"],
            {},
            self.limits,
            self.refused,
            time.monotonic() - self.t0,
            aborted=self.aborted,
        )

    def _ready(self, results: dict, running: dict) -> list[list[str]]:
        """Groups of steps to start now (a group runs as one unit: cpcs orders a group)."""
        plan, m = self.plan, self.m
        busy = {sid for g in running.values() for sid in g}
        ready = [
            sid
            for sid in plan.order()
            if sid != "answer"
            and sid not in results
            and sid not in busy
            and all(d in results for d in plan.steps[sid].deps)
        ]
        if m.sequential:
            return [[ready[0]]] if ready and not running else []
        if m.runtime:
            needed = plan.needed()
            pending_eager = [
                sid for sid in needed if sid != "answer" and sid not in results and not plan.steps[sid].lazy
            ]
            ready = [sid for sid in ready if sid in needed and (not plan.steps[sid].lazy or not pending_eager)]
            if m.cpcs and m.scch:  # a group wider than the machine: cpcs orders it (critical path first)
                sym = [sid for sid in ready if plan.steps[sid].kind == "symbolic" and not self._memo_hit(sid)]
                if len(sym) >= CPCS_MIN_WIDTH:
                    return [sym] + [[sid] for sid in ready if sid not in sym]
        if m.heft:
            rank = plan.upward_rank()
            ready.sort(key=lambda sid: -rank[sid])
        return [[sid] for sid in ready]

    async def _revise(self, rev: Revision, running: dict) -> None:
        plan = self.plan
        plan.apply(rev, time.monotonic() - self.t0)
        self.events.append(
            {
                "step": rev.step,
                "kind": "revise",
                "t0": round(time.monotonic() - self.t0, 4),
                "t1": round(time.monotonic() - self.t0, 4),
                "action": rev.action,
                "reason": rev.reason,
            }
        )
        if rev.action not in ("drop", "replace"):
            return
        sid = rev.step
        if rev.new is not None and self.m.ttc and rev.new.kind == "tool":
            await self._prepare(rev.new)
        for fut, group in list(running.items()):
            if sid in group and len(group) == 1:
                if self.m.cancel_on_drop:
                    await self._abort(sid, rev.reason)
                    fut.cancel()
                    if sid in self.runs:
                        self.runs[sid].cancelled = True
                else:  # pic: the run goes on; nobody will read its result
                    self.rs.left_running.append(fut)
                running.pop(fut)
        if sid in self.prepared:
            await self._abort(sid, rev.reason)

    # -- steps --------------------------------------------------------------------------------------

    async def _exec(self, group: list[str]) -> dict[str, Any]:
        if len(group) > 1:
            return await self._symbolic_cpcs(group)
        sid = group[0]
        step = self.plan.steps[sid]
        heavy_slot = self.m.heft and step.heavy
        if heavy_slot:
            await self.rs.slots.acquire()
        t0 = time.monotonic()
        try:
            out = await getattr(self, f"_do_{step.kind}")(sid, step)
        except errors.Refused as exc:
            self.refused.append({"step": sid, "kind": step.kind, "reason": str(exc)})
            out = {"refused": True, "reason": str(exc)}
        finally:
            if heavy_slot:
                self.rs.slots.release()
        self.note(sid, step.kind, t0, **{k: v for k, v in out.items() if k in ("how", "hit", "ok", "level", "refused")})
        return {sid: out}

    async def _cached(self, key: str, compute: Any) -> tuple[Any, bool]:
        """strong's exact-string cache: (result, computed here)."""
        fut = self.rs.cache.get(key)
        if fut is not None:
            return await asyncio.shield(fut), False
        fut = self.rs.cache[key] = asyncio.get_running_loop().create_future()
        try:
            out = await compute()
        except BaseException as exc:
            del self.rs.cache[key]
            fut.cancel() if isinstance(exc, asyncio.CancelledError) else fut.set_exception(exc)
            raise
        fut.set_result(out)
        return out, True

    async def _do_symbolic(self, sid: str, step: Step) -> dict:
        sg = step.spec["subgoal"]

        async def solve() -> dict:
            return await self.call("scch", {"op": "solve", "subgoal": sg, "cache": self.m.scch})

        if self.m.exact_cache or self.m.memo:
            out, computed = await self._cached(self._memo_key(sid), solve)
            self.heavy(sid, out["key"], computed and not out.get("hit"))
        else:
            out = await solve()
            self.heavy(sid, out["key"], not out.get("hit"))
        return {"answer": out["answer"], "hit": bool(out.get("hit"))}

    def _memo_key(self, sid: str) -> str:
        return "scch:" + json.dumps(self.plan.steps[sid].spec["subgoal"], sort_keys=True)

    def _memo_hit(self, sid: str) -> bool:
        """The same subgoal text was already asked in this run (its answer is, or will be, in the
        exact-text memo): no scch call, no cpcs task."""
        return self.m.memo and self._memo_key(sid) in self.rs.cache

    async def _symbolic_cpcs(self, group: list[str]) -> dict[str, Any]:
        """reca: the ready subgoals as one DAG on cpcs (critical path first); cpcs's FINAL carries
        each task's scch answer (a task that failed there is solved again here, and counted)."""
        t0 = time.monotonic()
        dag = {
            "tasks": [
                {
                    "id": sid,
                    "service": "scch",
                    "kind": "symbolic",
                    "payload": {"op": "solve", "subgoal": self.plan.steps[sid].spec["subgoal"], "cache": True},
                    "eta_s": max(0.01, self.plan.steps[sid].est_cpu_s),
                }
                for sid in group
            ]
        }
        summary = await self.call("cpcs", {"dag": dag, "policy": "cpcs"})
        results = summary.get("results") or {}
        out: dict[str, Any] = {}
        for sid in group:
            res = results.get(sid)
            if not isinstance(res, dict) or "answer" not in res:  # the task failed in cpcs: solve here
                res = await self.call(
                    "scch", {"op": "solve", "subgoal": self.plan.steps[sid].spec["subgoal"], "cache": True}
                )
            self.heavy(sid, res["key"], not res.get("hit"))
            out[sid] = {"answer": res["answer"], "hit": bool(res.get("hit"))}
            if self.m.memo and self._memo_key(sid) not in self.rs.cache:
                fut = self.rs.cache[self._memo_key(sid)] = asyncio.get_running_loop().create_future()
                fut.set_result(res)
            self.note(sid, "symbolic", t0, via="cpcs")
        return out

    # decode -------------------------------------------------------------------------------------

    async def _lazy_chain(self, prompt: str) -> str:
        out = await self.call(
            "decode", {"op": "generate", "prompt": prompt, "max_new": 16 * prompt.count(",") + 24, "keep": False}
        )
        return out["text"]

    async def _do_decode(self, sid: str, step: Step) -> dict:
        items = [chains.Item(*it) for it in step.spec["items"]]
        prompt = chains.prompt(items)
        if self.m.ids and self.task.family == "algo":
            return await self._decode_ids(prompt, len(items))
        out = await self.call("decode", {"op": "generate", "prompt": prompt, "max_new": MAX_NEW_PER_ITEM * len(items)})
        return {"decode": out["decode"], "text": out["text"], "prompt": prompt}

    async def _decode_ids(self, prompt: str, n_items: int) -> dict:
        """Decode the chain in one generate (as every mode does); if the check rejects a step, the
        decode is rewound to that step, the exact answer (a tool: exact arithmetic) is spliced in
        through IDS, and decoding resumes after it: only the text after the wrong step is decoded
        again, never the whole answer.  (Decoding a step at a time, ``stop=";"``, found the same
        errors at about twice the decode service's CPU: a round trip and a prefill per step.)"""
        out = await self.call("decode", {"op": "generate", "prompt": prompt, "max_new": MAX_NEW_PER_ITEM * n_items})
        did, spliced, text = out["decode"], 0, out["text"]
        for _ in range(2 * n_items):
            rep = lmv.verify(text)
            bad = rep.first_error
            if bad is None or bad.kind not in ("mul", "add") or bad.end > len(text):
                break
            item = rep.items[bad.item]
            right = item.steps()[0 if bad.kind == "mul" else 1] + ";"
            await self.call("decode", {"op": "rewind", "decode": did, "pos": tokenizer.char_to_token(bad.start)})
            await self.call("ids", {"op": "inject", "decode": did, "text": right})
            spliced += 1
            left = MAX_NEW_PER_ITEM * (n_items - bad.item)
            out = await self.call("decode", {"op": "generate", "decode": did, "max_new": left})
            text = out["text"]
        return {"decode": did, "text": text, "prompt": prompt, "how": f"ids:{spliced}"}

    async def _do_thunk(self, sid: str, step: Step) -> dict:
        """Force one item of the LM planner's lazy chain: the model answers the one-item question."""
        it = chains.Item(*step.spec["item"])
        out = await self.call(
            "decode", {"op": "generate", "prompt": chains.prompt([it]), "max_new": MAX_NEW_PER_ITEM, "keep": False}
        )
        return {"text": out["text"], "index": step.spec["index"], "item": step.spec["item"]}

    async def _do_verify(self, sid: str, step: Step) -> dict:
        texts = self._chain_texts()
        reports = [lmv.verify(t) for t in texts]
        bad = next((r.first_error for r in reports if not r.ok), None)
        return {"ok": bad is None, "reason": bad.reason if bad else ""}

    def _chain_texts(self) -> list[str]:
        res = self._results
        if "fix" in res:
            return res["fix"]["texts"]
        if "chain" in res:
            return [res["chain"]["text"]]
        return [
            res[sid]["text"]
            for sid in self.plan.order()
            if self.plan.steps[sid].kind in ("thunk", "decode") and sid in res
        ]

    async def _do_repair(self, sid: str, step: Step) -> dict:
        res = self._results
        if "chain" in res and self.m.roi:
            did = res["chain"]["decode"]
            out = await self.call("psccr", {"op": "repair", "decode": did, "width": 8})
            state = await self.call("decode", {"op": "state", "decode": did})
            how = f"psccr:grafts={out.get('grafts', 0)},splices={out.get('splices', 0)}"
            return {"texts": [state["text"]], "how": how}
        texts = []
        for t in self._chain_texts():
            if lmv.verify(t).ok:
                texts.append(t)
                continue
            prompt = t[: t.index(";") + 1]
            items = len(lmv.parse_header(t)[1])
            out = await self.call(
                "decode",
                {"op": "generate", "prompt": prompt, "max_new": MAX_NEW_PER_ITEM * items, "width": 4, "keep": False},
            )
            texts.append(out["text"])
        return {"texts": texts, "how": "regenerate"}

    # tools and simulations ----------------------------------------------------------------------

    def _tool_of(self, step: Step) -> tuple[str, dict, float]:
        if step.kind == "tool":
            return step.spec["tool"], step.spec["inputs"], max(2.0, 3 * step.est_cpu_s)
        s = self.task.spec
        level = step.spec.get("level", step.spec.get("to_level"))
        inputs = {
            "case": s["case"],
            "params": s["params"],
            "blocks": s["blocks"],
            "cells": s["cells"],
            "level": level,
            "steps": SIM_STEPS,
        }
        return "sim", inputs, max(2.0, 3 * step.est_cpu_s)

    async def _prepare_all(self) -> None:
        for step in self.plan.live():
            if step.kind == "tool":
                await self._prepare(step)

    async def _prepare(self, step: Step, attempt: int = 0) -> None:
        tool, inputs, cost = self._tool_of(step)
        idem = f"{self.rs.tag}:{_key([tool, inputs])}" + (f"#{attempt}" if attempt else "")
        try:
            out = await self.call(
                "ttc",
                {
                    "op": "prepare",
                    "tool": tool,
                    "inputs": inputs,
                    "est_cost": cost,
                    "consumers": [f"{self.job}/{step.id}"],
                    "idem": idem,
                    "timeout": 600,
                },
            )
        except errors.RecaError as exc:
            self.refused.append({"step": step.id, "kind": "prepare", "reason": f"{exc.code}: {exc}"})
            return
        self.prepared[step.id] = out["call_id"]
        self.idem[step.id] = idem

    async def _abort(self, sid: str, reason: str) -> None:
        cid = self.prepared.pop(sid, None) or self.calls.get(sid)
        if cid is None:
            return
        try:
            out = await self.call("ttc", {"op": "abort", "call_id": cid, "reason": reason[:80]})
        except errors.RecaError as exc:  # already finished (another task's consumer uses it) or aborted
            out = {"error": exc.code}
        self.aborted.append({"step": sid, "call_id": cid, "reason": reason, **out})

    async def _ttc_run(self, sid: str, step: Step) -> dict:
        """Run a tool step through ttc: reca commits the call prepared with the plan (a call that
        another task already ran is replayed by its idempotency key: no second run); the peers
        prepare and commit at once."""
        tool, inputs, cost = self._tool_of(step)
        key = f"{tool}:{_key(inputs)}"
        if self.m.ttc and sid in self.prepared:
            for attempt in range(1, 3):
                cid, idem = self.prepared[sid], self.idem[sid]
                try:
                    out = await self.call(
                        "ttc", {"op": "commit", "call_id": cid, "idem": idem, "wait": True, "timeout": CALL_TIMEOUT}
                    )
                except errors.RecaError as exc:
                    if exc.code != "aborted" and "ABORTED" not in str(exc):
                        raise
                    await self._prepare(step, attempt)  # an earlier task aborted this call: a new one
                    continue
                replay = out.get("state") == "DONE" and self._ran_before(key)
                self.calls[sid] = cid
                self.prepared.pop(sid, None)
                self.heavy(sid, key, not replay)
                return out
            raise errors.Refused(f"tool call of {sid} could not be committed")

        async def run() -> dict:
            p = await self.call(
                "ttc",
                {
                    "op": "prepare",
                    "tool": tool,
                    "inputs": inputs,
                    "est_cost": cost,
                    "consumers": [f"{self.job}/{sid}"],
                    "timeout": 600,
                },
            )
            self.calls[sid] = p["call_id"]
            h = self.heavy(sid, key, True)
            out = await self.call(
                "ttc", {"op": "commit", "call_id": p["call_id"], "wait": True, "timeout": CALL_TIMEOUT}
            )
            return h, out

        if self.m.exact_cache:
            (h, out), computed = await self._cached("ttc:" + key, run)
            if not computed:
                self.heavy(sid, key, False)
            return out
        return (await run())[1]

    def _ran_before(self, key: str) -> bool:
        return any(h.key == key and h.ran for h in self.rs.heavy)

    async def _do_tool(self, sid: str, step: Step) -> dict:
        out = await self._ttc_run(sid, step)
        res = out.get("result") or {}
        if out.get("state") != "DONE" or not res.get("ok"):
            return {"error": out.get("state"), "reason": out.get("reason")}
        return dict(res["value"])

    async def _sim_service(self, sid: str, level: int) -> dict:
        s = self.task.spec
        payload = {
            "case": s["case"],
            "params": s["params"],
            "blocks": s["blocks"],
            "cells": s["cells"],
            "level": level,
            "max_level": level,
            "report_every": 1000,
            "cache": self.m.sim_cache,
        }
        key = f"sim:{_key([s['case'], s['params'], level])}"

        async def run() -> dict:
            out = await self.call("sim", payload)
            self.heavy(sid, key, not out.get("cached"))
            return out

        if self.m.exact_cache:
            out, computed = await self._cached("sim:" + json.dumps(payload, sort_keys=True), run)
            if not computed:
                self.heavy(sid, key, False)
            return out
        return await run()

    async def _sim(self, sid: str, step: Step, level: int) -> dict:
        # Simulations run on the sim service in every mode: a ttc tool run would start a process
        # (interpreter, NumPy, sims) per run, which costs more CPU than these runs themselves.
        summ = await self._sim_service(sid, level)
        return {"level": level, "summary": summ}

    async def _do_sim(self, sid: str, step: Step) -> dict:
        return await self._sim(sid, step, step.spec["level"])

    async def _do_whatif(self, sid: str, step: Step) -> dict:
        s = self.task.spec
        if self.m.cswif:
            esc = {
                "run_id": f"{self.job}/{sid}",
                "case": s["case"],
                "params": s["params"],
                "blocks": s["blocks"],
                "cells": s["cells"],
                "from_level": step.spec["from_level"],
                "to_level": step.spec["to_level"],
            }
            same = "gate:" + json.dumps({k: v for k, v in esc.items() if k != "run_id"}, sort_keys=True)
            earlier = self.rs.cache.get(same) if self.m.memo else None
            if earlier is not None and earlier.done() and not earlier.exception():
                # the gate already decided this very escalation in this run (its dry run is a pure
                # function of the request): the same answer, without a second dry run; an approved
                # one is then served by sim's cache (nothing computed, no escalation spent)
                dec = earlier.result()
            else:
                try:
                    dec = await self.call("cswif", {"escalation": esc})
                except errors.Refused as exc:
                    detail = exc.detail or {}
                    dec = {
                        "refused": str(exc)[:160],
                        "prediction": (detail.get("decision") or detail).get("prediction"),
                        "gate": "decision" in detail,
                    }
                if self.m.memo and dec.get("gate", True):  # the gate's own decisions, not a job's budget
                    self.rs.cache[same] = fut = asyncio.get_running_loop().create_future()
                    fut.set_result(dec)
            if "refused" in dec:
                self.refused.append(
                    {"step": sid, "kind": "whatif", "reason": dec["refused"], "prediction": dec["prediction"]}
                )
                return {"refused": True}
            # approved (one unit of the job's escalations spent): run on sim, through its cache
            out = await self._sim(sid, step, step.spec["to_level"])
            return out | {"how": f"cswif approved: {dec.get('reason', '')}"[:120]}
        return await self._sim(sid, step, step.spec["to_level"])

    # -- the answer ---------------------------------------------------------------------------------

    def _assemble(self, results: dict) -> dict:
        plan, fam = self.plan, self.task.family
        if fam == "physics":
            esc = results.get("esc") or {}
            best = esc if "level" in esc else results.get("base") or {}
            return {"level": best.get("level"), "summary": best.get("summary")}
        chain: dict[str, int] = {}
        if "chain" in results:
            for t in self._chain_texts():
                chain.update(stated_values(t))
        else:  # the LM planner's items: one text per item
            chain = {}
            for sid in plan.order():
                r = results.get(sid) or {}
                if plan.steps[sid].kind in ("thunk", "decode") and "text" in r:
                    v = stated_values(self._fixed_text(r))
                    if "0" in v:
                        chain[str(plan.steps[sid].spec["index"])] = v["0"]
        if fam == "math":
            n = len(self.task.spec["subgoals"])
            return {"subgoals": [(results.get(f"sg{i}") or {}).get("answer") for i in range(n)], "chain": chain}
        branch = next(
            (
                results[sid]
                for sid in ("swap", "if_sat", "if_unsat")
                if sid in results and sid in plan.steps and not plan.steps[sid].dropped
            ),
            {},
        )
        return {"probe": (results.get("probe") or {}).get("sat"), "branch": branch, "chain": chain}

    def _fixed_text(self, r: dict) -> str:
        fix = self._results.get("fix")
        if fix:
            for t in fix["texts"]:
                if t.startswith(r["text"][: r["text"].index(";") + 1]):
                    return t
        return r["text"]


async def run_task(rs: RunState, task: Task) -> TaskRun:
    """Execute one task in ``rs``'s mode."""
    return await _Task(rs, task).run()
