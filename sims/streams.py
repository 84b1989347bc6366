"""Drift streams of seed 000: a supervised Gaussian-mixture stream and a contextual bandit.

Both streams are generated up front into arrays, so that a model reads step ``t`` without
touching a random generator and no model can perturb another's data.

RNG contract (this is what makes seed 000's tables reproduce bit for bit): each stream owns one
``numpy.random.RandomState(seed)`` (the legacy Mersenne-Twister generator, not ``default_rng``)
and draws from it in exactly this order —

* classification: the phase-0 means ``uniform(-r, r, (classes, components, d))``; then per step
  ``t``: at a phase boundary new means (same call), then ``randint(0, classes)`` (label),
  ``randint(0, components)`` (mixture component), ``normal(0, sigma, d)`` (noise);
* bandit: phase-0 hotspot centres ``uniform(-r, r, (arms, hotspots, d))`` and scales
  ``0.6 + 0.8 * rand(arms, hotspots)``; then per step: at a phase boundary new centres and scales,
  the context ``uniform(-r, r, d)``, then one ``rand()`` per policy slot (the Bernoulli draw of
  that slot's reward, whatever arm the policy pulls).

In the origin all policies pulled from the environment's one generator in a fixed order each step,
so a policy's reward draw depends only on its position in that order ("slot"), never on the arms
chosen.  ``BanditStream.uniforms[t, slot]`` is that draw; ``n_slots`` must equal the number of
policies the origin ran (2 for seed 33, 3 for seed 37) for its tables to reproduce, because the
slots are interleaved with the contexts in the generator's sequence.
"""

from __future__ import annotations

import dataclasses

import numpy as np

STEPS_PER_PHASE = 2000
N_PHASES = 6
RANGE_LIMIT = 3.0
CLASSIFICATION_SEED = 21
BANDIT_SEEDS = (33, 37)
#: Policy slots the origin's bandit scripts used, by seed (LinUCB, GRBFN+Plastic[, MLP]).
ORIGIN_BANDIT_SLOTS = {33: 2, 37: 3}


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ClassificationStream:
    """A pre-generated supervised stream with abrupt drifts.

    ``X[t]`` (float64, shape ``(T, d)``) and ``y[t]`` (int64) are step ``t``'s sample;
    ``means[phase]`` the ``(classes, components, d)`` mixture means of that phase.
    Invariant: the means change exactly at ``drift_points`` (multiples of ``steps_per_phase``).
    """

    X: np.ndarray
    y: np.ndarray
    means: np.ndarray
    steps_per_phase: int
    n_classes: int
    seed: int

    @property
    def n_steps(self) -> int:
        return int(self.X.shape[0])

    @property
    def drift_points(self) -> list[int]:
        return list(range(self.steps_per_phase, self.n_steps, self.steps_per_phase))


def classification_stream(
    seed: int = CLASSIFICATION_SEED,
    *,
    n_classes: int = 3,
    n_components: int = 2,
    d: int = 2,
    sigma: float = 0.4,
    range_limit: float = RANGE_LIMIT,
    steps_per_phase: int = STEPS_PER_PHASE,
    n_phases: int = N_PHASES,
) -> ClassificationStream:
    """Each class is a mixture of ``n_components`` isotropic Gaussians (std ``sigma``) whose means are
    drawn from U[-range_limit, range_limit]^d and redrawn at every drift.  Labels and components are
    uniform.  See the module docstring for the exact draw order."""
    _check_positive(n_classes=n_classes, n_components=n_components, d=d, sigma=sigma,
                    range_limit=range_limit, steps_per_phase=steps_per_phase, n_phases=n_phases)
    rng = np.random.RandomState(seed)
    shape = (n_classes, n_components, d)
    n_steps = steps_per_phase * n_phases
    means = np.empty((n_phases,) + shape)
    X = np.empty((n_steps, d))
    y = np.empty(n_steps, dtype=np.int64)
    means[0] = rng.uniform(-range_limit, range_limit, size=shape)
    for t in range(n_steps):
        phase = t // steps_per_phase
        if phase and t % steps_per_phase == 0:
            means[phase] = rng.uniform(-range_limit, range_limit, size=shape)
        label = rng.randint(0, n_classes)
        comp = rng.randint(0, n_components)
        X[t] = means[phase, label, comp] + rng.normal(0, sigma, size=(d,))
        y[t] = label
    X.flags.writeable = False
    y.flags.writeable = False
    means.flags.writeable = False
    return ClassificationStream(X=X, y=y, means=means, steps_per_phase=steps_per_phase,
                                n_classes=n_classes, seed=seed)


