"""The router and procedural-attention comparison models (spark/compare.py): shapes, routing
rules, equal active parameters, the procedural basis, and a short training run that learns."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from spark import compare


def test_routers_pick_one_expert_per_token_and_the_content_hash_is_fixed():
    torch.manual_seed(0)
    idx = torch.randint(0, 50, (2, 9))
    x = torch.randn(2, 9, 32)
    for router in compare.ROUTERS:
        moe = compare.MoE(compare.Spec(router=router))
        choice, weight = moe.route(x, idx)
        assert choice.shape == idx.shape and int(choice.min()) >= 0 and int(choice.max()) < 4
        assert moe(x, idx).shape == x.shape
    moe = compare.MoE(compare.Spec(router="content"))
    a, _ = moe.route(x, idx)
    b, _ = moe.route(torch.randn_like(x), idx)
    assert torch.equal(a, b)  # a function of the token alone


def test_equal_active_parameters_across_routers_and_the_dense_peer():
    base = compare.Spec()
    dense = compare.Small(base).active_params()
    for router in ("content", "random"):
        moe = compare.Small(dataclasses.replace(base, router=router))
        assert moe.active_params() == dense  # one expert is as wide as the dense MLP; no gate
        assert sum(p.numel() for p in moe.parameters()) > dense
    learned = compare.Small(dataclasses.replace(base, router="learned"))
    assert learned.active_params() == dense + 2 * base.d_model * base.experts  # the gates


@pytest.mark.parametrize("attention", ["sinusoid", "legendre"])
def test_procedural_attention_is_causal_and_has_few_parameters(attention):
    s = compare.Spec(attention=attention)
    att = compare.Attention(s)
    assert att.basis.shape == (s.atoms, s.max_len, s.max_len)
    x = torch.randn(1, 12, 32)
    y = att(x)
    x2 = x.clone()
    x2[0, 7:] += 5.0  # later tokens must not change earlier outputs
    torch.testing.assert_close(att(x2)[0, :7], y[0, :7])
    learned = compare.Attention(compare.Spec())
    assert sum(p.numel() for p in att.parameters()) < sum(p.numel() for p in learned.parameters())
    with pytest.raises(ValueError):
        compare.Attention(compare.Spec(attention="magic"))


def test_a_short_training_run_learns_and_reports_every_figure():
    torch.set_num_threads(1)
    spec = compare.Spec(router="learned", n_layers=1)
    untrained = compare.train_and_score(spec, steps=0, batch=8, eval_batches=1)
    out = compare.train_and_score(spec, steps=12, batch=8, eval_batches=1)
    assert out["accuracy"] > untrained["accuracy"]
    assert 0 <= out["balance_std"] <= 0.5
    assert out["params"] > out["active_params"] > 0
