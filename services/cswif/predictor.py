"""CS-WIF's scaling-law ROI predictor (seed 004 S-3): an escalation's gain read off the breakpoint
law of its case, with no dry run.

It is a :class:`sims.whatif.Surrogate`: :meth:`ScalingLawPredictor.predict` returns the same
:class:`sims.whatif.Prediction` the Richardson dry run does, so :class:`sims.whatif.WhatIfGate`
decides with it unchanged.  What it knows comes from *observations* of finished runs (the
outcomes of earlier escalations): for a case, ``(params, cells per side, cell updates, relative L1
error)`` at each level run.  From them, per case:

* **cost model** -- ``log cost`` linear in ``log N`` (cells per side) and the logs of the case's
  positive parameters (least squares, minimum norm): what a level of this escalation will cost;
* **error law** -- :func:`lm.scaling.fit_auto` of relative error against cell updates (one or two
  breakpoints where the points allow, a plain power law otherwise).

Gain = law(cost at ``from_level``) - law(cost at ``to_level``), cost = their difference; the
prediction's ``surrogate_cost`` is 0 cell updates (the fit is microseconds of host work).  A case
with fewer than :data:`MIN_OBSERVATIONS` observations cannot be predicted
(:class:`NotEnoughHistory`); the service then falls back to the dry run.  Pure: no I/O, no clock.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from lm import scaling
from sims.whatif import FinerRun, Prediction

#: Observations of a case needed before its law is trusted (three give a plain power law; a
#: one-breakpoint law needs four distinct computes, and BIC decides whether it is worth it).
MIN_OBSERVATIONS = 3
#: Errors below this are clamped to it (a log-log law needs positive losses; exact runs give 0).
ERROR_FLOOR = 1e-12


class NotEnoughHistory(LookupError):
    """The case has too few observations for a law."""


@dataclasses.dataclass(frozen=True)
class Observation:
    params: dict[str, float]
    cells_per_side: int
    cost: float  # cell updates of the whole run
    error: float  # relative L1 error against a finer reference


def _features(params: dict[str, float], names: tuple[str, ...], n: int) -> list[float]:
    return [1.0, math.log(n)] + [math.log(params[k]) if params.get(k, 0) > 0 else 0.0 for k in names]


class ScalingLawPredictor:
    def __init__(self, max_breaks: int = 2) -> None:
        self.max_breaks = max_breaks
        self.history: dict[str, list[Observation]] = {}
        self._models: dict[str, tuple[tuple[str, ...], np.ndarray, scaling.BreakpointLaw]] = {}

    def observe(self, case: str, params: dict[str, float], cells_per_side: int, cost: float, error: float) -> None:
        """Record one finished run.  ``ValueError`` on a non-positive cost or size, a negative error."""
        if not (isinstance(cells_per_side, int) and cells_per_side > 0):
            raise ValueError(f"cells_per_side must be a positive integer, got {cells_per_side!r}")
        if not (math.isfinite(cost) and cost > 0):
            raise scaling.NonPositiveError(f"cost must be finite and > 0, got {cost!r}")
        if not (math.isfinite(error) and error >= 0):
            raise ValueError(f"error must be finite and >= 0, got {error!r}")
        for k, v in params.items():
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"param {k!r} must be a finite number, got {v!r}")
        self.history.setdefault(case, []).append(Observation(dict(params), cells_per_side, float(cost), float(error)))
        self._models.pop(case, None)

    def can_predict(self, case: str) -> bool:
        return len(self.history.get(case, ())) >= MIN_OBSERVATIONS

    def _model(self, case: str):
        if case not in self._models:
            obs = self.history.get(case, [])
            if len(obs) < MIN_OBSERVATIONS:
                raise NotEnoughHistory(f"case {case!r}: {len(obs)} observations, {MIN_OBSERVATIONS} needed")
            names = tuple(sorted({k for o in obs for k in o.params}))
            X = np.array([_features(o.params, names, o.cells_per_side) for o in obs])
            y = np.log([o.cost for o in obs])
            theta = np.linalg.lstsq(X, y, rcond=None)[0]
            law = scaling.fit_auto([o.cost for o in obs], [max(o.error, ERROR_FLOOR) for o in obs], self.max_breaks)
            self._models[case] = (names, theta, law)
        return self._models[case]

    def law(self, case: str) -> scaling.BreakpointLaw:
        return self._model(case)[2]

    def predict(self, esc: FinerRun) -> Prediction:
        names, theta, law = self._model(esc.case)

        def cost(level: int) -> float:
            n = esc.blocks * (esc.cells << level)
            return float(np.exp(np.dot(_features(esc.params, names, n), theta)))

        c_from, c_to = cost(esc.from_level), cost(esc.to_level)
        e_from, e_to = (float(v) for v in law.predict([c_from, c_to]))
        return Prediction(max(0.0, e_from - e_to), max(c_to - c_from, 1.0), 0, -law.slopes[-1], 0.0)
