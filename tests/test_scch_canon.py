"""Unit and property tests of the canonical forms (:mod:`reason.canon`) and verifiers
(:mod:`reason.check`): equivalent inputs get equal keys, answers translate back correctly, bad
input is a typed error within bounds."""

from __future__ import annotations

import random

import numpy as np
import pytest
import sympy as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reason import canon as C
from reason import workload as W
from reason.check import QuickCheck, full_check
from reason.errors import ParseError, ReasonError, TooLarge, Unsupported, VerifierRejected
from reason.solve import timed_compute

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_classes = st.tuples(st.sampled_from(sorted(W.FAMILIES)), st.integers(0, 10_000))


def _class_of(kind: str, n: int) -> tuple[str, tuple[int, int]]:
    rng = random.Random(n)
    template = rng.choice(sorted(W.FAMILIES[kind]))
    return template, (rng.randint(2, 9), rng.randint(0, 5))


@SETTINGS
@given(_classes, st.integers(0, 2**31), st.integers(0, 2**31))
def test_members_of_one_class_get_one_key(cls, seed_a, seed_b):
    kind, n = cls
    template, consts = _class_of(kind, n)
    a, _ = W.member(kind, template, consts, random.Random(seed_a))
    b, _ = W.member(kind, template, consts, random.Random(seed_b))
    assert C.canonicalise(a).key == C.canonicalise(b).key, (a, b)


@SETTINGS
@given(st.integers(0, 10_000), st.integers(0, 10_000))
def test_different_classes_get_different_keys(n, m):
    kind = "integrate"
    ta, ca = _class_of(kind, n)
    tb, cb = _class_of(kind, m)
    if W.class_id(kind, ta, ca) == W.class_id(kind, tb, cb):
        return
    ka = C.canonicalise(W.member(kind, ta, ca, random.Random(n))[0]).key
    kb = C.canonicalise(W.member(kind, tb, cb, random.Random(m))[0]).key
    assert ka != kb


_letters = st.sampled_from(["a", "b", "k", "m", "p", "q", "s", "t", "w", "zeta"])


@SETTINGS
@given(st.lists(_letters, min_size=3, max_size=3, unique=True), st.permutations([0, 1, 2]),
       st.integers(2, 7), st.integers(-5, 5).filter(bool))
def test_integral_answers_translate_back(names, order, a, b):
    """A canonical antiderivative, translated into a renamed, re-ordered, affinely substituted
    query, differentiates back to the query's integrand."""
    var, p, q = names
    u = f"({a}*{var} + {b})"
    terms = [f"{p}*{u}**2", f"{q}*sin({u})", f"3*exp({u})"]
    query = {"kind": "integrate", "expr": " + ".join(terms[i] for i in order), "var": var}
    cn = C.canonicalise(query)
    assert cn.affine is not None
    answer, _ = timed_compute("integrate", cn.form)
    back = cn.to_query(answer)
    x = sp.Symbol(var)
    assert sp.simplify(sp.diff(back, x) - cn.query) == 0
    # and the inverse mapping recovers the canonical answer
    assert sp.simplify(cn.to_canonical(back) - answer) == 0


@SETTINGS
@given(st.lists(_letters, min_size=2, max_size=2, unique=True), st.integers(2, 6), st.integers(1, 6),
       st.integers(1, 4))
def test_solutions_translate_back(names, a, b, scale):
    var, p = names
    u = f"({a}*{var} - {b})"
    query = {"kind": "solve", "expr": f"{scale}*{u}**2 = {scale}*{p}**2", "var": var}
    cn = C.canonicalise(query)
    sols, _ = timed_compute("solve", cn.form)
    x = sp.Symbol(var)
    for s in cn.to_query(sols):
        assert sp.simplify(cn.query.xreplace({x: s})) == 0


def test_renaming_reordering_scaling_of_odes_share_a_key():
    a = C.canonicalise({"kind": "dsolve", "expr": "y'' + 4*y = sin(2*x)", "var": "x", "func": "y"})
    b = C.canonicalise({"kind": "dsolve", "expr": "12*g + 3*g'' = 3*sin(2*t)", "var": "t", "func": "g"})
    c = C.canonicalise({"kind": "dsolve", "expr": "y'' + 9*y = sin(2*x)", "var": "x", "func": "y"})
    assert a.key == b.key != c.key
    sol, _ = timed_compute("dsolve", a.form)
    t, g = sp.Symbol("t"), sp.Function("g")
    back = b.to_query(sol)
    assert sp.simplify(b.query.subs(g(t), back).doit()) == 0


