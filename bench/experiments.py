"""Seed 000's drift experiments, reproduced and extended with a runtime growth gate.

    python -m bench.experiments classification|bandit|budget-sweep|all [--out results/grbfn] [--quick]
                               [--no-peers] [--seeds 33 37]

Writes CSV tables and PNG figures under ``--out`` and prints the tables; per-run progress goes to
stderr.  ``--quick`` shortens every phase to 500 steps (3,000-step streams) for a smoke run.

Model names in the tables:
* ``[origin keys]``: GRBFN+Plastic with the origin's key update (keys never learn) — the rows that
  reproduce seed 000's tables.  Unmarked GRBFN+Plastic rows use the fixed key learning.
* ``[gate N]``: growth gated by a ``LocalGate`` allowing ``N - k`` spawns, i.e. at most ``N`` units
  ever (``k`` = 3 initial units); seed 000's "budget of 25" is ``[gate 25]``.

Bandit reward draws: every policy runs alone against the pre-generated stream and reads the
Bernoulli draws of its slot (``sims.streams``): LinUCB slot 0, GRBFN+Plastic slot 1, MLP slot 2 as
in the origin; the policies the origin did not run (VW, extra GRBFN variants, MLP on seed 33) read
slot 1, sharing the GRBFN+Plastic draws (common random numbers).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import numpy as np

from clients.table import print_table
from sims.grbfn import GRBFN, MLP, GRBFNPlastic, LinUCB, LocalGate, LogReg, UnlimitedGate
from sims.grbfn.gate import PROTOTYPES, GrowthGate
from sims.streams import (BANDIT_SEEDS, CLASSIFICATION_SEED, N_PHASES, STEPS_PER_PHASE,
                          BanditStream, bandit_stream, classification_stream)

QUICK_STEPS_PER_PHASE = 500
BUDGET_SWEEP_UNITS = (5, 10, 15, 20, 25, 30, 40, 50, 60, 75, 90)
QUICK_BUDGET_SWEEP_UNITS = (5, 25, 90)
SEA_VARIANTS = (0, 3)
SEA_STEPS_PER_VARIANT = 5000
PROGRESS_EVERY = 2000

#: Seed 000's published figures (README tables; bandit gated rows from the origin's results CSVs).
SEED_000 = {
    "classification": {
        "GRBFN": {"accuracy": 0.9043, "post200": 0.786, "post500": 0.8636},
        "GRBFN+Plastic": {"accuracy": 0.9004, "post200": 0.815, "post500": 0.8716},
        "LogReg": {"accuracy": 0.7398, "post200": 0.65, "post500": 0.7144},
        "MLP(32)": {"accuracy": 0.8269, "post200": 0.637, "post500": 0.7344},
    },
    "bandit": {
        33: {"LinUCB(alpha=0.8)": {"reward": 6256.0, "regret": 222.6492386884768},
             "GRBFN+Plastic": {"reward": 6200.0, "regret": 271.04147275534183, "units": 25}},
        37: {"LinUCB(alpha=0.8)": {"reward": 6152.0, "regret": 299.4124817407165},
             "GRBFN+Plastic": {"reward": 6203.0, "regret": 228.30886977959412, "units": 25},
             "MLP(32)": {"reward": 6291.0, "regret": 247.61384443497}},
    },
}


# --- progress ---------------------------------------------------------------------------------

class Progress:
    """Writes ``[task] name: t/T`` lines to a stream (stderr by default) every ``every`` steps."""

    def __init__(self, task: str, *, every: int = PROGRESS_EVERY, stream: Any = None,
                 enabled: bool = True) -> None:
        self.task, self.every, self.enabled = task, every, enabled
        self.stream = stream if stream is not None else sys.stderr

    def step(self, name: str, t: int, total: int) -> None:
        if self.enabled and (t + 1) % self.every == 0 and t + 1 < total:
            print(f"[{self.task}] {name}: {t + 1}/{total}", file=self.stream, flush=True)

    def done(self, name: str, total: int, wall_s: float, extra: str = "") -> None:
        if self.enabled:
            print(f"[{self.task}] {name}: {total}/{total} in {wall_s:.2f}s {extra}".rstrip(),
                  file=self.stream, flush=True)


_SILENT = Progress("", enabled=False)


# --- classification ---------------------------------------------------------------------------

class Classifier(Protocol):
    def predict(self, x: np.ndarray) -> int: ...

    def update(self, x: np.ndarray, y: int) -> None: ...


@dataclasses.dataclass
class ClassifierRun:
    """Pre-update ("predict, then learn") outcome of one classifier on one stream."""

    name: str
    correct: np.ndarray  # bool per step
    units: np.ndarray | None  # live prototypes after each step (growing models only)
    wall_s: float
    spawned: int | None = None

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean())

    def post_drift(self, drift_points: Sequence[int], n: int) -> float:
        """Mean over drifts of the accuracy on the first ``n`` samples after each drift."""
        if not drift_points:
            raise ValueError("no drift points")
        return float(np.mean([self.correct[d:d + n].mean() for d in drift_points]))


def run_classifier(model: Classifier, X: np.ndarray, y: np.ndarray, *, name: str | None = None,
                   progress: Progress = _SILENT) -> ClassifierRun:
    """Predict each sample, score it, then learn from it."""
    if len(X) != len(y):
        raise ValueError(f"X and y differ in length: {len(X)} != {len(y)}")
    name = name or model.name
    n = len(y)
    correct = np.zeros(n, dtype=bool)
    growing = isinstance(model, GRBFN)
    units = np.zeros(n, dtype=np.int64) if growing else None
    start = time.perf_counter()
    for t in range(n):
        x, label = X[t], int(y[t])
        correct[t] = model.predict(x) == label
        model.update(x, label)
        if units is not None:
            units[t] = model.M
        progress.step(name, t, n)
    wall = time.perf_counter() - start
    run = ClassifierRun(name, correct, units, wall, model.spawned if growing else None)
    progress.done(name, n, wall, f"acc={run.accuracy:.4f}")
    return run


def units_gate(max_units: int, k: int) -> LocalGate:
    """A gate under which a model starting with ``k`` units can ever hold at most ``max_units``."""
    if max_units < k:
        raise ValueError(f"max_units ({max_units}) must be at least the {k} initial units")
    return LocalGate({PROTOTYPES: max_units - k})


def grbfn_plastic(task: str, *, key_update: str = "gradient", gate: GrowthGate | None = None,
                  d: int = 2, k: int = 3, name: str | None = None) -> GRBFNPlastic:
    """GRBFN+Plastic with seed 000's settings for ``task`` ("classification" or "bandit")."""
    if task == "classification":
        sigma, r_merge = 0.65, 0.35
    elif task == "bandit":
        sigma, r_merge = 0.7, 0.4
    else:
        raise ValueError(f"task must be 'classification' or 'bandit', got {task!r}")
    return GRBFNPlastic(d, k, sigma=sigma, r_merge=r_merge, key_update=key_update,  # type: ignore[arg-type]
                        gate=gate, name=name)


