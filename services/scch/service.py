"""``scch``: the cross-query subgoal cache with canonical hashing, served through the kernel.

Ops (payload maps; a *subgoal* is ``{"kind", "expr", "var"?, "func"?}``, see :mod:`reason.canon`):

* ``{"op": "get", "subgoal"}`` -> ``{"hit", "answer"?, "key", "how"?, "priority_hint"}``: an
  answer in the query's own symbols, served only after its quick check passed and after it was
  verified against the query as written (``solve``: ``complete``, and ``excluded`` for the
  canonical form's solutions where the written equation is undefined).  Charged nothing.
* ``{"op": "put", "subgoal", "answer", "verifier"?}`` -> ``{"admitted", "key", "how", ...}``:
  the answer (printed, in the query's symbols; a list for ``solve``) is verified in full and
  stored with the verifier's hash; ``verifier``, when given, must be the current verifier hash.
* ``--near-miss`` (off by default): on a ``solve`` miss, first the verified answer of a similar
  cached subgoal (:mod:`services.scch.nearmiss`: proposed by embedding, accepted only after the
  full check on this subgoal's canonical form and the check on the query as written; the reply
  says ``near_miss: true`` and ``near_miss_of``); stored entries are indexed for it.
* ``{"op": "solve", "subgoal", "cache": true}``: ``get``, and on a miss the heavy SymPy call in
  the solver process (hard time bound ``--solve-seconds``), verified and admitted.  A miss reports
  ``cpu_ms`` (the solver's CPU time) and ``solver_calls`` 1 to the kernel, which charges the
  caller's job and enforces its budget; a hit reports nothing.  ``cache: false`` computes without
  the cache (the no-cache peer).  The solver's bound is the least of ``--solve-seconds`` and the
  request's granted ``wall_ms`` (the kernel enforces wall budgets itself); ``cpu_ms`` counts the
  solver child's CPU, which the kernel's own per-process CPU measurement does not see.
* ``{"op": "canon", "subgoal"}``: the key, canonical form and mapping (for tools and psccr).
* ``{"op": "stats"}``: counters, hit ratio, per-kind priority hints.

Bad input (unparseable or oversized expressions, an answer the verifier rejects) is
``bad_request`` with ``kind`` naming the :mod:`reason.errors` class; a solver call past its bound
is ``bad_request`` kind ``TimeLimit`` (its process is killed; the service keeps serving).

**Principals** (issue 24): each principal (the kernel's word, ``ctx.principal``) has a cache of
its own -- its own entries, observations, counters and priority hints (an SQLite file
``DB.<tag>``, an in-memory database, or the Redis prefix ``PREFIX<tag>:``; ``tag`` a digest of the
principal) -- so no principal is served what another put, or learns from a hit what another
asked.  ``--shared`` keeps one cache for every principal (a single-tenant deployment).

Backend loss (``--backend redis`` and the server goes away): ``get`` and ``put`` answer
``unavailable`` (retryable) with ``kind: BackendUnavailable``; ``solve`` falls back to computing
without the cache and says ``"cache": "bypassed"``.  Nothing half-written can be served (entries
are written atomically and carry a digest).  The next request tries the server again.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import time
from typing import Any

from kernel import errors
from reason.check import warm_up
from reason.errors import ReasonError
from reason.solve import SOLVE_SECONDS, SolverPool
from services.scch.nearmiss import NearMissProposer
from services.base import Context, Service
from services.scch.capped import CappedParser
from services.scch.logic import SubgoalCache
from services.scch.store import BackendUnavailable, open_backend


def _bad(exc: Exception) -> errors.BadRequest:
    return errors.BadRequest(str(exc), kind=type(exc).__name__)


class ScchService(Service):
    name = "scch"
    capacity = 1  # SymPy work and the backend connection are one at a time per worker

    def __init__(self) -> None:
        self.backend_kind = "sqlite"
        self.db = ":memory:"
        self.redis_url = ""
        self.prefix = "scch:"
        self.cache_capacity = 10_000
        self.half_life = 3600.0
        self.admit_min = 1.0
        self.solve_seconds = SOLVE_SECONDS
        self.cache: SubgoalCache | None = None  # the cache of the principal being served
        self.caches: dict[str, SubgoalCache] = {}
        #: near-miss proposers, one per cache (``--near-miss``; services/scch/nearmiss.py)
        self.near_miss = False
        self.proposers: dict[int, NearMissProposer] = {}
        self.shared = False
        self.pool: SolverPool | None = None
        self.parser: CappedParser | None = None

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--backend", choices=("sqlite", "redis"), default="sqlite")
        parser.add_argument("--db", default=":memory:", help="SQLite file (WAL mode)")
        parser.add_argument("--redis-url", default="", help="redis://host:port/0 or unix:///path/redis.sock")
        parser.add_argument("--prefix", default="scch:", help="Redis key prefix")
        parser.add_argument("--entries", type=int, default=10_000, help="most cached artifacts")
        parser.add_argument("--half-life", type=float, default=3600.0, help="reuse half-life, seconds")
        parser.add_argument("--admit-min", type=float, default=1.0,
                            help="least decayed observation count for admission")
        parser.add_argument("--solve-seconds", type=float, default=SOLVE_SECONDS)
        parser.add_argument("--near-miss", action="store_true",
                            help="on a miss, try verified answers of similar cached subgoals before solving")
        parser.add_argument("--shared", action="store_true",
                            help="one cache for every principal (default: one per principal)")

    def configure(self, args: argparse.Namespace) -> None:
        self.backend_kind, self.db, self.redis_url, self.prefix = args.backend, args.db, args.redis_url, args.prefix
        self.cache_capacity, self.half_life, self.admit_min = args.entries, args.half_life, args.admit_min
        self.solve_seconds = args.solve_seconds
        self.near_miss = bool(getattr(args, "near_miss", False))
        self.shared = bool(getattr(args, "shared", False))

    def cache_for(self, principal: str) -> SubgoalCache:
        """``principal``'s cache (opened on its first request; one for all with ``--shared``)."""
        scope = "" if self.shared else principal
        cache = self.caches.get(scope)
        if cache is None:
            tag = hashlib.sha256(scope.encode("utf-8", "surrogatepass")).hexdigest()[:12]
            path = self.db if self.shared or self.db == ":memory:" else f"{self.db}.{tag}"
            prefix = self.prefix if self.shared else f"{self.prefix}{tag}:"
            backend = open_backend(self.backend_kind, path=path, url=self.redis_url, prefix=prefix)
            assert self.parser is not None
            cache = self.caches[scope] = SubgoalCache(backend, capacity=self.cache_capacity,
                                                      half_life=self.half_life, admit_min=self.admit_min,
                                                      canonicalise=self.parser.canonicalise,
                                                      parse_artifact=self.parser.artifact_from_text)
        return cache

    async def setup(self) -> None:
        self.parser = CappedParser()  # client text is parsed only there (memory-capped, no methods)
        await asyncio.to_thread(self.parser.canonicalise, {"kind": "simplify", "expr": "x + 1"})  # start it
        self.pool = SolverPool(self.solve_seconds)
        warm_up()

    async def teardown(self) -> None:
        if self.pool is not None:
            await asyncio.to_thread(self.pool.close)
        if self.parser is not None:
            await asyncio.to_thread(self.parser.close)
        for cache in self.caches.values():
            try:
                cache.flush()
            except BackendUnavailable:
                pass  # score updates only; the entries are written already
            cache.backend.close()

    async def handle(self, ctx: Context, payload: Any) -> Any:
        if not isinstance(payload, dict):
            raise errors.BadRequest("scch takes a map {op, ...}; ops: get, put, solve, canon, stats")
        op = payload.get("op")
        cache = self.cache = self.cache_for(ctx.principal)
        if op == "stats":
            try:
                return cache.stats()
            except BackendUnavailable as exc:
                return {**_counts(cache), "backend_error": str(exc)}
        subgoal = payload.get("subgoal")
        try:
            if op == "get":
                cn, served, entry = cache.get(subgoal, time.time())
                out = {"hit": served is not None, "key": cn.key, "priority_hint": cache.priority_hint(cn.kind)}
                if served is not None:
                    out |= {**served, "how": entry.how}
                return out
            if op == "put":
                now = time.time()
                cn, canonical = cache.offer(subgoal, payload.get("answer"), now, verifier=payload.get("verifier"))
                # the full check runs in the solver process (off this thread, killable at its bound)
                _, _, how = await asyncio.to_thread(self.pool.call, cn.kind, cn.form, answer=canonical)
                return cache.admit(cn, canonical, now, how, offered=True)
            if op == "solve":
                return await self._solve(ctx, cache, subgoal, bool(payload.get("cache", True)))
            if op == "canon":
                cn = cache.canon(subgoal)
                return {"key": cn.key, "kind": cn.kind, "form": cn.text,
                        "rename": {k: str(v) for k, v in cn.rename.items()},
                        "affine": [str(a) for a in cn.affine] if cn.affine else None}
        except ReasonError as exc:
            raise _bad(exc) from None
        except BackendUnavailable as exc:
            raise errors.Unavailable(str(exc), kind="BackendUnavailable") from None
        raise errors.BadRequest(f"unknown op {op!r}; scch ops: get, put, solve, canon, stats")

    async def _solve(self, ctx: Context, cache: SubgoalCache, subgoal: Any, use_cache: bool) -> dict:
        pool = self.pool
        assert pool is not None
        bypassed = False
        now = time.time()  # one time per request: admission compares with this request's observation
        try:
            cn, hit = cache.lookup(subgoal, now, use_cache)
        except BackendUnavailable:
            bypassed, use_cache = True, False
            cn, hit = cache.lookup(subgoal, now, False)
        if hit is not None:
            return hit  # a hit reports no spending
        proposer = self.proposers.setdefault(id(cache), NearMissProposer()) if self.near_miss and use_cache else None
        if proposer is not None:
            got = proposer.resolve(cache, cn)  # verified against this subgoal, or None
            if got is not None:
                return {k: v for k, v in got.items() if k != "canonical"}
        # The heavy call runs in the solver process; this thread only waits (bounded), so the
        # worker keeps heartbeating.  Canonical forms and checks run on the loop thread, where
        # their CPU-time limits (SIGPROF) apply.
        bound = self.solve_seconds
        if "wall_ms" in ctx.granted:  # never outlive the job's granted wall time
            bound = max(0.05, min(bound, float(ctx.granted["wall_ms"]) / 1000.0))
        try:
            canonical, cpu, how = await asyncio.to_thread(pool.call, cn.kind, cn.form, bound)
        finally:
            ctx.charge(solver_calls=1)
        ctx.charge(cpu_ms=1000.0 * cpu)
        try:
            out = cache.finish(cn, canonical, cpu, now, use_cache, how)
        except BackendUnavailable:
            bypassed = True
            out = cache.finish(cn, canonical, 0.0, now, False, how)
        if bypassed:
            out["cache"] = "bypassed"
        elif proposer is not None and cache.backend.load(cn.key) is not None:
            proposer.remember(cn)
        return out


def _counts(cache: SubgoalCache) -> dict:
    c = cache.counts
    return {"gets": c.gets, "hits": c.hits, "misses": c.misses, "rejected": c.rejected, "hit_ratio": cache.hit_ratio()}


SERVICE = ScchService()
