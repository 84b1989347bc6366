"""CSS without sockets: units and derivations (pint), slack arithmetic, the funding policies on a
synthetic problem, and the shallow-water case measured by real runs."""

from __future__ import annotations

import math

import pytest

from services.css import problem
from services.css.logic import (Q, ActionSpec, ConstraintError, Funder, make_constraint, make_derivation)

DIMS = {"len": Q(1.0, "m").dimensionality, "ratio": Q(1.0).dimensionality}


@pytest.mark.parametrize("doc, reason", [
    ({"name": "a", "quantity": "len", "limit": "1 s"}, "units"),
    ({"name": "a", "quantity": "len", "limit": "1 m", "scale": "2 kg"}, "units"),
    ({"name": "a", "quantity": "ratio", "limit": "0.4 m"}, "units"),
    ({"name": "a", "quantity": "nope", "limit": "1 m"}, "unknown_quantity"),
    ({"name": "a", "quantity": "len", "limit": "1 m", "op": "<"}, "type"),
    ({"name": "a", "quantity": "len", "limit": "nan m"}, "range"),
    ({"name": "a", "quantity": "len", "limit": "1 m", "scale": "-1 m"}, "range"),
    ({"name": "a", "quantity": "len", "limit": "1 furlongz"}, "units"),
    ({"quantity": "len", "limit": "1 m"}, "type"),
])
def test_bad_constraints_are_typed_errors(doc, reason):
    with pytest.raises(ConstraintError) as info:
        make_constraint(doc, DIMS)
    assert info.value.code == "bad_request" and info.value.detail["reason"] == reason


def test_slack_converts_units():
    c = make_constraint({"name": "err", "quantity": "len", "op": "<=", "limit": "2 mm", "scale": "1 mm"}, DIMS)
    assert c.slack(Q(0.001, "m")) == pytest.approx(1.0)
    assert c.slack(Q(3.0, "mm")) == pytest.approx(-1.0)
    ge = make_constraint({"name": "depth", "quantity": "len", "op": ">=", "limit": "1 cm"}, DIMS)
    assert ge.slack(Q(0.5, "cm")) == pytest.approx(-0.5)


def test_derivation_units_are_checked():
    ok, why = make_derivation(problem.BAD_DERIVATION).check()
    assert not ok and ("dimension" in why.lower() or "convert" in why.lower())
    good = make_derivation({**problem.BAD_DERIVATION, "steps": problem.GOOD_STEPS})
    assert good.check() == (True, "")
    wrong_result = make_derivation({**problem.BAD_DERIVATION, "steps": [["dt", "cfl * dx * (g * h) ** 0.5"]]})
    assert wrong_result.check()[0] is False
    with pytest.raises(ConstraintError):
        make_derivation({**problem.BAD_DERIVATION, "expect": "[nonsense]"})
    with pytest.raises(ConstraintError):
        make_derivation({"steps": [], "expect": "[time]"})


# -- policies on a synthetic problem: state = a dict of knobs, cost = the knobs' sum ----------

def synthetic():
    def act(name, target, gain, cost_step):
        return ActionSpec(name, (target,), lambda s, st, t=target, g=gain: {t: s[t] + g},
                          lambda st, n=name, c=cost_step: {**st, n: st.get(n, 0) + c})
    acts = [act("big_a", "a", 3.0, 10.0), act("cheap_a", "a", 3.0, 1.0), act("fix_b", "b", 1.0, 1.0)]
    return acts, lambda st: 1.0 + sum(st.values())


def test_maxmin_raises_the_least_slack_first_with_the_best_gain_per_cost_in_one_batch():
    acts, cost = synthetic()
    f = Funder(["a", "b"], acts, "maxmin", cost)
    batch = f.plan({"a": -2.0, "b": -0.5}, {})
    assert batch[0] == "cheap_a" and set(batch) == {"cheap_a", "fix_b"}
    assert f.plan({"a": 1.0, "b": 0.0}, {}) == []


def test_maxmin_never_pushes_another_constraint_below_the_minimum():
    hurt = ActionSpec("hurt", ("a",), lambda s, st: {"a": s["a"] + 5, "b": -9.0}, lambda st: st)
    ok = ActionSpec("ok", ("a",), lambda s, st: {"a": s["a"] + 1}, lambda st: st)
    f = Funder(["a", "b"], [hurt, ok], "maxmin", lambda st: 1.0)
    assert f.plan({"a": -1.0, "b": 1.0}, {})[0] == "ok"


def test_budget_truncates_the_batch_least_slack_first():
    acts, cost = synthetic()
    f = Funder(["a", "b"], acts, "maxmin", cost)
    assert f.plan({"a": -2.0, "b": -0.5}, {}, budget_left=2.5) == ["cheap_a"]


def test_peers_fund_one_action_per_round_without_estimates():
    acts, cost = synthetic()
    rr = Funder(["a", "b"], acts, "round_robin", cost)
    s = {"a": -2.0, "b": -0.5}
    assert [rr.plan(s, {}) for _ in range(4)] == [["big_a"], ["fix_b"], ["cheap_a"], ["fix_b"]]
    wf = Funder(["a", "b"], acts, "worst_first", cost)
    assert [wf.plan(s, {}) for _ in range(3)] == [["big_a"], ["cheap_a"], ["big_a"]]
    with pytest.raises(ConstraintError):
        Funder(["a"], acts, "magic", cost)


def test_observe_corrects_the_gain_model():
    acts, cost = synthetic()
    f = Funder(["a", "b"], acts, "maxmin", cost)
    before = {"a": -2.0, "b": 1.0}
    pred = f.predict_batch(["cheap_a"], before, {})
    f.observe(["cheap_a"], before, pred, {"a": -0.5, "b": 1.0})  # half the predicted gain
    assert f.predicted("cheap_a", before, {})["a"] < pred["a"]


# -- the shallow-water case (real runs) -------------------------------------------------------

def test_measurements_have_the_declared_dimensions_and_the_cost_is_predicted():
    cfg = problem.parse_start({"cells": 6, "dt_factor": 1.4, "order": 1})
    measured, cost = problem.measure(cfg)
    for name, dim in problem.DIMENSIONS.items():
        assert measured[name].dimensionality == dim
    assert measured["courant"].magnitude > problem.CFL_LIMIT  # dt 1.4x the stable one breaks CFL
    assert abs(problem.run_cost(cfg) - cost) <= 0.05 * cost
    shrunk = problem.apply("shrink_dt", problem.apply("shrink_dt", cfg))
    assert problem.measure(shrunk)[0]["courant"].magnitude <= problem.CFL_LIMIT


def test_bad_start_is_refused():
    for bad in ({"cells": 1}, {"cells": 100}, {"dt_factor": math.inf}, {"order": 3}, {"cells": True},
                {"cells": 5}, {"cells": 2}, {"cells": 23}):
        with pytest.raises(ConstraintError):
            problem.parse_start(bad)


def test_every_valid_start_builds():
    """A start that passes validation runs (an odd count used to pass and then fail in the grid)."""
    for cells in range(4, problem.MAX_CELLS + 1, 2):
        assert problem.run_cost(problem.parse_start({"cells": cells})) > 0
