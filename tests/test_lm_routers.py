"""MoE routing (lm/routers.py) and its use in bklm's MoE FFN."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bklm.errors import ConfigError
from bklm.model import FlopCounter, LanguageModel, ModelConfig
from bklm.model import MoEFFN as BKMoE
from lm.errors import LMError
from lm.routers import HashRouter, MoEFFN, Routing, RouterError, SwitchRouter, make_router


def _x(t=64, d=16, seed=0):
    return torch.randn(t, d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("k", [1, 2])
def test_hash_router_by_ids_is_a_function_of_the_id(k):
    r = HashRouter(8, k)
    ids = torch.tensor([5, 9, 5, 1000, 9, 0, 7])
    out = r.route(_x(7), ids)
    assert out.experts.shape == (7, k) and out.probs is None
    assert torch.equal(out.experts[0], out.experts[2]) and torch.equal(out.experts[1], out.experts[4])
    assert ((out.experts >= 0) & (out.experts < 8)).all()
    if k == 2:
        assert (out.experts[:, 0] != out.experts[:, 1]).all()
    torch.testing.assert_close(out.weights, torch.full((7, k), 1.0 / k))
    # a different batch routes the same ids the same way (no state, no learning)
    again = r.route(_x(3, seed=1), torch.tensor([9, 5, 1000]))
    assert torch.equal(again.experts, out.experts[[1, 0, 3]])


def test_hash_router_by_content_sends_equal_vectors_together():
    r = HashRouter(4, 2, d=16)
    x = _x(32)
    x[10] = x[3]
    x[11] = x[3] * 2.5  # SimHash is a function of the direction
    out = r.route(x)
    assert torch.equal(out.experts[10], out.experts[3]) and torch.equal(out.experts[11], out.experts[3])
    assert (out.experts[:, 0] != out.experts[:, 1]).all()
    assert len(set(out.experts[:, 0].tolist())) > 1  # it spreads different contents
    # saved and loaded, it routes the same (the projections are a buffer)
    r2 = HashRouter(4, 2, d=16, seed=7)
    r2.load_state_dict(r.state_dict())
    assert torch.equal(r2.route(x).experts, out.experts)


def test_switch_router_top1_and_top2():
    torch.manual_seed(0)
    r1 = SwitchRouter(16, 4, 1)
    x = _x()
    out = r1.route(x)
    probs = F.softmax(r1.gate(x), -1)
    assert torch.equal(out.experts[:, 0], probs.argmax(-1))
    torch.testing.assert_close(out.weights[:, 0], probs.max(-1).values)
    r2 = SwitchRouter(16, 4, 2)
    out2 = r2.route(x)
    assert (out2.experts[:, 0] != out2.experts[:, 1]).all()
    torch.testing.assert_close(out2.weights.sum(-1), torch.ones(64))
    # the balance loss trains the gate
    r2.balance_loss(out2).backward()
    assert r2.gate.weight.grad is not None and r2.gate.weight.grad.abs().sum() > 0


def test_balance_statistics():
    r = HashRouter(4, 1)
    even = Routing(torch.arange(8).remainder(4)[:, None], torch.ones(8, 1), None, 4)
    torch.testing.assert_close(r.expert_utilization(even), torch.full((4,), 0.25))
    assert r.load_balance_std(even) == pytest.approx(0.0)
    one = Routing(torch.zeros(8, 1, dtype=torch.long), torch.ones(8, 1), None, 4)
    torch.testing.assert_close(r.expert_utilization(one), torch.tensor([1.0, 0, 0, 0]))
    assert r.load_balance_std(one) == pytest.approx(math.sqrt(3))
    assert float(r.balance_loss(one)) == 0.0  # a hash router has nothing to learn
    s = SwitchRouter(4, 4)
    uniform = Routing(even.experts, torch.ones(8, 1), torch.full((8, 4), 0.25), 4)
    assert float(s.balance_loss(uniform)) == pytest.approx(1.0)
    collapsed = Routing(one.experts, torch.ones(8, 1), F.one_hot(torch.zeros(8, dtype=torch.long), 4).float(), 4)
    assert float(s.balance_loss(collapsed)) == pytest.approx(4.0)
    empty = Routing(torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, 1), torch.zeros(0, 4), 4)
    assert r.load_balance_std(empty) == 0.0 and float(s.balance_loss(empty)) == 0.0


@pytest.mark.parametrize("router", ["hash", "switch"])
@pytest.mark.parametrize("k", [1, 2])
def test_moe_ffn_equals_a_token_by_token_reference(router, k):
    torch.manual_seed(1)
    moe = MoEFFN(16, 4, 24, make_router(router, 16, 4, k), balance_weight=0.5)
    x = _x(20).double()
    moe.double()
    out, aux = moe(x)
    rt = moe.last_routing
    for t in range(20):
        want = sum(
            rt.weights[t, j] * (F.gelu(x[t] @ moe.w1[e] + moe.b1[e]) @ moe.w2[e] + moe.b2[e])
            for j, e in enumerate(rt.experts[t].tolist())
        )
        torch.testing.assert_close(out[t], want, rtol=0, atol=1e-12)
    torch.testing.assert_close(aux, 0.5 * moe.router.balance_loss(rt))
    per_expert = 2 * 16 * 24 + 24 + 16
    assert moe.active_parameters() == k * per_expert + (16 * 4 + 4 if router == "switch" else 0)


def test_bklm_moe_default_is_the_switch_top1_it_always_was():
    """The bklm MoE FFN through lm.routers computes what the former built-in top-1 gate did."""
    torch.manual_seed(3)
    moe = BKMoE(16, 4, 32, ModelConfig(d_model=16, n_experts=4, balance_lambda=1.0))
    x = _x(40)
    fc = FlopCounter()
    out, balance = moe(x, fc)
    gate = moe.router.gate
    probs = F.softmax(gate(x), dim=-1)  # the former implementation, written out
    top = probs.argmax(-1)
    ref = x.new_zeros(40, 16)
    for e in range(4):
        idx = (top == e).nonzero(as_tuple=True)[0]
        if idx.numel():
            h = F.gelu(x[idx] @ moe.w1[e] + moe.b1[e])
            ref = ref.index_add(0, idx, (h @ moe.w2[e] + moe.b2[e]) * probs[idx, e, None])
    frac = F.one_hot(top, 4).float().mean(0)
    assert torch.equal(out, ref)
    torch.testing.assert_close(balance, 4 * (frac * probs.mean(0)).sum())
    assert fc.flops == 2 * 40 * 16 * 4 + 2 * 2 * 40 * 16 * 32 + 40 * 32 * 8


def test_bklm_loads_a_checkpoint_with_the_former_gate_keys():
    cfg = ModelConfig(arch="transformer", d_model=16, n_layers=1, n_seq=8, n_heads=2)
    model = LanguageModel(cfg)
    legacy = {k.replace("moe.router.gate.", "moe.gate."): v for k, v in model.state_dict().items()}
    assert any(".moe.gate.weight" in k for k in legacy)
    fresh = LanguageModel(cfg)
    fresh.load_state_dict(legacy)
    ids = torch.randint(0, cfg.vocab, (2, 8), generator=torch.Generator().manual_seed(0))
    assert torch.equal(fresh(ids).logits, model(ids).logits)


@pytest.mark.parametrize("router,k", [("hash", 1), ("hash", 2), ("switch", 2)])
def test_bklm_trains_with_each_router(router, k):
    torch.manual_seed(0)
    cfg = ModelConfig(arch="transformer", d_model=16, n_layers=1, n_seq=16, n_heads=2, router=router, router_k=k)
    model = LanguageModel(cfg)
    ids = torch.randint(0, 16, (4, 17), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(15):
        loss, _, out = model.loss(ids[:, :-1], ids[:, 1:])
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first
    assert out.flops > 0


@pytest.mark.parametrize(
    "make",
    [
        lambda: make_router("topk", 8, 4),
        lambda: HashRouter(4, 3),
        lambda: SwitchRouter(8, 4, 5),
        lambda: SwitchRouter(8, 4, 0),
        lambda: HashRouter(0),
        lambda: HashRouter(4, True),
        lambda: MoEFFN(8, 4, 8, HashRouter(3, d=8)),
        lambda: MoEFFN(8, 4, 8, HashRouter(4, d=8), balance_weight=-1.0),
        lambda: SwitchRouter(8, 4).route(torch.zeros(3, 7)),
        lambda: SwitchRouter(8, 4).route(torch.zeros(2, 3, 8)),
        lambda: HashRouter(4).route(torch.zeros(3, 8)),  # no d and no ids
        lambda: HashRouter(4).route(torch.zeros(3, 8), torch.tensor([1.0, 2.0, 3.0])),
        lambda: HashRouter(4).route(torch.zeros(3, 8), torch.tensor([1, -2, 3])),
        lambda: HashRouter(4).route(torch.zeros(3, 8), torch.tensor([1, 2])),
    ],
)
def test_bad_input_is_a_router_error(make):
    with pytest.raises(RouterError) as exc:
        make()
    assert isinstance(exc.value, LMError) and isinstance(exc.value, ValueError)


@pytest.mark.parametrize(
    "kw", [{"router": "topk"}, {"router": "hash", "router_k": 3}, {"router_k": 5}, {"router_k": 0}]
)
def test_bklm_config_refuses_bad_routers(kw):
    with pytest.raises(ConfigError):
        ModelConfig(**kw)
