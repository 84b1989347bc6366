"""``python -m bench scch``: the subgoal cache against an exact-string cache, the oracle and no
cache, on generated streams of renamed / affinely substituted / re-ordered problems
(:mod:`reason.workload`), and its lookup latency through the kernel (SQLite and Redis backends)
against a routed echo.

Hit rates.  Every cache has the same capacity, the same admission and the same half-life
eviction (the scores of :mod:`services.scch.logic`); they differ only in the key: SCCH's
canonical key (the real :class:`~services.scch.logic.SubgoalCache` over SQLite), the subgoal's
exact text (GPTCache-style), or the class id (the oracle, perfect equivalence).  Time is the query
index.  The half-life and admission threshold are chosen on a training stream (by SCCH's hit
rate) and reported on three held-out streams (median, min, max).  Every answer SCCH serves is
checked again independently in the query's own symbols (a wrong answer served counts); one
admitted artifact in ``TAMPER_EVERY`` is overwritten with a wrong one (digest resealed, as a buggy
writer would) so that the hit-time verifier has something to reject.

Solver time: each distinct canonical problem is solved once (its CPU seconds measured); a miss
costs that, a hit nothing; no cache pays it for every query.

Latency.  One ``python -m kernel`` with ``echo``, ``scch`` (SQLite WAL file) and ``scch_redis``
(a real ``redis-server`` on a private unix socket).  ``get`` of a previously seen text (*warm*:
canonical form memoised) and of a fresh member of a cached class (*cold*: canonicalised now), and a
routed ``echo`` of a payload of the same size, sequentially from one client.
"""

from __future__ import annotations

import json
import random
import shutil
import statistics
import time

import numpy as np
import sympy as sp
import zmq

from bench._common import Result, percentile
from reason import canon as C
from reason import workload as W
from reason.check import QuickCheck
from reason.errors import ReasonError
from reason.solve import timed_compute
from services.scch.logic import SubgoalCache, bump, score_at
from services.scch.store import Entry, open_backend

CAPACITY = 32
TAMPER_EVERY = 10
GRID = [(hl, am) for hl in (30.0, 120.0, 600.0) for am in (1.0, 1.5)]


class KeyedPolicy:
    """The same admission and eviction as SubgoalCache, keyed by an arbitrary function."""

    def __init__(self, capacity: int, half_life: float, admit_min: float) -> None:
        self.capacity, self.half_life, self.admit_min = capacity, half_life, admit_min
        self.entries: dict[str, float] = {}
        self.obs: dict[str, float] = {}
        self.hits = self.gets = 0

    def query(self, key: str, now: float) -> bool:
        self.gets += 1
        self.obs[key] = bump(self.obs.get(key), now, self.half_life)
        if key in self.entries:
            self.hits += 1
            self.entries[key] = bump(self.entries[key], now, self.half_life)
            return True
        score = score_at(self.obs[key], now, self.half_life)
        if score < self.admit_min:
            return False
        if len(self.entries) >= self.capacity:
            victim = min(self.entries, key=self.entries.get)
            if score <= score_at(self.entries[victim], now, self.half_life):
                return False
            del self.entries[victim]
        self.entries[key] = self.obs.pop(key)
        return False


class Solver:
    """Solves each canonical problem once; remembers its CPU seconds."""

    def __init__(self) -> None:
        self.done: dict[str, tuple] = {}

    def __call__(self, key: str, kind: str, form: sp.Expr) -> tuple:
        if key not in self.done:
            try:
                self.done[key] = timed_compute(kind, form, seconds=20.0)
            except ReasonError as exc:
                self.done[key] = (exc, 0.0)
        return self.done[key]


def independent_check(subgoal: dict, answer, rng: np.random.Generator) -> bool:
    """The served answer against the query in the query's own form (its own constants and
    operand order; only the variable is renamed to the verifier's ``x``)."""
    kind, expr, var, fn = C.parse_subgoal(subgoal)
    if fn is not None:
        expr = expr.subs(fn(var), C.FUNC(var))
    rename = {}
    if var is not None and var != C.VAR:
        rename = {var: C.VAR, C.VAR: sp.Symbol("xq")}
    expr = expr.xreplace(rename)
    parsed = C.artifact_from_text(kind, answer)
    parsed = [p.xreplace(rename) for p in parsed] if kind == "solve" else parsed.xreplace(rename)
    try:
        return QuickCheck.compile(kind, expr, parsed).check(rng, 12)
    except ReasonError:
        return False


