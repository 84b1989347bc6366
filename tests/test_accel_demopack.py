"""cuda/demopack.cu (codebook decode and the fused decode + matvec) run by the host emulation
against the NumPy references of accel/demopack.py, and the typed shape errors."""

from __future__ import annotations

import numpy as np
import pytest

from accel import demopack as dp


def make(rows: int, cols: int, dim: int, k: int, seed: int = 0) -> dp.CodebookMatrix:
    rng = np.random.default_rng(seed)
    book = rng.standard_normal((k, dim)).astype(np.float32)
    codes = rng.integers(0, k, size=(rows, cols // dim), dtype=np.uint8)
    return dp.CodebookMatrix(book, codes, (rows, cols))


@pytest.mark.parametrize(
    ("rows", "cols", "dim", "k"), [(7, 12, 4, 16), (64, 64, 8, 256), (3, 10, 1, 5), (130, 6, 6, 1)]
)
def test_emulated_decode_is_bit_exact(rows, cols, dim, k):
    cb = make(rows, cols, dim, k)
    ref = dp.decode(cb, backend="reference")
    emu = dp.decode(cb, backend="emulate")
    assert emu.dtype == np.float32 and np.array_equal(emu, ref)
    # each sub-vector is its codeword
    assert np.array_equal(ref[2 % rows, :dim], cb.codebook[cb.codes[2 % rows, 0]])


@pytest.mark.parametrize(
    ("rows", "cols", "dim", "k", "nvec"), [(7, 12, 4, 16, 1), (64, 64, 8, 256, 3), (33, 20, 2, 7, 5)]
)
def test_emulated_fused_matvec_matches_the_lookup_table_reference(rows, cols, dim, k, nvec):
    cb = make(rows, cols, dim, k, seed=rows)
    x = np.random.default_rng(1).standard_normal((nvec, cols)).astype(np.float32)
    exact = x.astype(np.float64) @ dp.decode_reference(cb).astype(np.float64).T
    ref = dp.matvec(cb, x, backend="reference")
    emu = dp.matvec(cb, x, backend="emulate")
    assert emu.shape == (nvec, rows)
    np.testing.assert_allclose(ref, exact, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(emu, exact, rtol=1e-4, atol=1e-4)
    single = dp.matvec(cb, x[0], backend="emulate")
    assert single.shape == (rows,) and np.array_equal(single, emu[0])


def test_shapes_that_do_not_fit_are_typed_errors():
    with pytest.raises(dp.CodebookShapeError, match="does not divide"):
        dp.check_shape(4, 10, 3, 16)
    with pytest.raises(dp.CodebookShapeError, match="codewords"):
        dp.check_shape(4, 12, 3, 300)
    cb = make(4, 12, 4, 8)
    bad_codes = dp.CodebookMatrix(cb.codebook, cb.codes.astype(np.int64), cb.shape)
    with pytest.raises(dp.CodebookShapeError):
        dp.decode(bad_codes, backend="emulate")
    codes = cb.codes.copy()
    codes[0, 0] = 8
    with pytest.raises(dp.CodebookShapeError, match=">= K"):
        dp.matvec(dp.CodebookMatrix(cb.codebook, codes, cb.shape), np.zeros(12, np.float32), backend="emulate")
    with pytest.raises(dp.CodebookShapeError, match="x must be"):
        dp.matvec(cb, np.zeros(11, np.float32), backend="emulate")
    assert cb.nbytes == cb.codebook.nbytes + 4 * 3