def classification_models(*, d: int = 2, k: int = 3, peers: bool = True,
                          gate_units: int = 25) -> list[tuple[str, Callable[[], Classifier]]]:
    """(name, factory) for every model of the classification table, reproduction rows first."""
    models: list[tuple[str, Callable[[], Classifier]]] = [
        ("GRBFN", lambda: GRBFN(d, k)),
        ("GRBFN+Plastic [origin keys]",
         lambda: grbfn_plastic("classification", key_update="origin", d=d, k=k)),
        ("LogReg", lambda: LogReg(d, k)),
        ("MLP(32)", lambda: MLP(d, k)),
        ("GRBFN+Plastic", lambda: grbfn_plastic("classification", d=d, k=k)),
        (f"GRBFN+Plastic [gate {gate_units}]",
         lambda: grbfn_plastic("classification", d=d, k=k, gate=units_gate(gate_units, k))),
    ]
    if peers:
        from sims.grbfn import peers as river_peers

        models += [
            ("River ARF", river_peers.river_arf),
            ("River HAT", river_peers.river_hat),
            ("River LogReg", lambda: river_peers.river_logreg(k)),
        ]
    return models


def _write_csv(path: str, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    cols = list(rows[0])
    for row in rows[1:]:
        cols += [c for c in row if c not in cols]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=cols)
        writer.writeheader()
        writer.writerows(rows)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mark_drifts(ax: Any, drift_points: Iterable[int]) -> None:
    for dp in drift_points:
        ax.axvline(dp, linestyle="--", linewidth=0.8, color="gray", alpha=0.7)