def test_what_is_not_recognised_is_a_different_key():
    # documented: trigonometric identities are not applied, so these differ (a miss, not an error)
    a = C.canonicalise({"kind": "integrate", "expr": "sin(x)**2"})
    b = C.canonicalise({"kind": "integrate", "expr": "(1 - cos(2*x))/2"})
    assert a.key != b.key
    # while a polynomial factor written expanded is still an image of the affine map found
    c = C.canonicalise({"kind": "integrate", "expr": "(2*x + 1)**2*exp(2*x + 1)"})
    d = C.canonicalise({"kind": "integrate", "expr": "(4*x**2 + 4*x + 1)*exp(2*x + 1)"})
    assert c.key == d.key


@pytest.mark.parametrize("text, error", [
    ("__import__('os')", ParseError),
    ("x.__class__", ParseError),
    ("lambda: 1", ParseError),
    ("sin(x", ParseError),
    ("x +* 2", ParseError),
    ("", ParseError),
    ("1/0", ParseError),
    ("Integral(x, x)", ParseError),
    ("x" + "+x" * 1500, TooLarge),
    ("2**2**2**2**2**2", TooLarge),
    ("x**100000", TooLarge),
    ("(a+b+c+d+e+f+g+h)**40", TooLarge),
    ("9" * 60 + "*x", TooLarge),
    ("sin(" * 60 + "x" + ")" * 60, TooLarge),
])
def test_bad_input_is_a_typed_error(text, error):
    with pytest.raises(error):
        C.canonicalise({"kind": "simplify", "expr": text})


@pytest.mark.parametrize("subgoal", [
    None, "x", {"kind": "nope", "expr": "x"}, {"kind": "solve", "expr": "a = b = c"},
    {"kind": "solve", "expr": "y + 1", "var": "x"}, {"kind": "dsolve", "expr": "y + x"},
    {"kind": "integrate", "expr": "x", "var": "sin"}, {"kind": "dsolve", "expr": "y' = C1"},
])
def test_bad_subgoals_are_typed_errors(subgoal):
    with pytest.raises(ReasonError):
        C.canonicalise(subgoal)


def test_canonicalisation_is_time_bounded():
    # a tiny bound on a real canonicalisation (within the size bounds, ~0.5 s of CPU): the time
    # limit, not a hang, ends it.  The bound is CPU time, so a loaded machine changes nothing.
    # SymPy caches results process-wide: after the rest of the suite, parts of a common expression
    # may be known already, and the work left could finish inside the bound.  A fresh cache and
    # constants no other test uses keep the work real.
    from sympy.core.cache import clear_cache

    clear_cache()
    with pytest.raises(C.TimeLimit):
        C.canonicalise({"kind": "simplify", "expr": "(a+b+c+d)**5*(a-7919*b)**3/(a+c+104729) + sin(a)"}, seconds=0.02)


def test_time_limit_counts_cpu_not_wall_time():
    import time

    with C.time_limit(0.05, "sleep"):
        time.sleep(0.2)  # descheduled: no CPU spent, no TimeLimit
    with pytest.raises(C.TimeLimit, match="spin exceeded"):
        with C.time_limit(0.05, "spin"):
            while True:
                pass


def test_verifier_accepts_right_and_rejects_wrong_answers():
    rng = np.random.default_rng(0)
    cn = C.canonicalise({"kind": "integrate", "expr": "t*exp(t)", "var": "t"})
    right, _ = timed_compute("integrate", cn.form)
    assert full_check("integrate", cn.form, right, rng) in ("proved", "points")
    wrong = right + C.VAR ** 2
    with pytest.raises(VerifierRejected):
        full_check("integrate", cn.form, wrong, rng)
    assert QuickCheck.compile("integrate", cn.form, right).check(rng)
    assert not QuickCheck.compile("integrate", cn.form, wrong).check(rng)
    sol = C.canonicalise({"kind": "solve", "expr": "x**2 - 4"})
    with pytest.raises(VerifierRejected):
        full_check("solve", sol.form, [sp.Integer(2)], rng)  # incomplete: one of two roots
    with pytest.raises(VerifierRejected):
        full_check("solve", sol.form, [], rng)


def test_unsupported_answers():
    cn = C.canonicalise({"kind": "integrate", "expr": "exp(x**3)*sin(x)**2/log(x)"})
    with pytest.raises((Unsupported, C.TimeLimit)):
        timed_compute("integrate", cn.form, seconds=3.0)
