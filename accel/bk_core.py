"""BK-core: the diagonal of the resolvent of a tridiagonal matrix in O(N), exact gradient, causal.

Notation (``../shared/specs/bk_core.md``): H is tridiagonal with diagonal v (the "potential"),
superdiagonal b (H[k, k+1] = b_k) and subdiagonal c (H[k+1, k] = c_k); T = H - zI and
G = T^{-1}. With p_k = b_k c_k the LU pivots of T from the left and from the right are

    alpha_0 = v_0 - z,        alpha_i = (v_i - z) - p_{i-1} / alpha_{i-1}   (= theta_{i+1} / theta_i)
    beta_{N-1} = v_{N-1} - z, beta_i  = (v_i - z) - p_i / beta_{i+1}        (= phi_{i-1} / phi_i)

and G_ii = 1 / (alpha_i + beta_i - (v_i - z)). Pivots are ratios of the continuants theta / phi,
so nothing grows with N: this is the scaled recurrence that runs N = 1,000,000 without the
origin's clamping. (Every leading and trailing principal minor of T must be non-zero — true
whenever p_k > 0 and Im z != 0, e.g. the origin's Laplacian with z = 1j.)

Exact backward. dG_ii/dv_j = -G_ij G_ji, and for a tridiagonal resolvent
G_ij G_ji = G_jj^2 prod_{k=i}^{j-1} p_k / alpha_k^2 (i <= j) and
G_ij G_ji = G_jj^2 prod_{k=j}^{i-1} p_k / beta_{k+1}^2 (i >= j). With the cotangent
w_i = dL/dRe G_ii - 1j dL/dIm G_ii, two affine sweeps
    Lsum_j = w_j + (p_{j-1} / alpha_{j-1}^2) Lsum_{j-1},   Rsum_j = w_j + (p_j / beta_{j+1}^2) Rsum_{j+1}
give dL/dv_j = -Re(G_jj^2 (Lsum_j + Rsum_j - w_j)) and, with
P_k = G_kk^2 Lsum_k / beta_{k+1} + G_{k+1,k+1}^2 Rsum_{k+1} / alpha_k,
dL/db_k = Re(c_k P_k), dL/dc_k = Re(b_k P_k). O(N), checked by torch.autograd.gradcheck.

Causal variant. The last diagonal entry of the resolvent of the leading (i+1)x(i+1) block is
theta_i / theta_{i+1} = 1 / alpha_i: it depends on v_0..v_i only, and one complex number
(alpha_i) is the whole state carried from step to step (:func:`causal_step`). Its backward is
the adjoint of the alpha recurrence, one reverse affine sweep.

All four recurrences are Möbius maps, computed by one chunked scan (``cuda/bk_core.cu`` on a
GPU, :func:`scan_reference` on the CPU): compose each chunk's 2x2 transfer matrix, carry across
chunks, refill the chunks. On the CPU that is ~3 sqrt(N) vectorised numpy steps instead of N
Python steps. Output features are ``[Re G_ii, Im G_ii]``, shape (B, N, 2).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import numpy as np
import torch

from accel._backend import array_module, grid_1d, kernel_module, resolve

#: CUDA threads per block for the three scan kernels.
SCAN_THREADS = 128

ScanFn = Callable[..., Any]


def default_chunk(n: int) -> int:
    """Steps per chunk: ceil(sqrt(n)) balances chunk length against the number of chunks."""
    return max(1, math.isqrt(max(n - 1, 0)) + 1)


# --------------------------------------------------------------------------------------------
# The scan: x_s = d_s - e_s / x_{s-1} (pivot) or x_s = d_s + e_s x_{s-1} (affine), x_{-1} = 1.


def scan_reference(d: np.ndarray, e: np.ndarray, *, reverse: bool, affine: bool, chunk: int | None = None) -> np.ndarray:
    """NumPy chunked scan, vectorised over rows and chunks; same algorithm as cuda/bk_core.cu.

    d, e: complex (B, N); e at the first step (position 0, or N-1 when ``reverse``) must be 0.
    Returns x (B, N) with x at position pos the value after the step at pos.
    """
    rows, n = d.shape
    out = np.empty_like(d)
    if rows == 0 or n == 0:
        return out
    chunk = chunk or default_chunk(n)
    k = -(-n // chunk)
    if reverse:
        d, e = d[:, ::-1], e[:, ::-1]
    # Pad to whole chunks with harmless steps (d = 1, e = 0 gives x = 1); only the last chunk,
    # whose map is never needed, is padded.
    d3 = np.ones((rows, k * chunk), d.dtype)
    e3 = np.zeros((rows, k * chunk), d.dtype)
    d3[:, :n], e3[:, :n] = d, e
    d3, e3 = d3.reshape(rows, k, chunk), e3.reshape(rows, k, chunk)

    # 1. Transfer matrix of every full chunk but the last, renormalised each step.
    q = np.zeros((4, rows, k - 1), d.dtype)
    q[0] = q[3] = 1
    for j in range(chunk):
        ds, es = d3[:, : k - 1, j], e3[:, : k - 1, j]
        if affine:  # [[e, d], [0, 1]] @ Q
            q[0], q[1] = es * q[0] + ds * q[2], es * q[1] + ds * q[3]
        else:  # [[d, -e], [1, 0]] @ Q
            q0, q1 = q[0].copy(), q[1].copy()
            q[0], q[1] = ds * q0 - es * q[2], ds * q1 - es * q[3]
            q[2], q[3] = q0, q1
        scale = np.abs(q.view(q.real.dtype)).max(axis=0)
        q /= np.where(scale > 0, scale, 1).reshape(rows, k - 1, 2).max(axis=2)
    # 2. The value entering each chunk.
    carry = np.empty((rows, k), d.dtype)
    x = np.ones(rows, d.dtype)
    for c in range(k):
        carry[:, c] = x
        if c < k - 1:
            x = (q[0, :, c] * x + q[1, :, c]) / (q[2, :, c] * x + q[3, :, c])
    # 3. Refill every chunk from its incoming value.
    out3 = np.empty((rows, k, chunk), d.dtype)
    x = carry
    for j in range(chunk):
        x = d3[:, :, j] + e3[:, :, j] * x if affine else d3[:, :, j] - e3[:, :, j] / x
        out3[:, :, j] = x
    res = out3.reshape(rows, k * chunk)[:, :n]
    out[:] = res[:, ::-1] if reverse else res
    return out


def scan_launch(module: Any, xp: Any, d: Any, e: Any, *, reverse: bool, affine: bool, chunk: int | None = None) -> Any:
    """The same scan by the three kernels of cuda/bk_core.cu (CuPy, or the host emulation)."""
    rows, n = d.shape
    out = xp.empty_like(d)
    if rows == 0 or n == 0:
        return out
    suffix = {np.dtype(np.complex128): "c128", np.dtype(np.complex64): "c64"}[np.dtype(d.dtype)]
    chunk = chunk or default_chunk(n)
    k = -(-n // chunk)
    d, e = xp.ascontiguousarray(d), xp.ascontiguousarray(e)
    maps = xp.empty((rows, k, 4), d.dtype)
    carry = xp.empty((rows, k), d.dtype)
    shape = (np.int64(rows), np.int64(n), np.int64(chunk), np.int64(k))
    flags = (np.int32(reverse), np.int32(affine))
    block = (SCAN_THREADS, 1, 1)
    module.get_function(f"bk_scan_maps_{suffix}")(grid_1d(rows * k, SCAN_THREADS), block, (d, e, maps, *shape, *flags))
    module.get_function(f"bk_scan_carry_{suffix}")(grid_1d(rows, SCAN_THREADS), block, (maps, carry, np.int64(rows), np.int64(k)))
    module.get_function(f"bk_scan_fill_{suffix}")(grid_1d(rows * k, SCAN_THREADS), block, (d, e, carry, out, *shape, *flags))
    return out


def _scanner(backend: str, chunk: int | None) -> tuple[Any, ScanFn]:
    """(array module, scan function) for a concrete backend."""
    if backend == "reference":
        return np, lambda d, e, **kw: scan_reference(d, e, chunk=chunk, **kw)
    module, xp = kernel_module("bk_core", backend), array_module(backend)
    return xp, lambda d, e, **kw: scan_launch(module, xp, d, e, chunk=chunk, **kw)


# --------------------------------------------------------------------------------------------
# Forward and backward on arrays (numpy or cupy), given a scan.


@dataclasses.dataclass
class Forward:
    """What the forward pass keeps for the backward: pivots, the diagonal, the couplings."""

    shifted: Any  # v - z, (B, N) complex
    coupling: Any  # p = b c, (B, N-1) complex
    alpha: Any  # left pivots (B, N)
    beta: Any | None  # right pivots (B, N); None for the causal variant
    diag: Any  # G_ii (non-causal) or 1 / alpha_i (causal), (B, N)


def _pad(xp: Any, a: Any, front: bool) -> Any:
    zero = xp.zeros((a.shape[0], 1), a.dtype)
    return xp.concatenate([zero, a] if front else [a, zero], axis=1)


def forward_arrays(xp: Any, scan: ScanFn, shifted: Any, coupling: Any, causal: bool) -> Forward:
    alpha = scan(shifted, _pad(xp, coupling, front=True), reverse=False, affine=False)
    if causal:
        return Forward(shifted, coupling, alpha, None, 1 / alpha)
    beta = scan(shifted, _pad(xp, coupling, front=False), reverse=True, affine=False)
    return Forward(shifted, coupling, alpha, beta, 1 / (alpha + beta - shifted))


def backward_arrays(xp: Any, scan: ScanFn, fwd: Forward, w: Any) -> tuple[Any, Any]:
    """(dL/dv as complex (B, N), dL/dp as complex (B, N-1)) for the cotangent w = gRe - 1j gIm.

    Real parts are taken by the caller: dL/dv = Re(first), dL/db = Re(c * second),
    dL/dc = Re(b * second).
    """
    g, p = fwd.diag, fwd.coupling
    if fwd.beta is None:  # causal: adjoint lambda_i = -w_i y_i^2 + lambda_{i+1} p_i y_i^2
        y2 = g * g
        lam = scan(-w * y2, _pad(xp, p * y2[:, :-1], front=False), reverse=True, affine=True)
        return lam, -lam[:, 1:] * g[:, :-1]
    alpha, beta = fwd.alpha, fwd.beta
    lsum = scan(w, _pad(xp, p / (alpha[:, :-1] * alpha[:, :-1]), front=True), reverse=False, affine=True)
    rsum = scan(w, _pad(xp, p / (beta[:, 1:] * beta[:, 1:]), front=False), reverse=True, affine=True)
    g2 = g * g
    dv = -g2 * (lsum + rsum - w)
    dp = g2[:, :-1] * lsum[:, :-1] / beta[:, 1:] + g2[:, 1:] * rsum[:, 1:] / alpha[:, :-1]
    return dv, dp


# --------------------------------------------------------------------------------------------
# Validation and the torch interface.

_COMPLEX_OF = {torch.float64: np.complex128, torch.float32: np.complex64}


def _validate(v: torch.Tensor, b: torch.Tensor, c: torch.Tensor, z: complex) -> None:
    for name, t in (("v", v), ("b", b), ("c", c)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _COMPLEX_OF:
            raise ValueError(f"{name} must be float32 or float64, got {t.dtype}")
    if v.ndim != 2 or v.shape[1] < 1:
        raise ValueError(f"v must have shape (B, N) with N >= 1, got {tuple(v.shape)}")
    expected = (v.shape[0], v.shape[1] - 1)
    for name, t in (("b", b), ("c", c)):
        if tuple(t.shape) != expected:
            raise ValueError(f"{name} must have shape {expected}, got {tuple(t.shape)}")
        if t.dtype != v.dtype or t.device != v.device:
            raise ValueError(f"{name} must match v's dtype and device ({v.dtype}, {v.device})")
    if not isinstance(z, (complex, float, int)) or not np.isfinite(complex(z)):
        raise ValueError(f"z must be a finite complex number, got {z!r}")


def _to_array(t: torch.Tensor, backend: str) -> Any:
    if backend == "cupy":
        import cupy

        return cupy.from_dlpack(t.detach().contiguous())
    return t.detach().cpu().numpy()


def _to_tensor(a: Any, like: torch.Tensor) -> torch.Tensor:
    if isinstance(a, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(a)).to(like.device)
    return torch.from_dlpack(a)


def _backend_for(v: torch.Tensor, backend: str) -> str:
    backend = resolve(backend)
    if backend == "cupy" and not v.is_cuda:
        return "reference"  # CPU tensors are computed on the CPU
    if v.is_cuda and backend != "cupy":
        raise ValueError(f"v is on {v.device}; backend {backend!r} computes on the host")
    return backend


class BKCoreFunction(torch.autograd.Function):
    """features = BKCoreFunction.apply(v, b, c, z, causal, backend, chunk) -> (B, N, 2).

    Differentiable in v, b and c (real float32 / float64 tensors); z is a Python complex. float64
    computes in complex128, float32 in complex64.
    """

    @staticmethod
    def forward(ctx: Any, v: torch.Tensor, b: torch.Tensor, c: torch.Tensor, z: complex,
                causal: bool, backend: str, chunk: int | None) -> torch.Tensor:
        _validate(v, b, c, z)
        backend = _backend_for(v, backend)
        xp, scan = _scanner(backend, chunk)
        ctype = _COMPLEX_OF[v.dtype]
        shifted = _to_array(v, backend).astype(ctype) - ctype(z)
        coupling = (_to_array(b, backend) * _to_array(c, backend)).astype(ctype)
        fwd = forward_arrays(xp, scan, shifted, coupling, causal)
        ctx.fwd, ctx.scan, ctx.xp, ctx.backend = fwd, scan, xp, backend
        ctx.save_for_backward(b, c)
        diag = fwd.diag
        return _to_tensor(xp.stack([diag.real, diag.imag], axis=-1), v)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        b, c = ctx.saved_tensors
        xp, fwd = ctx.xp, ctx.fwd
        g = _to_array(grad, ctx.backend)
        w = g[..., 0] - 1j * g[..., 1]
        dv, dp = backward_arrays(xp, ctx.scan, fwd, w.astype(fwd.diag.dtype))
        grad_v = _to_tensor(xp.ascontiguousarray(dv.real), grad) if ctx.needs_input_grad[0] else None
        grad_b = grad_c = None
        if ctx.needs_input_grad[1]:
            grad_b = _to_tensor(xp.ascontiguousarray((_to_array(c, ctx.backend) * dp).real), grad)
        if ctx.needs_input_grad[2]:
            grad_c = _to_tensor(xp.ascontiguousarray((_to_array(b, ctx.backend) * dp).real), grad)
        return grad_v, grad_b, grad_c, None, None, None, None


def bk_core(v: torch.Tensor, b: torch.Tensor | None = None, c: torch.Tensor | None = None, z: complex = 1j,
            *, causal: bool = False, backend: str = "auto", chunk: int | None = None) -> torch.Tensor:
    """[Re G_ii, Im G_ii] of (H - zI)^{-1}, shape (B, N, 2); b, c default to ones (a Laplacian's
    off-diagonals, as in the origin's layer). ``causal`` gives the leading-block variant."""
    if not isinstance(v, torch.Tensor) or v.ndim != 2:
        raise ValueError(f"v must be a (B, N) torch.Tensor, got {getattr(v, 'shape', type(v).__name__)}")
    ones = v.new_ones(v.shape[0], max(v.shape[1] - 1, 0))
    return BKCoreFunction.apply(v, ones if b is None else b, ones if c is None else c, z, causal, backend, chunk)


# --------------------------------------------------------------------------------------------
# The causal variant, one step at a time (a decode worker's recurrent state).


@dataclasses.dataclass(frozen=True)
class CausalState:
    """Everything the causal BK-core carries between positions: alpha of the last position.

    Invariant: ``alpha`` has shape (B,); ``position`` is the number of positions consumed.
    """

    alpha: np.ndarray
    position: int


def causal_init(batch: int, dtype: Any = np.complex128) -> CausalState:
    return CausalState(np.ones(batch, dtype), 0)


def causal_step(state: CausalState, v: np.ndarray, z: complex = 1j, coupling: np.ndarray | float = 1.0) -> tuple[np.ndarray, CausalState]:
    """Consume position i = state.position: (G_last, new state), G_last = 1 / alpha_i, shape (B,).

    ``coupling`` is b_{i-1} c_{i-1} (ignored at i = 0). O(1) work and state per row.
    """
    v = np.asarray(v)
    if v.shape != state.alpha.shape:
        raise ValueError(f"v must have shape {state.alpha.shape}, got {v.shape}")
    shifted = v.astype(state.alpha.dtype) - z
    alpha = shifted if state.position == 0 else shifted - np.asarray(coupling, state.alpha.dtype) / state.alpha
    return 1 / alpha, CausalState(alpha, state.position + 1)


def dense_resolvent_diag(v: torch.Tensor, b: torch.Tensor, c: torch.Tensor, z: complex, *, causal: bool = False) -> torch.Tensor:
    """Ground truth by dense inversion (O(N^3)), complex128, (B, N): G_ii, or for ``causal`` the
    last diagonal entry of the inverse of each leading block. Differentiable by autograd."""
    bsz, n = v.shape
    t = torch.diag_embed(v.to(torch.complex128)) - z * torch.eye(n, dtype=torch.complex128)
    t = t + torch.diag_embed(b.to(torch.complex128), offset=1) + torch.diag_embed(c.to(torch.complex128), offset=-1)
    if not causal:
        return torch.linalg.inv(t).diagonal(dim1=-2, dim2=-1)
    cols = [torch.linalg.inv(t[:, : i + 1, : i + 1])[:, i, i] for i in range(n)]
    return torch.stack(cols, dim=1)
