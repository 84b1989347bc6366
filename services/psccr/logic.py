"""PSC-CR logic, without sockets: a derivation is a chain of transformations of one expression,
each verified; every verified state is a checkpoint keyed canonically (:mod:`reason.canon`).

* A step whose result fails its check is retried from the last verified checkpoint (the state
  before it), never from the start.
* Before computing a step, the store is asked for a verified continuation from an equivalent
  state (same canonical key, same step): a *cousin* branch — another derivation that reached an
  equivalent state — may have computed it.  The stored result is translated into this
  derivation's symbols, re-checked cheaply, and grafted instead of recomputed.

Steps: ``{"op": "integrate" | "diff" | "expand" | "simplify" | "subs", "arg"?}`` (``subs``:
``arg`` is an expression replacing the variable).  :class:`Checkpoints` is an in-memory store or a
SQLite file (WAL).  ``await compute(op, expr, var, arg) -> (result, cpu_s)`` does the work; the
service passes kernel-budgeted calls for the heavy ops, the benchmark local ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sqlite3
from typing import Awaitable, Callable

import numpy as np
import sympy as sp

from reason import canon as C
from reason.check import CHECK_SECONDS, QuickCheck
from reason.errors import ParseError, TimeLimit, VerifierRejected

OPS = ("integrate", "diff", "expand", "simplify", "subs")
MAX_STEPS = 256
#: Attempts of one step before the derivation stops.
MAX_ATTEMPTS = 4


def compute_local(op: str, expr: sp.Expr, var: sp.Symbol, arg: sp.Expr | None) -> sp.Expr:
    if op == "integrate":
        return sp.integrate(expr, var)
    if op == "diff":
        return sp.diff(expr, var)
    if op == "expand":
        return sp.expand(expr)
    if op == "simplify":
        return sp.simplify(expr)
    if op == "subs":
        return expr.xreplace({var: arg})
    raise ParseError(f"unknown step op {op!r}; ops: {', '.join(OPS)}")


def check_step(op: str, before: sp.Expr, after: sp.Expr, var: sp.Symbol, arg: sp.Expr | None,
               rng: np.random.Generator) -> bool:
    """Is ``after`` a correct result of ``op`` on ``before``?  (Random-point residual checks of
    both signs, in the derivation's own symbols: nothing is renamed, so no symbol of the
    expression can be captured by the variable.)"""
    b, a = before, after
    if op == "integrate":
        kind, form, answer = "integrate", b, a
    elif op == "diff":
        kind, form, answer = "simplify", sp.diff(b, var), a
    elif op == "subs":
        kind, form, answer = "simplify", b.xreplace({var: arg}), a
    else:
        kind, form, answer = "simplify", b, a
    try:
        with C.time_limit(CHECK_SECONDS, "step check"):
            return QuickCheck.compile(kind, form, answer, var).check(rng, 6)
    except (VerifierRejected, TimeLimit, TypeError, ValueError):
        return False


class Checkpoints:
    """Verified states and continuations: ``(state key, step key) -> next state`` in canonical
    symbols.  SQLite (``path``; ``":memory:"`` by default), WAL mode."""

    def __init__(self, path: str = ":memory:") -> None:
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS edges (state TEXT, step TEXT, result TEXT, PRIMARY KEY (state, step))")

    def get(self, state: str, step: str) -> str | None:
        row = self.db.execute("SELECT result FROM edges WHERE state = ? AND step = ?", (state, step)).fetchone()
        return row[0] if row else None

    def put(self, state: str, step: str, result: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO edges VALUES (?, ?, ?)", (state, step, result))

    def count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM edges").fetchone()[0]


@dataclasses.dataclass
class Outcome:
    final: str
    ok: bool
    steps: int
    computed: int = 0        # step computations run (including failed attempts and redone work)
    redone: int = 0          # computations repeated because of a failure (restart cost)
    redone_cpu_s: float = 0.0
    failures: int = 0
    grafted: int = 0
    cpu_s: float = 0.0
    trail: list = dataclasses.field(default_factory=list)


def _step_key(step: dict, cn: C.Canon, var: sp.Symbol) -> str | None:
    """The step in the state's canonical symbols: its op, its argument, and which canonical
    symbol is the derivation's variable."""
    arg = step.get("arg")
    state_syms = cn.query.free_symbols
    if var not in state_syms:
        # every symbol of the state is a constant for the step; the variable has no canonical
        # name, and its raw name could collide with one (``c1`` for a state renamed to
        # ``c0*c1**2``): no key, no reuse
        return None
    if arg is not None:
        parsed = C.parse(arg)
        if parsed.free_symbols - state_syms:
            return None  # the argument brings a symbol the state lacks: no key, no reuse
        arg = sp.srepr(cn._to_canon_syms(parsed))
    role = sp.srepr(cn._to_canon_syms(var))
    return hashlib.blake2b(json.dumps([step["op"], arg, role]).encode(), digest_size=12).hexdigest()


