"""Peers nobody here wrote, behind the same interfaces as our models.

* Classifiers (``predict(x) -> int``, ``update(x, y)``): River 0.26 ``ARFClassifier``,
  ``HoeffdingAdaptiveTreeClassifier`` and ``LogisticRegression`` (one-vs-rest for more than two
  classes, which is how River applies a binary model to several classes).
* Bandit policy (``select(x) -> arm``, ``update(x, arm, reward)``): Vowpal Wabbit 9
  ``--cb_explore_adf`` with the context namespace ``C`` crossed with the action namespace ``A``
  (``-q CA``), i.e. one linear model per arm like LinUCB.  VW returns a PMF; the arm is sampled from
  it with this object's own seeded generator, so runs are deterministic.

Both libraries are imported lazily so the rest of ``sims.grbfn`` works without them.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _features(x: np.ndarray) -> dict[str, float]:
    return {f"x{i}": float(v) for i, v in enumerate(x)}


class RiverClassifier:
    """Adapter from River's ``predict_one``/``learn_one`` on dicts to arrays and int labels.

    Before River has seen any label it predicts ``None``; that counts as class 0."""

    def __init__(self, model: Any, name: str) -> None:
        self.model = model
        self.name = name

    def predict(self, x: np.ndarray) -> int:
        pred = self.model.predict_one(_features(x))
        return 0 if pred is None else int(pred)

    def update(self, x: np.ndarray, y: int) -> None:
        self.model.learn_one(_features(x), int(y))


def river_arf(seed: int = 42) -> RiverClassifier:
    from river import forest

    return RiverClassifier(forest.ARFClassifier(seed=seed), "River ARF")


def river_hat(seed: int = 42) -> RiverClassifier:
    from river import tree

    return RiverClassifier(tree.HoeffdingAdaptiveTreeClassifier(seed=seed), "River HAT")


def river_logreg(n_classes: int) -> RiverClassifier:
    from river import linear_model, multiclass

    if n_classes < 2:
        raise ValueError(f"need at least 2 classes, got {n_classes}")
    model = linear_model.LogisticRegression()
    if n_classes > 2:
        model = multiclass.OneVsRestClassifier(model)
    return RiverClassifier(model, "River LogReg")


class VWContextualBandit:
    """Vowpal Wabbit ``--cb_explore_adf`` as a bandit policy.

    Costs are ``-reward`` (VW minimises cost).  ``extra_args`` are appended to the fixed
    ``--cb_explore_adf -q CA --quiet`` (e.g. ``--epsilon 0.05`` or ``--power_t 0``)."""

    def __init__(self, n_arms: int, *, extra_args: str = "--epsilon 0.05", seed: int = 0,
                 name: str | None = None) -> None:
        import vowpalwabbit

        if n_arms < 2:
            raise ValueError(f"need at least 2 arms, got {n_arms}")
        self.n_arms = n_arms
        self.args = f"--cb_explore_adf -q CA --quiet {extra_args}".strip()
        self.name = name or f"VW cb_explore_adf -q CA {extra_args}".strip()
        self._ws = vowpalwabbit.Workspace(self.args)
        self._rng = np.random.default_rng(seed)
        self._last_pmf: np.ndarray | None = None

    def _lines(self, x: np.ndarray, label: tuple[int, float, float] | None = None) -> list[str]:
        shared = "shared |C " + " ".join(f"x{i}:{v:.9g}" for i, v in enumerate(x))
        lines = [shared]
        for arm in range(self.n_arms):
            head = ""
            if label is not None and label[0] == arm:
                head = f"0:{label[1]:g}:{label[2]:.9g} "
            lines.append(f"{head}|A a{arm}")
        return lines

    def select(self, x: np.ndarray) -> int:
        pmf = np.asarray(self._ws.predict(self._lines(x)), dtype=float)
        pmf /= pmf.sum()
        self._last_pmf = pmf
        return int(self._rng.choice(self.n_arms, p=pmf))

    def update(self, x: np.ndarray, arm: int, reward: float) -> None:
        if self._last_pmf is None:
            raise RuntimeError("update() before select(): VW needs the probability of the pulled arm")
        self._ws.learn(self._lines(x, (arm, -float(reward), float(self._last_pmf[arm]))))
        self._last_pmf = None

    def close(self) -> None:
        self._ws.finish()
