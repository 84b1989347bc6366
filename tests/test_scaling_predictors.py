"""The breakpoint law where reca uses it: cs-wif's ROI predictor and bktrain's FLOPs budget
(pure parts; bad input -> bad_request)."""

import math

import pytest

from kernel import errors
from services.bktrain.estimate import budget_from_curve
from services.cswif.predictor import NotEnoughHistory, ScalingLawPredictor
from services.cswif.service import CSWIFService
from sims.whatif import FinerRun


def _cost(n: int, t_end: float) -> float:
    return 7.0 * n**3 * t_end


def _err(c: float) -> float:
    return 4.0 * c**-0.6


def test_cswif_law_predicts_a_held_out_escalation():
    pred = ScalingLawPredictor(max_breaks=1)
    for t_end in (0.5, 1.0, 2.0):
        for n in (8, 16, 32):
            c = _cost(n, t_end)
            pred.observe("toy", {"t_end": t_end}, n, c, _err(c))
    esc = FinerRun("held", "toy", {"t_end": 1.5}, 2, 4, 1, 2)  # t_end never observed; 16 -> 32 cells a side
    p = pred.predict(esc)
    c_from, c_to = _cost(16, 1.5), _cost(32, 1.5)
    assert p.cost == pytest.approx(c_to - c_from, rel=1e-6)
    assert p.gain == pytest.approx(_err(c_from) - _err(c_to), rel=1e-3)
    assert p.surrogate_cost == 0


def test_cswif_law_refuses_without_history_and_bad_observations():
    pred = ScalingLawPredictor()
    pred.observe("toy", {}, 8, 100.0, 0.1)
    assert not pred.can_predict("toy")
    with pytest.raises(NotEnoughHistory):
        pred.predict(FinerRun("r", "toy", {}, 1, 4, 0, 1))
    for bad in ((0, 100.0, 0.1), (8, -1.0, 0.1), (8, 100.0, -0.1), (8, math.inf, 0.1)):
        with pytest.raises(ValueError):
            pred.observe("toy", {}, *bad)


def test_cswif_observe_op_bad_request():
    svc = CSWIFService()
    with pytest.raises(errors.BadRequest):
        svc._observe({"op": "observe", "case": "toy", "cells_per_side": 8, "cost": 0, "error": 0.1})
    with pytest.raises(errors.BadRequest):
        svc._observe({"op": "observe", "case": 3})
    out = svc._observe({"op": "observe", "case": "toy", "params": {}, "cells_per_side": 8, "cost": 10.0, "error": 0.1})
    assert out == {"case": "toy", "observations": 1, "predicts": False}


def test_bktrain_budget_from_a_pilot_curve():
    curve = [[f, 10.0 * f**-0.1] for f in (1e6 * 2**i for i in range(12))]
    out = budget_from_curve(curve, 10.0 * 1e9**-0.1, margin=1.5)
    assert out["predicted_flops"] == pytest.approx(1e9, rel=1e-3)
    assert out["budget_flops"] == pytest.approx(1.5e9, rel=1e-3)


@pytest.mark.parametrize(
    "curve, target, margin, reason",
    [
        ("not a list", 1.0, 1.25, "bad_curve"),
        ([[1, 2], [3]], 1.0, 1.25, "bad_curve"),
        ([[1, 2], [2, 1.5], [4, 1.2]], -1.0, 1.25, "bad_curve"),
        ([[1, 2], [2, 1.5], [4, 1.2]], 1.0, 0.5, "bad_curve"),
        ([[0, 2], [2, 1.5], [4, 1.2]], 1.0, 1.25, "bad_curve"),
        ([[1, 2]], 1.0, 1.25, "too_few_points"),
        ([[1, 2], [2, 2.0], [4, 2.0], [8, 2.0]], 1.0, 1.25, "unreachable"),
    ],
)
def test_bktrain_budget_bad_request(curve, target, margin, reason):
    with pytest.raises(errors.BadRequest) as exc:
        budget_from_curve(curve, target, margin)
    assert exc.value.detail["reason"] == reason
