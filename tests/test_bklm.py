"""The ResNet-BK LM library (bklm): corpus split, causality of every variant, the six techniques
doing what they claim to do (ACT halts, multi-scale and sparsity skip work, curriculum orders,
active learning selects, cache hits reuse gradients), checkpoints restoring a run bit for bit,
and the typed errors. Tiny configs: seconds in all."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

from bklm import corpus as corpus_mod
from bklm.errors import BudgetTooSmallError, CheckpointError, ConfigError, CorpusError
from bklm.model import BK_SITE_FLOPS, FlopCounter, LanguageModel, ModelConfig, bk_features, sparse_bk_features
from bklm.train import Trainer, TrainConfig, bigram_difficulty

TINY = ModelConfig(d_model=32, n_seq=16, n_layers=3, n_heads=4, n_experts=2)
VARIANTS = {
    "bk": {}, "transformer": {"arch": "transformer"}, "act": {"act": True, "act_init_bias": 0.0},
    "multiscale": {"multiscale": True}, "sparsity": {"sparsity": True},
    "pair_merge_control": {"multiscale": True, "multiscale_stride": 1},
    "all": {"act": True, "act_init_bias": 0.0, "multiscale": True, "sparsity": True},
}


@pytest.fixture(scope="module")
def corpus():
    return corpus_mod.load(limit_bytes=60_000)


def tiny_trainer(corpus, **kw) -> Trainer:
    model = dataclasses.replace(TINY, **kw.pop("model", {}))
    return Trainer(TrainConfig(model=model, batch=4, eval_windows=8, total_steps=20, **kw), corpus)


# -- corpus -------------------------------------------------------------------------------------

def test_corpus_is_split_by_module_deterministically(corpus):
    full = corpus_mod.load()
    assert not set(full.train_modules) & set(full.heldout_modules)
    assert all(corpus_mod.is_heldout(m) for m in full.heldout_modules)
    assert not any(corpus_mod.is_heldout(m) for m in full.train_modules)
    assert 0.05 < len(full.heldout) / (len(full.train) + len(full.heldout)) < 0.25
    again = corpus_mod.load()
    assert again.digest == full.digest and np.array_equal(again.train, full.train)
    assert full.train.max() < corpus_mod.VOCAB and "def " in corpus_mod.decode(full.train[:5000])
    w = corpus.windows("train", 16)
    assert w.shape[1] == 17 and np.array_equal(w[1], corpus.train[17:34])


def test_unreadable_or_missing_corpus_files_are_typed_errors(tmp_path):
    (tmp_path / "good.py").write_text("x = 1\n" * 100)
    os.symlink(tmp_path / "missing", tmp_path / "broken.py")
    with pytest.raises(CorpusError) as info:
        corpus_mod.load(tmp_path)
    assert info.value.path.endswith("broken.py")
    with pytest.raises(CorpusError, match="no \\*.py"):
        corpus_mod.load(tmp_path / "nowhere")


# -- the model ------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_is_causal(variant):
    torch.manual_seed(0)
    model = LanguageModel(dataclasses.replace(TINY, **VARIANTS[variant])).eval()
    ids = torch.randint(1, 127, (3, 16))
    for cut in (8, 9):  # an even and an odd cut: a pair merge that leaked would show at one of them
        later = ids.clone()
        later[:, cut:] = torch.randint(1, 127, (3, 16 - cut))
        with torch.no_grad():
            a, b = model(ids).logits, model(later).logits
        assert torch.allclose(a[:, :cut], b[:, :cut], atol=1e-5)
        assert not torch.allclose(a[:, cut:], b[:, cut:], atol=1e-3)


def test_act_halts_tokens_and_halted_tokens_skip_work():
    ids = torch.randint(1, 127, (2, 16))
    torch.manual_seed(0)
    full = LanguageModel(dataclasses.replace(TINY, act=True, act_init_bias=-20.0))(ids)
    torch.manual_seed(0)
    early = LanguageModel(dataclasses.replace(TINY, act=True, act_init_bias=20.0))(ids)
    assert full.mean_stages == 3.0 and full.ponder_steps == 3 * 32
    assert early.mean_stages == 1.0 and early.ponder_steps == 32  # every token halted after stage 1
    assert early.flops < 0.5 * full.flops
    torch.manual_seed(0)
    mixed = LanguageModel(dataclasses.replace(TINY, act=True, act_init_bias=0.0))
    with torch.no_grad():
        out = mixed(ids)
    assert 1.0 < out.mean_stages < 3.0  # p ~ 0.5: tokens halt at different stages
    loss, _, _ = mixed.loss(ids[:, :-1], ids[:, 1:])
    loss.backward()
    assert mixed.halt[2].weight.grad.abs().sum() > 0  # the ponder cost trains the halting unit


def test_multiscale_runs_the_middle_blocks_at_half_length():
    ids = torch.randint(1, 127, (2, 16))
    torch.manual_seed(0)
    plain = LanguageModel(TINY)(ids)
    torch.manual_seed(0)
    ms = LanguageModel(dataclasses.replace(TINY, multiscale=True))(ids)
    assert ms.flops < plain.flops
    assert ms.ponder_steps == 3 * 32  # three stages: full, (middle at N/2), full


def test_sparse_bk_core_runs_the_recursion_over_kept_sites_only():
    torch.manual_seed(0)
    v = torch.randn(2, 10, 3)
    keep = torch.tensor([[1, 0, 0, 1, 1, 0, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    fc = FlopCounter()
    got = sparse_bk_features(v, keep, keep.float(), fc)
    assert fc.flops == 2 * 8 * 3 * BK_SITE_FLOPS  # padded to the longest chain (8 kept), not N = 10
    for r in range(2):
        kept = keep[r].nonzero().squeeze(1)
        chain = bk_features(v[r: r + 1, kept], FlopCounter())[0]  # the shorter operator
        for i in range(10):
            before = kept[kept <= i]
            want = chain[len(before) - 1] if len(before) else torch.zeros(6)
            assert torch.allclose(got[r, i], want, atol=1e-6)


def test_sparsity_unit_skips_sites_and_is_trained():
    torch.manual_seed(0)
    model = LanguageModel(dataclasses.replace(TINY, sparsity=True))
    ids = torch.randint(1, 127, (4, 16))
    loss, _, out = model.loss(ids[:, :-1], ids[:, 1:])
    assert 0.0 < out.keep_rate < 1.0
    loss.backward()
    assert model.stages[0].importance.weight.grad.abs().sum() > 0


def test_config_errors_are_typed():
    with pytest.raises(ConfigError, match="ResNet-BK techniques"):
        ModelConfig(arch="transformer", act=True)
    with pytest.raises(ConfigError, match="multiple"):
        ModelConfig(d_model=30, n_heads=4)
    with pytest.raises(ConfigError, match="unknown training keys"):
        TrainConfig.from_dict({"turbo": 1})
    with pytest.raises(ConfigError, match="unknown model keys"):
        TrainConfig.from_dict({"model": {"warp": 1}})


# -- the data-side techniques ------------------------------------------------------------------------

def test_curriculum_starts_with_the_easiest_windows(corpus):
    tr = tiny_trainer(corpus, curriculum=True, curriculum_start=0.1)
    diff = bigram_difficulty(corpus, tr.train_windows)
    first = tr._candidates(64)
    assert diff[first].max() <= np.quantile(diff, 0.1) + 1e-9
    tr.step_count = tr.cfg.total_steps  # past the ramp: the whole set
    late = tr._candidates(2000)
    assert diff[late].max() > np.quantile(diff, 0.9)


def test_active_learning_picks_the_most_uncertain_windows(corpus):
    tr = tiny_trainer(corpus, active=True, active_pool=3, seed=3)
    state = tr.rng.bit_generator.state
    chosen, flops = tr._select()
    tr.rng.bit_generator.state = state
    pool = tr._candidates(12)
    with torch.no_grad():
        logp = torch.log_softmax(tr.model(torch.from_numpy(tr.train_windows[pool, :-1])).logits, -1)
        ent = -(logp.exp() * logp).sum(-1).mean(1).numpy()
    assert sorted(chosen) == sorted(pool[np.argsort(-ent)[:4]])
    assert flops > 0  # scoring is counted


def test_gradient_cache_reuses_gradients_of_a_near_duplicate_batch(corpus):
    tr = tiny_trainer(corpus, gradcache=True)
    fixed = np.array([5, 6, 7, 8])
    tr._select = lambda: (fixed, 0)
    first = tr.step()
    cached = [g.clone() for g in tr.cache[0].grads]
    second = tr.step()
    assert not first.cache_hit and second.cache_hit and tr.cache_hits == 1
    assert second.flops < first.flops / 100  # no forward, no backward
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in cached]))
    scale = min(1.0, 1.0 / (float(norm) + 1e-6))  # clip_grad_norm_(1.0), as on a computed step
    for p, g in zip(tr.model.parameters(), cached):
        assert torch.allclose(p.grad, g * scale, rtol=1e-6, atol=1e-9)  # stepped on the cached gradients
    fresh = tiny_trainer(corpus, gradcache=True)
    hits = sum(fresh.step().cache_hit for _ in range(6))
    assert hits == 0  # random windows of code are not near-duplicates


# -- checkpoints and budgets --------------------------------------------------------------------

@pytest.mark.parametrize("kw", [{}, {"gradcache": True, "cache_signature": "embedding", "active": True}])
def test_checkpoint_resume_equals_an_uninterrupted_run(corpus, tmp_path, kw):
    ref = tiny_trainer(corpus, **kw)
    for _ in range(6):
        ref.step()
    a = tiny_trainer(corpus, **kw)
    for _ in range(3):
        a.step()
    a.save(tmp_path / "run.ckpt")
    b = tiny_trainer(corpus, **kw)
    b.load(tmp_path / "run.ckpt")
    assert b.step_count == 3
    for _ in range(3):
        b.step()
    assert b.weights_digest() == ref.weights_digest() and b.flops == ref.flops


def test_damaged_checkpoints_are_refused_and_leave_the_trainer_as_it_was(corpus, tmp_path):
    tr = tiny_trainer(corpus)
    tr.step()
    data = bytearray(tr.state_bytes())
    other = tiny_trainer(corpus)
    before = other.weights_digest()
    data[-100] ^= 0xFF
    with pytest.raises(CheckpointError, match="corrupt"):
        other.load_state_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="magic"):
        other.load_state_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="another config"):
        tiny_trainer(corpus, seed=9).load_state_bytes(tr.state_bytes())
    with pytest.raises(CheckpointError, match="cannot read"):
        other.load(tmp_path / "none.ckpt")
    assert other.weights_digest() == before and other.step_count == 0


def test_budget_too_small_for_one_step(corpus):
    tr = tiny_trainer(corpus, model={"act": True})
    bound = tr.step_flops_bound()
    with pytest.raises(BudgetTooSmallError) as info:
        tr.check_budget(bound - 1)
    assert info.value.needed == bound
    tr.check_budget(bound)
    assert tr.step().flops <= bound


# -- the measurement's arithmetic (bench bk_lm) ----------------------------------------------------

def test_cost_to_target_and_factors_interpolate_and_report_misses(corpus):
    from bklm.experiment import Curve, Point, cost_to_target, factors, loss_at

    plain = [Point(0, 0, 0, 4.0), Point(100, 10, 10, 3.0), Point(200, 20, 20, 2.0)]
    fast = [Point(0, 0, 0, 4.0), Point(50, 10, 10, 2.5), Point(100, 20, 20, 2.0)]
    slow = [Point(0, 0, 0, 4.0), Point(200, 10, 10, 3.2)]
    assert cost_to_target(plain, 2.5) == (150, 15)
    assert cost_to_target(fast, 2.5) == (50, 10)
    assert cost_to_target(slow, 2.5) is None
    assert loss_at(plain, 50) == 3.5 and loss_at(plain, 1000) == 2.0
    curves = {a: [Curve(a, 0, pts, 4.0, 1.0, 0, 1)] for a, pts in (("bk", plain), ("fast", fast), ("slow", slow))}
    f = factors(curves, "fast", "bk", 2.5)
    assert f.flops == [3.0] and f.wall == [1.5] and f.reached() == 1
    miss = factors(curves, "slow", "bk", 2.5)
    assert miss.flops == [None] and miss.reached() == 0
    assert miss.flops_spread() == (0.0, 0.0, 0.0)  # not reached: no speed-up shown


def test_train_curve_stops_at_the_budget(corpus):
    from bklm.experiment import arm_config, train_curve

    base = TrainConfig(model=TINY, batch=4, eval_windows=8, total_steps=6)
    cfg = arm_config(base, "multiscale", 1)
    assert cfg.model.multiscale and cfg.seed == 1
    per_step = Trainer(arm_config(base, "bk", 0), corpus).step().flops
    curve = train_curve(arm_config(base, "bk", 0), corpus, "bk", 3 * per_step, evals=3, max_steps=10)
    assert [p.steps for p in curve.points] == [0, 1, 2, 3]
    assert curve.points[-1].flops == 3 * per_step and curve.points[-1].loss < curve.points[0].loss
    assert curve.train_loss is None  # not asked for


def test_train_curve_reports_the_loss_on_training_windows_it_was_given(corpus):
    import torch

    from bklm.experiment import arm_config, train_curve

    base = TrainConfig(model=TINY, batch=4, eval_windows=8, total_steps=6)
    per_step = Trainer(arm_config(base, "bk", 0), corpus).step().flops
    windows = torch.from_numpy(corpus.windows("train", TINY.n_seq)[:6])
    curve = train_curve(arm_config(base, "bk", 0), corpus, "bk", 2 * per_step, evals=2, max_steps=10,
                        train_windows=windows)
    # the same weights evaluated on those windows by a trainer run the same way (seeded: identical)
    tr = Trainer(arm_config(base, "bk", 0), corpus)
    tr.step(), tr.step()
    assert curve.train_loss == pytest.approx(tr.evaluate(windows)[0], rel=1e-6)
    assert curve.train_loss != pytest.approx(curve.points[-1].loss)  # not the held-out figure
