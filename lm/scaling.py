"""Breakpoint scaling law (seed 004 S-3): loss against compute as a piecewise power law.

In log-log space the law is a continuous piecewise-linear function with ``n_breaks`` breakpoints::

    log10 L = a + b_0 x + sum_j c_j max(0, x - x_j),      x = log10 C

so segment ``i`` has slope ``b_0 + c_1 + ... + c_i`` (a "broken" power law, as in Caballero et
al. 2022's broken neural scaling laws, in its sharp-break limit).  :func:`fit` chooses the
breakpoints by exhaustive search over the gaps between sorted distinct ``x`` (every segment keeps
at least :data:`MIN_SEGMENT` points), solves the rest by least squares (NumPy), then refines the
breakpoints continuously with SciPy's Nelder-Mead from the best grid point.  :func:`fit_auto`
picks the number of breakpoints by BIC.

Used by reca as a predictor, never fitted on what it predicts:

* :mod:`services.cswif.predictor` -- an escalation's gain from the error-vs-compute law of its case
  (no dry run);
* :mod:`services.bktrain` ``op: budget`` -- the FLOPs a training run needs to reach a target loss,
  from its pilot curve: the job's ``flops`` budget is set from it.

Bad input raises :class:`ScalingError` subclasses (``ValueError``): non-positive or non-finite
compute or loss, too few points for the breakpoints asked, a target the law never reaches.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence

import numpy as np

#: Least points on each side of a breakpoint (a segment is a line: two points at least).
MIN_SEGMENT = 2
#: Largest number of breakpoints :func:`fit` searches exhaustively.
MAX_BREAKS = 3


class ScalingError(ValueError):
    """Base of the scaling-law errors (bad input to a fit or a prediction)."""


class NonPositiveError(ScalingError):
    """A compute or loss value that is not a finite number > 0 (a log-log law needs both)."""


class TooFewPointsError(ScalingError):
    """Fewer (distinct-compute) points than the breakpoints asked for need."""


class UnreachableError(ScalingError):
    """The law never reaches the target loss (its last segment does not fall below it)."""


def _positive(values: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise NonPositiveError(f"{what} must be numbers: {exc}") from None
    bad = ~np.isfinite(arr) | (arr <= 0)
    if bad.any():
        raise NonPositiveError(f"{what} must be finite and > 0; got {arr[bad][:3].tolist()}")
    return arr


def _design(x: np.ndarray, breaks: Sequence[float]) -> np.ndarray:
    cols = [np.ones_like(x), x] + [np.maximum(0.0, x - b) for b in breaks]
    return np.stack(cols, axis=1)


def _lstsq(x: np.ndarray, y: np.ndarray, breaks: Sequence[float]) -> tuple[np.ndarray, float]:
    coef, *_ = np.linalg.lstsq(_design(x, breaks), y, rcond=None)
    resid = y - _design(x, breaks) @ coef
    return coef, float(resid @ resid)


@dataclasses.dataclass(frozen=True)
class BreakpointLaw:
    """A fitted law.  ``breakpoints``: compute values (not logs) where the slope changes;
    ``slopes``: the log-log slope of each segment; ``rss``: residual sum of squares in log10."""

    intercept: float
    slopes: tuple[float, ...]
    breakpoints: tuple[float, ...]
    rss: float
    n_points: int
    min_compute: float

    def log_loss(self, log_c: np.ndarray) -> np.ndarray:
        y = self.intercept + self.slopes[0] * log_c
        for j, b in enumerate(self.breakpoints):
            y = y + (self.slopes[j + 1] - self.slopes[j]) * np.maximum(0.0, log_c - math.log10(b))
        return y

    def predict(self, compute: float | Sequence[float] | np.ndarray) -> np.ndarray:
        """Loss at ``compute`` (an array, the shape of the input)."""
        c = _positive(compute, "compute")
        return np.power(10.0, self.log_loss(np.log10(c))).reshape(np.shape(compute))

    def compute_for(self, target_loss: float) -> float:
        """The least compute, not below the smallest fitted one, at which the law's loss is
        ``<= target_loss`` (extrapolating along the last segment).  :class:`UnreachableError` if
        it never is."""
        t = math.log10(float(_positive([target_loss], "target loss")[0]))
        x0 = math.log10(self.min_compute)
        knots = [k for k in (math.log10(b) for b in self.breakpoints) if k > x0] + [math.inf]
        first = len(self.slopes) - len(knots)  # the segment x0 lies on
        left = x0
        for slope, right in zip(self.slopes[first:], knots):
            y_left = float(self.log_loss(np.array([left]))[0])
            if y_left <= t:
                return 10.0**left
            if slope < 0:
                x = left + (t - y_left) / slope
                if x <= right:
                    if x > 300:
                        raise UnreachableError(f"loss {target_loss:g} lies beyond 1e300 compute on this law")
                    return 10.0**x
            left = right
        raise UnreachableError(
            f"the law never reaches loss {target_loss:g}: its last segment's slope is {self.slopes[-1]:.3g}"
        )

    def to_wire(self) -> dict:
        return {
            "intercept": self.intercept,
            "slopes": list(self.slopes),
            "breakpoints": list(self.breakpoints),
            "rss": self.rss,
            "n_points": self.n_points,
            "min_compute": self.min_compute,
        }


def fit(
    compute: Sequence[float] | np.ndarray, loss: Sequence[float] | np.ndarray, n_breaks: int = 1, *, refine: bool = True
) -> BreakpointLaw:
    """Least-squares law with ``n_breaks`` breakpoints through (compute, loss) pairs."""
    if isinstance(n_breaks, bool) or not isinstance(n_breaks, int) or not 0 <= n_breaks <= MAX_BREAKS:
        raise ScalingError(f"n_breaks must be an integer in [0, {MAX_BREAKS}], got {n_breaks!r}")
    c, l_ = _positive(compute, "compute"), _positive(loss, "loss")
    if c.shape != l_.shape:
        raise ScalingError(f"compute and loss differ in length: {c.size} vs {l_.size}")
    order = np.argsort(c, kind="stable")
    x, y = np.log10(c[order]), np.log10(l_[order])
    distinct = np.unique(x)
    need = MIN_SEGMENT * (n_breaks + 1)
    if distinct.size < need:
        raise TooFewPointsError(
            f"{n_breaks} breakpoint(s) need at least {need} distinct compute values, got {distinct.size}"
        )
    if n_breaks == 0:
        coef, rss = _lstsq(x, y, ())
        return BreakpointLaw(float(coef[0]), (float(coef[1]),), (), rss, int(x.size), float(10 ** x[0]))
    gaps = (distinct[:-1] + distinct[1:]) / 2  # candidate breakpoints between distinct x
    best: tuple[float, tuple[float, ...]] | None = None
    for combo in itertools.combinations(range(gaps.size), n_breaks):
        breaks = tuple(float(gaps[i]) for i in combo)
        edges = (-math.inf, *breaks, math.inf)
        if any(np.count_nonzero((distinct > a) & (distinct < b)) < MIN_SEGMENT for a, b in zip(edges, edges[1:])):
            continue
        _, rss = _lstsq(x, y, breaks)
        if best is None or rss < best[0]:
            best = (rss, breaks)
    if best is None:
        raise TooFewPointsError(f"no placement of {n_breaks} breakpoint(s) leaves {MIN_SEGMENT} points per segment")
    rss, breaks = best
    if refine:
        breaks, rss = _refine(x, y, breaks, rss, distinct)
    coef, rss = _lstsq(x, y, breaks)
    slopes = tuple(float(s) for s in np.cumsum(coef[1:]))
    return BreakpointLaw(float(coef[0]), slopes, tuple(10.0**b for b in breaks), rss, int(x.size), float(10 ** x[0]))


def _refine(x: np.ndarray, y: np.ndarray, breaks: tuple[float, ...], rss: float, distinct: np.ndarray):
    """Continuous breakpoints (SciPy Nelder-Mead) kept inside the data and ordered."""
    from scipy.optimize import minimize

    lo, hi = float(distinct[1]), float(distinct[-2])

    def objective(b: np.ndarray) -> float:
        bs = np.sort(b)
        if bs[0] < lo or bs[-1] > hi:
            return rss * 10 + 1.0
        return _lstsq(x, y, tuple(bs))[1]

    res = minimize(objective, np.array(breaks), method="Nelder-Mead", options={"xatol": 1e-4, "fatol": 1e-12})
    if res.success and res.fun < rss:
        return tuple(float(b) for b in np.sort(res.x)), float(res.fun)
    return breaks, rss


def fit_auto(
    compute: Sequence[float] | np.ndarray, loss: Sequence[float] | np.ndarray, max_breaks: int = 2
) -> BreakpointLaw:
    """The law with 0..``max_breaks`` breakpoints of least BIC (``n ln(rss/n) + k ln n``) among
    those the points allow; at least one breakpoint is tried whenever the points allow it."""
    c = _positive(compute, "compute")
    n = c.size
    laws = []
    for k in range(max_breaks + 1):
        try:
            laws.append(fit(compute, loss, k))
        except TooFewPointsError:
            break
    if not laws:
        raise TooFewPointsError(f"a power law needs at least {MIN_SEGMENT} distinct compute values, got {n}")

    def bic(law: BreakpointLaw) -> float:
        k = 2 + 2 * len(law.breakpoints)
        return n * math.log(max(law.rss, 1e-300) / n) + k * math.log(n)

    return min(laws, key=bic)
