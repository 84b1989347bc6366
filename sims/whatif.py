"""Compute-Safe Two-Phase What-If (seed 001 §3.12): predict an escalation's return on a cheap
surrogate, refuse it unless the predicted gain per unit cost clears a threshold, and keep the
predictions beside the outcomes so the gate's accuracy can be measured.

Escalation handled here: "run this case at a finer level" (:class:`FinerRun`).  Refining a region
of a live run is the same question asked of a sub-domain; IGMS asks its resource gate instead.

Surrogate (:class:`RichardsonSurrogate`): three dry runs of the same case on grids 2^k times
coarser than the escalation's starting grid (``N_s``, ``2 N_s``, ``4 N_s`` cells per side), over at
most the case's horizon and never more than ``max_cost_fraction`` of the escalation's own cost (a
shorter horizon is used when needed).  From the successive differences d1 = |u_Ns - u_2Ns|,
d2 = |u_2Ns - u_4Ns| (L1, on the coarser grid of each pair) it fits the observed order
p = log2(d1/d2) and the error model e(N) = C N^-p, so the predicted gain is e(N_from) - e(N_to).
Costs (cell updates) are extrapolated from the surrogates' own measured counts with the measured
exponent.  Gains are relative to the solution's L1 norm, so one threshold serves every case.

Pure apart from running the surrogate simulations: no sockets, ``now`` passed in.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Protocol

import numpy as np

from sims import cases

MIN_ORDER, MAX_ORDER = 0.5, 3.0


@dataclasses.dataclass(frozen=True)
class FinerRun:
    """Escalate ``case`` (with ``params``) on ``blocks``² root blocks of ``cells``² cells from a
    uniform run at ``from_level`` to one at ``to_level``."""

    run_id: str
    case: str
    params: dict[str, float]
    blocks: int
    cells: int
    from_level: int
    to_level: int

    def __post_init__(self) -> None:
        if not 0 <= self.from_level < self.to_level <= 4:
            raise ValueError(f"need 0 <= from_level < to_level <= 4, got {self.from_level} -> {self.to_level}")
        if self.blocks < 1 or self.cells < 4:
            raise ValueError("blocks >= 1 and cells >= 4 are required")


@dataclasses.dataclass(frozen=True)
class Prediction:
    """``gain``: predicted relative L1 error reduction; ``cost``: predicted extra cell updates;
    ``surrogate_cost``: cell updates the dry run spent; ``order``: fitted convergence order."""

    gain: float
    cost: float
    surrogate_cost: int
    order: float
    horizon: float

    @property
    def roi(self) -> float:
        return self.gain / self.cost if self.cost > 0 else math.inf


@dataclasses.dataclass(frozen=True)
class Decision:
    run_id: str
    approved: bool
    prediction: Prediction
    threshold: float
    reason: str
    at: float


class Surrogate(Protocol):
    def predict(self, esc: FinerRun) -> Prediction: ...


def _l1_pair(coarse: np.ndarray, fine: np.ndarray, area: float) -> float:
    n = coarse.shape[0]
    return float(np.abs(coarse - fine.reshape(n, 2, n, 2).mean(axis=(1, 3))).sum()) * area


class RichardsonSurrogate:
    """Three-grid Richardson dry run (see module docstring).  ``coarsen_by``: the first surrogate
    grid has ``N_from / 2**coarsen_by`` cells per block side (at least 4)."""

    def __init__(self, coarsen_by: int = 2, max_cost_fraction: float = 0.1) -> None:
        if coarsen_by < 1:
            raise ValueError("coarsen_by must be >= 1")
        if not 0 < max_cost_fraction <= 1:
            raise ValueError("max_cost_fraction must lie in (0, 1]")
        self.coarsen_by = coarsen_by
        self.max_cost_fraction = max_cost_fraction

    def predict(self, esc: FinerRun) -> Prediction:
        case = cases.make_case(esc.case, **esc.params)
        n_from = esc.cells << esc.from_level  # cells per block side
        n_to = esc.cells << esc.to_level
        base = max(4, n_from >> self.coarsen_by)
        base += base % 2
        # cost exponent of the scheme: cells (2) + steps (1 hyperbolic, 2 parabolic)
        q = 3.0 if case.physics.time_ratio == 2 else 4.0
        dry = 1.0 + 2.0**q + 4.0**q  # dry-run cost in units of the smallest run
        budget = self.max_cost_fraction * (n_to / base) ** q
        horizon = case.t_end * min(1.0, budget / dry)
        sols, updates = [], []
        for k in range(3):
            sim = cases.build(case, blocks=esc.blocks, cells=base << k, max_level=0, level=0, t_end=horizon)
            rep = cases.run_to_end(sim)
            if rep is None or rep.status == "unstable":
                raise ValueError(f"surrogate run of {esc.case!r} went unstable")
            sols.append(sim.uniform(0))
            updates.append(rep.total_cell_updates)
        pred = self._fit(esc, case, base, sols, updates, horizon)
        # the escalation itself runs to t_end
        return dataclasses.replace(pred, cost=pred.cost * case.t_end / horizon)

    def _fit(self, esc: FinerRun, case: Any, base: int, sols, updates, horizon: float) -> Prediction:
        x0, x1, _, _ = case.domain
        L = x1 - x0
        ncells = [esc.blocks * (base << k) for k in range(3)]
        d1 = _l1_pair(sols[0], sols[1], (L / ncells[0]) ** 2)
        d2 = _l1_pair(sols[1], sols[2], (L / ncells[1]) ** 2)
        norm = float(np.abs(sols[2]).sum()) * (L / ncells[2]) ** 2 or 1.0
        q = math.log2(updates[2] / updates[1])
        n_from = esc.cells << esc.from_level
        n_to = esc.cells << esc.to_level
        cost = _extrapolate(updates[2], base << 2, n_to, q) - _extrapolate(updates[2], base << 2, n_from, q)
        if d2 <= 0.0 or d1 <= 0.0:
            return Prediction(0.0, cost, sum(updates), math.nan, horizon)
        p = min(MAX_ORDER, max(MIN_ORDER, math.log2(d1 / d2)))
        # e(4 N_s) ~ d2 / (2^p - 1);  e(N) = e(4 N_s) (N / 4 N_s)^-p
        e_top = d2 / (2.0**p - 1.0) / norm
        top = base << 2

        def err(n: int) -> float:
            return e_top * (n / top) ** (-p)

        return Prediction(max(0.0, err(n_from) - err(n_to)), cost, sum(updates), p, horizon)


def _extrapolate(updates: float, n_have: int, n_want: int, exponent: float) -> float:
    return updates * (n_want / n_have) ** exponent


class WhatIfGate:
    """The hard gate: approve iff the predicted relative gain per million cell updates is at least
    ``threshold`` (and the gain positive).  ``ledger`` keeps every decision; ``record_outcome`` adds
    what the escalation (or the run it was refused) actually achieved."""

    def __init__(self, surrogate: Surrogate, threshold: float) -> None:
        if not (math.isfinite(threshold) and threshold >= 0):
            raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}")
        self.surrogate = surrogate
        self.threshold = float(threshold)
        self.ledger: dict[str, Decision] = {}
        self.outcomes: dict[str, tuple[float, float]] = {}

    def request(self, esc: FinerRun, now: float) -> Decision:
        if esc.run_id in self.ledger:
            raise ValueError(f"escalation {esc.run_id!r} was already decided")
        pred = self.surrogate.predict(esc)
        return self.decide(esc.run_id, pred, now)

    def decide(self, run_id: str, pred: Prediction, now: float) -> Decision:
        """The gate rule alone (pure)."""
        roi_per_m = pred.roi * 1e6
        approved = pred.gain > 0.0 and roi_per_m >= self.threshold
        reason = f"predicted gain {pred.gain:.3g} for {pred.cost:.3g} cell updates: {roi_per_m:.3g}/M vs threshold {self.threshold:g}/M"
        d = Decision(run_id, approved, pred, self.threshold, reason, now)
        self.ledger[run_id] = d
        return d

    def record_outcome(self, run_id: str, realized_gain: float, realized_cost: float) -> None:
        if run_id not in self.ledger:
            raise ValueError(f"unknown escalation {run_id!r}")
        self.outcomes[run_id] = (float(realized_gain), float(realized_cost))

    def would_have_approved(self, run_id: str) -> bool:
        gain, cost = self.outcomes[run_id]
        return gain > 0.0 and (gain / cost * 1e6 if cost > 0 else math.inf) >= self.threshold

    def accuracy(self) -> dict[str, float]:
        """Over escalations with outcomes: decisions that differ from what the realized numbers
        would have decided, and the median relative error of the predicted gain."""
        ids = [i for i in self.ledger if i in self.outcomes]
        wrong = sum(self.ledger[i].approved != self.would_have_approved(i) for i in ids)
        rel = [
            abs(self.ledger[i].prediction.gain - self.outcomes[i][0]) / max(abs(self.outcomes[i][0]), 1e-12)
            for i in ids
            if self.outcomes[i][0] > 1e-9
        ]
        return {
            "decided": float(len(ids)),
            "wrong": float(wrong),
            "wrong_rate": wrong / len(ids) if ids else math.nan,
            "median_gain_rel_error": float(np.median(rel)) if rel else math.nan,
        }
