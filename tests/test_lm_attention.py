"""The one attention entry point (lm/attention.py): numerics against the explicit softmax, the
backend choice, bad input, and the shipped weights giving the same outputs through it."""

from __future__ import annotations

import pytest
import torch

from lm import attention as attn_mod
from lm import longmodel
from lm.attention import AttentionShapeError, attention, backend_for, reference_attention
from lm.engine import Engine
from lm.errors import LMError

TOL64 = dict(rtol=0, atol=1e-12)
TOL32 = dict(rtol=1e-5, atol=1e-5)


def _qkv(b=2, h=3, t=7, s=7, d=16, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, h, t, d, generator=g, dtype=dtype),
        torch.randn(b, h, s, d, generator=g, dtype=dtype),
        torch.randn(b, h, s, d, generator=g, dtype=dtype),
    )


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, TOL64), (torch.float32, TOL32)])
def test_matches_explicit_softmax(causal, dtype, tol):
    q, k, v = _qkv(dtype=dtype)
    torch.testing.assert_close(attention(q, k, v, causal=causal), reference_attention(q, k, v, causal=causal), **tol)


def test_causal_is_a_lower_triangle_checked_by_hand():
    q, k, v = _qkv(b=1, h=1, t=4, s=4, d=8)
    out = attention(q, k, v, causal=True)
    for t in range(4):  # query t sees keys 0..t only: a direct softmax over that prefix
        w = torch.softmax(q[0, 0, t] @ k[0, 0, : t + 1].T / 8**0.5, -1)
        torch.testing.assert_close(out[0, 0, t], w @ v[0, 0, : t + 1], **TOL64)


def test_key_padding_mask_and_causal_together():
    q, k, v = _qkv(t=6, s=6)
    keep = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])  # sequence 1 is padded after 4 keys
    mask = keep[:, None, None, :]
    got = attention(q, k, v, causal=True, mask=mask)
    torch.testing.assert_close(got, reference_attention(q, k, v, causal=True, mask=mask), **TOL64)
    # the padded keys change nothing: the same as attending over the first 4 keys only
    short = attention(q[1:, :, :4], k[1:, :, :4], v[1:, :, :4], causal=True)
    torch.testing.assert_close(got[1:, :, :4], short, **TOL64)


def test_decode_position_mask_like_the_paged_path():
    # queries at positions 5, 6 of a 7-key sequence (mask j <= pos), as TinyLM.forward_paged uses
    q, k, v = _qkv(b=1, t=2, s=7)
    pos = torch.tensor([[5, 6]])
    mask = (torch.arange(7)[None, None, :] <= pos[:, :, None])[:, None]
    got = attention(q, k, v, mask=mask)
    torch.testing.assert_close(got, reference_attention(q, k, v, mask=mask), **TOL64)
    torch.testing.assert_close(got[:, :, 1], attention(q[:, :, 1:], k, v)[:, :, 0], **TOL64)


def test_cross_attention_lengths_and_scale():
    q, k, v = _qkv(t=3, s=9)
    torch.testing.assert_close(attention(q, k, v, scale=0.5), reference_attention(q, k, v, scale=0.5), **TOL64)


def test_backward_matches_reference():
    q, k, v = (t.requires_grad_() for t in _qkv(dtype=torch.float64))
    attention(q, k, v, causal=True).square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    reference_attention(q, k, v, causal=True).square().sum().backward()
    for g, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(g, t.grad, **TOL64)


def _bias(b=2, h=3, t=7, s=7, dtype=torch.float64, seed=5):
    return torch.randn(b, h, t, s, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, TOL64), (torch.float32, TOL32)])
def test_bias_matches_explicit_softmax(causal, dtype, tol):
    q, k, v = _qkv(dtype=dtype)
    for bias in (_bias(dtype=dtype), _bias(b=1, h=3, dtype=dtype), _bias(b=1, h=1, dtype=dtype)):  # broadcast
        got = attention(q, k, v, causal=causal, bias=bias)
        torch.testing.assert_close(got, reference_attention(q, k, v, causal=causal, bias=bias), **tol)


def test_bias_is_added_to_the_scaled_logits_checked_by_hand():
    q, k, v = _qkv(b=1, h=1, t=3, s=5, d=8)
    bias = _bias(b=1, h=1, t=3, s=5)
    mask = torch.arange(5)[None, None, None, :] <= torch.tensor([2, 3, 4])[None, None, :, None]
    out = attention(q, k, v, mask=mask, bias=bias, scale=0.25)
    for t in range(3):  # query t sees keys 0..t+2; its logits are q.k * scale + bias
        n = t + 3
        w = torch.softmax(q[0, 0, t] @ k[0, 0, :n].T * 0.25 + bias[0, 0, t, :n], -1)
        torch.testing.assert_close(out[0, 0, t], w @ v[0, 0, :n], **TOL64)
    # a zero bias changes nothing
    torch.testing.assert_close(
        attention(q, k, v, bias=torch.zeros(1, 1, 3, 5, dtype=torch.float64)), attention(q, k, v), **TOL64
    )