@dataclasses.dataclass(frozen=True)
class BanditStream:
    """A pre-generated contextual bandit with abrupt drifts.

    ``X[t]``: context; ``probs[t, a]``: P(reward = 1 | X[t], arm a), in [0.5, 0.75] (exactly 0.5 where exp underflows);
    ``uniforms[t, slot]``: the Bernoulli draw of the policy in ``slot`` at step ``t``.
    """

    X: np.ndarray
    probs: np.ndarray
    uniforms: np.ndarray
    centres: np.ndarray
    scales: np.ndarray
    steps_per_phase: int
    seed: int

    @property
    def n_steps(self) -> int:
        return int(self.X.shape[0])

    @property
    def n_arms(self) -> int:
        return int(self.probs.shape[1])

    @property
    def n_slots(self) -> int:
        return int(self.uniforms.shape[1])

    @property
    def drift_points(self) -> list[int]:
        return list(range(self.steps_per_phase, self.n_steps, self.steps_per_phase))

    def reward(self, t: int, slot: int, arm: int) -> int:
        """1 if the draw of ``slot`` at step ``t`` falls below arm ``arm``'s reward probability."""
        return int(self.uniforms[t, slot] < self.probs[t, arm])

    def regret(self, t: int, arm: int) -> float:
        """Expected regret of pulling ``arm`` at step ``t``: max_a p(a) - p(arm)."""
        row = self.probs[t]
        return float(row.max() - row[arm])


def reward_probabilities(x: np.ndarray, centres: np.ndarray, scales: np.ndarray,
                         width: float) -> np.ndarray:
    """p(a) = sigmoid(log1p(sum_h exp(-||x - c_ah||^2 / (2 width^2) * s_ah))) for every arm a.

    ``centres``: (arms, hotspots, d); ``scales``: (arms, hotspots).  Elementwise identical to the
    origin's per-arm loop, so results match bit for bit."""
    diffs = centres - x
    dist2 = np.sum(diffs * diffs, axis=-1)
    logits = -dist2 / (2.0 * (width ** 2)) * scales
    val = np.log1p(np.sum(np.exp(logits), axis=-1))
    return 1.0 / (1.0 + np.exp(-val))


def bandit_stream(
    seed: int,
    *,
    n_slots: int | None = None,
    n_arms: int = 3,
    n_hotspots: int = 2,
    d: int = 2,
    width: float = 0.5,
    range_limit: float = RANGE_LIMIT,
    steps_per_phase: int = STEPS_PER_PHASE,
    n_phases: int = N_PHASES,
) -> BanditStream:
    """Each arm has ``n_hotspots`` hotspots (centres U[-r, r]^d, scales U(0.6, 1.4)) redrawn at every
    drift; contexts are U[-r, r]^d.  ``n_slots`` defaults to the origin's slot count for seeds 33
    and 37 and to 1 otherwise.  See the module docstring for the exact draw order."""
    if n_slots is None:
        n_slots = ORIGIN_BANDIT_SLOTS.get(seed, 1)
    _check_positive(n_slots=n_slots, n_arms=n_arms, n_hotspots=n_hotspots, d=d, width=width,
                    range_limit=range_limit, steps_per_phase=steps_per_phase, n_phases=n_phases)
    rng = np.random.RandomState(seed)
    n_steps = steps_per_phase * n_phases
    centres = np.empty((n_phases, n_arms, n_hotspots, d))
    scales = np.empty((n_phases, n_arms, n_hotspots))
    X = np.empty((n_steps, d))
    uniforms = np.empty((n_steps, n_slots))

    def new_phase(phase: int) -> None:
        centres[phase] = rng.uniform(-range_limit, range_limit, size=(n_arms, n_hotspots, d))
        scales[phase] = 0.6 + 0.8 * rng.rand(n_arms, n_hotspots)

    new_phase(0)
    for t in range(n_steps):
        phase = t // steps_per_phase
        if phase and t % steps_per_phase == 0:
            new_phase(phase)
        X[t] = rng.uniform(-range_limit, range_limit, size=(d,))
        for slot in range(n_slots):
            uniforms[t, slot] = rng.rand()
    phase_of = np.arange(n_steps) // steps_per_phase
    probs = np.empty((n_steps, n_arms))
    for phase in range(n_phases):
        rows = phase_of == phase
        # (steps, 1, 1, d) against (arms, hotspots, d): same elementwise ops as the per-step form.
        probs[rows] = reward_probabilities(X[rows][:, None, None, :], centres[phase], scales[phase], width)
    for arr in (X, probs, uniforms, centres, scales):
        arr.flags.writeable = False
    return BanditStream(X=X, probs=probs, uniforms=uniforms, centres=centres, scales=scales,
                        steps_per_phase=steps_per_phase, seed=seed)