def _rolling_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Mean over the last ``window`` values (fewer at the start)."""
    c = np.cumsum(np.insert(values.astype(float), 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def classification_experiment(out: str | None = None, *, quick: bool = False, peers: bool = True,
                              progress: Progress = _SILENT) -> list[dict[str, Any]]:
    """Seed 000's classification table (+ fixed keys, gated and River rows); returns the rows."""
    spp = QUICK_STEPS_PER_PHASE if quick else STEPS_PER_PHASE
    stream = classification_stream(CLASSIFICATION_SEED, steps_per_phase=spp)
    runs = [run_classifier(factory(), stream.X, stream.y, name=name, progress=progress)
            for name, factory in classification_models(peers=peers)]
    rows = []
    for run in runs:
        rows.append({
            "model": run.name, "accuracy": round(run.accuracy, 4),
            "post200": round(run.post_drift(stream.drift_points, 200), 4),
            "post500": round(run.post_drift(stream.drift_points, 500), 4),
            "final_units": int(run.units[-1]) if run.units is not None else "",
            "spawned": run.spawned if run.spawned is not None else "",
            "wall_s": round(run.wall_s, 3),
        })
    if out is not None:
        os.makedirs(out, exist_ok=True)
        _write_csv(os.path.join(out, "classification.csv"), rows)
        plt = _plt()
        fig, ax = plt.subplots(figsize=(10, 5.5))
        for run in runs:
            ax.plot(_rolling_mean(run.correct, 100), label=run.name, linewidth=1)
        _mark_drifts(ax, stream.drift_points)
        ax.set(title=f"Pre-update accuracy, rolling 100 (seed {CLASSIFICATION_SEED})", xlabel="step",
               ylabel="accuracy", ylim=(0, 1.05))
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        fig.savefig(os.path.join(out, "classification_accuracy.png"), dpi=110)
        plt.close(fig)
        fig, ax = plt.subplots(figsize=(8, 4))
        for run in runs:
            if run.units is not None:
                ax.plot(run.units, label=run.name)
        _mark_drifts(ax, stream.drift_points)
        ax.set(title="Live prototypes", xlabel="step", ylabel="# prototypes")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "classification_prototypes.png"), dpi=110)
        plt.close(fig)
    return rows


def sea_stream(*, seed: int = CLASSIFICATION_SEED, variants: Sequence[int] = SEA_VARIANTS,
               steps_per_variant: int = SEA_STEPS_PER_VARIANT) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """River's SEA stream with abrupt drifts: ``steps_per_variant`` samples of each variant in turn
    (River 0.26.1's ``ConceptDriftStream`` overflows at width 1, so streams are chained instead).

    Features are mapped from [0, 10]^3 to [-3, 3]^3 (x * 0.6 - 3), the range the RBF widths were
    tuned for; the labels are River's.  Returns (X, y, drift_points)."""
    from river.datasets import synth

    if steps_per_variant < 1 or len(variants) < 2:
        raise ValueError("need at least two variants and a positive length")
    X, y = [], []
    for i, variant in enumerate(variants):
        for xd, label in synth.SEA(variant=variant, seed=seed + i).take(steps_per_variant):
            X.append([xd[0], xd[1], xd[2]])
            y.append(int(label))
    drift_points = [steps_per_variant * i for i in range(1, len(variants))]
    return np.asarray(X) * 0.6 - 3.0, np.asarray(y, dtype=np.int64), drift_points


