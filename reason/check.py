"""Verifiers of answers to subgoals (:mod:`reason.canon`).

Each kind has one verifier, named with a version; :func:`verifier_hash` is what a cache stores
with an artifact, so an artifact accepted by an older or different check is never served as if
the current one had accepted it.

A check reduces an answer to *residuals* that vanish exactly when the answer is right:

* ``integrate``: ``d/dx G - f``;
* ``solve``: ``f(x = s)`` for every solution ``s``;
* ``simplify``: ``g - f``;
* ``dsolve``: the ODE with ``f(x)`` replaced by the solution (which must hold as many constants
  ``C1, C2, ...`` as the ODE's order).

Every symbol is taken as **real** and the residuals are evaluated at random points **of both
signs** (the variable alternates sign; parameters and constants take random signs), in complex
arithmetic: ``sqrt(x^2) = x``, ``∫|x| dx = x²/2`` and ``log(ab) = log a + log b`` all fail at
negative points.  A point where the original expression is undefined is skipped (a residual
term that is not finite), and a check needs enough defined points, or it refuses.

``solve`` answers get more (:func:`check_solutions`): no duplicates and no numerical
near-duplicates; each solution is a zero of the equation at 50 significant digits (exact answers
to 1e-25, answers with floats to 1e-10, relative) and lies in its domain (the equation is finite
there); the solutions must be *all* of them (:func:`solution_count`) when the equation's
numerator factors into polynomials in the variable (parameters allowed, as polynomial
coefficients) and factors with no zero at all (``exp(g)``, ``b**g``, constants): the count is the
degree of the polynomial part's generic square-free part.  Other equations (``sin``, ``log``,
``exp(x) - 2``, ...) are verified solution by solution and said to be incomplete
(``complete: False``); :func:`admission_refusal` keeps them out of a cache ("cannot prove the
solution set complete").

:func:`full_check` (at admission) first tries to prove the residual zero with ``simplify`` under a
time limit, and always evaluates it at random points: a residual above tolerance (``RTOL``, 1e-11 relative) at
any point rejects.  Points are never a proof: an answer a client offers (``put``) is stored only
when ``"proved"``.  :class:`QuickCheck` (every cache hit) compiles the residuals once per artifact with
``lambdify`` and evaluates them at fresh random points, which costs microseconds; an artifact it
cannot evaluate at enough points is not served.  Functions NumPy/SciPy cannot evaluate
(``meijerg``, ...) are evaluated with mpmath.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import warnings
from typing import Any

import mpmath
import numpy as np
import scipy.special  # noqa: F401 - lambdify's "scipy" module: imported here, not inside the first check
import sympy as sp

from reason.canon import FUNC, VAR, time_limit
from reason.errors import TimeLimit, VerifierRejected

VERIFIERS = {
    "integrate": "integrate/diff+points/v3",
    "solve": "solve/subs+domain+factor-count/v3",
    "simplify": "simplify/difference+points/v3",
    "dsolve": "dsolve/residual+points/v3",
}
#: Relative tolerance of a numeric residual: |sum| <= RTOL * (1 + sum |terms|).  Double precision
#: leaves ~1e-15 relative error per term; 1e-11 rejects perturbations of 1e-9 (v2 had 1e-8, which
#: admitted ``sin(x) + 1e-9 x`` as an antiderivative of ``cos(x)``).  Points are evidence, not a
#: proof: an answer offered by a client is admitted only when proved (:func:`admission_refusal`).
RTOL = 1e-11
#: Points evaluated by the full check and by the quick check of a hit.
FULL_POINTS = 12
QUICK_POINTS = 4
#: Time bound of the symbolic proof attempt, seconds.
PROOF_SECONDS = 0.5
#: The proof attempt's and the whole check's bounds for an answer offered by a client (``put``),
#: which is stored only when proved: longer, so that a busy machine does not turn a provable
#: answer into a refusal.  (The service runs this check in its killable solver process.)
OFFERED_PROOF_SECONDS = 3.0
OFFERED_CHECK_SECONDS = 5.0
#: Time bound of one whole check (compile and evaluate, and the proof attempt), seconds; kept below
#: the kernel's default liveness window, as checks run on a service's event-loop thread.
CHECK_SECONDS = 1.5
#: Magnitudes of the random points (signs drawn separately): the variable, then parameters and
#: ODE constants.
VAR_RANGE = (0.2, 3.5)
PARAM_RANGE = (0.25, 3.5)
#: Digits of the high-precision evaluation of a solution, and the relative tolerances of an exact
#: answer and of one holding floats.
SOLUTION_DIGITS = 50
EXACT_TOL = 1e-25
FLOAT_TOL = 1e-10
#: Two solutions closer than this (relative) are one solution written twice.
NEAR_DUPLICATE = 1e-6


_HASHES: dict[tuple, str] = {}


def verifier_hash(kind: str) -> str:
    """Hash of the verifier of ``kind`` with its settings (memoised by the settings themselves:
    every cache hit asks for it)."""
    settings = (VERIFIERS[kind], RTOL, FULL_POINTS, QUICK_POINTS, VAR_RANGE, PARAM_RANGE, SOLUTION_DIGITS, EXACT_TOL,
                FLOAT_TOL, NEAR_DUPLICATE)
    found = _HASHES.get(settings)
    if found is None:
        spec = (f"{VERIFIERS[kind]}|rtol={RTOL}|full={FULL_POINTS}|quick={QUICK_POINTS}|{VAR_RANGE}|{PARAM_RANGE}"
                f"|{SOLUTION_DIGITS}|{EXACT_TOL}|{FLOAT_TOL}|{NEAR_DUPLICATE}")
        found = _HASHES[settings] = hashlib.blake2b(spec.encode(), digest_size=8).hexdigest()
    return found


def _constants(expr: sp.Expr) -> set[sp.Symbol]:
    return {s for s in expr.free_symbols if s.name[:1] == "C" and s.name[1:].isdigit()}


def _real(exprs: list[sp.Expr]) -> tuple[list[sp.Expr], dict[sp.Symbol, sp.Symbol]]:
    """``exprs`` with every plain symbol replaced by a real symbol of the same name."""
    syms = set().union(*(e.free_symbols for e in exprs)) if exprs else set()
    mapping = {s: sp.Symbol(s.name, real=True) for s in syms if isinstance(s, sp.Symbol) and not s.is_real}
    return [e.xreplace(mapping) for e in exprs], mapping


def _has_float(*exprs: Any) -> bool:
    return any(isinstance(e, sp.Basic) and e.has(sp.Float) for e in exprs)


def is_polynomial_equation(form: sp.Expr, var: sp.Symbol = VAR) -> bool:
    num = sp.numer(sp.together(form))
    return bool(num.is_polynomial(var)) and num.has(var)


def has_no_roots(form: sp.Expr, var: sp.Symbol = VAR) -> bool:
    """Whether ``form = 0`` has no solution because its (cancelled) numerator is a non-zero
    constant in ``var`` (``1/(x+1) = 0``; with parameters: generically non-zero)."""
    num = sp.numer(sp.cancel(sp.together(form)))
    return not num.has(var) and num != 0


def root_count(form: sp.Expr, var: sp.Symbol = VAR) -> int | None:
    """The number of distinct roots of ``form``'s numerator, a polynomial in ``var`` (the degree of
    its generic square-free part, parameters as coefficients); ``None`` when it is no polynomial."""
    num = sp.numer(sp.together(form))
    if not num.is_polynomial(var) or not num.has(var):
        return None
    return int(sp.Poly(num, var).sqf_part().degree())


def _never_zero(factor: sp.Expr, var: sp.Symbol) -> bool:
    """Whether ``factor`` (one factor of a product) has no zero in ``var``, over the complex
    numbers too: a factor without ``var`` (a constant or a parameter, generically non-zero),
    ``exp(g)``, or ``b**g`` with ``b`` free of ``var`` and not zero."""
    if not factor.has(var):
        return True
    base, exp = factor.as_base_exp()  # exp(g) -> (E, g)
    return not base.has(var) and base.is_zero is not True and bool(exp.has(var))


def _log_argument(factor: sp.Expr, var: sp.Symbol) -> sp.Expr | None:
    """``g`` when ``factor`` is ``log(g)`` (or a positive integer power of it) with ``g`` a
    polynomial in ``var``; None otherwise."""
    base, exp = factor.as_base_exp()
    if exp != 1 and not (exp.is_Integer and exp > 0):
        return None
    if isinstance(base, sp.log) and len(base.args) == 1 and base.args[0].is_polynomial(var):
        return base.args[0]
    return None


def solution_count(form: sp.Expr, var: sp.Symbol = VAR) -> tuple[int | None, str]:
    """``(n, "")``: the equation ``form = 0`` has exactly ``n`` distinct solutions in ``var`` (for
    generic parameters), proved by factoring; ``(None, why)`` when that cannot be proved.

    Recognised: a numerator that is a product of polynomials in ``var`` (parameters as
    coefficients), factors with no zero at all (``exp(g)``, ``b**g`` with ``b`` free of ``var``,
    constants) and logarithms of polynomials, ``log(g)`` (or a power of one): SymPy's ``log`` is
    the principal branch, ``log z = ln|z| + i arg z``, which is 0 exactly at ``z = 1``, over the
    complex numbers too -- so ``log(g) = 0`` has exactly the roots of ``g - 1``.  The candidates
    are the roots of the square-free part ``S`` of the product of the polynomial factors and the
    ``g - 1``; those where the equation is undefined -- a root of a logarithm's argument ``g`` or
    of a denominator polynomial -- are removed exactly (``S / gcd(S, D)``), so ``x log x = 0`` has
    one solution (``x = 0`` is outside the domain).  A denominator may hold polynomials and
    zero-free factors.  Anything else -- ``sin``, ``sqrt``, a sum such as ``exp(x) - 2``
    (infinitely many complex solutions ``log 2 + 2 pi i k``), ``x exp(x) - c`` (every branch of
    Lambert's W) -- is not counted."""
    num, den = sp.fraction(sp.together(form))
    poly = sp.Integer(1)
    undefined = sp.Integer(1)  # where a logarithm's argument or a denominator vanishes
    for factor in sp.Mul.make_args(sp.factor(num)):
        if _never_zero(factor, var):
            continue
        if factor.is_polynomial(var):
            poly *= factor
            continue
        arg = _log_argument(factor, var)
        if arg is not None:
            poly *= arg - 1
            undefined *= arg
            continue
        return None, (f"cannot prove the solution set complete: the factor {sp.sstr(factor)} is neither a "
                      f"polynomial in {var}, the logarithm of one, nor free of zeros (a periodic or "
                      f"transcendental equation may have solutions the answer does not list)")
    if num.has(sp.log):
        # a logarithm inside a factor counted as a polynomial or zero-free (log(2)*x, x**log(3))
        # has a domain too; its argument must not vanish at a counted root
        for node in sp.preorder_traversal(num):
            if isinstance(node, sp.log) and node.args[0].has(var):
                if not node.args[0].is_polynomial(var):
                    return None, f"cannot prove the solution set complete: log of {sp.sstr(node.args[0])}"
                undefined *= node.args[0]
    if not poly.has(var):
        return 0, ""
    for factor in sp.Mul.make_args(sp.factor(den)):
        if _never_zero(factor, var):
            continue
        if not factor.is_polynomial(var):
            return None, f"cannot prove the solution set complete: the denominator factor {sp.sstr(factor)} is not a polynomial"
        undefined *= factor
    roots = sp.Poly(sp.expand(poly), var).sqf_part()
    if undefined.has(var):
        common = sp.gcd(roots.as_expr(), sp.expand(undefined))
        if common.has(var):
            roots = sp.Poly(sp.quo(roots.as_expr(), common, var), var)
    return int(roots.degree()), ""


def param_values(symbols: set[sp.Symbol], rng: np.random.Generator) -> dict[sp.Symbol, sp.Rational]:
    """Random rational values of both signs for ``symbols`` (exact, so 50 digits are meaningful)."""
    out = {}
    for s in sorted(symbols, key=lambda s: s.name):
        lo, hi = PARAM_RANGE
        mag = sp.Rational(int(rng.uniform(lo, hi) * 1000), 1000)
        out[s] = mag if rng.random() < 0.5 else -mag
    return out


def solution_status(form: sp.Expr, var: sp.Symbol, sol: sp.Expr, values: dict, *, floats: bool) -> str:
    """``"ok"`` when ``sol`` is a zero of ``form`` at the parameter ``values`` (50 digits),
    ``"undefined"`` when ``form`` is not finite there (outside its domain), else ``"wrong"``."""
    point = sol.xreplace(values)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            exact = form.xreplace(values).xreplace({var: point})
        except (ZeroDivisionError, TypeError, ValueError):
            return "undefined"
        if exact.has(sp.nan, sp.zoo, sp.oo, -sp.oo):
            return "undefined"
        # the domain: every denominator and logarithm's argument is non-zero at the point
        for node in sp.preorder_traversal(form.xreplace(values)):
            base = None
            if isinstance(node, sp.Pow) and node.exp.is_negative:
                base = node.base
            elif isinstance(node, sp.log):
                base = node.args[0]
            if base is not None and base.has(var):
                b = sp.N(base.xreplace({var: point}), SOLUTION_DIGITS)
                if b.has(sp.nan, sp.zoo) or abs(complex(b)) < EXACT_TOL:
                    return "undefined"
        terms = sp.Add.make_args(sp.expand(exact)) if exact.is_Add else (exact,)
        vals = [sp.N(t, SOLUTION_DIGITS) for t in terms]
    try:
        total = complex(sum(vals))
        scale = sum(abs(complex(v)) for v in vals)
    except (TypeError, ValueError):
        return "wrong"
    if not (math.isfinite(abs(total)) and math.isfinite(scale)):
        return "undefined"
    tol = FLOAT_TOL if floats else EXACT_TOL
    return "ok" if abs(total) <= tol * (1.0 + scale) else "wrong"


def check_solutions(form: sp.Expr, sols: list[sp.Expr], rng: np.random.Generator, var: sp.Symbol = VAR,
                    *, rounds: int = 2) -> bool:
    """Verify a ``solve`` answer for the equation ``form = 0`` in ``var``; returns whether it is
    *complete* (every solution: a polynomial equation).  Raises :class:`VerifierRejected` with the
    reason otherwise (an empty list, a duplicate or near-duplicate, a solution that is not one or
    lies outside the domain, a missing root)."""
    if not sols:
        if has_no_roots(form, var) or solution_count(form, var)[0] == 0:
            return True  # 1/(x + 1) = 0, exp(x) = 0: no solution, and that is every solution
        raise VerifierRejected("no solutions given (an empty answer cannot be verified)")
    if any(s.has(var) for s in sols):
        raise VerifierRejected("a solution must not contain the variable")
    if len(set(sols)) != len(sols):
        raise VerifierRejected("a solution is listed twice")
    params = (form.free_symbols | set().union(*(s.free_symbols for s in sols))) - {var}
    floats = _has_float(form)  # an exact equation needs exact (or 25-digit) solutions
    for _ in range(rounds):
        values = param_values(params, rng)
        points = []
        for s in sols:
            status = solution_status(form, var, s, values, floats=floats)
            if status == "undefined":
                raise VerifierRejected(f"{var} = {s} lies outside the equation's domain (it is undefined there)")
            if status != "ok":
                raise VerifierRejected(f"{var} = {s} is not a solution (checked to {SOLUTION_DIGITS} digits)")
            points.append(complex(sp.N(s.xreplace(values), 30)))
        for i in range(len(points)):
            for j in range(i):
                gap = abs(points[i] - points[j])
                if gap <= NEAR_DUPLICATE * (1.0 + abs(points[i]) + abs(points[j])):
                    raise VerifierRejected(f"{sols[j]} and {sols[i]} are one solution written twice")
    count, _ = solution_count(form, var)
    if count is None:
        return False
    if len(sols) != count:
        raise VerifierRejected(f"{len(sols)} distinct solutions for an equation with {count} distinct "
                               f"roots (a solution is missing)")
    return True


def residuals(kind: str, form: sp.Expr, answer: Any, var: sp.Symbol = VAR, func: Any = FUNC) -> list[sp.Expr]:
    """The expressions that must vanish, with every symbol real; raises
    :class:`VerifierRejected` for an answer of the wrong shape (no solutions, too few constants, a
    leftover unevaluated integral)."""
    if kind == "integrate":
        if answer.has(sp.Integral):
            raise VerifierRejected("an antiderivative must not contain an unevaluated integral")
        (f, g), m = _real([form, answer])
        return [sp.diff(g, m.get(var, var)) - f]
    if kind == "simplify":
        (f, g), _ = _real([form, answer])
        return [g - f]
    if kind == "solve":
        sols = list(answer)
        if not sols:
            if has_no_roots(form, var) or solution_count(form, var)[0] == 0:
                return []
            raise VerifierRejected("no solutions given (an empty answer cannot be verified)")
        if any(s.has(var) for s in sols):
            raise VerifierRejected("a solution must not contain the variable")
        reals, _ = _real([form] + sols)
        f = reals[0]
        xr = next((s for s in f.free_symbols if s.name == var.name), var)
        return [f.xreplace({xr: s}) for s in reals[1:]]
    if kind == "dsolve":
        fx = func(var)
        order = max((d.derivative_count for d in form.atoms(sp.Derivative)), default=0)
        if answer.has(fx):
            raise VerifierRejected("a solution must be explicit in the function")
        if len(_constants(answer)) < order:
            raise VerifierRejected(f"a general solution of order {order} needs {order} constants")
        res = form.subs(fx, answer).doit()
        (r,), _ = _real([res])
        return [r]
    raise VerifierRejected(f"no verifier for {kind!r}")


@dataclasses.dataclass
class QuickCheck:
    """Residuals compiled for fast evaluation at random points."""

    symbols: tuple[sp.Symbol, ...]
    funcs: list[Any]
    var: str = "x"
    exprs: list[list[sp.Expr]] = dataclasses.field(default_factory=list)

    @classmethod
    def compile(cls, kind: str, form: sp.Expr, answer: Any, var: sp.Symbol = VAR, func: Any = FUNC) -> "QuickCheck":
        res = residuals(kind, form, answer, var, func)
        symbols = tuple(sorted(set().union(*(r.free_symbols for r in res)), key=lambda s: s.name))
        funcs, exprs = [], []
        for r in res:
            terms = list(sp.Add.make_args(r))
            exprs.append(terms)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    funcs.append(sp.lambdify(symbols, terms, modules=["scipy", "numpy"]))
                except (NameError, TypeError, KeyError, SyntaxError):
                    funcs.append(None)  # evaluated with mpmath
        return cls(symbols, funcs, var.name, exprs)

    def _points(self, rng: np.random.Generator, n: int) -> list[np.ndarray]:
        cols = []
        alternate = np.where(np.arange(n) % 2 == 0, 1.0, -1.0)
        for s in self.symbols:
            if s.name == self.var:
                cols.append(rng.uniform(*VAR_RANGE, n) * alternate)
            else:
                cols.append(rng.uniform(*PARAM_RANGE, n) * rng.choice((-1.0, 1.0), n))
        return cols

    @staticmethod
    def _complex(cols: list[np.ndarray]) -> list[np.ndarray]:
        return [c.astype(complex) for c in cols]

    def _mpmath(self, terms: list[sp.Expr], cols: list[np.ndarray], n: int) -> list[np.ndarray]:
        fn = sp.lambdify(self.symbols, terms, modules="mpmath")
        out = np.full((len(terms), n), np.nan, dtype=complex)
        with mpmath.workdps(30):
            for i in range(n):
                try:
                    vals = fn(*(mpmath.mpc(float(c[i])) for c in cols))
                    out[:, i] = [complex(v) for v in vals]
                except (ZeroDivisionError, OverflowError, ValueError, TypeError, NameError):
                    continue
        return list(out)

    def check(self, rng: np.random.Generator, points: int = QUICK_POINTS) -> bool:
        """True when every residual is within tolerance at ``points`` random points where it can
        be evaluated (drawing up to four times as many; at least a quarter of the points with a
        negative variable when the variable occurs); False otherwise."""
        n = 4 * points
        cols = self._points(rng, n)
        var_col = next((c for s, c in zip(self.symbols, cols) if s.name == self.var), None)
        negative = None if var_col is None else var_col < 0
        for fn, terms_expr in zip(self.funcs, self.exprs):
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    if fn is None:
                        raise NameError
                    terms = [np.asarray(t, dtype=complex) for t in fn(*self._complex(cols))]
                    if any(t.shape not in ((), (n,)) for t in terms):
                        raise ValueError("a residual term of an unexpected shape")
                except (ZeroDivisionError, OverflowError, ValueError, TypeError, NameError, AttributeError):
                    try:
                        terms = self._mpmath(terms_expr, cols, n)
                    except (NameError, TypeError, KeyError, SyntaxError, AttributeError):
                        return False
                total: Any = np.zeros(n, dtype=complex)
                scale: Any = np.zeros(n)
                for t in terms:  # term by term, in order (a scalar term broadcasts)
                    total = total + t
                    scale = scale + np.abs(t)
                size = np.abs(total)
                usable = np.isfinite(size) & np.isfinite(scale)
                bad = usable & (size > RTOL * (1 + scale))
            # The points are taken in order, skipping unusable ones, until ``points`` usable ones
            # (at least a quarter of them with a negative variable) are in; a bad point among
            # those taken fails the check.  Vectorised: the first usable index where the running
            # counts suffice is where the scan stops.
            enough = usable & (np.cumsum(usable) >= points)
            if negative is not None:
                enough &= 4 * np.cumsum(usable & negative) >= points
            if not enough.any():
                return False
            if bad[: int(np.argmax(enough)) + 1].any():
                return False
        return True


def warm_up() -> None:
    """Compile and run one check, so that the first real one does not pay SymPy's and lambdify's
    one-time costs inside its time bound (services call this in ``setup``)."""
    QuickCheck.compile("integrate", VAR * sp.exp(VAR), (VAR - 1) * sp.exp(VAR)).check(np.random.default_rng(0))
    check_solutions(VAR**2 - 4, [sp.Integer(2), sp.Integer(-2)], np.random.default_rng(0))


def admission_refusal(kind: str, how: str, form: sp.Expr | None = None, *, offered: bool = False,
                      var: sp.Symbol = VAR) -> str | None:
    """Why an answer verified as ``how`` (:func:`full_check`) may not be stored, or ``None``.

    * ``solve``: only a solution set proved complete (``+complete``) is stored: a cache serves an
      answer to every query with the same canonical form, and a partial set served as *the*
      answer is a wrong answer;
    * an answer ``offered`` by a client (``put``) must be ``proved``: agreement at random points
      is not enough (an error of 1e-12 passes any numeric tolerance a double can afford).
      Answers computed by the cache's own solver (SymPy) may be stored on points."""
    if kind == "solve" and not how.endswith("+complete"):
        why = solution_count(form, var)[1] if form is not None else ""
        return why or "cannot prove the solution set complete"
    if offered and not how.startswith("proved"):
        return (f"the {kind} answer agrees at random points but could not be proved equal symbolically "
                f"(points alone are not enough to store an offered answer)")
    return None


def full_check(kind: str, form: sp.Expr, answer: Any, rng: np.random.Generator,
               proof_seconds: float = PROOF_SECONDS, seconds: float = CHECK_SECONDS,
               var: sp.Symbol = VAR, func: Any = FUNC) -> str:
    """Verify ``answer`` for ``form``; returns ``"proved"`` (the residual simplifies to 0) or
    ``"points"`` (no proof within the bound, every point within tolerance); for ``solve``, the
    suffix ``"+complete"`` when the answer is every solution.  Raises :class:`VerifierRejected`,
    or :class:`TimeLimit` past ``seconds``."""
    with time_limit(seconds, "verification"):
        complete = False
        if kind == "solve":
            complete = check_solutions(form, list(answer), rng, var)
        quick = QuickCheck.compile(kind, form, answer, var, func)
        if not quick.check(rng, FULL_POINTS):
            raise VerifierRejected(f"{kind} answer fails the residual check at random points of both signs "
                                   f"(or cannot be evaluated at enough of them)")
        try:
            with time_limit(proof_seconds, "proof attempt"):
                proved = all(sp.simplify(r) == 0 for r in residuals(kind, form, answer, var, func))
        except TimeLimit as exc:
            if "proof attempt" not in str(exc):
                raise  # the whole check's bound, not the proof's
            proved = False
    how = "proved" if proved else "points"
    return how + ("+complete" if complete else "")
