"""Per-block precision masks: quantise / dequantise by a mask, and a masked mixed-precision matvec.

A float32 matrix (rows, cols) is cut into blocks of ``block`` consecutive columns of one row
(group-wise quantisation, the last block of a row may be shorter). ``codes`` (rows, nblocks)
gives each block's storage: :data:`PRECISIONS`. The quantised form is one byte buffer with
each block at a 4-byte-aligned offset, plus one float32 scale per block (int8: amax / 127, rounded
up to a multiple of 2^-149 where that is subnormal so that it never underflows to 0;
fp16: amax / 65504 when amax exceeds fp16's range, else 1; fp32 and bf16: 1). Rounding is to
nearest even everywhere; the CPU reference here reproduces ``cuda/precision.cu`` bit for bit
(fp16 via numpy, bf16 via torch, int8 via float32 ``rint``).

Validation before any launch: x float32 2-D and finite, codes integer in 0..3 of shape
(rows, nblocks), block >= 1, vectors float32 with ``cols`` columns — else ``ValueError``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from accel._backend import array_module, grid_1d, kernel_module, resolve

PRECISIONS: dict[str, int] = {"fp32": 0, "fp16": 1, "bf16": 2, "int8": 3}
BYTES_PER_ELEMENT = np.array([4, 2, 2, 1], dtype=np.int64)
PREC_THREADS = 128
_FP16_MAX = np.float32(65504.0)


@dataclasses.dataclass(frozen=True)
class QuantisedMatrix:
    """A matrix stored block by block in mixed precision.

    Invariants: ``codes`` (rows, nblocks) uint8; ``offsets`` (rows * nblocks,) int64, multiples
    of 4, ascending in row-major block order; ``scales`` (rows, nblocks) float32; ``payload``
    uint8 of ``payload_bytes(codes, cols, block)`` bytes.
    """

    payload: Any
    codes: Any
    offsets: Any
    scales: Any
    shape: tuple[int, int]
    block: int

    @property
    def nbytes(self) -> int:
        """Bytes of storage: payload plus one float32 scale per block."""
        return int(self.payload.nbytes + self.scales.nbytes)


def num_blocks(cols: int, block: int) -> int:
    return -(-cols // block)


def block_lengths(cols: int, block: int) -> np.ndarray:
    nb = num_blocks(cols, block)
    lengths = np.full(nb, block, dtype=np.int64)
    if nb:
        lengths[-1] = cols - (nb - 1) * block
    return lengths


def block_offsets(codes: np.ndarray, cols: int, block: int) -> tuple[np.ndarray, int]:
    """(byte offset of each block in row-major block order, total payload bytes)."""
    sizes = BYTES_PER_ELEMENT[codes.astype(np.int64)] * block_lengths(cols, block)[None, :]
    sizes = (sizes + 3) // 4 * 4
    flat = sizes.reshape(-1)
    offsets = np.zeros(flat.size, dtype=np.int64)
    np.cumsum(flat[:-1], out=offsets[1:])
    return offsets, int(flat.sum())


def _host(a: Any) -> np.ndarray:
    return a.get() if type(a).__module__.startswith("cupy") else np.asarray(a)


def _validate_codes(codes: Any, rows: int, cols: int, block: int) -> np.ndarray:
    if not isinstance(block, (int, np.integer)) or block < 1:
        raise ValueError(f"block must be a positive integer, got {block!r}")
    codes = _host(codes)
    nb = num_blocks(cols, block)
    if codes.shape != (rows, nb):
        raise ValueError(f"codes must have shape (rows, nblocks) = {(rows, nb)}, got {codes.shape}")
    if codes.size and not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
    if codes.size and (codes.min() < 0 or codes.max() > 3):
        raise ValueError(f"codes must be in 0..3 ({PRECISIONS}), got range [{codes.min()}, {codes.max()}]")
    return codes.astype(np.uint8)


def _validate_matrix(x: Any) -> None:
    if getattr(x, "ndim", None) != 2 or np.dtype(x.dtype) != np.float32:
        raise ValueError(f"x must be a 2-D float32 array, got {getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")
    xp = array_module("cupy") if type(x).__module__.startswith("cupy") else np
    if x.size and not bool(xp.isfinite(x).all()):
        raise ValueError("x must be finite (NaN / inf cannot be quantised)")


# -------------------------------------------------------------------- reference (NumPy / torch)


def _element_index(rows: int, cols: int, block: int, offsets: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per element (row-major): its block's code and its byte position in the payload."""
    nb = num_blocks(cols, block)
    col = np.arange(cols)
    blk = np.arange(rows)[:, None] * nb + (col // block)[None, :]
    code = codes.reshape(-1)[blk]
    pos = offsets[blk] + (col % block)[None, :] * BYTES_PER_ELEMENT[code]
    return code, pos


def _f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.ascontiguousarray(x)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def quantise_reference(x: np.ndarray, codes: np.ndarray, block: int) -> QuantisedMatrix:
    rows, cols = x.shape
    nb = num_blocks(cols, block)
    offsets, total = block_offsets(codes, cols, block)
    padded = np.zeros((rows, nb * block), np.float32)
    padded[:, :cols] = np.abs(x)
    amax = padded.reshape(rows, nb, block).max(axis=2) if nb else np.zeros((rows, 0), np.float32)
    scales = np.ones((rows, nb), np.float32)
    int8 = (codes == 3) & (amax > 0)
    scales[int8] = amax[int8] / np.float32(127)
    # subnormal int8 scales: rounded up in units of 2^-149 (never 0), as cuda/precision.cu does
    tiny = int8 & (scales < np.finfo(np.float32).tiny)
    scales[tiny] = (np.ceil(amax[tiny].astype(np.float64) * 2.0**149 / 127.0) * 2.0**-149).astype(np.float32)
    big = (codes == 1) & (amax > _FP16_MAX)
    scales[big] = amax[big] / _FP16_MAX
    payload = np.zeros(total, np.uint8)
    code, pos = _element_index(rows, cols, block, offsets, codes)
    scale_el = np.repeat(scales, block, axis=1)[:, :cols]
    for c, stored in (
        (0, lambda s: x[s].astype(np.float32)),
        (1, lambda s: (x[s] / scale_el[s]).astype(np.float16)),
        (2, lambda s: _f32_to_bf16_bits(x[s])),
        (3, lambda s: np.clip(np.rint(x[s] / scale_el[s]), -127, 127).astype(np.int8)),
    ):
        sel = code == c
        if sel.any():
            raw = np.ascontiguousarray(stored(sel)).view(np.uint8).reshape(-1, BYTES_PER_ELEMENT[c])
            payload[pos[sel][:, None] + np.arange(BYTES_PER_ELEMENT[c])] = raw
    return QuantisedMatrix(payload, codes, offsets, scales, (rows, cols), block)


def dequantise_reference(q: QuantisedMatrix) -> np.ndarray:
    rows, cols = q.shape
    out = np.empty((rows, cols), np.float32)
    code, pos = _element_index(rows, cols, q.block, q.offsets, q.codes)
    scale_el = np.repeat(q.scales, q.block, axis=1)[:, :cols]
    for c, dtype in ((0, np.float32), (1, np.float16), (2, np.uint16), (3, np.int8)):
        sel = code == c
        if not sel.any():
            continue
        raw = q.payload[pos[sel][:, None] + np.arange(BYTES_PER_ELEMENT[c])]
        vals = np.ascontiguousarray(raw).view(dtype).reshape(-1)
        if c == 2:
            vals = (vals.astype(np.uint32) << 16).view(np.float32)
        out[sel] = vals.astype(np.float32) * scale_el[sel]
    return out


# -------------------------------------------------------------------- kernels


def _args(q: QuantisedMatrix) -> tuple:
    rows, cols = q.shape
    return (np.int64(rows), np.int64(cols), np.int64(q.block), np.int64(num_blocks(cols, q.block)))


def quantise(x: Any, codes: Any, block: int, *, backend: str = "auto") -> QuantisedMatrix:
    """Quantise float32 x (rows, cols) block by block per ``codes``; see the module docstring."""
    _validate_matrix(x)
    rows, cols = x.shape
    codes = _validate_codes(codes, rows, cols, block)
    backend = resolve(backend)
    if backend == "reference":
        return quantise_reference(np.asarray(x), codes, int(block))
    xp = array_module(backend)
    offsets, total = block_offsets(codes, cols, block)
    nb = num_blocks(cols, block)
    q = QuantisedMatrix(xp.zeros(total, xp.uint8), xp.asarray(codes), xp.asarray(offsets),
                        xp.empty((rows, nb), xp.float32), (rows, cols), int(block))
    if rows * nb:
        fn = kernel_module("precision", backend).get_function("prec_quantise")
        fn(grid_1d(rows * nb, PREC_THREADS), (PREC_THREADS, 1, 1),
           (xp.ascontiguousarray(x), q.codes, q.offsets, q.payload, q.scales, *_args(q)))
    return q


def dequantise(q: QuantisedMatrix, *, backend: str = "auto") -> Any:
    """The float32 matrix the quantised one stands for."""
    backend = resolve(backend)
    if backend == "reference":
        return dequantise_reference(q)
    xp = array_module(backend)
    rows, cols = q.shape
    out = xp.empty((rows, cols), xp.float32)
    nb = num_blocks(cols, q.block)
    if rows * nb:
        fn = kernel_module("precision", backend).get_function("prec_dequantise")
        fn(grid_1d(rows * nb, PREC_THREADS), (PREC_THREADS, 1, 1),
           (q.payload, q.codes, q.offsets, q.scales, out, *_args(q)))
    return out


def masked_matvec(q: QuantisedMatrix, vec: Any, *, backend: str = "auto") -> Any:
    """y = dequantise(q) @ vec for vec (cols,) -> (rows,), or vec (nvec, cols) -> (nvec, rows).

    The kernel reads each block in its stored precision (never materialising the float32
    matrix) and accumulates in float32; the reference computes in float64 from the dequantised
    matrix, so the two agree to float32 accumulation error.
    """
    rows, cols = q.shape
    if getattr(vec, "dtype", None) != np.float32 or vec.ndim not in (1, 2) or vec.shape[-1] != cols:
        raise ValueError(f"vec must be float32 with shape ({cols},) or (nvec, {cols}), got {getattr(vec, 'dtype', None)} {getattr(vec, 'shape', None)}")
    single = vec.ndim == 1
    backend = resolve(backend)
    if backend == "reference":
        w = dequantise_reference(q).astype(np.float64)
        y = (np.atleast_2d(vec).astype(np.float64) @ w.T).astype(np.float32)
        return y[0] if single else y
    xp = array_module(backend)
    v2 = xp.ascontiguousarray(vec.reshape(1, cols) if single else vec)
    y = xp.zeros((v2.shape[0], rows), xp.float32)
    if y.size:
        fn = kernel_module("precision", backend).get_function("prec_matvec")
        fn(grid_1d(y.size, PREC_THREADS), (PREC_THREADS, 1, 1),
           (q.payload, q.codes, q.offsets, q.scales, v2, y, *_args(q), np.int64(v2.shape[0])))
    return y[0] if single else y


def precision_errors(x: np.ndarray, vec: np.ndarray, block: int, *, backend: str = "auto") -> dict[str, float]:
    """Relative error ||y_p - y_fp32|| / ||y_fp32|| of the masked matvec with every block in
    precision p, against the float64 product of the float32 matrix."""
    exact = np.atleast_2d(vec).astype(np.float64) @ x.astype(np.float64).T
    out = {}
    for name, code in PRECISIONS.items():
        codes = np.full((x.shape[0], num_blocks(x.shape[1], block)), code, np.uint8)
        y = _host(masked_matvec(quantise(x, codes, block, backend=backend), vec, backend=backend))
        out[name] = float(np.linalg.norm(np.atleast_2d(y) - exact) / np.linalg.norm(exact))
    return out


# -------------------------------------------------------------------- low-rank adapters (LoRA)
#
# LoRA adapter matrices (seed 004, S-4) are stored in one of :data:`ADAPTER_BITS`' precisions:
# fp16 (numpy half), int8 or int4, both symmetric with one float32 scale per group of
# ``group`` consecutive columns of a row (scale = amax / 127 or amax / 7, 1 for an all-zero
# group).  int4 is packed two per byte: column 2j in the low nibble, 2j + 1 in the high one, as
# two's-complement nibbles in -8..7 (rounding to nearest even, clipped to -7..7 so the grid is
# symmetric).  Dequantised on use (:func:`unpack_adapter`).

#: Storage bits per element of each adapter precision (scales counted separately).
ADAPTER_BITS: dict[str, int] = {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4}
_ADAPTER_QMAX = {"int8": 127, "int4": 7}


@dataclasses.dataclass(frozen=True)
class PackedAdapter:
    """One adapter matrix in its stored form.  Invariants: ``payload`` uint8; for int4 it holds
    ``rows * ceil(cols / 2)`` bytes, for int8 ``rows * cols``, for fp16 ``2 * rows * cols``, for
    fp32 ``4 * rows * cols``; ``scales`` float32 ``(rows, ceil(cols / group))`` (empty for fp16
    and fp32)."""

    payload: np.ndarray
    scales: np.ndarray
    shape: tuple[int, int]
    precision: str
    group: int

    @property
    def nbytes(self) -> int:
        return int(self.payload.nbytes + self.scales.nbytes)

    @property
    def bits(self) -> int:
        """Storage bits, payload and scales."""
        return 8 * self.nbytes


def _group_scales(x: np.ndarray, group: int, qmax: int) -> np.ndarray:
    rows, cols = x.shape
    nb = num_blocks(cols, group)
    padded = np.zeros((rows, nb * group), np.float32)
    padded[:, :cols] = np.abs(x)
    amax = padded.reshape(rows, nb, group).max(axis=2)
    return np.where(amax > 0, amax / np.float32(qmax), np.float32(1)).astype(np.float32)


def adapter_codes(x: np.ndarray, precision: str, group: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes (rows, cols) and group scales of ``x`` for int8 / int4."""
    qmax = _ADAPTER_QMAX[precision]
    scales = _group_scales(x, group, qmax)
    scale_el = np.repeat(scales, group, axis=1)[:, : x.shape[1]]
    return np.clip(np.rint(x / scale_el), -qmax, qmax).astype(np.int8), scales


def pack_adapter(x: np.ndarray, precision: str, group: int = 32) -> PackedAdapter:
    """Store float32 ``x`` (rows, cols) in ``precision`` (:data:`ADAPTER_BITS`)."""
    _validate_matrix(x)
    if precision not in ADAPTER_BITS:
        raise ValueError(f"adapter precision must be one of {sorted(ADAPTER_BITS)}, got {precision!r}")
    if not isinstance(group, (int, np.integer)) or isinstance(group, bool) or group < 1:
        raise ValueError(f"group must be a positive integer, got {group!r}")
    x = np.ascontiguousarray(x)
    rows, cols = x.shape
    empty = np.zeros((rows, 0), np.float32)
    if precision == "fp32":
        return PackedAdapter(x.view(np.uint8).reshape(-1).copy(), empty, (rows, cols), precision, int(group))
    if precision == "fp16":
        return PackedAdapter(x.astype(np.float16).view(np.uint8).reshape(-1), empty, (rows, cols), precision, int(group))
    q, scales = adapter_codes(x, precision, int(group))
    if precision == "int8":
        return PackedAdapter(q.view(np.uint8).reshape(-1).copy(), scales, (rows, cols), precision, int(group))
    nib = (q.astype(np.int16) & 0xF).astype(np.uint8)  # two's-complement nibbles
    if cols % 2:
        nib = np.pad(nib, ((0, 0), (0, 1)))
    packed = nib[:, 0::2] | (nib[:, 1::2] << 4)
    return PackedAdapter(packed.reshape(-1), scales, (rows, cols), precision, int(group))


def unpack_adapter(p: PackedAdapter) -> np.ndarray:
    """The float32 matrix a stored adapter stands for (dequantise on use)."""
    rows, cols = p.shape
    if p.precision == "fp32":
        return p.payload.view(np.float32).reshape(rows, cols).copy()
    if p.precision == "fp16":
        return p.payload.view(np.float16).reshape(rows, cols).astype(np.float32)
    if p.precision == "int8":
        q = p.payload.view(np.int8).reshape(rows, cols).astype(np.float32)
    elif p.precision == "int4":
        b = p.payload.reshape(rows, -1)
        nib = np.empty((rows, b.shape[1] * 2), np.uint8)
        nib[:, 0::2], nib[:, 1::2] = b & 0xF, b >> 4
        q = nib[:, :cols].astype(np.int16)
        q = np.where(q >= 8, q - 16, q).astype(np.float32)
    else:
        raise ValueError(f"unknown adapter precision {p.precision!r}")
    return q * np.repeat(p.scales, p.group, axis=1)[:, :cols]
