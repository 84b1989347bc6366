"""Experiment runners, outputs and the River / Vowpal Wabbit adapters on short streams."""

import csv
import io

import numpy as np
import pytest

from bench import experiments as ex
from sims.grbfn import MLP
from sims.streams import bandit_stream


def test_post_drift_averages_the_first_n_after_each_drift():
    correct = np.zeros(100, dtype=bool)
    correct[20:25] = True  # 5 of the first 10 after drift 20
    correct[60:70] = True  # all 10 after drift 60
    run = ex.ClassifierRun("m", correct, None, 0.0)
    assert run.post_drift([20, 60], 10) == pytest.approx(0.75)
    assert run.accuracy == pytest.approx(0.15)
    with pytest.raises(ValueError):
        run.post_drift([], 10)


def test_supervised_bandit_policy_learns_arm_or_runner_up():
    seen = []

    class Fixed:
        name = "fixed"

        def predict_proba(self, x):
            return np.array([0.2, 0.5, 0.3])

        def update(self, x, y):
            seen.append(y)

    policy = ex.SupervisedBanditPolicy(Fixed())
    x = np.zeros(2)
    assert policy.select(x) == 1
    policy.update(x, 1, 1)
    policy.select(x)
    policy.update(x, 1, 0)
    assert seen == [1, 2]
    with pytest.raises(RuntimeError):
        policy.update(x, 1, 0)


def test_run_bandit_validates_slot_and_counts():
    s = bandit_stream(37, steps_per_phase=100)
    run = ex.run_bandit(ex.SupervisedBanditPolicy(MLP(2, 3)), s, 2)
    assert run.rewards.shape == (600,) and set(np.unique(run.rewards)) <= {0.0, 1.0}
    assert np.all(run.regrets >= 0) and run.cum_regret == pytest.approx(run.regrets.sum())
    with pytest.raises(ValueError, match="slot"):
        ex.run_bandit(ex.SupervisedBanditPolicy(MLP(2, 3)), s, 3)


def test_units_gate_counts_initial_units():
    assert ex.units_gate(25, 3).caps == {"prototypes": 22}
    with pytest.raises(ValueError):
        ex.units_gate(2, 3)
    with pytest.raises(ValueError):
        ex.grbfn_plastic("regression")


def test_quick_experiments_write_tables_and_figures(tmp_path, monkeypatch):
    monkeypatch.setattr(ex, "QUICK_STEPS_PER_PHASE", 200)
    log = io.StringIO()
    progress = ex.Progress("t", every=500, stream=log)
    rows = ex.classification_experiment(str(tmp_path), quick=True, peers=False, progress=progress)
    assert [r["model"] for r in rows][:4] == ["GRBFN", "GRBFN+Plastic [origin keys]", "LogReg", "MLP(32)"]
    gated = next(r for r in rows if r["model"] == "GRBFN+Plastic [gate 25]")
    assert gated["final_units"] <= 25 and gated["spawned"] <= 22
    brows = ex.bandit_experiment([33], str(tmp_path), quick=True, peers=False, progress=progress)
    assert {r["policy"] for r in brows} >= {"LinUCB(alpha=0.8)", "GRBFN+Plastic [gate 25]"}
    srows = ex.budget_sweep(str(tmp_path), quick=True, seeds=[33], units=(5, 25),
                            key_updates=("gradient",), progress=progress)
    assert [r["max_units"] for r in srows] == [5, 25, ""]
    assert srows[0]["class_spawned"] <= 2 and srows[0]["spawned_33"] <= 2
    for name in ("classification.csv", "bandit.csv", "budget_sweep.csv", "classification_accuracy.png",
                 "classification_prototypes.png", "bandit_33_cumreward.png", "bandit_33_cumregret.png",
                 "budget_sweep.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    with open(tmp_path / "classification.csv") as fh:
        assert len(list(csv.DictReader(fh))) == len(rows)
    assert "[t] GRBFN: 1200/1200" in log.getvalue()


def test_river_peers_run_and_are_deterministic():
    pytest.importorskip("river")
    from sims.grbfn import peers

    s = ex.classification_stream(21, steps_per_phase=100)
    for make in (peers.river_arf, peers.river_hat, lambda: peers.river_logreg(3)):
        a = ex.run_classifier(make(), s.X, s.y)
        b = ex.run_classifier(make(), s.X, s.y)
        assert np.array_equal(a.correct, b.correct)
        assert a.accuracy > 0.4  # 3 classes: chance is 1/3
    with pytest.raises(ValueError):
        peers.river_logreg(1)


def test_sea_stream_has_one_abrupt_drift():
    pytest.importorskip("river")
    X, y, drifts = ex.sea_stream(steps_per_variant=300)
    assert X.shape == (600, 3) and drifts == [300]
    assert np.all((X >= -3) & (X <= 3)) and set(np.unique(y)) == {0, 1}
    # SEA labels x0 + x1 > threshold; raw features are (X + 3) / 0.6. Variant 0: 8, variant 3: 9.5.
    raw = (X + 3.0) / 0.6
    s = raw[:, 0] + raw[:, 1]
    assert np.array_equal(y[:300], (s[:300] > 8).astype(int))
    assert np.array_equal(y[300:], (s[300:] > 9.5).astype(int))


def test_vw_policy_is_deterministic_and_beats_random():
    pytest.importorskip("vowpalwabbit")
    from sims.grbfn.peers import VWContextualBandit

    s = bandit_stream(33, steps_per_phase=200)
    runs = []
    for _ in range(2):
        policy = VWContextualBandit(3, extra_args="--epsilon 0.05")
        runs.append(ex.run_bandit(policy, s, 1))
        policy.close()
    assert np.array_equal(runs[0].rewards, runs[1].rewards)
    random_regret = np.mean(s.probs.max(axis=1)[:, None] - s.probs) * s.n_steps
    assert runs[0].cum_regret < random_regret
    fresh = VWContextualBandit(3)
    with pytest.raises(RuntimeError):
        fresh.update(np.zeros(2), 0, 1.0)
    fresh.close()