def sea_experiment(out: str | None = None, *, quick: bool = False,
                   progress: Progress = _SILENT) -> list[dict[str, Any]]:
    """All classifiers on River's SEA stream with one abrupt drift (variant 0 -> 3)."""
    X, y, drifts = sea_stream(steps_per_variant=1000 if quick else SEA_STEPS_PER_VARIANT)
    rows = []
    for name, factory in classification_models(d=3, k=2, peers=True):
        run = run_classifier(factory(), X, y, name=name, progress=progress)
        rows.append({"model": name, "accuracy": round(run.accuracy, 4),
                     "post200": round(run.post_drift(drifts, 200), 4),
                     "post500": round(run.post_drift(drifts, 500), 4),
                     "final_units": int(run.units[-1]) if run.units is not None else "",
                     "wall_s": round(run.wall_s, 3)})
    if out is not None:
        os.makedirs(out, exist_ok=True)
        _write_csv(os.path.join(out, "classification_sea.csv"), rows)
    return rows


# --- bandit -----------------------------------------------------------------------------------

class BanditPolicy(Protocol):
    def select(self, x: np.ndarray) -> int: ...

    def update(self, x: np.ndarray, arm: int, reward: float) -> None: ...


class SupervisedBanditPolicy:
    """The origin's way to run a classifier as a bandit policy: pull argmax p; learn the label
    ``arm`` if rewarded, else the second-ranked arm (``argsort(p)[-2]``)."""

    def __init__(self, model: Any, name: str | None = None) -> None:
        self.model = model
        self.name = name or model.name
        self._p: np.ndarray | None = None

    def select(self, x: np.ndarray) -> int:
        self._p = self.model.predict_proba(x)
        return int(np.argmax(self._p))

    def update(self, x: np.ndarray, arm: int, reward: float) -> None:
        if self._p is None:
            raise RuntimeError("update() before select()")
        label = arm if reward > 0 else int(np.argsort(self._p)[-2])
        self._p = None
        self.model.update(x, label)


@dataclasses.dataclass
class BanditRun:
    name: str
    slot: int
    rewards: np.ndarray  # 0/1 per step
    regrets: np.ndarray  # expected regret per step
    units: np.ndarray | None
    wall_s: float

    @property
    def cum_reward(self) -> float:
        return float(self.rewards.sum())

    @property
    def cum_regret(self) -> float:
        """Left-to-right running sum, as the origin accumulated it."""
        return float(np.cumsum(self.regrets)[-1])


def run_bandit(policy: BanditPolicy, stream: BanditStream, slot: int, *, name: str | None = None,
               progress: Progress = _SILENT) -> BanditRun:
    if not 0 <= slot < stream.n_slots:
        raise ValueError(f"slot {slot} outside the stream's {stream.n_slots} slots")
    name = name or policy.name  # type: ignore[attr-defined]
    n = stream.n_steps
    rewards = np.zeros(n)
    regrets = np.zeros(n)
    model = getattr(policy, "model", None)
    units = np.zeros(n, dtype=np.int64) if isinstance(model, GRBFN) else None
    best = stream.probs.max(axis=1)
    start = time.perf_counter()
    for t in range(n):
        x = stream.X[t]
        arm = policy.select(x)
        reward = stream.reward(t, slot, arm)
        policy.update(x, arm, reward)
        rewards[t] = reward
        regrets[t] = best[t] - stream.probs[t, arm]
        if units is not None:
            units[t] = model.M
        progress.step(name, t, n)
    wall = time.perf_counter() - start
    run = BanditRun(name, slot, rewards, regrets, units, wall)
    progress.done(name, n, wall, f"reward={run.cum_reward:.0f} regret={run.cum_regret:.2f}")
    return run


def bandit_policies(seed: int, *, peers: bool = True, gate_units: int = 25
                    ) -> list[tuple[str, int, Callable[[], BanditPolicy]]]:
    """(name, slot, factory) for the bandit table of ``seed``; origin slots for the origin's policies."""
    mlp_slot = 2 if seed == 37 else 1
    g = gate_units
    policies: list[tuple[str, int, Callable[[], BanditPolicy]]] = [
        ("LinUCB(alpha=0.8)", 0, lambda: LinUCB(2, 3, alpha=0.8)),
        ("GRBFN+Plastic [origin keys]", 1,
         lambda: SupervisedBanditPolicy(grbfn_plastic("bandit", key_update="origin"))),
        (f"GRBFN+Plastic [origin keys, gate {g}]", 1, lambda: SupervisedBanditPolicy(
            grbfn_plastic("bandit", key_update="origin", gate=units_gate(g, 3)))),
        ("MLP(32)", mlp_slot, lambda: SupervisedBanditPolicy(MLP(2, 3))),
        ("GRBFN+Plastic", 1, lambda: SupervisedBanditPolicy(grbfn_plastic("bandit"))),
        (f"GRBFN+Plastic [gate {g}]", 1,
         lambda: SupervisedBanditPolicy(grbfn_plastic("bandit", gate=units_gate(g, 3)))),
    ]
    if peers:
        from sims.grbfn.peers import VWContextualBandit

        policies += [
            ("VW cb_explore_adf eps=0.05", 1,
             lambda: VWContextualBandit(3, extra_args="--epsilon 0.05")),
            ("VW cb_explore_adf eps=0.05 power_t=0", 1,
             lambda: VWContextualBandit(3, extra_args="--epsilon 0.05 --power_t 0")),
        ]
    return policies