def _state_canon(expr: sp.Expr) -> C.Canon:
    """A state keyed by its α-renamed normal form (renaming and operand order are ignored);
    translation back is a pure renaming."""
    return C.canonicalise({"kind": "simplify", "expr": sp.sstr(expr)})


async def derive(start: str, var: str, steps: list[dict], *, compute: Callable[..., Awaitable[tuple[sp.Expr, float]]],
           store: Checkpoints | None, faults: set[int] = frozenset(), mode: str = "checkpoint",
           rng: np.random.Generator | None = None, corrupt: Callable[[sp.Expr], sp.Expr] | None = None) -> Outcome:
    """Run a derivation.  ``mode="checkpoint"`` (PSC-CR): retry a failed step from the state
    before it, graft continuations found in ``store``.  ``mode="scratch"`` (the peer): a failed
    step restarts the derivation from the start.  ``faults``: step indices whose first attempt is
    corrupted (an injected wrong result, as a faulty model or tool would produce)."""
    if mode not in ("checkpoint", "scratch"):
        raise ParseError("mode is checkpoint or scratch")
    if not isinstance(steps, list) or not 1 <= len(steps) <= MAX_STEPS:
        raise ParseError(f"steps: a list of 1..{MAX_STEPS} steps")
    for st in steps:
        if not isinstance(st, dict) or st.get("op") not in OPS:
            raise ParseError(f"a step is {{op, arg?}} with op in {OPS}")
    rng = rng or np.random.default_rng()
    corrupt = corrupt or (lambda e: e + C.VAR ** 2 / 7 + 1)
    x = sp.Symbol(var)
    state0 = C.parse(start)
    pending_faults = set(faults)
    out = Outcome(final="", ok=False, steps=len(steps))
    state, i = state0, 0
    progress = 0  # the furthest step reached (work past a restart point is redone)
    attempts = 0
    while i < len(steps):
        step = steps[i]
        arg = C.parse(step["arg"]) if step.get("arg") is not None else None
        cn = _state_canon(state) if store is not None and mode == "checkpoint" else None
        skey = _step_key(step, cn, x) if cn is not None else None
        if skey is None:
            cn = None
        if cn is not None:
            found = store.get(cn.key, skey)
            if found is not None:
                candidate = cn.to_query(C.parse(found, artifact=True))
                if check_step(step["op"], state, candidate, x, arg, rng):
                    out.grafted += 1
                    out.trail.append({"step": i, "how": "grafted"})
                    state, i = candidate, i + 1
                    progress = max(progress, i)
                    continue
        result, cpu = await compute(step["op"], state, x, arg)
        out.computed += 1
        out.cpu_s += cpu
        if i < progress:
            out.redone += 1
            out.redone_cpu_s += cpu
        if i in pending_faults:
            pending_faults.discard(i)
            result = corrupt(result)
        if not check_step(step["op"], state, result, x, arg, rng):
            out.failures += 1
            out.trail.append({"step": i, "how": "failed"})
            attempts += 1
            if attempts > MAX_ATTEMPTS:
                out.final = sp.sstr(state)
                return out
            if mode == "scratch":
                progress = max(progress, i + 1)
                state, i = state0, 0
            else:
                progress = max(progress, i + 1)  # the failed attempt is redone from the checkpoint
            continue
        attempts = 0
        if cn is not None:
            try:
                store.put(cn.key, skey, sp.sstr(cn.to_canonical(result)))
            except VerifierRejected:
                pass  # the result has a symbol the state lacks: not reusable under the state's key
        out.trail.append({"step": i, "how": "computed"})
        state, i = result, i + 1
    out.final, out.ok = sp.sstr(state), True
    return out
