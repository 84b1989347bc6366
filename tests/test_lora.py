"""S-4: int4 / int8 / fp16 LoRA adapters — packed storage, dequantise on use, trained in their
precision, billed in bits by POPB, carried by orders to the decode worker, bad input typed."""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from accel import precision as accel_precision
from kernel import errors
from lm import popb
from lm.longmodel import load
from lm.longsession import LongSessions
from lm.lora import AdapterError, Adapters, LoRA, fake_quant
from services.popb.service import PopbService


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return load()


def test_int4_is_two_per_byte_and_round_trips_the_grid():
    g = np.random.default_rng(0)
    scales = g.uniform(0.1, 2.0, (3, 2)).astype(np.float32)
    q = g.integers(-7, 8, (3, 37))
    q[:, 0], q[:, 32] = 7, -7  # every group reaches its amax, so the scale is recovered
    x = (q * np.repeat(scales, 32, axis=1)[:, :37]).astype(np.float32)
    p = accel_precision.pack_adapter(x, "int4", 32)
    assert p.payload.dtype == np.uint8 and p.payload.size == 3 * 19  # ceil(37 / 2) bytes a row
    assert p.bits == 8 * (3 * 19 + 3 * 2 * 4)
    np.testing.assert_allclose(accel_precision.unpack_adapter(p), x, rtol=1e-6, atol=0)
    # nibbles: column 0 in the low half of byte 0, column 1 in the high half
    b0 = int(p.payload[0])
    assert ((b0 & 0xF) ^ 8) - 8 == q[0, 0] and ((b0 >> 4) ^ 8) - 8 == q[0, 1]


@pytest.mark.parametrize("precision,rel", [("fp16", 1e-3), ("int8", 1 / 127), ("int4", 1 / 7)])
def test_pack_error_is_bounded_and_equals_the_training_rounding(precision, rel):
    x = np.random.default_rng(1).standard_normal((5, 70)).astype(np.float32)
    deq = accel_precision.unpack_adapter(accel_precision.pack_adapter(x, precision, 32))
    amax = np.abs(x).max()
    assert np.abs(deq - x).max() <= rel * amax
    # quantisation-aware training sees exactly the stored values
    np.testing.assert_array_equal(fake_quant(torch.from_numpy(x), precision).numpy(), deq)


