"""POPB: plans stay within their average-bits budget, apply through accel.precision exactly, the
probe measures every operator and token group, and bad orders are typed errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lm import popb
from lm.longmodel import load
from lm.longsession import LongSessions, RequestError, parse_policy, parse_tiers
from lm.kvtiers import BudgetTooSmallError


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return load()


@pytest.fixture(scope="module")
def probe(model):
    return popb.probe(model, seed=3, length=256)


def test_uniform_plans_have_their_bits_and_fp32_changes_nothing(model) -> None:
    for prec, bits in popb.BITS.items():
        assert popb.PrecisionPlan.uniform(model, prec).avg_bits(model) == bits
    same, nbytes = popb.PrecisionPlan.uniform(model, "fp32").apply(model)
    x = torch.randint(3, 40, (1, 50))
    assert torch.equal(same(x), model(x))
    assert nbytes >= sum(w.numel() * 4 for w in popb.matrices(model).values())


def test_applied_weights_are_the_accel_precision_round_trip(model) -> None:
    plan = popb.PrecisionPlan.uniform(model, "int8")
    applied, nbytes = plan.apply(model)
    for name, w in popb.matrices(applied).items():
        ref = popb.roundtrip(popb.matrices(model)[name].detach().numpy().astype(np.float32), "int8")
        np.testing.assert_array_equal(w.detach().numpy(), ref)
    assert nbytes < sum(w.numel() * 2 for w in popb.matrices(model).values())  # int8 + scales < fp16


def test_probe_covers_every_operator_and_group(model, probe) -> None:
    assert set(probe.kl) == set(popb.operators(model))
    for op, groups in probe.kl.items():
        assert set(groups) == {*popb.GROUPS, "all"}
        assert all(v >= -1e-6 for v in groups.values())
    assert any(v > 0 for g in probe.kl.values() for v in g.values())  # int8 changes something
    for name, costs in probe.block_cost.items():
        assert np.all(costs["fp32"][0] == 0) and np.all(costs["fp32"][1] == 0)
        assert costs["int8"][1].sum() > costs["fp16"][1].sum() > 0
    assert all(op in probe.kl for op, _ in probe.hot)


@pytest.mark.parametrize("bits", [8, 10, 12, 16, 24, 32])
def test_plans_stay_within_the_budget(model, probe, bits) -> None:
    plan = popb.plan(model, probe, bits)
    got = plan.avg_bits(model)
    assert 8 <= got <= bits + 1e-9
    if bits == 32:
        assert got == 32  # the whole budget buys fp32 everywhere
    if bits >= 12:
        assert got > bits - 1  # the budget is spent, not left idle
    rand = popb.random_plan(model, bits, seed=1)
    assert rand.avg_bits(model) <= bits + 1e-9


def test_plans_travel_and_come_back_identical(model, probe) -> None:
    plan = popb.plan(model, probe, 12)
    back = popb.PrecisionPlan.from_wire(model, plan.to_wire())
    for name in plan.codes:
        np.testing.assert_array_equal(back.codes[name], plan.codes[name])


@pytest.mark.parametrize("order,match", [
    ({"operators": {"L7.attn": "int8"}}, "unknown operator"),
    ({"operators": {"L0.attn": "int4"}}, "unknown precision"),
    ({"operators": {}}, "non-empty"),
    ({"codes": {"L0.attn.qkv": [[0]]}, "block": 32}, "shape"),
    ({"codes": {"L0.attn.nope": [[0]]}, "block": 32}, "unknown matrix"),
    ({"codes": {}, "block": 16}, "block"),
    ("int8", "map"),
])
def test_bad_orders_are_typed_errors(model, order, match) -> None:
    with pytest.raises(popb.PrecisionOrderError, match=match):
        popb.PrecisionPlan.from_wire(model, order)


def test_budget_below_int8_is_refused(model, probe) -> None:
    with pytest.raises(popb.PrecisionOrderError):
        popb.plan(model, probe, 7.5)


def test_sessions_check_requests_before_creating_anything(model) -> None:
    sessions = LongSessions(model)
    with pytest.raises(RequestError):
        parse_policy({"name": "sparse", "topk": -2})
    with pytest.raises(RequestError):
        parse_tiers({"device_blocks": 0, "host_blocks": 4}, None)
    with pytest.raises(BudgetTooSmallError):
        parse_tiers({"device_blocks": 32, "host_blocks": 4}, device_cap=16)
    with pytest.raises(RequestError):
        sessions.open({"varref": {"length": 10}, "tiers": {"device_blocks": 16, "host_blocks": 64}})
    with pytest.raises(BudgetTooSmallError):
        sessions.open({"varref": {"length": 256}, "tiers": {"device_blocks": 4, "host_blocks": 64}})
    assert sessions.decoders == {}
    with pytest.raises(popb.PrecisionOrderError):
        sessions.set_precision({"operators": {"L0.ffn": "fp16"}})
    assert sessions.plan is None and sessions.model is model
