"""Codebook weights (spark/codebook.py): fitting, the three torch paths, the kernel path agreeing
with them, and applying it to the shipped chain LM."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from accel import demopack as dp
from spark import codebook as cbk


def test_a_matrix_with_k_distinct_subvectors_is_reconstructed_exactly():
    rng = np.random.default_rng(0)
    words = rng.standard_normal((8, 4)).astype(np.float32)
    codes = rng.integers(0, 8, size=(16, 5))
    w = words[codes].reshape(16, 20)
    cb = cbk.fit(w, 4, 8, seed=1)
    assert cb.codes.dtype == np.uint8 and cb.codes.shape == (16, 5)
    np.testing.assert_allclose(dp.decode_reference(cb), w, atol=1e-6)
    assert cb.nbytes == 8 * 4 * 4 + 16 * 5 < w.nbytes


def test_fit_refuses_shapes_that_do_not_fit_before_any_work():
    with pytest.raises(dp.CodebookShapeError, match="does not divide"):
        cbk.fit(np.zeros((4, 10), np.float32), 4, 2)
    with pytest.raises(dp.CodebookShapeError, match="sub-vectors"):
        cbk.fit(np.zeros((2, 4), np.float32), 2, 16)
    with pytest.raises(dp.CodebookShapeError):
        cbk.fit(np.zeros(8, np.float32), 2, 2)


def test_the_three_torch_paths_and_the_kernel_agree():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((24, 16)).astype(np.float32)
    cb = cbk.fit(w, 4, 16, seed=0)
    bias = torch.randn(24)
    x = torch.randn(2, 5, 16)
    want = x @ torch.from_numpy(dp.decode_reference(cb)).T + bias
    for mode in cbk.MODES:
        got = cbk.CodebookLinear(cb, bias, mode)(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    emu = dp.matvec(cb, x.reshape(-1, 16).numpy(), backend="emulate")
    np.testing.assert_allclose(emu + bias.numpy(), want.reshape(-1, 24).numpy(), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError):
        cbk.CodebookLinear(cb, bias, "magic")


def test_the_chain_lm_with_codebook_weights_is_smaller_and_close():
    from lm.train import load

    torch.manual_seed(0)
    model = load()
    cbm = cbk.codebook_model(model, 2, 256, mode="lut", seed=0)
    assert cbk.linear_weight_bytes(cbm) < cbk.linear_weight_bytes(model) / 3
    assert cbk.model_bytes(cbm) < cbk.model_bytes(model)
    idx = torch.randint(3, 20, (2, 24))
    with torch.no_grad():
        dense, coded = model(idx), cbm(idx)
    assert coded.shape == dense.shape
    # the same weights decoded once give the same logits as the lookup-table path
    for blk in cbm.blocks:
        for name in cbk.LINEARS:
            lin = getattr(blk, name)
            lin.mode, lin._cached = "cached", lin.decoded()
    with torch.no_grad():
        torch.testing.assert_close(cbm(idx), coded, rtol=1e-4, atol=1e-4)
    # k-means of 2-element sub-vectors with 256 codewords keeps the model's predictions mostly
    agree = (dense.argmax(-1) == coded.argmax(-1)).float().mean().item()
    assert agree > 0.5
