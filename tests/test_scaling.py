"""lm.scaling: the breakpoint law recovers a known broken power law, inverts it, and refuses bad input."""

import numpy as np
import pytest

from lm import scaling


def _broken(c: np.ndarray) -> np.ndarray:
    x = np.log10(c)
    return 10 ** (1.0 - 0.05 * (x - 10) - 0.2 * np.maximum(0.0, x - 13))


def test_fit_recovers_breakpoint_and_slopes():
    c = np.logspace(10, 16, 25)
    law = scaling.fit(c, _broken(c), 1)
    assert law.slopes == pytest.approx((-0.05, -0.25), abs=1e-6)
    assert np.log10(law.breakpoints[0]) == pytest.approx(13.0, abs=1e-3)
    held_out = np.array([3.3e11, 7.7e14])  # points the fit never saw
    assert law.predict(held_out) == pytest.approx(_broken(held_out), rel=1e-6)


def test_compute_for_inverts_predict_and_refuses_unreachable():
    c = np.logspace(10, 16, 25)
    law = scaling.fit(c, _broken(c), 1)
    for target in (5.0, 2.0, 0.5):
        need = law.compute_for(target)
        assert float(law.predict(need)) == pytest.approx(target, rel=1e-6)
    assert law.compute_for(1e9) == pytest.approx(law.min_compute)  # already below at the start
    flat = scaling.fit(c, np.full(c.shape, 3.0), 0)
    with pytest.raises(scaling.UnreachableError):
        flat.compute_for(1.0)


def test_noisy_fit_and_bic_choice():
    rng = np.random.default_rng(0)
    c = np.logspace(8, 14, 40)
    noisy = _broken(c * 100) * np.exp(rng.normal(0, 0.01, c.size))
    auto = scaling.fit_auto(c, noisy, max_breaks=2)
    assert len(auto.breakpoints) >= 1
    plain = scaling.fit(c, noisy, 0)
    assert auto.rss < plain.rss


@pytest.mark.parametrize(
    "compute, loss, exc",
    [
        ([0.0, 1, 2, 3], [1, 1, 1, 1], scaling.NonPositiveError),
        ([1, 2, 3, 4], [1, -1, 1, 1], scaling.NonPositiveError),
        ([1, 2, float("nan"), 4], [1, 1, 1, 1], scaling.NonPositiveError),
        ([1, 2, 3], [3, 2, 1], scaling.TooFewPointsError),
        ([1, 1, 2, 2, 3], [3, 3, 2, 2, 1], scaling.TooFewPointsError),
        ([1, 2, 3, 4], [1, 2, 3], scaling.ScalingError),
    ],
)
def test_bad_input_is_typed(compute, loss, exc):
    with pytest.raises(exc):
        scaling.fit(compute, loss, 1)


def test_bad_breaks_and_predict_input():
    c = np.logspace(1, 3, 6)
    with pytest.raises(scaling.ScalingError):
        scaling.fit(c, c, 7)
    law = scaling.fit(c, 1 / c, 0)
    with pytest.raises(scaling.NonPositiveError):
        law.predict([-1.0])
    assert issubclass(scaling.ScalingError, ValueError)
