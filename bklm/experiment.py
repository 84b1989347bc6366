"""The measurement behind ``python -m bench bk_lm``: every arm (plain ResNet-BK, the Transformer
baseline, each technique alone, all six combined) trained at equal counted compute over several
seeds, its held-out loss recorded against FLOPs and wall time, and the seed's claimed speed-up of
each technique set beside the measured one.

Definitions (fixed before any run; no hyperparameter was tuned on held-out data — every arm uses
the same defaults of :class:`bklm.train.TrainConfig`):

* budget: ``budget_steps`` steps of the plain ResNet-BK, in counted training FLOPs; every arm
  trains until its own counted FLOPs reach it (or ``max_steps_factor`` x budget_steps steps, for
  arms whose steps can cost almost nothing, like a gradient cache that always hits);
* target loss: the held-out loss plain ResNet-BK reaches at ``target_fraction`` of the budget
  (median over seeds, interpolated);
* compute to target: the first crossing of the target on the held-out curve, interpolated linearly
  between evaluations, in counted FLOPs and in training wall seconds (evaluation excluded);
* factor: plain's compute to target / the arm's, per seed (seed i against plain's seed i), given
  as median [min, max]; a seed that never reaches the target counts as factor 0 (no speed-up
  shown) and the number of seeds that reached it is reported;
* a claim holds when the median factor is at least the claimed factor.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable

from bklm.corpus import Corpus
from bklm.train import Trainer, TrainConfig

#: The seed's claimed speed-ups (seed 002, steps 6 and 7).
CLAIMS: dict[str, float] = {
    "act": 1.4, "multiscale": 2.0, "sparsity": 1.8, "curriculum": 1.4, "active": 2.0, "gradcache": 1.25,
    "gradcache_seed": 1.25,
}
CLAIMS["combined"] = 1.4 * 2.0 * 1.8 * 1.4 * 2.0 * 1.25  # the six claims multiplied: 17.6

ARMS: dict[str, dict[str, Any]] = {
    "bk": {},
    "transformer": {"model": {"arch": "transformer"}},
    "act": {"model": {"act": True}},
    "multiscale": {"model": {"multiscale": True}},
    "pair_merge_control": {"model": {"multiscale": True, "multiscale_stride": 1}},
    "sparsity": {"model": {"sparsity": True}},
    "curriculum": {"curriculum": True},
    "active": {"active": True},
    "gradcache": {"gradcache": True},
    "gradcache_seed": {"gradcache": True, "cache_signature": "embedding"},
    "combined": {"model": {"act": True, "multiscale": True, "sparsity": True},
                 "curriculum": True, "active": True, "gradcache": True},
}


@dataclasses.dataclass(frozen=True)
class Point:
    flops: float  # counted training FLOPs so far
    wall_s: float  # training wall seconds so far (evaluation excluded)
    steps: int
    loss: float  # held-out cross-entropy, nats per token


@dataclasses.dataclass
class Curve:
    arm: str
    seed: int
    points: list[Point]
    mean_stages: float | None  # None: unknown (curves saved without run statistics)
    keep_rate: float | None
    cache_hits: int | None
    params: int | None
    train_loss: float | None = None  # loss on training windows at the end (when asked for)


def arm_config(base: TrainConfig, arm: str, seed: int) -> TrainConfig:
    over = ARMS[arm]
    model = dataclasses.replace(base.model, **over.get("model", {}))
    rest = {k: v for k, v in over.items() if k != "model"}
    return dataclasses.replace(base, model=model, seed=seed, **rest)


def train_curve(cfg: TrainConfig, corpus: Corpus, arm: str, budget: float, evals: int, max_steps: int,
                train_windows: Any = None) -> Curve:
    """Train one arm until ``budget`` counted FLOPs (or ``max_steps``), evaluating held-out loss
    at 0 and every budget / evals FLOPs; with ``train_windows`` (a ``(W, n_seq + 1)`` tensor of
    training windows) also the final loss on them (``Curve.train_loss``: what a hyperparameter is
    chosen on, so the held-out curve stays unseen by the choice)."""
    tr = Trainer(cfg, corpus)
    loss, _ = tr.evaluate()
    points = [Point(tr.flops, 0.0, 0, loss)]
    wall, mark, stages, keeps, n = 0.0, budget / evals, 0.0, 0.0, 0
    while tr.flops < budget and tr.step_count < max_steps:
        report = tr.step()
        wall += report.wall_s
        if not report.cache_hit:
            stages, keeps, n = stages + report.mean_stages, keeps + report.keep_rate, n + 1
        if tr.flops >= mark or tr.flops >= budget or tr.step_count >= max_steps:
            loss, _ = tr.evaluate()
            points.append(Point(tr.flops, wall, tr.step_count, loss))
            while mark <= tr.flops:
                mark += budget / evals
    params = sum(p.numel() for p in tr.model.parameters())
    train_loss = None if train_windows is None else tr.evaluate(train_windows)[0]
    return Curve(arm, cfg.seed, points, stages / max(n, 1), keeps / max(n, 1), tr.cache_hits, params, train_loss)


def cost_to_target(points: list[Point], target: float) -> tuple[float, float] | None:
    """(FLOPs, wall s) at the first crossing of ``target``, interpolated; None if never reached."""
    for i, p in enumerate(points):
        if p.loss <= target:
            if i == 0:
                return p.flops, p.wall_s
            q = points[i - 1]
            f = (q.loss - target) / (q.loss - p.loss)
            return q.flops + f * (p.flops - q.flops), q.wall_s + f * (p.wall_s - q.wall_s)
    return None


def loss_at(points: list[Point], flops: float) -> float:
    """Held-out loss at ``flops`` (linear between evaluations; the last one beyond them)."""
    for q, p in zip(points, points[1:]):
        if p.flops >= flops:
            f = (flops - q.flops) / (p.flops - q.flops) if p.flops > q.flops else 1.0
            return q.loss + f * (p.loss - q.loss)
    return points[-1].loss


def spread(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


@dataclasses.dataclass
class Factor:
    """Per-seed factors of one arm against a reference arm (None: not reached in the budget)."""

    flops: list[float | None]
    wall: list[float | None]

    def reached(self) -> int:
        return sum(f is not None for f in self.flops)

    def flops_spread(self) -> tuple[float, float, float]:
        """median [min, max] over seeds, a seed that did not reach the target counted as 0."""
        return spread([0.0 if f is None else f for f in self.flops])

    def wall_spread(self) -> tuple[float, float, float] | None:
        got = [w for w in self.wall if w is not None]
        return spread(got) if got else None


def factors(curves: dict[str, list[Curve]], arm: str, reference: str, target: float) -> Factor:
    out = Factor([], [])
    for ref, cur in zip(curves[reference], curves[arm]):
        r = cost_to_target(ref.points, target)
        c = cost_to_target(cur.points, target)
        if r is None or c is None:
            out.flops.append(None)
            out.wall.append(None)
            continue
        out.flops.append(r[0] / c[0] if c[0] > 0 else float("inf"))
        out.wall.append(r[1] / c[1] if c[1] > 0 else float("inf"))
    return out


def run_all(corpus: Corpus, base: TrainConfig, arms: list[str], seeds: list[int], budget_steps: int,
            evals: int, max_steps_factor: float = 2.5,
            progress: Callable[[str], None] = lambda s: None) -> tuple[dict[str, list[Curve]], float]:
    """Every arm x seed; returns (curves by arm, budget in FLOPs). The budget is measured from
    the plain model's per-step FLOPs (constant for it)."""
    probe = Trainer(arm_config(base, "bk", seeds[0]), corpus)
    per_step = probe.step().flops
    budget = float(per_step * budget_steps)
    curves: dict[str, list[Curve]] = {a: [] for a in arms}
    total, k = len(arms) * len(seeds), 0
    t0 = time.monotonic()
    for seed in seeds:
        for arm in arms:
            k += 1
            c = train_curve(arm_config(base, arm, seed), corpus, arm, budget,
                            evals, int(max_steps_factor * budget_steps))
            curves[arm].append(c)
            last = c.points[-1]
            progress(f"[{k}/{total}] {arm} seed {seed}: {last.steps} steps, held-out {last.loss:.4f} at "
                     f"{last.flops:.3g} FLOPs, {last.wall_s:.1f} s train wall ({time.monotonic() - t0:.0f} s elapsed)")
    return curves, budget
