"""The heavy SymPy operations (``integrate``, ``solve``, ``simplify``, ``dsolve``) on canonical
forms, and :class:`SolverPool`, which runs them in a child process with a hard time bound.

A heavy SymPy call can run for minutes or exhaust memory; a thread cannot be stopped, so the pool
runs each call — and the full check of its answer — in a ``forkserver`` child (SymPy preloaded)
and terminates the child when the bound passes, starting a fresh one for the next call.  The caller gets :class:`TimeLimit` and the
service keeps serving.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.pool
import threading
import time
from typing import Any

import sympy as sp
from sympy.integrals.manualintegrate import manualintegrate

import numpy as np

from reason.canon import FUNC, VAR, time_limit
from reason.check import (OFFERED_PROOF_SECONDS, PROOF_SECONDS, _has_float, full_check, has_no_roots, param_values,
                          solution_count, solution_status)
from reason.errors import ParseError, ReasonError, TimeLimit, TooLarge, Unsupported, VerifierRejected

#: Default bound of one heavy call, seconds.
SOLVE_SECONDS = 20.0


def compute(kind: str, form: sp.Expr) -> Any:
    """The answer to the canonical subgoal ``form`` (an expression; a list for ``solve``).
    Raises :class:`Unsupported` when SymPy finds no closed form."""
    if kind == "integrate":
        out = sp.integrate(form, VAR)
        if _awkward(out):
            # SymPy's Meijer-G route answers with a Piecewise over |x| < 1 and meijerg terms that
            # hold on part of the line only; the heuristic routes give one elementary form
            for attempt in (lambda: sp.integrate(form, VAR, meijerg=False), lambda: manualintegrate(form, VAR)):
                try:
                    other = attempt()
                except (ValueError, TypeError, NotImplementedError):
                    continue
                if not _awkward(other):
                    out = other
                    break
        if out.has(sp.Integral):
            raise Unsupported("no closed-form antiderivative found")
        return out
    if kind == "solve":
        sols = sp.solve(form, VAR)
        if any(isinstance(s, dict) for s in sols):
            raise Unsupported("no explicit solutions found")
        # SymPy's solve keeps roots of a factor where another is undefined (x log x = 0 -> [0, 1]);
        # those are no solutions (the check would refuse the whole answer for them).  Dropping a
        # true one by mistake can only make the count check refuse, never serve a wrong answer.
        sols = [s for s in sols if not _outside_domain(form, s)]
        if not sols and (has_no_roots(form) or solution_count(form)[0] == 0):
            return []  # a non-zero constant (or zero-free) numerator: no solution, and that is complete
        if not sols:
            raise Unsupported("no explicit solutions found")
        return list(sols)
    if kind == "simplify":
        return sp.simplify(form)
    if kind == "dsolve":
        sol = sp.dsolve(form, FUNC(VAR))
        if isinstance(sol, list) or sol.lhs != FUNC(VAR):
            raise Unsupported("no explicit general solution found")
        return sol.rhs
    raise Unsupported(f"no solver for {kind!r}")


def _outside_domain(form: sp.Expr, sol: sp.Expr) -> bool:
    """Whether the equation ``form = 0`` is undefined at ``VAR = sol`` (parameters at fixed
    random values of both signs)."""
    params = (form.free_symbols | sol.free_symbols) - {VAR}
    values = param_values(params, np.random.default_rng(0))
    try:
        return solution_status(form, VAR, sol, values, floats=_has_float(form)) == "undefined"
    except (TypeError, ValueError, ZeroDivisionError):
        return False


def _awkward(out: sp.Expr) -> bool:
    """An antiderivative with an unevaluated integral, a Meijer G-function, or a Piecewise whose
    conditions depend on the variable (rather than only on parameters)."""
    if out.has(sp.Integral, sp.meijerg):
        return True
    return any(VAR in cond.free_symbols for pw in out.atoms(sp.Piecewise) for _, cond in pw.args)


def timed_compute(kind: str, form: sp.Expr, seconds: float = SOLVE_SECONDS) -> tuple[Any, float]:
    """:func:`compute` in this process under :func:`time_limit` (main thread only); returns the
    answer and the CPU seconds it took."""
    t0 = time.process_time()
    with time_limit(seconds, f"{kind} call"):
        out = compute(kind, form)
    return out, time.process_time() - t0


#: Bound of a full check run in the child (killable, so it may be generous), seconds.
CHILD_CHECK_SECONDS = 10.0
_ERRORS = {cls.__name__: cls for cls in (Unsupported, TimeLimit, VerifierRejected, ParseError, TooLarge)}


def _child(kind: str, form: sp.Expr, answer: Any = None) -> tuple[str, Any, float]:
    """In the child: compute (unless ``answer`` is given) and verify in full."""
    t0 = time.process_time()
    try:
        out = compute(kind, form) if answer is None else answer
        cpu = time.process_time() - t0
        # an offered answer (``put``) is stored only when proved: a longer proof attempt
        proof = PROOF_SECONDS if answer is None else OFFERED_PROOF_SECONDS
        how = full_check(kind, form, out, np.random.default_rng(), proof_seconds=proof, seconds=CHILD_CHECK_SECONDS)
    except ReasonError as exc:
        return "error", (type(exc).__name__, str(exc)), time.process_time() - t0
    except Exception as exc:  # noqa: BLE001 - SymPy raises many kinds; report, never crash the child
        return "error", ("Unsupported", f"{type(exc).__name__}: {exc}"), time.process_time() - t0
    return "ok", (out, how), cpu


class SolverPool:
    """One child process for heavy calls, replaced after a timeout.  Thread-safe (one call at a
    time; callers queue on a lock)."""

    def __init__(self, seconds: float = SOLVE_SECONDS) -> None:
        self.seconds = seconds
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(["sympy", "reason.solve"])
        self._pool: multiprocessing.pool.Pool | None = None
        self._lock = threading.Lock()
        self.timeouts = 0
        self.calls = 0

    def _get(self) -> multiprocessing.pool.Pool:
        if self._pool is None:
            self._pool = self._ctx.Pool(1, maxtasksperchild=200)
        return self._pool

    def call(self, kind: str, form: sp.Expr, seconds: float | None = None, *, answer: Any = None
             ) -> tuple[Any, float, str]:
        """``(answer, CPU seconds of computing it, how it verified)``: the heavy call and its full
        check, both in the child (``answer`` given: only the check).  Raises :class:`TimeLimit`
        (the child is killed), :class:`Unsupported` or :class:`VerifierRejected`."""
        bound = self.seconds if seconds is None else seconds
        with self._lock:
            pool = self._get()
            self.calls += 1
            pending = pool.apply_async(_child, (kind, form, answer))
            try:
                status, out, cpu = pending.get(bound)
            except multiprocessing.TimeoutError:
                self.timeouts += 1
                self._kill()
                raise TimeLimit(f"{kind} call exceeded {bound:g} s; its process was killed") from None
        if status == "error":
            name, message = out
            raise _ERRORS.get(name, Unsupported)(message)
        return out[0], cpu, out[1]

    def _kill(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.terminate()
            pool.join()

    def close(self) -> None:
        with self._lock:
            self._kill()
