"""Verifiers of answers to subgoals, in canonical symbols (:mod:`reason.canon`).

Each kind has one verifier, named with a version; :func:`verifier_hash` is what a cache stores
with an artifact, so an artifact accepted by an older or different check is never served as if
the current one had accepted it.

A check reduces an answer to *residuals* that vanish exactly when the answer is right:

* ``integrate``: ``d/dx G - f``;
* ``solve``: ``f(x = s)`` for every solution ``s`` (at least one; for a polynomial equation, as
  many distinct solutions as the square-free part's degree);
* ``simplify``: ``g - f``;
* ``dsolve``: the ODE with ``f(x)`` replaced by the solution (which must hold as many constants
  ``C1, C2, ...`` as the ODE's order).

:func:`full_check` (at admission) first tries to prove the residual zero with ``simplify`` under a
time limit, and always evaluates it at random real points (parameters, constants and the
variable drawn at random): a residual above tolerance at any point rejects.  :class:`QuickCheck`
(every cache hit) compiles the residuals once per artifact with ``lambdify`` and evaluates them
at fresh random points, which costs microseconds; an artifact it cannot evaluate at enough points
is not served.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import warnings
from typing import Any

import numpy as np
import scipy.special  # noqa: F401 - lambdify's "scipy" module: imported here, not inside the first check
import sympy as sp

from reason.canon import FUNC, VAR, time_limit
from reason.errors import TimeLimit, VerifierRejected

VERIFIERS = {
    "integrate": "integrate/diff+points/v1",
    "solve": "solve/subs+points/v1",
    "simplify": "simplify/difference+points/v1",
    "dsolve": "dsolve/residual+points/v1",
}
#: Relative tolerance of a numeric residual: |sum| <= RTOL * (1 + sum |terms|).
RTOL = 1e-8
#: Points evaluated by the full check and by the quick check of a hit.
FULL_POINTS = 12
QUICK_POINTS = 4
#: Time bound of the symbolic proof attempt, seconds.
PROOF_SECONDS = 0.5
#: Time bound of one whole check (compile and evaluate, and the proof attempt), seconds; kept below
#: the kernel's default liveness window, as checks run on a service's event-loop thread.
CHECK_SECONDS = 1.5
#: Range of the random points: the variable, then parameters and ODE constants.
VAR_RANGE = (0.15, 0.95)
PARAM_RANGE = (0.5, 1.5)


def verifier_hash(kind: str) -> str:
    """Hash of the verifier of ``kind`` with its settings."""
    spec = f"{VERIFIERS[kind]}|rtol={RTOL}|full={FULL_POINTS}|quick={QUICK_POINTS}|{VAR_RANGE}|{PARAM_RANGE}"
    return hashlib.blake2b(spec.encode(), digest_size=8).hexdigest()


def _constants(expr: sp.Expr) -> set[sp.Symbol]:
    return {s for s in expr.free_symbols if s.name[:1] == "C" and s.name[1:].isdigit()}


def residuals(kind: str, form: sp.Expr, answer: Any) -> list[sp.Expr]:
    """The expressions that must vanish; raises :class:`VerifierRejected` for an answer of the
    wrong shape (no solutions, too few constants, a leftover unevaluated integral)."""
    if kind == "integrate":
        if answer.has(sp.Integral):
            raise VerifierRejected("an antiderivative must not contain an unevaluated integral")
        return [sp.diff(answer, VAR) - form]
    if kind == "simplify":
        return [answer - form]
    if kind == "solve":
        sols = list(answer)
        if not sols:
            raise VerifierRejected("no solutions given")
        if any(s.has(VAR) for s in sols):
            raise VerifierRejected("a solution must not contain the variable")
        num = sp.numer(sp.together(form))
        if num.is_polynomial(VAR) and not num.free_symbols - {VAR}:
            degree = sp.degree(sp.sqf_part(num), VAR)
            if len(set(sols)) != degree:
                raise VerifierRejected(f"{len(set(sols))} distinct solutions for a square-free degree of {degree}")
        return [form.xreplace({VAR: s}) for s in sols]
    if kind == "dsolve":
        order = max((d.derivative_count for d in form.atoms(sp.Derivative)), default=0)
        if answer.has(FUNC(VAR)):
            raise VerifierRejected("a solution must be explicit in the function")
        if len(_constants(answer)) < order:
            raise VerifierRejected(f"a general solution of order {order} needs {order} constants")
        return [form.subs(FUNC(VAR), answer).doit()]
    raise VerifierRejected(f"no verifier for {kind!r}")


@dataclasses.dataclass
class QuickCheck:
    """Residuals compiled for fast evaluation at random points."""

    symbols: tuple[sp.Symbol, ...]
    funcs: list[Any]

    @classmethod
    def compile(cls, kind: str, form: sp.Expr, answer: Any) -> "QuickCheck":
        res = residuals(kind, form, answer)
        symbols = tuple(sorted(set().union(*(r.free_symbols for r in res)), key=lambda s: s.name))
        funcs = []
        for r in res:
            terms = list(sp.Add.make_args(r))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                funcs.append(sp.lambdify(symbols, terms, modules=["scipy", "numpy"]))
        return cls(symbols, funcs)

    def _points(self, rng: np.random.Generator, n: int) -> list[np.ndarray]:
        cols = []
        for s in self.symbols:
            lo, hi = VAR_RANGE if s == VAR else PARAM_RANGE
            cols.append(rng.uniform(lo, hi, n))
        return cols

    def check(self, rng: np.random.Generator, points: int = QUICK_POINTS) -> bool:
        """True when every residual is within tolerance at ``points`` random points where it can
        be evaluated (drawing up to four times as many); False otherwise."""
        cols = self._points(rng, 4 * points)
        for fn in self.funcs:
            good = 0
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    terms = [np.broadcast_to(np.asarray(t, dtype=complex), (4 * points,)) for t in fn(*cols)]
                except (ZeroDivisionError, OverflowError, ValueError, TypeError, NameError):
                    return False
            total = np.sum(terms, axis=0)
            scale = np.sum(np.abs(terms), axis=0)
            for i in range(4 * points):
                if not (math.isfinite(abs(total[i])) and math.isfinite(scale[i])):
                    continue
                if abs(total[i]) > RTOL * (1 + scale[i]):
                    return False
                good += 1
                if good >= points:
                    break
            if good < points:
                return False
        return True


def warm_up() -> None:
    """Compile and run one check, so that the first real one does not pay SymPy's and lambdify's
    one-time costs inside its time bound (services call this in ``setup``)."""
    QuickCheck.compile("integrate", VAR * sp.exp(VAR), (VAR - 1) * sp.exp(VAR)).check(np.random.default_rng(0))


def full_check(kind: str, form: sp.Expr, answer: Any, rng: np.random.Generator,
               proof_seconds: float = PROOF_SECONDS, seconds: float = CHECK_SECONDS) -> str:
    """Verify ``answer`` for the canonical ``form``; returns ``"proved"`` (the residual
    simplifies to 0) or ``"points"`` (no proof within the bound, every point within tolerance).
    Raises :class:`VerifierRejected`, or :class:`TimeLimit` past ``seconds``."""
    with time_limit(seconds, "verification"):
        quick = QuickCheck.compile(kind, form, answer)
        if not quick.check(rng, FULL_POINTS):
            raise VerifierRejected(f"{kind} answer fails the residual check at random points")
        try:
            with time_limit(proof_seconds, "proof attempt"):
                proved = all(sp.simplify(r) == 0 for r in residuals(kind, form, answer))
        except TimeLimit as exc:
            if "proof attempt" not in str(exc):
                raise  # the whole check's bound, not the proof's
            proved = False
    return "proved" if proved else "points"
