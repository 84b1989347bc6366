"""Codebook ("demopack") weights on the GPU: decode and the fused decode + matvec of
``cuda/demopack.cu``, with their NumPy references (seed 003, SPARK; spark/codebook.py fits the
codebooks and applies them to the chain LM).

A weight matrix (rows, cols) is stored as a ``codebook`` (K, dim) float32 and ``codes``
(rows, cols // dim) uint8: sub-vector (r, b) = ``codebook[codes[r, b]]``.  K <= 256.

Validation before any launch or allocation (:class:`CodebookShapeError`, a ``ValueError``):
dim >= 1 dividing cols, codebook float32 (K, dim) with 1 <= K <= 256, codes uint8 (rows, nsub)
below K, inputs float32 with ``cols`` columns.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from accel._backend import array_module, grid_1d, kernel_module, resolve

DP_THREADS = 128
MAX_CODEWORDS = 256


class CodebookShapeError(ValueError):
    """Codebook, codes or inputs whose shapes or types do not fit (nothing was allocated)."""


@dataclasses.dataclass(frozen=True)
class CodebookMatrix:
    """A (rows, cols) matrix as a codebook (K, dim) and codes (rows, cols // dim)."""

    codebook: Any
    codes: Any
    shape: tuple[int, int]

    @property
    def dim(self) -> int:
        return int(self.codebook.shape[1])

    @property
    def nbytes(self) -> int:
        """Bytes of storage: the codebook plus one byte per sub-vector."""
        return int(self.codebook.nbytes + self.codes.nbytes)


def check_shape(rows: int, cols: int, dim: int, k: int) -> None:
    """Raise :class:`CodebookShapeError` unless a (rows, cols) matrix can take a (k, dim) codebook."""
    if not isinstance(dim, (int, np.integer)) or dim < 1:
        raise CodebookShapeError(f"dim must be a positive integer, got {dim!r}")
    if cols % dim:
        raise CodebookShapeError(f"dim {dim} does not divide the {cols} columns of a ({rows}, {cols}) matrix")
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= MAX_CODEWORDS:
        raise CodebookShapeError(f"a codebook has 1..{MAX_CODEWORDS} codewords, got {k!r}")


def _host(a: Any) -> np.ndarray:
    return a.get() if type(a).__module__.startswith("cupy") else np.asarray(a)


def validate(cb: CodebookMatrix) -> None:
    rows, cols = cb.shape
    book, codes = cb.codebook, cb.codes
    if getattr(book, "ndim", None) != 2 or np.dtype(book.dtype) != np.float32:
        raise CodebookShapeError(f"codebook must be a 2-D float32 array, got {getattr(book, 'dtype', type(book))}")
    check_shape(rows, cols, int(book.shape[1]), int(book.shape[0]))
    nsub = cols // int(book.shape[1])
    if getattr(codes, "shape", None) != (rows, nsub) or np.dtype(codes.dtype) != np.uint8:
        raise CodebookShapeError(
            f"codes must be uint8 of shape {(rows, nsub)}, got "
            f"{getattr(codes, 'dtype', None)} {getattr(codes, 'shape', None)}"
        )
    if codes.size and int(_host(codes).max()) >= book.shape[0]:
        raise CodebookShapeError(f"a code is >= K = {book.shape[0]}")


def decode_reference(cb: CodebookMatrix) -> np.ndarray:
    rows, cols = cb.shape
    return np.asarray(cb.codebook)[np.asarray(cb.codes)].reshape(rows, cols)


def matvec_reference(cb: CodebookMatrix, x: np.ndarray) -> np.ndarray:
    """y = x @ decode(cb).T through the lookup table T[v, b, k] = <x[v, b], codebook[k]> (float64):
    the decoded matrix is never formed."""
    rows, cols = cb.shape
    dim = cb.dim
    xb = np.atleast_2d(x).astype(np.float64).reshape(-1, cols // dim, dim)
    table = np.einsum("vbd,kd->vbk", xb, np.asarray(cb.codebook, np.float64))
    codes = np.asarray(cb.codes).astype(np.int64)
    y = table[:, np.arange(cols // dim)[None, :], codes].sum(-1)  # (nvec, rows)
    return y.astype(np.float32)


def _args(cb: CodebookMatrix) -> tuple:
    rows, cols = cb.shape
    return (np.int64(rows), np.int64(cols // cb.dim), np.int64(cb.dim))


def decode(cb: CodebookMatrix, *, backend: str = "auto") -> Any:
    """The float32 (rows, cols) matrix the codebook stands for."""
    validate(cb)
    backend = resolve(backend)
    if backend == "reference":
        return decode_reference(cb)
    xp = array_module(backend)
    rows, cols = cb.shape
    out = xp.empty((rows, cols), xp.float32)
    n = rows * (cols // cb.dim)
    if n:
        fn = kernel_module("demopack", backend).get_function("dp_decode")
        fn(
            grid_1d(n, DP_THREADS),
            (DP_THREADS, 1, 1),
            (xp.ascontiguousarray(cb.codebook), xp.ascontiguousarray(cb.codes), out, *_args(cb)),
        )
    return out


def matvec(cb: CodebookMatrix, x: Any, *, backend: str = "auto") -> Any:
    """y = decode(cb) @ x for x (cols,) -> (rows,), or x (nvec, cols) -> (nvec, rows), with each
    weight synthesised from the codebook as it is used (the kernel never writes the matrix)."""
    validate(cb)
    rows, cols = cb.shape
    if getattr(x, "dtype", None) != np.float32 or getattr(x, "ndim", 0) not in (1, 2) or x.shape[-1] != cols:
        raise CodebookShapeError(
            f"x must be float32 with shape ({cols},) or (nvec, {cols}), got "
            f"{getattr(x, 'dtype', None)} {getattr(x, 'shape', None)}"
        )
    single = x.ndim == 1
    backend = resolve(backend)
    if backend == "reference":
        y = matvec_reference(cb, _host(x))
        return y[0] if single else y
    xp = array_module(backend)
    x2 = xp.ascontiguousarray(x.reshape(1, cols) if single else x)
    y = xp.zeros((x2.shape[0], rows), xp.float32)
    if y.size:
        fn = kernel_module("demopack", backend).get_function("dp_matvec")
        fn(
            grid_1d(y.size, DP_THREADS),
            (DP_THREADS, 1, 1),
            (
                xp.ascontiguousarray(cb.codebook),
                xp.ascontiguousarray(cb.codes),
                x2,
                y,
                *_args(cb),
                np.int64(x2.shape[0]),
            ),
        )
    return y[0] if single else y