def test_fake_quant_passes_gradients_straight_through():
    x = torch.randn(4, 40, requires_grad=True)
    fake_quant(x, "int4").sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_fresh_adapters_change_nothing_and_only_adapters_train(model):
    lora = LoRA(model, 2, "int4")
    idx = torch.randint(3, model.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(lora(idx), model(idx), rtol=0, atol=0)
    lora(idx).logsumexp(-1).mean().backward()
    assert all(p.grad is None for p in model.parameters())
    # B starts at 0, so the first gradient reaches B (and A only once B moves)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.b.values())


def _train(model, precision, steps=12):
    from bench._s004_lora import _batch

    lora = LoRA(model, 2, precision, seed=0)
    opt = torch.optim.Adam(lora.parameters(), lr=1e-2)
    rng = random.Random(0)
    losses = []
    for _ in range(steps):
        toks, mask = _batch(rng, 4)
        logits = lora(toks[:, :-1])
        loss = F.cross_entropy(logits[mask[:, :-1]], toks[:, 1:][mask[:, :-1]])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return lora, losses


@pytest.mark.parametrize("precision", ["int4", "fp16"])
def test_trained_adapters_apply_through_popb_as_they_trained(model, precision):
    lora, losses = _train(model, precision)
    assert losses[-1] < losses[0]
    adapters = lora.pack()
    plan = popb.PrecisionPlan.uniform(model, "fp32").with_adapters(adapters)
    applied, nbytes = plan.apply(model)
    idx = torch.randint(3, model.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(applied(idx), lora(idx), rtol=1e-4, atol=1e-4)
    elems = sum(w.numel() for w in popb.matrices(model).values())
    assert plan.avg_bits(model) == pytest.approx(32 + adapters.bits() / elems)
    assert nbytes >= adapters.bits() // 8


def test_bits_billed_fall_with_precision(model):
    bits = {p: LoRA(model, 4, p).pack().bits() for p in ("fp16", "int8", "int4")}
    assert bits["int4"] < bits["int8"] < bits["fp16"]
    assert bits["int4"] <= 0.35 * bits["fp16"]  # 4 bits + one 32-bit scale per 32 elements


def test_adapters_travel_in_an_order_to_the_decode_sessions(model):
    lora, _ = _train(model, "int4", steps=3)
    plan = popb.PrecisionPlan.uniform(model, "int8").with_adapters(lora.pack())
    wire = plan.to_wire()
    back = popb.PrecisionPlan.from_wire(model, wire)
    assert back.adapters is not None and back.adapters.bits() == plan.adapters.bits()
    for n in plan.adapters.packed:
        torch.testing.assert_close(back.adapters.delta(n), plan.adapters.delta(n), rtol=0, atol=0)
    sessions = LongSessions(model)
    info = sessions.set_precision(wire)
    assert info["avg_bits"] == pytest.approx(plan.avg_bits(model))


def test_choose_adapter_takes_the_fewest_bits_within_tolerance(model):
    base = popb.PrecisionPlan.uniform(model, "int8")
    cands = {p: LoRA(model, 4, p).pack() for p in ("fp16", "int8", "int4")}
    assert (
        popb.choose_adapter(model, base, cands, {"fp16": 1.00, "int8": 1.01, "int4": 1.04}, 64, tolerance=0.05)
        == "int4"
    )
    assert (
        popb.choose_adapter(model, base, cands, {"fp16": 1.00, "int8": 1.01, "int4": 1.20}, 64, tolerance=0.05)
        == "int8"
    )
    tight = base.with_adapters(cands["int4"]).avg_bits(model)
    assert popb.choose_adapter(model, base, cands, {"fp16": 1.0, "int8": 1.0, "int4": 9.0}, tight) == "int4"
    assert popb.choose_adapter(model, base, cands, {"fp16": 1.0, "int8": 1.0, "int4": 1.0}, 8.0) is None
    with pytest.raises(popb.PrecisionOrderError):
        popb.choose_adapter(model, base, cands, {"fp16": 1.0}, 64)


def _wire(model):
    return popb.PrecisionPlan.uniform(model, "fp32").with_adapters(LoRA(model, 2, "int4").pack()).to_wire()


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda w: w["adapters"].update(precision="int3"),
        lambda w: w["adapters"].update(rank=0),
        lambda w: w["adapters"].update(rank=True),
        lambda w: w["adapters"].update(scale=float("nan")),
        lambda w: w["adapters"].update(group=16),
        lambda w: w["adapters"].update(matrices={}),
        lambda w: w["adapters"]["matrices"].update({"L9.attn.qkv": w["adapters"]["matrices"]["L0.attn.qkv"]}),
        lambda w: w["adapters"]["matrices"]["L0.attn.qkv"].update(a=b"\x00" * 3),
        lambda w: w["adapters"]["matrices"]["L0.mlp.fc1"].update(b_scales=[[1.0]]),
        lambda w: w["adapters"]["matrices"]["L0.mlp.fc1"].update(a_scales="x"),
        lambda w: w.update(adapters=[1, 2]),
    ],
)
def test_bad_adapters_are_typed_errors_and_bad_request(model, corrupt):
    wire = _wire(model)
    corrupt(wire)
    with pytest.raises(popb.PrecisionOrderError):
        popb.PrecisionPlan.from_wire(model, wire)
    sessions = LongSessions(model)
    with pytest.raises(popb.PrecisionOrderError):
        sessions.set_precision(wire)
    assert sessions.plan is None
    svc = PopbService()
    svc.model = model
    with pytest.raises(errors.BadRequest):
        asyncio.run(svc.handle(None, {"op": "order", **wire}))


def test_library_checks():
    with pytest.raises(ValueError):
        accel_precision.pack_adapter(np.zeros((2, 3), np.float32), "int2")
    with pytest.raises(ValueError):
        accel_precision.pack_adapter(np.zeros((2, 3), np.float32), "int4", 0)
    with pytest.raises(ValueError):
        accel_precision.pack_adapter(np.zeros(3, np.float32), "int4")
    m = load()
    for rank, prec in ((0, "int4"), (65, "int4"), (4, "int2")):
        with pytest.raises(AdapterError):
            LoRA(m, rank, prec)
    assert issubclass(AdapterError, ValueError)
    assert isinstance(Adapters, type)
