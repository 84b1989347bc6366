"""The answer verifier: independent of the services.

It never calls the kernel or imports ``services``; it recomputes what it needs from the task
itself with SymPy, PicoSAT (``pycosat``, called here directly) and the simulation library at a
finer reference level:

* ``math``: each antiderivative is differentiated and compared with the integrand, each
  solution substituted into its equation (and the set compared with SymPy's own solve), each chain
  value compared with exact integer arithmetic;
* ``algo``: the probe is re-solved; the instance the task needed (the probe's outcome picks it,
  the task's ``swap`` replaces it) is regenerated from its seed; a claimed model must satisfy every
  clause, a claimed UNSAT must be confirmed by a fresh solve;
* ``physics``: the answer's level must be the one it ran at (summary: finished, every block at
  that level, at ``t_end``) and its relative L1 error against a level-3 reference at most the
  tolerance (chosen on training tasks).
"""

from __future__ import annotations

import functools
import json
import random
import tokenize
from typing import Any

import numpy as np
import sympy as sp
from sympy.parsing.sympy_parser import parse_expr, standard_transformations

from planner.tasks import SIM_REF, Task

_FUNCS = {
    name: getattr(sp, name)
    for name in (
        "sin",
        "cos",
        "tan",
        "exp",
        "log",
        "sqrt",
        "atan",
        "asin",
        "acos",
        "sinh",
        "cosh",
        "tanh",
        "Abs",
        "pi",
        "E",
        "I",
    )
}
_FUNCS.update(atan=sp.atan, oo=sp.oo)
_RNG_POINTS = (0.23, 0.41, 0.67, 0.83)


class VerifyError(ValueError):
    """The answer is malformed (not merely wrong)."""


def _parse(text: str) -> sp.Expr:
    import re

    names = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text)) - set(_FUNCS)
    local = {n: sp.Symbol(n) for n in names}
    local.update(_FUNCS)
    return parse_expr(text.replace("^", "**"), local_dict=local, transformations=standard_transformations)


def _numeric_zero(expr: sp.Expr, var: sp.Symbol) -> bool:
    others = sorted(expr.free_symbols - {var}, key=str)
    for k, x0 in enumerate(_RNG_POINTS):
        subs = {var: x0, **{s: 0.7 + 0.13 * ((i + k) % 4) for i, s in enumerate(others)}}
        try:
            v = complex(expr.evalf(subs=subs))
        except (TypeError, ValueError):
            return False
        if not np.isfinite(v.real) or abs(v) > 1e-7 * (1 + abs(v)):
            return False
    return True


def check_subgoal(subgoal: dict, answer: Any) -> bool:
    kind = subgoal["kind"]
    var = sp.Symbol(subgoal.get("var", "x"))
    try:
        if kind == "integrate":
            f, g = _parse(subgoal["expr"]), _parse(str(answer))
            return _numeric_zero(sp.diff(g, var) - f, var)
        if kind == "solve":
            lhs, rhs = subgoal["expr"].split("=")
            eq = _parse(lhs) - _parse(rhs)
            sols = answer if isinstance(answer, list) else [answer]
            if not sols:
                return False
            got = [_parse(str(s)) for s in sols]
            if not all(_numeric_zero(eq.subs(var, s), var) for s in got):
                return False
            ref = sp.solve(eq, var)
            return len({sp.srepr(sp.nsimplify(s)) for s in got}) >= len(ref) or len(got) >= len(ref)
    except (sp.SympifyError, SyntaxError, TypeError, ValueError, ZeroDivisionError, tokenize.TokenError):
        return False
    raise VerifyError(f"unknown subgoal kind {kind!r}")


def random_3sat(n_vars: int, ratio: float, seed: int) -> list[list[int]]:
    """The instance named by ``(n_vars, ratio, seed)``, regenerated here (the definition: ``ratio *
    n_vars`` clauses of 3 distinct variables from ``random.Random(seed)``, each negated w.p. 1/2)."""
    rng = random.Random(seed)
    out = []
    for _ in range(round(ratio * n_vars)):
        vs = rng.sample(range(1, n_vars + 1), 3)
        out.append([v if rng.random() < 0.5 else -v for v in vs])
    return out


