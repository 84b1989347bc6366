"""seed004 section ``scaling`` (S-3): the breakpoint scaling law as a predictor reca uses.

(a) **cs-wif ROI** -- :class:`services.cswif.predictor.ScalingLawPredictor` against the Richardson
dry run (:class:`sims.whatif.RichardsonSurrogate`, the gate's surrogate) on *held-out* escalations.
Training escalations (seed 11) are run for real at levels 0, 1 and 2 against a level-3 reference;
their (params, cells, cell updates, relative L1 error) are the predictor's only history.  Test
escalations (seed 12, never observed) are predicted by both and then run for real.  The threshold
(relative gain per million cell updates) is the median realised ROI of the *training* escalations.
Figures: wrong decisions of each predictor against what the realised gain and cost imply, median
relative error of the predicted gain, and what a prediction costs (cell updates of the dry run vs
none; host wall time).

(b) **bktrain FLOPs budget** -- a bklm pilot run records (cumulative FLOPs, smoothed training loss);
the law is fitted on its first half only; the target is the smoothed loss the run reaches at its
end (beyond the fitted range).  The job's budget is ``margin x`` the predicted FLOPs (what
``bktrain``'s ``op: budget`` answers); checked against the FLOPs the run actually needed to reach
the target.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from bench._common import Result

#: budget margin over the predicted FLOPs (bktrain's default)
MARGIN = 1.25


def _levels(esc, levels) -> dict[int, tuple[float, float]]:
    """level -> (cell updates, relative L1 error) against a uniform reference at ``to_level + 1``."""
    from sims import cases

    case = cases.make_case(esc.case, **esc.params)
    top = esc.to_level + 1
    ref = cases.build(case, blocks=esc.blocks, cells=esc.cells, max_level=top, level=top)
    cases.run_to_end(ref)
    reference = ref.uniform(top)
    norm = float(np.abs(reference).sum()) * ref.spec.h(top) ** 2 or 1.0
    out = {}
    for lv in levels:
        sim = cases.build(case, blocks=esc.blocks, cells=esc.cells, max_level=top, level=lv)
        rep = cases.run_to_end(sim)
        out[lv] = (float(rep.total_cell_updates), sim.l1_error(reference, top) / norm)
    return out


def _approve(gain: float, cost: float, thr: float) -> bool:
    return gain > 0.0 and gain / cost * 1e6 >= thr


def cswif_part(quick: bool) -> tuple[dict, list[dict], list[str]]:
    from bench.cswif import escalations
    from services.cswif.predictor import ScalingLawPredictor
    from sims.whatif import RichardsonSurrogate

    n_train, n_test = (5, 2) if quick else (30, 15)
    blocks, cells = 2, 4
    pred = ScalingLawPredictor(max_breaks=1)
    train_roi = []
    for esc in escalations(n_train, 11, "train", blocks, cells):
        lv = _levels(esc, (0, 1, 2))
        for level, (cost, err) in lv.items():
            pred.observe(esc.case, esc.params, esc.blocks * (esc.cells << level), cost, err)
        gain, cost = lv[1][1] - lv[2][1], lv[2][0] - lv[1][0]
        train_roi.append(gain / cost * 1e6)
    thr = float(np.median(train_roi))
    sur = RichardsonSurrogate(coarsen_by=2, max_cost_fraction=0.1)
    t0 = time.perf_counter()
    laws = {case: pred.law(case) for case in pred.history if pred.can_predict(case)}  # fitted once, up front
    fit_ms = (time.perf_counter() - t0) * 1e3
    rows = []
    for esc in escalations(n_test, 12, "test", blocks, cells):
        lv = _levels(esc, (1, 2))
        real_gain, real_cost = lv[1][1] - lv[2][1], lv[2][0] - lv[1][0]
        t0 = time.perf_counter()
        p_s = sur.predict(esc)
        wall_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        p_l = pred.predict(esc)
        wall_l = time.perf_counter() - t0
        should = _approve(real_gain, real_cost, thr)
        rows.append(
            {
                "escalation": esc.run_id,
                "real_gain": real_gain,
                "real_cost": real_cost,
                "surrogate_gain": p_s.gain,
                "law_gain": p_l.gain,
                "should": should,
                "surrogate_ok": _approve(p_s.gain, p_s.cost, thr) == should,
                "law_ok": _approve(p_l.gain, p_l.cost, thr) == should,
                "surrogate_cells": p_s.surrogate_cost,
                "surrogate_ms": wall_s * 1e3,
                "law_ms": wall_l * 1e3,
            }
        )

    def rel(key: str) -> float:
        errs = [abs(r[key] - r["real_gain"]) / abs(r["real_gain"]) for r in rows if r["real_gain"] > 1e-9]
        return float(np.median(errs)) if errs else float("nan")

    n = len(rows)
    total_cost = sum(r["real_cost"] for r in rows)
    metrics = {
        "cswif_test_escalations": float(n),
        "cswif_threshold_per_M": thr,
        "cswif_law_wrong_rate": sum(not r["law_ok"] for r in rows) / n,
        "cswif_surrogate_wrong_rate": sum(not r["surrogate_ok"] for r in rows) / n,
        "cswif_law_gain_rel_err_median": rel("law_gain"),
        "cswif_surrogate_gain_rel_err_median": rel("surrogate_gain"),
        "cswif_surrogate_cost_share": sum(r["surrogate_cells"] for r in rows) / total_cost,
        "cswif_law_cost_share": 0.0,
        "cswif_surrogate_ms_median": statistics.median(r["surrogate_ms"] for r in rows),
        "cswif_law_ms_median": statistics.median(r["law_ms"] for r in rows),
    }
    metrics["cswif_law_fit_ms_all_cases"] = fit_ms
    notes = [
        f"cs-wif: {n_train} training escalations observed at levels 0-2 (seed 11), {n} held-out test escalations "
        f"(seed 12), level 1 -> 2 on {blocks}x{blocks} blocks of {cells}^2 cells, reference at level 3; threshold = "
        f"median training ROI {thr:.3g}/M",
        "laws per case (breakpoints in cell updates): "
        + "; ".join(
            f"{c}: slopes {', '.join(f'{s:.2f}' for s in law.slopes)}"
            + (f" break {law.breakpoints[0]:.3g}" if law.breakpoints else "")
            for c, law in laws.items()
        ),
    ]
    return metrics, rows, notes


def _pilot(steps: int):
    from bklm import corpus as corpus_mod
    from bklm.model import ModelConfig
    from bklm.train import Trainer, TrainConfig

    cfg = TrainConfig(
        model=ModelConfig(d_model=32, n_layers=2, n_seq=32, n_heads=2, n_experts=2),
        batch=8,
        lr=3e-3,
        total_steps=steps,
        eval_windows=8,
    )
    trainer = Trainer(cfg, corpus_mod.load(None, limit_bytes=400_000))
    flops, losses = [], []
    for _ in range(steps):
        rep = trainer.step()
        flops.append(float(trainer.flops))
        losses.append(rep.loss)
    return np.array(flops), np.array(losses)


def _smooth(x: np.ndarray, alpha: float = 0.1) -> np.ndarray:
    out, s = np.empty_like(x), x[0]
    for i, v in enumerate(x):
        s = alpha * v + (1 - alpha) * s
        out[i] = s
    return out


def bktrain_part(quick: bool) -> tuple[dict, list[dict], list[str]]:
    from lm import scaling

    steps = 16 if quick else 240
    flops, losses = _pilot(steps)
    smooth = _smooth(losses)
    half, skip = steps // 2, max(2, steps // 20)
    law = scaling.fit_auto(flops[skip:half], smooth[skip:half], max_breaks=1)
    rows, metrics = [], {}
    # targets beyond the fitted range: the smoothed loss reached at 3/4 and at the end of the run
    for name, at in (("three_quarters", (3 * steps) // 4 - 1), ("end", steps - 1)):
        target = float(smooth[at:].min()) if name == "end" else float(smooth[at])
        actual = float(flops[int(np.argmax(smooth <= target))])
        try:
            predicted = law.compute_for(target)
        except scaling.UnreachableError:
            predicted = float("inf")
        rows.append(
            {
                "target": name,
                "target_loss": target,
                "predicted_flops": predicted,
                "budget_flops": MARGIN * predicted,
                "needed_flops": actual,
                "budget_sufficient": MARGIN * predicted >= actual,
            }
        )
        metrics[f"bktrain_{name}_predicted_over_needed"] = predicted / actual
        metrics[f"bktrain_{name}_budget_sufficient"] = float(MARGIN * predicted >= actual)
    notes = [
        f"bktrain: bklm pilot of {steps} steps (d_model 32, 2 layers, n_seq 32, batch 8, stdlib corpus 400 kB); "
        f"law fitted on steps {skip}-{half} (EMA-smoothed training loss), {len(law.breakpoints)} breakpoint(s), "
        f"slopes {', '.join(f'{s:.3f}' for s in law.slopes)}; budget = {MARGIN} x predicted"
    ]
    return metrics, rows, notes


def run(quick: bool) -> Result:
    import torch

    torch.set_num_threads(1)
    m1, r1, n1 = cswif_part(quick)
    m2, r2, n2 = bktrain_part(quick)
    return Result(
        metrics={**m1, **m2},
        targets={"cswif_law_cost_share": ("<=", 0.0), "bktrain_end_budget_sufficient": (">=", 1.0)},
        table=r1 + r2,
        notes=n1 + n2 + ["held-out only: neither predictor ever saw the escalation or the loss it predicts"],
    )