def test_bias_backward_matches_reference():
    q, k, v = (t.requires_grad_() for t in _qkv(dtype=torch.float64))
    bias = _bias(b=1).requires_grad_()
    attention(q, k, v, causal=True, bias=bias).square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v, bias)]
    for t in (q, k, v, bias):
        t.grad = None
    reference_attention(q, k, v, causal=True, bias=bias).square().sum().backward()
    for g, t in zip(grads, (q, k, v, bias)):
        torch.testing.assert_close(g, t.grad, **TOL64)


def test_backend_choice_on_this_machine():
    q, k, _ = _qkv(dtype=torch.float32)
    assert isinstance(attn_mod.HAS_FLASH, bool)
    assert (attn_mod.FLASH_VERSION is None) == (not attn_mod.HAS_FLASH)
    assert backend_for(q, k) == "sdpa"  # CPU tensors never go to FlashAttention
    assert backend_for(q, k, use_flash=False) == "sdpa"
    assert backend_for(q, k, bias=torch.zeros(1, 1, 7, 7)) == "sdpa"


@pytest.mark.parametrize(
    "args,kw",
    [
        ((torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)), {}),  # 3-D
        ((torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 5, 8), torch.zeros(1, 2, 5, 4)), {}),  # head dims
        ((torch.zeros(1, 2, 3, 4), torch.zeros(1, 3, 5, 4), torch.zeros(1, 3, 5, 4)), {}),  # heads
        ((torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 5, 4), torch.zeros(1, 2, 6, 4)), {}),  # k/v lengths
        ((torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 0, 4), torch.zeros(1, 2, 0, 4)), {}),  # no keys
        ((torch.zeros(1, 1, 2, 4, dtype=torch.long),) * 3, {}),  # integer
        ((torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4, dtype=torch.float64), torch.zeros(1, 1, 2, 4)), {}),
        ((torch.zeros(1, 1, 2, 4),) * 3, {"mask": torch.ones(1, 1, 2, 2)}),  # float mask
        ((torch.zeros(1, 1, 2, 4),) * 3, {"mask": torch.ones(1, 1, 3, 2, dtype=torch.bool)}),  # wrong T
        ((torch.zeros(1, 1, 2, 4),) * 3, {"mask": torch.ones(2, 2, dtype=torch.bool)}),  # 2-D mask
        (([[1.0]], torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4)), {}),  # not a tensor
        ((torch.zeros(1, 1, 2, 4),) * 3, {"bias": torch.ones(1, 1, 2, 2, dtype=torch.bool)}),  # boolean bias
        ((torch.zeros(1, 1, 2, 4),) * 3, {"bias": torch.ones(1, 1, 2, 2, dtype=torch.float64)}),  # dtype
        ((torch.zeros(1, 1, 2, 4),) * 3, {"bias": torch.ones(1, 2, 2, 2)}),  # wrong H
        ((torch.zeros(1, 1, 2, 4),) * 3, {"bias": torch.ones(2, 2)}),  # 2-D bias
    ],
)
def test_bad_shapes_are_typed_errors(args, kw):
    for fn in (attention, reference_attention):
        with pytest.raises(AttentionShapeError) as exc:
            fn(*args, **kw)
        assert isinstance(exc.value, LMError) and isinstance(exc.value, ValueError)


def test_shipped_chain_weights_decode_the_same_through_the_reference(monkeypatch):
    """The engine on lm/weights/chain.pt: greedy tokens and logits through the entry point equal
    those with the explicit softmax swapped in (float64: differences ~1e-15, far below any gap)."""
    eng = Engine.load(dtype=torch.float64, num_blocks=64, block_size=16)
    prompt = [3, 5, 7, 11, 13, 2, 4]
    sid = eng.start(prompt)
    fused_tokens = eng.generate(sid, 24)
    fused_logits = eng.logits_history(sid).clone()
    eng.free(sid)
    monkeypatch.setattr("lm.model.attention", reference_attention)
    sid = eng.start(prompt)
    assert eng.generate(sid, 24) == fused_tokens
    torch.testing.assert_close(eng.logits_history(sid), fused_logits, rtol=0, atol=1e-9)


def test_shipped_long_weights_give_the_same_logits_through_the_reference(monkeypatch):
    model = longmodel.load()
    idx = torch.randint(1, model.cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    fused = model(idx)
    monkeypatch.setattr("lm.longmodel.attention", reference_attention)
    ref = model(idx)
    torch.testing.assert_close(fused, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(fused.argmax(-1), ref.argmax(-1))