@functools.lru_cache(maxsize=4096)
def _sat(key: str) -> bool:
    import pycosat

    inst = json.loads(key)
    return pycosat.solve(random_3sat(inst["n_vars"], inst["ratio"], inst["seed"])) != "UNSAT"


def is_sat(inst: dict) -> bool:
    return _sat(json.dumps(inst, sort_keys=True))


def needed_instance(task: Task) -> dict:
    """The heavy instance the algo task's answer is about."""
    s = task.spec
    return s["swap"] or (s["if_sat"] if is_sat(s["probe"]) else s["if_unsat"])


def check_sat(inst: dict, claim: Any) -> bool:
    if not isinstance(claim, dict) or not isinstance(claim.get("sat"), bool):
        return False
    if not claim["sat"]:
        return not is_sat(inst)
    model = claim.get("model")
    if not isinstance(model, list):
        return False
    true = {lit for lit in model if isinstance(lit, int) and lit > 0}
    return all(
        any((lit > 0) == (abs(lit) in true) for lit in cl)
        for cl in random_3sat(inst["n_vars"], inst["ratio"], inst["seed"])
    )


def check_chain(items: list, values: Any) -> bool:
    if not isinstance(values, dict):
        return False
    return all(values.get(str(i), values.get(i)) == a + b * c for i, (a, b, c) in enumerate(items))


@functools.lru_cache(maxsize=1024)
def _level_errors(key: str) -> tuple[float, ...]:
    from sims import cases

    s = json.loads(key)
    ref = cases.build(
        cases.make_case(s["case"], **s["params"]),
        blocks=s["blocks"],
        cells=s["cells"],
        max_level=SIM_REF,
        level=SIM_REF,
    )
    cases.run_to_end(ref)
    R = ref.uniform(SIM_REF, 0)
    norm = float(np.abs(R).sum()) * ref.spec.h(SIM_REF) ** 2
    out = []
    for lv in range(SIM_REF):
        sim = cases.build(
            cases.make_case(s["case"], **s["params"]), blocks=s["blocks"], cells=s["cells"], max_level=lv, level=lv
        )
        cases.run_to_end(sim)
        out.append(sim.l1_error(R, SIM_REF) / norm)
    return tuple(out)


def level_errors(task: Task) -> tuple[float, ...]:
    """Relative L1 error of a uniform run at each level below the reference's (cached)."""
    s = task.spec
    return _level_errors(json.dumps({k: s[k] for k in ("case", "params", "blocks", "cells")}, sort_keys=True))


def check_physics(task: Task, answer: Any, tol: float) -> bool:
    if not isinstance(answer, dict) or not isinstance(answer.get("level"), int):
        return False
    lv, summ = answer["level"], answer.get("summary") or {}
    if summ.get("status") != "finished" or set(summ.get("levels", [])) != {lv}:
        return False
    return level_errors(task)[lv] <= tol


def verify(task: Task, answer: Any, *, tol: float) -> bool:
    """True when ``answer`` is a correct answer to ``task`` (``tol``: the physics tolerance)."""
    if not isinstance(answer, dict):
        return False
    s = task.spec
    if task.family == "math":
        subs = answer.get("subgoals")
        if not isinstance(subs, list) or len(subs) != len(s["subgoals"]):
            return False
        return all(check_subgoal(sg, a) for sg, a in zip(s["subgoals"], subs)) and check_chain(
            s["items"], answer.get("chain")
        )
    if task.family == "algo":
        return (
            answer.get("probe") == is_sat(s["probe"])
            and check_sat(needed_instance(task), answer.get("branch"))
            and check_chain(s["items"], answer.get("chain"))
        )
    if task.family == "physics":
        return check_physics(task, answer, tol)
    raise VerifyError(f"unknown family {task.family!r}")