def bandit_experiment(seeds: Sequence[int] = BANDIT_SEEDS, out: str | None = None, *,
                      quick: bool = False, peers: bool = True,
                      progress: Progress = _SILENT) -> list[dict[str, Any]]:
    """Seed 000's bandit tables (+ gated, fixed-key and VW rows) for each seed; returns the rows."""
    spp = QUICK_STEPS_PER_PHASE if quick else STEPS_PER_PHASE
    rows = []
    for seed in seeds:
        stream = bandit_stream(seed, steps_per_phase=spp)
        runs = []
        for name, slot, factory in bandit_policies(seed, peers=peers):
            policy = factory()
            runs.append(run_bandit(policy, stream, slot, name=name, progress=progress))
            if hasattr(policy, "close"):
                policy.close()
        for run in runs:
            rows.append({"seed": seed, "policy": run.name, "slot": run.slot,
                         "cum_reward": run.cum_reward, "cum_regret": round(run.cum_regret, 4),
                         "final_units": int(run.units[-1]) if run.units is not None else "",
                         "wall_s": round(run.wall_s, 3)})
        if out is not None:
            os.makedirs(out, exist_ok=True)
            plt = _plt()
            for field, label in (("rewards", "cumreward"), ("regrets", "cumregret")):
                fig, ax = plt.subplots(figsize=(8, 5))
                for run in runs:
                    ax.plot(np.cumsum(getattr(run, field)), label=run.name, linewidth=1)
                _mark_drifts(ax, stream.drift_points)
                ax.set(title=f"Cumulative {'reward' if field == 'rewards' else 'regret'} (seed {seed})",
                       xlabel="step", ylabel=label)
                ax.legend(fontsize=7)
                fig.tight_layout()
                fig.savefig(os.path.join(out, f"bandit_{seed}_{label}.png"), dpi=110)
                plt.close(fig)
            fig, ax = plt.subplots(figsize=(8, 4))
            for run in runs:
                if run.units is not None:
                    ax.plot(run.units, label=run.name)
            _mark_drifts(ax, stream.drift_points)
            ax.set(title=f"Live prototypes (bandit seed {seed})", xlabel="step", ylabel="# prototypes")
            ax.legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(os.path.join(out, f"bandit_{seed}_prototypes.png"), dpi=110)
            plt.close(fig)
    if out is not None:
        _write_csv(os.path.join(out, "bandit.csv"), rows)
    return rows


# --- budget sweep -----------------------------------------------------------------------------