def evaluate(queries: list[W.Query], half_life: float, admit_min: float, solver: Solver, *,
             tamper: bool, rng: np.random.Generator) -> dict:
    cache = SubgoalCache(open_backend("sqlite"), capacity=CAPACITY, half_life=half_life, admit_min=admit_min, seed=1)
    exact = KeyedPolicy(CAPACITY, half_life, admit_min)
    oracle = KeyedPolicy(CAPACITY, half_life, admit_min)
    wrong = checked = errors = admitted = 0
    cpu_cache = cpu_none = 0.0
    lookups: list[float] = []
    for t, q in enumerate(queries):
        now = float(t)
        exact.query(json.dumps(q.subgoal, sort_keys=True), now)
        oracle.query(q.cls, now)
        try:
            t0 = time.perf_counter()
            cn, served, entry = cache.get(q.subgoal, now)
            lookups.append(time.perf_counter() - t0)
        except ReasonError:
            errors += 1
            continue
        answer, cpu = solver(cn.key, cn.kind, cn.form)
        cpu_none += cpu
        if served is not None:
            checked += 1
            wrong += not independent_check(q.subgoal, served["answer"], rng)
            continue
        if isinstance(answer, Exception):
            continue
        cpu_cache += cpu
        out = cache.admit(cn, answer, now)
        if out["admitted"]:
            admitted += 1
            if tamper and admitted % TAMPER_EVERY == 0:
                e = cache.backend.load(cn.key)
                bad = json.dumps(C.to_text([a + 1 for a in answer] if cn.kind == "solve" else answer + C.VAR ** 3))
                cache.backend.store(Entry(e.key, e.kind, bad, e.verifier, e.how, e.z, e.hits).sealed())
    n = len(queries)
    return {"scch": cache.counts.hits / n, "exact": exact.hits / n, "oracle": oracle.hits / n,
            "wrong": wrong, "served": checked, "rejected": cache.counts.rejected, "errors": errors,
            "cpu_cache": cpu_cache, "cpu_none": cpu_none, "lookup_inproc_p50_ms": 1e3 * percentile(lookups, 50)}


def _latency(n: int, fresh: int) -> dict:
    from clients import Client
    from clients.launch import LocalKernel, kernel_config, service_block, short_tmpdir
    from services.scch.redis_local import RedisServer

    d = short_tmpdir("reca-bscch-")
    redis = RedisServer(d).start()
    services = (service_block("echo", "services.echo")
                + service_block("scch", "services.scch", args=["--db", f"{d}/scch.db"])
                + service_block("scch_redis", "services.scch",
                                args=["--name", "scch_redis", "--backend", "redis", "--redis-url", redis.url]))
    kern = LocalKernel(kernel_config(services, heartbeat=0.5, liveness=10))
    out: dict = {}
    try:
        with Client(kern.endpoint, timeout=60, retries=0, context=zmq.Context.instance()) as c:
            for name in ("echo", "scch", "scch_redis"):
                c.wait_for_service(name, 60)
            rng = random.Random(5)
            base = [("integrate", "lin_exp", (3, 1)), ("solve", "quadratic", (4, 2)), ("simplify", "trig", (5, 0)),
                    ("integrate", "pow_sin", (2, 1))]
            warm = [W.member(*b, rng)[0] for b in base]
            for svc in ("scch", "scch_redis"):
                for sg in warm:
                    c.call(svc, {"op": "solve", "subgoal": sg})
            payload = {"op": "get", "subgoal": warm[0]}
            samples = {k: [] for k in ("echo", "scch_warm", "scch_redis_warm", "scch_cold", "scch_redis_cold")}
            for i in range(n):
                for key, svc, body in (("echo", "echo", payload), ("scch_warm", "scch", {"op": "get", "subgoal": warm[i % 4]}),
                                       ("scch_redis_warm", "scch_redis", {"op": "get", "subgoal": warm[i % 4]})):
                    t0 = time.perf_counter()
                    reply = c.call(svc, body)
                    samples[key].append(time.perf_counter() - t0)
                    if svc != "echo":
                        assert reply["hit"], reply
            for i in range(fresh):
                sg = W.member(*base[i % 4], rng)[0]
                for key, svc in (("scch_cold", "scch"), ("scch_redis_cold", "scch_redis")):
                    t0 = time.perf_counter()
                    c.call(svc, {"op": "get", "subgoal": sg})
                    samples[key].append(time.perf_counter() - t0)
            for key, xs in samples.items():
                out[f"{key}_p50_ms"] = 1e3 * percentile(xs, 50)
                out[f"{key}_p99_ms"] = 1e3 * percentile(xs, 99)
                out[f"{key}_per_s"] = len(xs) / sum(xs)
                out[f"{key}_samples"] = len(xs)
    finally:
        kern.stop()
        redis.stop()
        shutil.rmtree(d, ignore_errors=True)
    return out


