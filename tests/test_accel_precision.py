"""Precision masks: emulated kernels == reference bit for bit; reference == ground truth
conversions (numpy fp16, torch bf16); matvec accuracy per precision against fp32; bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from accel.precision import (
    PRECISIONS,
    block_offsets,
    dequantise,
    masked_matvec,
    num_blocks,
    precision_errors,
    quantise,
)


def matrix(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    row_scale = rng.choice([1e-6, 1e-2, 1.0, 3e4, 1e6], size=(rows, 1))  # incl. fp16 overflow
    return (rng.standard_normal((rows, cols)) * row_scale).astype(np.float32)


def random_codes(rows: int, cols: int, block: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4, (rows, num_blocks(cols, block)), dtype=np.uint8)


@pytest.mark.parametrize("rows,cols,block", [(1, 1, 1), (3, 10, 4), (5, 33, 8), (4, 64, 16), (2, 7, 32), (0, 5, 2)])
def test_emulated_kernels_match_reference_bit_for_bit(rows: int, cols: int, block: int) -> None:
    x, codes = matrix(rows, cols), random_codes(rows, cols, block)
    ref = quantise(x, codes, block, backend="reference")
    emu = quantise(x, codes, block, backend="emulate")
    np.testing.assert_array_equal(emu.payload, ref.payload)
    np.testing.assert_array_equal(emu.scales, ref.scales)
    deq = dequantise(ref, backend="reference")
    np.testing.assert_array_equal(dequantise(emu, backend="emulate"), deq)
    vec = np.random.default_rng(1).standard_normal((3, cols)).astype(np.float32)
    y_ref = masked_matvec(ref, vec, backend="reference")
    y_emu = masked_matvec(emu, vec, backend="emulate")
    # float32 accumulation in the kernel vs float64 in the reference
    bound = 1e-6 * cols * (np.abs(deq) @ np.abs(vec).T).T + 1e-30
    assert np.all(np.abs(y_emu - y_ref) <= bound)


@pytest.mark.parametrize("backend", ["reference", "emulate"])
def test_conversions_round_to_nearest_even_like_numpy_and_torch(backend: str) -> None:
    """One element per block (scale 1 within fp16 range): 2^16 random float32 bit patterns
    plus fp16 edge values (subnormals, the 2^-25 tie, ties below 65504)."""
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, 2**16, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    x = x[np.isfinite(x) & (np.abs(x) <= 65504)]
    edges = np.array([0.0, -0.0, 2**-25, 2**-25 * 1.0000001, 3 * 2**-25, 2**-24, 2**-14, 65504, 65496, 65503.99,
                      -65504, 1e-8, 6e-5, 1 + 2**-11, 1 + 3 * 2**-11], np.float32)
    x = np.concatenate([edges, x]).reshape(-1, 1)
    for name, truth in (("fp16", lambda a: a.astype(np.float16).astype(np.float32)),
                        ("bf16", lambda a: torch.from_numpy(a).to(torch.bfloat16).float().numpy())):
        codes = np.full(x.shape, PRECISIONS[name], np.uint8)
        q = quantise(x, codes, 1, backend=backend)
        np.testing.assert_array_equal(dequantise(q, backend=backend), truth(x), err_msg=name)


@pytest.mark.parametrize("backend", ["reference", "emulate"])
def test_int8_and_large_fp16_blocks_use_scales(backend: str) -> None:
    x = np.array([[1.0, -2.0, 3.0, 127.0], [0.0, 0.0, 0.0, 0.0], [1e5, -2e5, 3.0, 7.0]], np.float32)
    codes = np.array([[3], [3], [1]], np.uint8)
    q = quantise(x, codes, 4, backend=backend)
    np.testing.assert_array_equal(q.scales[:, 0], np.float32([127 / 127, 1.0, 2e5 / 65504]))
    deq = dequantise(q, backend=backend)
    np.testing.assert_array_equal(deq[0], x[0])  # exactly representable on the int8 grid
    np.testing.assert_array_equal(deq[1], 0)
    assert np.all(np.isfinite(deq[2])) and np.allclose(deq[2, :2], x[2, :2], rtol=1e-3)


def test_payload_layout_is_packed_and_aligned() -> None:
    codes = np.array([[0, 1, 2, 3], [3, 3, 3, 3]], np.uint8)
    offsets, total = block_offsets(codes, cols=14, block=4)  # last block has 2 columns
    sizes = [16, 8, 8, 4, 4, 4, 4, 4]  # int8 tail (2 B) rounds up to 4
    assert offsets.tolist() == np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()
    assert total == sum(sizes) and all(o % 4 == 0 for o in offsets)
    x = matrix(64, 256)
    nbytes = {name: quantise(x, np.full((64, 4), code), 64, backend="reference").nbytes for name, code in PRECISIONS.items()}
    assert nbytes["int8"] < nbytes["fp16"] == nbytes["bf16"] < nbytes["fp32"]


def test_matvec_error_per_precision_against_fp32() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((128, 512)).astype(np.float32)
    vec = rng.standard_normal(512).astype(np.float32)
    err = precision_errors(x, vec, 64, backend="emulate")
    # unit roundoff: fp16 2^-11, bf16 2^-8; int8 grid step amax/127 of ~3.5-sigma blocks
    assert err["fp32"] < 1e-6
    assert 1e-5 < err["fp16"] < 2 * 2**-11
    assert err["fp16"] < err["bf16"] < 2 * 2**-8
    assert err["bf16"] < err["int8"] < 0.02


def test_matvec_single_vector_shape() -> None:
    x = matrix(6, 9)
    q = quantise(x, random_codes(6, 9, 4), 4, backend="emulate")
    y = masked_matvec(q, np.ones(9, np.float32), backend="emulate")
    assert y.shape == (6,)
    np.testing.assert_allclose(y, dequantise(q, backend="reference").astype(np.float64).sum(axis=1), rtol=1e-5)


@pytest.mark.parametrize(
    "args,message",
    [
        ((np.zeros((2, 4), np.float64), np.zeros((2, 1)), 4), "float32"),
        ((np.zeros(4, np.float32), np.zeros((1, 1)), 4), "2-D"),
        ((np.zeros((2, 4), np.float32), np.zeros((2, 2)), 4), "shape"),
        ((np.zeros((2, 4), np.float32), np.full((2, 1), 4), 4), "0..3"),
        ((np.zeros((2, 4), np.float32), np.full((2, 1), 0.5), 4), "integers"),
        ((np.zeros((2, 4), np.float32), np.zeros((2, 1)), 0), "positive"),
        ((np.array([[np.nan, 1.0]], np.float32), np.zeros((1, 1)), 2), "finite"),
    ],
)
@pytest.mark.parametrize("backend", ["reference", "emulate"])
def test_bad_input_raises_value_error(backend: str, args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        quantise(*args, backend=backend)


def test_bad_vector_raises_value_error() -> None:
    q = quantise(matrix(2, 4), np.zeros((2, 1), np.uint8), 4, backend="reference")
    for vec in (np.zeros(5, np.float32), np.zeros(4, np.float64), np.zeros((1, 1, 4), np.float32)):
        with pytest.raises(ValueError, match="vec must be float32"):
            masked_matvec(q, vec, backend="emulate")


@pytest.mark.parametrize("backend", ["reference", "emulate"])
def test_int8_scale_of_tiny_blocks_never_underflows(backend: str) -> None:
    """Blocks with amax from 1e-45 (one subnormal step) to 1e-36: the scale was amax/127, which
    underflows to 0 below ~8.9e-44 (NaN codes the kernel and the reference wrote differently)."""
    amaxes = np.array([1.4e-45, 5e-45, 1e-44, 8.8e-44, 9e-44, 1.7e-43, 1.8e-43, 2e-43, 1e-40, 1e-38, 1e-36], np.float32)
    rng = np.random.default_rng(7)
    x = (rng.uniform(-1, 1, (amaxes.size, 8)) * amaxes[:, None]).astype(np.float32)
    x[:, 0] = amaxes  # the block maximum itself
    codes = np.full((amaxes.size, 1), PRECISIONS["int8"], np.uint8)
    q = quantise(x, codes, 8, backend=backend)
    ref = quantise(x, codes, 8, backend="reference")
    np.testing.assert_array_equal(q.payload, ref.payload)
    np.testing.assert_array_equal(q.scales, ref.scales)
    scales = np.asarray(q.scales)[:, 0]
    assert np.all(scales > 0)
    back = np.asarray(dequantise(q, backend=backend))
    # every code inside +-127 (no clipping): round-trip error at most half a scale step
    assert np.all(np.abs(back - x) <= scales[:, None] / 2 + 1e-45)
    assert np.all(np.abs(q.payload.view(np.int8)) <= 127)
