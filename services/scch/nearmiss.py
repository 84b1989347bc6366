"""scch's near-miss proposer (seed 004 C-7): on a miss, the cached answers of *similar* subgoals are
proposed as candidates for the new one, found by embedding in a :class:`lm.vectorstore.VectorStore`,
and a candidate is **accepted only after canonical verification** against the new subgoal.

Why it can find anything: canonical keys are exact (renaming, re-ordering, affine substitution,
expansion), so subgoals that differ in form but share an answer -- ``∫ sin(x)^2`` and
``∫ 1 - cos(x)^2`` (antiderivatives one constant apart), ``x - 3 = 0`` and ``x^2 - 6x + 9 = 0`` --
have different keys; one's answer is still a right answer to the other.

* **Embedding** (:func:`embed`): hashed character 3-grams of ``kind | canonical text`` (BLAKE2b,
  stable across processes; :data:`TEXT_DIM` wide) beside a value signature -- the canonical form
  evaluated at :data:`POINTS` fixed points with the parameters at fixed values (integrands that are
  equal as functions embed alike) -- each part unit-normalised; cosine similarity.
* **Proposal** (:meth:`NearMissProposer.propose`): the top ``k`` stored keys other than the
  subgoal's own, with similarity at least ``min_score``.
* **Acceptance** (:meth:`NearMissProposer.resolve`): the candidate entry must be intact, of the
  same kind and verifier; its canonical answer must pass :func:`reason.check.full_check` against the
  *new* canonical form (``solve``: ``+complete`` required, every solution and only solutions), and
  then the cache's own :meth:`~services.scch.logic.SubgoalCache.for_query` check against the query
  as written.  Anything else is a rejection, counted; nothing unverified is ever returned.

The hook (int25's ``services/scch``): after a miss, ``resolve(cache, cn)``; after an admission,
``remember(cn)``.  Pure apart from the cache's backend reads; no clock.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any

import numpy as np
import sympy as sp

from lm.vectorstore import VectorStore
from reason import canon as C
from reason.check import full_check, verifier_hash
from reason.errors import ReasonError
from services.scch.logic import SubgoalCache, answer_from_text

TEXT_DIM = 96
POINTS = (-1.7, -0.6, 0.35, 0.9, 1.45, 2.3, 3.1, 4.2)
#: Parameter values the value signature uses (c0, c1, ... in canonical forms).
PARAM_VALUE = 1.3
#: Weight of the value signature against the text part.
VALUE_WEIGHT = 1.0
DEFAULT_K = 3
DEFAULT_MIN_SCORE = 0.35
_VERIFY_ERRORS = (ReasonError, ValueError, TypeError, SyntaxError, ZeroDivisionError, sp.SympifyError)


def _text_part(kind: str, text: str) -> np.ndarray:
    vec = np.zeros(TEXT_DIM, np.float32)
    s = f"^{kind}|{text.replace(' ', '')}$"
    for i in range(len(s) - 2):
        h = hashlib.blake2b(s[i : i + 3].encode(), digest_size=4).digest()
        vec[int.from_bytes(h, "little") % TEXT_DIM] += 1.0
    n = np.linalg.norm(vec)
    return vec / n if n else vec


def _value_part(form: sp.Expr, var: sp.Symbol | None) -> np.ndarray:
    out = np.zeros(len(POINTS), np.float32)
    x = var if var is not None else C.VAR
    params = {s: PARAM_VALUE for s in form.free_symbols if s != x}
    try:
        base = form.xreplace(params)
        for i, p in enumerate(POINTS):
            v = complex(sp.N(base.xreplace({x: p}), 15))
            out[i] = math.atan(v.real) if math.isfinite(v.real) else 0.0  # bounded, sign kept
    except (TypeError, ValueError, ZeroDivisionError, OverflowError, AttributeError):
        return np.zeros(len(POINTS), np.float32)
    n = np.linalg.norm(out)
    return out / n if n else out


def embed(cn: C.Canon) -> np.ndarray:
    """The subgoal's embedding (``TEXT_DIM + len(POINTS)`` wide; see the module docstring)."""
    form = cn.form
    if cn.kind == "dsolve":
        return np.concatenate((_text_part(cn.kind, cn.text), np.zeros(len(POINTS), np.float32)))
    return np.concatenate((_text_part(cn.kind, cn.text), VALUE_WEIGHT * _value_part(form, C.VAR)))


@dataclasses.dataclass
class NearMissCounts:
    lookups: int = 0
    proposed: int = 0
    accepted: int = 0
    rejected: int = 0


class NearMissProposer:
    def __init__(
        self, k: int = DEFAULT_K, min_score: float = DEFAULT_MIN_SCORE, store: VectorStore | None = None
    ) -> None:
        if k < 1 or not -1.0 <= min_score <= 1.0:
            raise ValueError("k >= 1 and min_score in [-1, 1] are required")
        self.k, self.min_score = k, min_score
        self.store = store if store is not None else VectorStore(TEXT_DIM + len(POINTS), "cosine")
        self.counts = NearMissCounts()

    def remember(self, cn: C.Canon) -> bool:
        """Index an admitted subgoal (once per key); False if it has no usable embedding."""
        if cn.key in self.store.index:
            return True
        vec = embed(cn)
        if not np.linalg.norm(vec):
            return False
        self.store.add([cn.key], vec[None, :])
        return True

    def propose(self, cn: C.Canon) -> list[tuple[str, float]]:
        vec = embed(cn)
        if not np.linalg.norm(vec) or not len(self.store):
            return []
        hits = self.store.search(vec[None, :], self.k + 1)[0]
        return [(key, s) for key, s in hits if key != cn.key and s >= self.min_score][: self.k]

    def resolve(self, cache: SubgoalCache, cn: C.Canon) -> dict[str, Any] | None:
        """A verified answer to ``cn`` from a similar entry, or None.  Never returns an answer
        that failed a check."""
        self.counts.lookups += 1
        for key, score in self.propose(cn):
            self.counts.proposed += 1
            entry = cache.backend.load(key)
            if entry is None or not entry.intact or entry.kind != cn.kind or entry.verifier != verifier_hash(cn.kind):
                self.counts.rejected += 1
                continue
            try:
                answer = answer_from_text(cn.kind, entry.artifact)
                how = full_check(cn.kind, cn.form, answer, cache.rng)
                if cn.kind == "solve" and not how.endswith("+complete"):
                    raise ValueError("a near-miss solve answer must be complete")
                served = cache.for_query(cn, answer, how)
            except _VERIFY_ERRORS:
                self.counts.rejected += 1
                continue
            self.counts.accepted += 1
            return {
                **served,
                "hit": False,
                "near_miss": True,
                "near_miss_of": key,
                "similarity": score,
                "how": how,
                "canonical": answer,
            }
        return None
