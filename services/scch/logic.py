"""The subgoal cache's logic, without sockets: canonical keys, admission, eviction and the
verification of every hit.  Time is passed in (``now``, seconds).

**Retention scores.**  Each stored entry and each observed key has a score that decays with a
half-life ``H``: a use at time ``t`` adds 1, and the score at ``now`` is
``s(now) = s(t) * 2 ** (-(now - t) / H)``.  It is stored as ``z = log2(s(t)) + t / H``, so that
``s(now) = 2 ** (z - now / H)`` and the order of ``z`` never changes as time passes: the entry
to evict (the least score) is the least ``z``, found by an index, without rescoring anything.

**Admission** (``put``): a key's observation score counts the queries that asked for it (every
``get``, and a ``put`` that offers an answer).  An artifact is admitted when that score is at least ``admit_min`` and either the
cache has room or the score beats the least-scored entry, which is then evicted.

**Serving** (``get``): an entry is served only if its digest is intact, it was accepted by the
current verifier (same verifier hash), and a quick check (:class:`reason.check.QuickCheck`) at
fresh random points passes -- on the first hit of each stored artifact, and on every hit of one
verified only at points (see :meth:`SubgoalCache._serve`); otherwise it is deleted, counted as
rejected, and the query is a miss.
Hits report no spending; misses that compute (``solve``) report the solver's CPU time.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
from typing import Any, Callable

import numpy as np
import sympy as sp

from reason import canon as C
from reason.canon import FUNC
from reason.check import (CHECK_SECONDS, OFFERED_CHECK_SECONDS, OFFERED_PROOF_SECONDS, QuickCheck, admission_refusal,
                          full_check, param_values, solution_status, verifier_hash)
from reason.errors import ParseError, ReasonError, TimeLimit, VerifierRejected
from services.scch.store import Backend, Entry, Scores

#: Canonical forms memoised by exact subgoal text (a front memo; bounded).
MEMO_SIZE = 4096
#: Compiled quick checks memoised by entry digest (bounded).
CHECKS_SIZE = 4096
#: ``get`` buffers its score writes (observation score; a hit's retention score and hit count)
#: and writes them together, in one backend write, once this many keys are buffered or this many
#: seconds (of ``now``) passed since the first, and always before anything reads scores
#: (admission, ``put``, ``stats``, :meth:`SubgoalCache.flush`).  Like any cache write, a crash
#: may lose them; another process sharing the backend sees them that much later.
FLUSH_KEYS = 32
FLUSH_SECONDS = 1.0


def bump(z: float | None, now: float, half_life: float) -> float:
    """The ``z`` after one more use at ``now``."""
    score = 0.0 if z is None else 2.0 ** (z - now / half_life)
    return math.log2(score + 1.0) + now / half_life


def score_at(z: float | None, now: float, half_life: float) -> float:
    return 0.0 if z is None else 2.0 ** (z - now / half_life)


class _LRU(collections.OrderedDict):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def get_fresh(self, key: Any) -> Any:
        value = self.get(key)
        if value is not None:
            self.move_to_end(key)
        return value

    def put(self, key: Any, value: Any) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


@dataclasses.dataclass
class Counts:
    gets: int = 0
    hits: int = 0
    misses: int = 0
    rejected: int = 0  # hits whose quick check, digest or verifier hash failed: never served
    admitted: int = 0
    refused: int = 0
    evicted: int = 0
    solved: int = 0
    solver_cpu_s: float = 0.0
    by_kind: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(lambda: [0, 0]))


def answer_text(kind: str, answer: Any) -> str:
    return json.dumps(C.to_text(answer))


def answer_from_text(kind: str, text: str) -> Any:
    return C.artifact_from_text(kind, json.loads(text))


def _assumptions(solutions: list, var: Any) -> list[str]:
    """``"d != 0"`` for each denominator factor of the solutions that holds parameters only
    (``a*x = b`` answered ``[b/a]`` assumes ``a != 0``)."""
    seen: dict[str, None] = {}
    for sol in solutions:
        for node in sp.preorder_traversal(sol):  # denominators anywhere, inside roots too
            if isinstance(node, sp.Pow) and node.exp.is_negative:
                for factor in sp.Mul.make_args(sp.factor_terms(node.base)):
                    base = factor.base if isinstance(factor, sp.Pow) else factor
                    if base.free_symbols and not base.has(var) and not base.is_number:
                        seen.setdefault(f"{sp.sstr(base)} != 0", None)
    return list(seen)


#: How well an entry was verified: a stored entry is replaced only by a strictly better one.
_RANK = {"points": 1, "points+complete": 2, "proved": 3, "proved+complete": 4}


class SubgoalCache:
    """The cache over one :class:`~services.scch.store.Backend`."""

    def __init__(self, backend: Backend, *, capacity: int = 10_000, half_life: float = 3600.0,
                 admit_min: float = 1.0, keep_observations: int | None = None, seed: int | None = None,
                 canonicalise: Callable[[Any], C.Canon] = C.canonicalise,
                 parse_artifact: Callable[[str, Any], Any] = C.artifact_from_text) -> None:
        if capacity < 1 or half_life <= 0 or admit_min < 0:
            raise ValueError("capacity >= 1, half_life > 0, admit_min >= 0")
        self.backend = backend
        #: Where client text is parsed (the service passes a memory-capped child: services.scch.capped).
        self._canonicalise = canonicalise
        self._parse_artifact = parse_artifact
        self.capacity = capacity
        self.half_life = half_life
        self.admit_min = admit_min
        self.keep_observations = keep_observations or 4 * capacity
        self.rng = np.random.default_rng(seed)
        self.counts = Counts()
        self._memo: _LRU = _LRU(MEMO_SIZE)
        self._checks: _LRU = _LRU(CHECKS_SIZE)
        self._answers: _LRU = _LRU(MEMO_SIZE)  # (subgoal text, entry digest) -> translated answer
        self._passed: _LRU = _LRU(CHECKS_SIZE)  # (key, digest) of proved artifacts that passed a hit check
        self._parsed: _LRU = _LRU(CHECKS_SIZE)  # entry digest -> parsed artifact
        self._scores: dict[str, Scores] = {}  # buffered get writes (FLUSH_KEYS, FLUSH_SECONDS)
        self._scores_since = 0.0

    # -- canonical forms --------------------------------------------------------------------------

    @staticmethod
    def _text(subgoal: Any) -> str:
        try:
            memo_key = json.dumps(subgoal, sort_keys=True)
        except (TypeError, ValueError):
            raise ParseError("a subgoal is a map of strings") from None
        if len(memo_key) > 4 * C.MAX_CHARS:
            raise C.TooLarge("subgoal text too long")
        return memo_key

    def canon(self, subgoal: Any, text: str | None = None) -> C.Canon:
        """The subgoal's canonical form (memoised by its exact text, ``text`` when the caller has
        it already)."""
        memo_key = self._text(subgoal) if text is None else text
        found = self._memo.get_fresh(memo_key)
        if found is None:
            found = self._canonicalise(subgoal)
            self._memo.put(memo_key, found)
        return found

    # -- get --------------------------------------------------------------------------------------

    def get(self, subgoal: Any, now: float) -> tuple[C.Canon, dict | None, Entry | None]:
        """``(canon, served, entry)``: ``served`` is ``{"answer", ...}`` (:meth:`for_query`: in
        the query's symbols, verified against the query); served and entry are ``None`` on a
        miss.  Counts the observation of the key.

        One backend read (the observation score and the entry); the score writes are buffered
        (:data:`FLUSH_KEYS`) and the buffer's scores override what was read."""
        text = self._text(subgoal)
        cn = self.canon(subgoal, text)
        self.counts.gets += 1
        observed, entry = self.backend.read(cn.key)
        buffered = self._scores.get(cn.key)
        served = None
        if entry is not None:
            served = self._serve(cn, entry, text)
            if served is None:
                entry = None
        sc = Scores(cn.key, bump(observed if buffered is None else buffered.observed_z, now, self.half_life))
        if entry is not None:  # a served hit (a miss drops a buffered hit: its entry is gone)
            last = entry.z if buffered is None or buffered.hit_z is None else buffered.hit_z
            sc.hit_z, sc.hits = bump(last, now, self.half_life), (buffered.hits if buffered else 0) + 1
        if not self._scores:
            self._scores_since = now
        self._scores[cn.key] = sc
        if len(self._scores) >= FLUSH_KEYS or now - self._scores_since >= FLUSH_SECONDS:
            self.flush()
        kind_counts = self.counts.by_kind[cn.kind]
        kind_counts[1] += 1
        if entry is None:
            self.counts.misses += 1
            return cn, None, None
        self.counts.hits += 1
        kind_counts[0] += 1
        return cn, served, entry

    def flush(self) -> None:
        """Write the buffered score updates of ``get`` (one backend write).  On a backend error
        they are dropped (a cache may lose score updates, never an entry's content)."""
        if self._scores:
            scores, self._scores = list(self._scores.values()), {}
            self.backend.record(scores, self.keep_observations)

    def _serve(self, cn: C.Canon, entry: Entry, text: str) -> dict | None:
        """The entry's answer in the query's symbols if it passes every check, else ``None``
        (and the entry is deleted).  Every hit checks the digest, the verifier hash and the kind.
        The quick check at fresh random points runs on the first hit of each stored artifact (its
        content digest) and, for an artifact verified only at points (``how`` not ``proved``), on
        every hit; an artifact proved symbolically at admission whose identical content (same
        digest, checked on this read) already passed here is not re-sampled: more random points
        add nothing to a proof.  The parsed artifact, its compiled check and its translation are
        memoised by the entry's digest."""
        ok = entry.intact and entry.verifier == verifier_hash(cn.kind) and entry.kind == cn.kind
        memo = (cn.key, entry.digest)
        if ok and memo in self._passed:
            self._passed.move_to_end(memo)
        elif ok:
            try:
                with C.time_limit(CHECK_SECONDS, "hit check"):  # a check that cannot finish: not served
                    check = self._checks.get_fresh((cn.key, entry.digest))
                    if check is None:
                        check = QuickCheck.compile(cn.kind, cn.form, self._artifact(entry))
                        self._checks.put((cn.key, entry.digest), check)
                    ok = check.check(self.rng)
            except (ReasonError, ValueError, TypeError, SyntaxError, sp.SympifyError):
                ok = False
            if ok and entry.how.startswith("proved"):
                self._passed.put(memo, True)
        if not ok:
            self.counts.rejected += 1
            self.backend.delete(cn.key)
            return None
        served = self._answers.get_fresh((text, entry.digest))
        if served is None:
            try:
                with C.time_limit(CHECK_SECONDS, "query check"):
                    served = self.for_query(cn, self._artifact(entry), entry.how)
            except (ReasonError, ValueError, TypeError, SyntaxError, sp.SympifyError):
                self.counts.rejected += 1
                self.backend.delete(cn.key)
                return None
            self._answers.put((text, entry.digest), served)
        return served

    def _artifact(self, entry: Entry) -> Any:
        """The entry's artifact parsed (SymPy objects are immutable: memoised by the digest,
        which the caller checked against the content)."""
        parsed = self._parsed.get_fresh(entry.digest)
        if parsed is None:
            parsed = answer_from_text(entry.kind, entry.artifact)
            self._parsed.put(entry.digest, parsed)
        return parsed

    def for_query(self, cn: C.Canon, canonical: Any, how: str) -> dict:
        """The canonical answer translated into the query's symbols and verified against the
        query *as written* (not only its canonical form): ``{"answer", ...}``.  ``solve``: each
        solution where the original equation is undefined is dropped (listed in ``excluded``; a
        removable singularity that the canonical form cancelled), a solution that does not solve
        the original raises :class:`VerifierRejected`; ``complete`` says whether the answer is
        every solution.  Other kinds: the quick check on the query itself."""
        answer = cn.to_query(canonical)
        if cn.kind == "integrate":
            # G' = F holds (the canonical check); the query's f(x) must equal F(a x + b) where
            # it is defined, and then the translated G(a x + b)/a differentiates to f: checked
            # without differentiating the translated answer symbolically (the costly step)
            if not QuickCheck.compile("simplify", cn.query, cn.form_in_query(), cn.var).check(self.rng):
                raise VerifierRejected("the query is not its canonical form where it is defined")
            return {"answer": C.to_text(answer)}
        if cn.kind != "solve":
            func = cn.rename["f"].func if cn.kind == "dsolve" else FUNC
            var = cn.var if cn.var is not None else C.VAR
            if not QuickCheck.compile(cn.kind, cn.query, answer, var, func).check(self.rng):
                raise VerifierRejected("the translated answer fails the check on the query as written")
            return {"answer": C.to_text(answer)}
        floats = cn.query.has(sp.Float)
        values = param_values(cn.query.free_symbols - {cn.var}, self.rng)
        kept, excluded = [], []
        for sol in answer:
            status = solution_status(cn.query, cn.var, sol, values, floats=floats)
            if status == "ok" and any(solution_status(d, cn.var, sol, values, floats=floats) == "undefined" for d in cn.domain):
                status = "undefined"  # a denominator or log of the query as written vanishes there
            if status == "wrong":
                raise VerifierRejected(f"{cn.var} = {sol} does not solve the equation as written")
            (kept if status == "ok" else excluded).append(sol)
        out = {"answer": C.to_text(kept), "complete": how.endswith("+complete")}
        assumes = _assumptions(kept, cn.var)
        if assumes:
            # the generic branch: where a parameter makes a denominator vanish the equation has
            # other solutions (or none); the answer says so instead of being wrong there
            out["assumes"] = assumes
        if excluded:
            out["excluded"] = C.to_text(excluded)
            out["why_excluded"] = "the equation as written is undefined there"
        return out

    # -- put --------------------------------------------------------------------------------------

    def put(self, subgoal: Any, answer: Any, now: float, *, verifier: str | None = None) -> dict:
        """Verify ``answer`` (in the query's symbols, printed) and admit it.  Raises
        :class:`VerifierRejected` when the check fails."""
        cn, canonical = self.offer(subgoal, answer, now, verifier=verifier)
        return self.admit(cn, canonical, now, offered=True)

    def offer(self, subgoal: Any, answer: Any, now: float, *, verifier: str | None = None) -> tuple[C.Canon, Any]:
        """The first half of :meth:`put`: the canonical form and the answer in canonical symbols;
        counts the offering query's observation of the subgoal."""
        self.flush()
        cn = self.canon(subgoal)
        if verifier is not None and verifier != verifier_hash(cn.kind):
            raise VerifierRejected(f"unknown verifier {verifier!r} for {cn.kind}; current: {verifier_hash(cn.kind)}")
        parsed = self._parse_artifact(cn.kind, answer)
        canonical = cn.to_canonical(parsed)  # refuses symbols the query does not have (capture)
        if cn.kind == "solve":
            # every solution must solve the equation as written, inside its domain
            values = param_values(cn.query.free_symbols - {cn.var}, self.rng)
            for sol in parsed:
                with C.time_limit(CHECK_SECONDS, "solution check"):
                    status = solution_status(cn.query, cn.var, sol, values, floats=cn.query.has(sp.Float))
                if status == "undefined":
                    raise VerifierRejected(f"{cn.var} = {sol} lies outside the domain of the equation as written")
                if status == "wrong":
                    raise VerifierRejected(f"{cn.var} = {sol} does not solve the equation as written")
        self.backend.observe(cn.key, bump(self.backend.observed(cn.key), now, self.half_life), self.keep_observations)
        return cn, canonical

    def admit(self, cn: C.Canon, canonical: Any, now: float, how: str | None = None, *, offered: bool = False) -> dict:
        """Admit a canonical answer (verified here unless ``how`` says it already was).

        Only what is proved is stored (:func:`reason.check.admission_refusal`): a ``solve`` answer
        must be complete, and an answer ``offered`` by a client (``put``) must be proved
        symbolically.  An offered answer that is not raises :class:`VerifierRejected` with the
        reason; a computed one is answered but not stored (``admitted: False`` and the reason).
        A stored entry is replaced by a strictly better-verified answer (``_RANK``)."""
        self.flush()
        if how is None and offered:
            how = full_check(cn.kind, cn.form, canonical, self.rng, proof_seconds=OFFERED_PROOF_SECONDS,
                             seconds=OFFERED_CHECK_SECONDS)
        elif how is None:
            how = full_check(cn.kind, cn.form, canonical, self.rng)
        try:
            with C.time_limit(CHECK_SECONDS, "admission"):
                refusal = admission_refusal(cn.kind, how, cn.form, offered=offered)
        except TimeLimit:
            refusal = admission_refusal(cn.kind, how, None, offered=offered)
        if refusal is not None:
            self.counts.refused += 1
            if offered:
                raise VerifierRejected(refusal)
            return {"key": cn.key, "admitted": False, "how": how, "reason": refusal}
        entry = Entry(cn.key, cn.kind, answer_text(cn.kind, canonical), verifier_hash(cn.kind), how)
        existing = self.backend.load(cn.key)
        if existing is not None:
            if (existing.intact and existing.verifier == entry.verifier and existing.kind == entry.kind
                    and _RANK.get(existing.how, 0) >= _RANK.get(how, 0)):
                # a verified entry is not overwritten by an answer verified no better (a put or a
                # racing solve); a proof replaces points, and an entry of an older verifier (a
                # different hash) is replaced by any verified answer
                self.counts.refused += 1
                return {"key": cn.key, "admitted": False, "how": how, "reason": "a verified entry exists"}
            self.backend.store(dataclasses.replace(entry, z=existing.z, hits=existing.hits).sealed())
            return {"key": cn.key, "admitted": True, "how": how, "replaced": True}
        observed = self.backend.observed(cn.key)
        score = score_at(observed, now, self.half_life)
        if score < self.admit_min:
            self.counts.refused += 1
            return {"key": cn.key, "admitted": False, "how": how, "reason": "observed too rarely"}
        evict = None
        if self.backend.count() >= self.capacity:
            victim = self.backend.victim()
            if victim is not None and score <= score_at(victim[1], now, self.half_life):
                self.counts.refused += 1
                return {"key": cn.key, "admitted": False, "how": how, "reason": "scores below every entry"}
            evict = victim[0] if victim is not None else None
        self.backend.store(dataclasses.replace(entry, z=observed if observed is not None else bump(None, now, self.half_life)).sealed(),
                           evict=evict)
        self.counts.admitted += 1
        self.counts.evicted += evict is not None
        return {"key": cn.key, "admitted": True, "how": how, "evicted": evict}

    # -- solve ------------------------------------------------------------------------------------

    def solve(self, subgoal: Any, now: float, compute: Callable[[str, sp.Expr], tuple[Any, float]],
              *, use_cache: bool = True) -> dict:
        """Answer from the cache, else ``compute(kind, form) -> (answer, cpu_s)``, verify and
        admit.  Returns ``{"answer", "hit", "key", "cpu_s", "how", ...}``."""
        cn, hit = self.lookup(subgoal, now, use_cache)
        if hit is not None:
            return hit
        canonical, cpu = compute(cn.kind, cn.form)
        return self.finish(cn, canonical, cpu, now, use_cache)

    def lookup(self, subgoal: Any, now: float, use_cache: bool = True) -> tuple[C.Canon, dict | None]:
        """The first half of :meth:`solve`: the canonical form and, on a served hit, the reply."""
        if not use_cache:
            return self.canon(subgoal), None
        cn, served, entry = self.get(subgoal, now)
        if served is None:
            return cn, None
        return cn, {**served, "hit": True, "key": cn.key, "cpu_s": 0.0, "how": entry.how}

    def finish(self, cn: C.Canon, canonical: Any, cpu: float, now: float, use_cache: bool = True,
               how: str | None = None) -> dict:
        """The second half of :meth:`solve`: verify a computed answer (unless ``how`` says it
        was), admit it, translate it."""
        self.counts.solved += 1
        self.counts.solver_cpu_s += cpu
        if how is None:
            how = full_check(cn.kind, cn.form, canonical, self.rng)
        with C.time_limit(CHECK_SECONDS, "query check"):
            served = self.for_query(cn, canonical, how)
        out = {**served, "hit": False, "key": cn.key, "cpu_s": cpu, "how": how}
        if use_cache:
            out["admission"] = self.admit(cn, canonical, now, how)
        return out

    # -- statistics -------------------------------------------------------------------------------

    def hit_ratio(self) -> float:
        return self.counts.hits / self.counts.gets if self.counts.gets else 0.0

    def priority_hint(self, kind: str | None = None) -> int:
        """0..3: how likely a query (of ``kind``) is answered from the cache — a scheduler may run
        likely hits first (they cost nothing) and give likely misses the solver's budget."""
        hits, gets = self.counts.by_kind[kind] if kind else (self.counts.hits, self.counts.gets)
        ratio = hits / gets if gets else 0.0
        return min(3, int(ratio * 4))

    def stats(self) -> dict:
        self.flush()
        c = self.counts
        return {"gets": c.gets, "hits": c.hits, "misses": c.misses, "rejected": c.rejected,
                "admitted": c.admitted, "refused": c.refused, "evicted": c.evicted, "solved": c.solved,
                "solver_cpu_s": c.solver_cpu_s, "hit_ratio": self.hit_ratio(),
                "priority_hint": self.priority_hint(),
                "by_kind": {k: {"hits": v[0], "gets": v[1], "priority_hint": self.priority_hint(k)}
                            for k, v in c.by_kind.items()},
                "entries": self.backend.count(), "backend": self.backend.name, "capacity": self.capacity,
                "half_life_s": self.half_life, "admit_min": self.admit_min}
