"""The pure IGMS controller (time passed in), its gate, and the what-if gate."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from sims import cases, igms, invariants
from sims.whatif import FinerRun, Prediction, RichardsonSurrogate, WhatIfGate


def _report(indicator, levels, *, breaches=(), status="ok", step=1, dt_factor=1.0, name="entropy"):
    n = len(levels)
    g = invariants.GlobalInvariants((1.0,), 0.0, 1.0, 0.0, 1.0, 2.0, 0.5, status != "unstable")
    return invariants.StepReport(
        step=step, time=0.1 * step, dt=0.1, dt_factor=dt_factor, cell_updates=10, total_cell_updates=10 * step,
        cells=10, levels=np.asarray(levels), block_min=np.ones(n), block_courant=np.zeros(n), block_energy=np.ones(n),
        indicators={name: np.asarray(indicator, dtype=float)}, globals=g, breaches=tuple(breaches), block_breaches={}, status=status,
    )


CFG = igms.IGMSConfig(indicator="entropy", refine_tol=1e-2, coarsen_tol=1e-3, max_level=1, calm_steps=3)


def test_refines_only_where_the_residual_is_breached_and_coarsens_where_safe():
    ctrl = igms.IGMSController(CFG)
    acts = ctrl.decide(_report([0.5, 0.02, 0.005, 0.0001], [0, 0, 1, 1]), now=10.0)
    assert acts == [igms.Coarsen((3,), "entropy < 0.001"), igms.Refine((0, 1), "entropy > 0.01")]
    assert ctrl.log[0][0] == 10.0 and ctrl.held == 2


def test_refinement_is_a_counted_resource_and_refusal_stops_it():
    gate = igms.LocalGate({"refinements": 2})
    ctrl = igms.IGMSController(CFG, gate)
    acts = ctrl.decide(_report([0.02, 0.9, 0.5, 0.0], [0, 0, 0, 0]), now=0.0)
    # largest residuals first; the third is refused
    assert acts == [igms.Refine((1, 2), "entropy > 0.01")]
    assert gate.used["refinements"] == 2 and gate.refused["refinements"] == 1 and ctrl.refused_refinements == 1
    # coarsening gives the units back, and the refused block gets its turn
    acts = ctrl.decide(_report([0.02, 0.0, 0.0, 0.0], [0, 1, 1, 0], step=2), now=1.0)
    assert acts == [igms.Coarsen((1, 2), "entropy < 0.001"), igms.Refine((0,), "entropy > 0.01")]
    assert gate.used["refinements"] == 1


def test_zero_capacity_gate_refuses_all_refinement():
    ctrl = igms.IGMSController(CFG, igms.LocalGate({"refinements": 0}))
    assert ctrl.decide(_report([1.0, 1.0], [0, 0]), now=0.0) == []


def test_cfl_breach_shrinks_dt_then_calm_steps_restore_it():
    ctrl = igms.IGMSController(CFG)
    acts = ctrl.decide(_report([0, 0], [0, 0], breaches=(invariants.CFL,)), now=0.0)
    assert acts == [igms.SetDtFactor(0.5, "breach: cfl")]
    for k in range(2):
        assert ctrl.decide(_report([0, 0], [0, 0], dt_factor=0.5, step=2 + k), now=1.0 + k) == []
    assert ctrl.decide(_report([0, 0], [0, 0], dt_factor=0.5, step=4), now=3.0) == [igms.SetDtFactor(1.0, "calm")]


def test_dt_factor_floor():
    ctrl = igms.IGMSController(dataclasses.replace(CFG, min_dt_factor=0.25))
    assert ctrl.decide(_report([0], [0], breaches=(invariants.ENERGY,), dt_factor=0.25), now=0.0) == []


def test_unstable_run_is_halted_and_nothing_else():
    ctrl = igms.IGMSController(CFG)
    acts = ctrl.decide(_report([1.0], [0], breaches=(invariants.FINITE,), status="unstable"), now=5.0)
    assert len(acts) == 1 and isinstance(acts[0], igms.Halt) and "non_finite" in acts[0].reason


def test_regrid_interval_and_missing_indicator():
    ctrl = igms.IGMSController(dataclasses.replace(CFG, regrid_every=2))
    assert ctrl.decide(_report([1.0], [0], step=1), now=0.0) == []
    assert ctrl.decide(_report([1.0], [0], step=2), now=1.0) == [igms.Refine((0,), "entropy > 0.01")]
    with pytest.raises(ValueError, match="no 'entropy' indicator"):
        igms.IGMSController(CFG).decide(_report([1.0], [0], name="gradient"), now=0.0)


def test_bad_config_and_gate_use():
    with pytest.raises(ValueError, match="coarsen_tol"):
        igms.IGMSConfig(refine_tol=1e-3, coarsen_tol=1e-2)
    with pytest.raises(ValueError, match="refine_tol"):
        igms.IGMSConfig(refine_tol=float("nan"))
    gate = igms.LocalGate({"refinements": 1})
    with pytest.raises(ValueError, match="cannot release"):
        gate.release("refinements", 1)


def test_closed_loop_refines_the_front_only_and_conserves_mass():
    """IGMS on a small dam break: refinement follows the front, mass stays at round-off, and the
    error lands between uniform coarse and uniform fine at fewer cell updates than uniform fine."""
    case = cases.make_case("radial_dam_break", t_end=0.6)
    ref = cases.build(case, blocks=8, cells=4, max_level=2, level=2)
    cases.run_to_end(ref)
    reference = ref.uniform(2)
    ctrl = igms.IGMSController(igms.IGMSConfig(indicator="entropy", refine_tol=3e-4, coarsen_tol=7.5e-5))
    sim = cases.build(case, blocks=8, cells=4, max_level=1, indicators=("entropy",))
    m0 = sim._mass()[0]
    report, refined = igms.run_controlled(sim, ctrl)
    assert report.status == "finished" and abs(sim._mass()[0] - m0) < 1e-13 * m0
    assert 0 < report.refined_blocks < 64
    coarse = cases.build(case, blocks=8, cells=4, max_level=1, level=0)
    fine = cases.build(case, blocks=8, cells=4, max_level=1, level=1)
    rc, rf = cases.run_to_end(coarse), cases.run_to_end(fine)
    e_c, e_f, e_i = (s.l1_error(reference, 2) for s in (coarse, fine, sim))
    assert e_f < e_i < e_c
    assert report.total_cell_updates < rf.total_cell_updates
    assert ctrl.held == int(report.levels.sum())


def test_gradient_baseline_uses_the_same_machinery():
    ctrl = igms.gradient_baseline(0.05)
    assert ctrl.config.indicator == "gradient" and ctrl.config.coarsen_tol == pytest.approx(0.0125)
    acts = ctrl.decide(_report([0.1, 0.0], [0, 1], name="gradient"), now=0.0)
    assert acts == [igms.Coarsen((1,), "gradient < 0.0125"), igms.Refine((0,), "gradient > 0.05")]


# --- CS-WIF ------------------------------------------------------------------------------------


def test_whatif_refuses_an_escalation_whose_surrogate_predicts_no_gain():
    gate = WhatIfGate(RichardsonSurrogate(), threshold=1e-4)
    esc = FinerRun("lake", "lake_at_rest", {"t_end": 0.2}, blocks=2, cells=8, from_level=1, to_level=2)
    d = gate.request(esc, now=3.0)
    assert not d.approved and d.prediction.gain == 0.0 and d.at == 3.0
    assert d.prediction.cost > 0 and d.prediction.surrogate_cost < 0.1 * d.prediction.cost * 1.5
    gate.record_outcome("lake", 0.0, d.prediction.cost)
    assert gate.accuracy()["wrong"] == 0.0
    with pytest.raises(ValueError, match="already decided"):
        gate.request(esc, now=4.0)


def test_whatif_approves_a_dam_break_escalation_and_predicts_its_gain():
    gate = WhatIfGate(RichardsonSurrogate(), threshold=1e-4)
    esc = FinerRun("dam", "radial_dam_break", {"t_end": 0.3}, blocks=2, cells=8, from_level=1, to_level=2)
    d = gate.request(esc, now=0.0)
    assert d.approved and d.prediction.gain > 0 and 0.5 < d.prediction.order < 3.0
    assert d.prediction.horizon > 0.5 * 0.3  # the dry run fits its budget without a short horizon
    # realize it: errors of both levels against a level-3 reference
    case = cases.make_case("radial_dam_break", t_end=0.3)
    ref = cases.build(case, blocks=2, cells=8, max_level=3, level=3)
    cases.run_to_end(ref)
    errs, costs = [], []
    for lv in (1, 2):
        s = cases.build(case, blocks=2, cells=8, max_level=3, level=lv)
        costs.append(cases.run_to_end(s).total_cell_updates)
        errs.append(s.l1_error(ref.uniform(3), 3))
    norm = float(ref.uniform(3).sum()) * ref.spec.h(3) ** 2
    real_gain = (errs[0] - errs[1]) / norm
    gate.record_outcome("dam", real_gain, costs[1] - costs[0])
    assert 0.25 < d.prediction.gain / real_gain < 4.0
    assert 0.5 < d.prediction.cost / (costs[1] - costs[0]) < 2.0
    assert gate.accuracy()["wrong"] == 0.0


def test_whatif_gate_rule_is_pure():
    gate = WhatIfGate(RichardsonSurrogate(), threshold=1.0)
    assert gate.decide("a", Prediction(gain=1e-5, cost=10.0, surrogate_cost=1, order=2.0, horizon=1.0), now=0.0).approved
    assert not gate.decide("b", Prediction(gain=1e-7, cost=1e6, surrogate_cost=1, order=2.0, horizon=1.0), now=0.0).approved
    assert not gate.decide("c", Prediction(gain=0.0, cost=0.0, surrogate_cost=1, order=2.0, horizon=1.0), now=0.0).approved


def test_whatif_bad_input():
    with pytest.raises(ValueError, match="from_level"):
        FinerRun("x", "lake_at_rest", {}, 2, 8, 2, 1)
    with pytest.raises(ValueError, match="threshold"):
        WhatIfGate(RichardsonSurrogate(), threshold=-1.0)
    gate = WhatIfGate(RichardsonSurrogate(), threshold=1.0)
    with pytest.raises(ValueError, match="unknown escalation"):
        gate.record_outcome("nope", 0.0, 1.0)
    with pytest.raises(ValueError, match="unknown case"):
        gate.request(FinerRun("y", "tsunami", {}, 2, 8, 0, 1), now=0.0)