def budget_sweep(out: str | None = None, *, quick: bool = False, seeds: Sequence[int] = BANDIT_SEEDS,
                 units: Sequence[int] | None = None, key_updates: Sequence[str] = ("gradient", "origin"),
                 progress: Progress = _SILENT) -> list[dict[str, Any]]:
    """GRBFN+Plastic under gates allowing 5..90 units: accuracy, Post@200, bandit reward and regret."""
    units = units or (QUICK_BUDGET_SWEEP_UNITS if quick else BUDGET_SWEEP_UNITS)
    spp = QUICK_STEPS_PER_PHASE if quick else STEPS_PER_PHASE
    cstream = classification_stream(CLASSIFICATION_SEED, steps_per_phase=spp)
    bstreams = {seed: bandit_stream(seed, steps_per_phase=spp) for seed in seeds}
    rows = []
    for key_update in key_updates:
        for cap in list(units) + [None]:
            tag = f"gate {cap}" if cap is not None else "no gate"
            name = f"GRBFN+Plastic [{key_update} keys, {tag}]"

            def gate() -> GrowthGate:
                return units_gate(cap, 3) if cap is not None else UnlimitedGate()

            model = grbfn_plastic("classification", key_update=key_update, gate=gate())
            crun = run_classifier(model, cstream.X, cstream.y, name=f"{name} classification",
                                  progress=progress)
            row: dict[str, Any] = {
                "keys": key_update, "max_units": cap if cap is not None else "",
                "accuracy": round(crun.accuracy, 4),
                "post200": round(crun.post_drift(cstream.drift_points, 200), 4),
                "class_units": int(crun.units[-1]), "class_spawned": model.spawned,
                "class_refused": model.refused,
            }
            for seed, bstream in bstreams.items():
                bmodel = grbfn_plastic("bandit", key_update=key_update, gate=gate())
                brun = run_bandit(SupervisedBanditPolicy(bmodel), bstream, 1,
                                  name=f"{name} bandit {seed}", progress=progress)
                row[f"reward_{seed}"] = brun.cum_reward
                row[f"regret_{seed}"] = round(brun.cum_regret, 2)
                row[f"units_{seed}"] = int(brun.units[-1])
                row[f"spawned_{seed}"] = bmodel.spawned
            rows.append(row)
    if out is not None:
        os.makedirs(out, exist_ok=True)
        _write_csv(os.path.join(out, "budget_sweep.csv"), rows)
        plt = _plt()
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
        for key_update in key_updates:
            capped = [r for r in rows if r["keys"] == key_update and r["max_units"] != ""]
            xs = [r["max_units"] for r in capped]
            axes[0].plot(xs, [r["accuracy"] for r in capped], "o-", label=f"accuracy ({key_update} keys)")
            axes[0].plot(xs, [r["post200"] for r in capped], "s--", label=f"Post@200 ({key_update} keys)")
            for seed in seeds:
                axes[1].plot(xs, [r[f"reward_{seed}"] for r in capped], "o-",
                             label=f"seed {seed} ({key_update} keys)")
                axes[2].plot(xs, [r[f"regret_{seed}"] for r in capped], "o-",
                             label=f"seed {seed} ({key_update} keys)")
        axes[0].set(title="Classification vs growth cap", xlabel="max units", ylabel="accuracy")
        axes[1].set(title="Bandit cumulative reward vs cap", xlabel="max units", ylabel="reward")
        axes[2].set(title="Bandit cumulative regret vs cap", xlabel="max units", ylabel="regret")
        for ax in axes:
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "budget_sweep.png"), dpi=110)
        plt.close(fig)
    return rows


# --- command line -----------------------------------------------------------------------------

def _print_rows(title: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n== {title} ==")
    print_table(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.experiments", description=__doc__.split("\n")[0])
    parser.add_argument("experiment", choices=["classification", "bandit", "budget-sweep", "all"])
    parser.add_argument("--out", default=os.path.join("results", "grbfn"), help="results folder")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_STEPS_PER_PHASE}-step phases")
    parser.add_argument("--no-peers", action="store_true", help="skip River and Vowpal Wabbit")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(BANDIT_SEEDS))
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)
    progress = Progress(args.experiment, enabled=not args.quiet)
    peers = not args.no_peers
    if args.experiment in ("classification", "all"):
        _print_rows(f"classification (seed {CLASSIFICATION_SEED})",
                    classification_experiment(args.out, quick=args.quick, peers=peers, progress=progress))
        if peers:
            _print_rows("River SEA, abrupt drift variant 0 -> 3",
                        sea_experiment(args.out, quick=args.quick, progress=progress))
    if args.experiment in ("bandit", "all"):
        _print_rows("bandit", bandit_experiment(args.seeds, args.out, quick=args.quick, peers=peers,
                                                progress=progress))
    if args.experiment in ("budget-sweep", "all"):
        _print_rows("budget sweep", budget_sweep(args.out, quick=args.quick, seeds=args.seeds,
                                                 progress=progress))
    print(f"\nresults written under {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