def run(quick: bool) -> Result:
    n_train, n_test, rounds = (60, 100, 1) if quick else (400, 600, 3)
    n_lat, n_fresh = (1000, 40) if quick else (1500, 300)
    grid = GRID[::3] if quick else GRID
    kw = dict(pool=40, p_new=0.15, p_repeat=0.1)
    solver = Solver()
    rng = np.random.default_rng(3)
    t0 = time.perf_counter()
    train = list(W.stream(101, n_train, **kw))
    scores = {(hl, am): evaluate(train, hl, am, solver, tamper=False, rng=rng)["scch"] for hl, am in grid}
    half_life, admit_min = max(grid, key=lambda g: (scores[g], -g[1], -g[0]))
    runs = [evaluate(list(W.stream(202 + r, n_test, **kw)), half_life, admit_min, solver, tamper=True, rng=rng)
            for r in range(rounds)]
    lat = _latency(n_lat, n_fresh)
    med = lambda k: statistics.median(r[k] for r in runs)  # noqa: E731
    metrics = {
        "heldout_queries_per_run": n_test, "runs": rounds, "capacity": CAPACITY,
        "chosen_half_life_queries": half_life, "chosen_admit_min": admit_min,
        "scch_hit_rate": med("scch"), "scch_hit_rate_min": min(r["scch"] for r in runs),
        "scch_hit_rate_max": max(r["scch"] for r in runs),
        "oracle_hit_rate": med("oracle"), "exact_string_hit_rate": med("exact"),
        "hit_rate_vs_oracle": med("scch") / max(med("oracle"), 1e-9),
        "hit_rate_vs_exact_string": med("scch") / max(med("exact"), 1e-9),
        "wrong_answers_served": sum(r["wrong"] for r in runs),
        "answers_served_and_rechecked": sum(r["served"] for r in runs),
        "verifier_rejections_at_hit": sum(r["rejected"] for r in runs),
        "typed_errors": sum(r["errors"] for r in runs),
        "solver_cpu_s_no_cache": med("cpu_none"), "solver_cpu_s_scch": med("cpu_cache"),
        "solver_time_saved_fraction": 1 - med("cpu_cache") / max(med("cpu_none"), 1e-9),
        "lookup_inproc_p50_ms": med("lookup_inproc_p50_ms"),
        **lat,
        "lookup_warm_p50_vs_echo": lat["scch_warm_p50_ms"] / lat["echo_p50_ms"],
        "lookup_cold_p50_vs_echo": lat["scch_cold_p50_ms"] / lat["echo_p50_ms"],
        "redis_warm_p50_vs_echo": lat["scch_redis_warm_p50_ms"] / lat["echo_p50_ms"],
        "wall_s": time.perf_counter() - t0,
    }
    targets = {
        "hit_rate_vs_oracle": (">=", 0.9),
        "hit_rate_vs_exact_string": (">=", 3.0),
        "wrong_answers_served": ("<=", 0),
        "lookup_warm_p50_vs_echo": ("<=", 2.0),
        "lookup_cold_p50_vs_echo": ("<=", 2.0),
        "solver_time_saved_fraction": (">=", 0.0),
    }
    table = [
        {"cache": "none", "hit_rate": 0.0, "solver_cpu_s": metrics["solver_cpu_s_no_cache"]},
        {"cache": "exact string", "hit_rate": metrics["exact_string_hit_rate"]},
        {"cache": "SCCH (canonical)", "hit_rate": metrics["scch_hit_rate"], "solver_cpu_s": metrics["solver_cpu_s_scch"],
         "wrong_served": metrics["wrong_answers_served"], "rejected": metrics["verifier_rejections_at_hit"]},
        {"cache": "oracle", "hit_rate": metrics["oracle_hit_rate"]},
        {"cache": "echo (routed)", "p50_ms": lat["echo_p50_ms"], "p99_ms": lat["echo_p99_ms"], "per_s": lat["echo_per_s"]},
        {"cache": "get sqlite warm", "p50_ms": lat["scch_warm_p50_ms"], "p99_ms": lat["scch_warm_p99_ms"],
         "per_s": lat["scch_warm_per_s"]},
        {"cache": "get redis warm", "p50_ms": lat["scch_redis_warm_p50_ms"], "p99_ms": lat["scch_redis_warm_p99_ms"],
         "per_s": lat["scch_redis_warm_per_s"]},
        {"cache": "get sqlite cold", "p50_ms": lat["scch_cold_p50_ms"], "p99_ms": lat["scch_cold_p99_ms"],
         "per_s": lat["scch_cold_per_s"]},
        {"cache": "get redis cold", "p50_ms": lat["scch_redis_cold_p50_ms"], "p99_ms": lat["scch_redis_cold_p99_ms"],
         "per_s": lat["scch_redis_cold_per_s"]},
    ]
    notes = [
        f"held-out: {rounds} stream(s) of {n_test} queries (40 recurring classes, 15% one-off problems, 10% exact "
        f"repeats); half-life {half_life:g} queries and admit_min {admit_min:g} chosen on a {n_train}-query training stream",
        "2-core machine shared with other agents: latencies are under contention",
        "warm: a text seen before (canonical form memoised); cold: a fresh member of a cached class, canonicalised "
        "with SymPy on the request path",
        f"one admitted artifact in {TAMPER_EVERY} is overwritten with a wrong one to exercise the hit-time verifier",
    ]
    return Result(metrics=metrics, targets=targets, table=table, notes=notes)
