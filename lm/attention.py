"""The one attention entry point of reca's models (seed 004, S-2).

:func:`attention` computes ``softmax(q k^T * scale + mask) v`` for 4-D ``[B, H, T, D]`` tensors.
Every model and benchmark in the project calls it (lm/model.py, lm/longmodel.py, bklm/model.py,
spark/compare.py, bench/bk_core.py); the streamed decode of :mod:`lm.kvpolicy` folds chunks with
its own online softmax (a single query over tier chunks, not a dense call).

Backends, chosen per call by :func:`backend_for` and never changing a result's meaning:

* ``flash`` — FlashAttention (``flash_attn_interface`` = FlashAttention-3 on Hopper, else
  ``flash_attn`` 2.x), used only when it imports (:data:`HAS_FLASH`), the tensors are on a CUDA
  device in fp16/bf16, there is no explicit mask, the head dim is at most 256 and a causal call
  is square;
* ``sdpa`` — :func:`torch.nn.functional.scaled_dot_product_attention` called on the 4-D tensors
  with ``is_causal`` (not an explicit triangular mask), so torch dispatches to its fused kernel
  (the flash-style CPU kernel here; flash / memory-efficient kernels on CUDA).  An explicit
  ``mask`` (key padding, per-sequence decode positions) is passed as a boolean ``attn_mask``,
  which the fused CPU kernel also takes.

:func:`reference_attention` is the explicit softmax (the score matrix materialised): the tests'
and the benchmark's reference.  Shapes are checked before any work: a bad call raises
:class:`AttentionShapeError` (an :class:`lm.errors.LMError` and a ``ValueError``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lm.errors import LMError

try:  # FlashAttention-3 (Hopper) first, then FlashAttention-2; absent on CPU-only installs
    from flash_attn_interface import flash_attn_func as _flash_func  # type: ignore[import-not-found]

    FLASH_VERSION: str | None = "3"
except ImportError:
    try:
        from flash_attn import flash_attn_func as _flash_func  # type: ignore[import-not-found,no-redef]

        FLASH_VERSION = "2"
    except ImportError:
        _flash_func = None
        FLASH_VERSION = None

#: True when a FlashAttention kernel imported (the origin's ``_HAS_FLASH3``); even then it runs
#: only for the calls :func:`backend_for` sends to it.
HAS_FLASH: bool = _flash_func is not None
#: Largest head dim the FlashAttention kernels take.
FLASH_MAX_HEAD_DIM = 256
BACKENDS = ("flash", "sdpa")


class AttentionShapeError(LMError, ValueError):
    """Query, key, value or mask tensors of shapes or dtypes that do not fit together."""


def check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> None:
    """Raise :class:`AttentionShapeError` unless ``q`` ``[B, H, T, D]``, ``k`` ``[B, H, S, D]``,
    ``v`` ``[B, H, S, Dv]``, ``mask`` (boolean) and ``bias`` (floating point, ``q``'s dtype), each
    broadcastable to ``[B, H, T, S]``, fit."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise AttentionShapeError(f"{name} must be a 4-D tensor [B, H, T, D], got {got}")
        if not t.is_floating_point():
            raise AttentionShapeError(f"{name} must be floating point, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise AttentionShapeError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3]:
        raise AttentionShapeError(
            f"batch/head/length mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise AttentionShapeError(f"q and k head dims differ: {q.shape[-1]} vs {k.shape[-1]}")
    if k.shape[2] == 0:
        raise AttentionShapeError("no keys to attend to")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool):
        raise AttentionShapeError("mask must be a boolean tensor (True = attend)")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.dtype != q.dtype):
        got = bias.dtype if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise AttentionShapeError(f"bias must be a floating-point tensor of q's dtype {q.dtype}, got {got}")
    want = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    for name, t in (("mask", mask), ("bias", bias)):
        if t is None:
            continue
        if t.dim() != 4:
            raise AttentionShapeError(f"{name} must be 4-D, broadcastable to [B, H, T, S], got {tuple(t.shape)}")
        for got_n, need in zip(t.shape, want):
            if got_n not in (1, need):
                raise AttentionShapeError(f"{name} {tuple(t.shape)} does not broadcast to {want}")


def backend_for(
    q: torch.Tensor,
    k: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    causal: bool = False,
    use_flash: bool = True,
    bias: torch.Tensor | None = None,
) -> str:
    """The backend :func:`attention` uses for these inputs: ``flash`` or ``sdpa``.  A causal call
    with ``T != S`` stays on SDPA: FlashAttention aligns its causal mask bottom-right, torch
    top-left, and the meaning of ``causal`` must not depend on the backend.  A ``bias`` stays on
    SDPA too (FlashAttention takes no additive bias)."""
    if (
        use_flash
        and HAS_FLASH
        and mask is None
        and bias is None
        and (not causal or q.shape[2] == k.shape[2])
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[-1] <= FLASH_MAX_HEAD_DIM
    ):
        return "flash"
    return "sdpa"


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    use_flash: bool = True,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``softmax(q k^T * scale + bias) v`` ``[B, H, T, Dv]`` of ``q`` ``[B, H, T, D]``, ``k``
    ``[B, H, S, D]``, ``v`` ``[B, H, S, Dv]``.

    ``causal``: query ``t`` sees keys ``0..t`` (top-left aligned, as torch's ``is_causal``; use
    it for a dense pass with ``T == S``).  ``mask``: boolean, True = attend, broadcastable to
    ``[B, H, T, S]`` (key padding, per-sequence decode positions); with ``causal`` both apply.
    A query row whose mask admits no key gives NaN, as softmax over nothing does.  ``scale``:
    default ``1 / sqrt(D)``.  ``use_flash=False`` keeps a call off FlashAttention.  ``bias``:
    floating point (``q``'s dtype), broadcastable to ``[B, H, T, S]``, added to the scaled logits
    (a position bias, ALiBi-style or procedural); with ``causal`` / ``mask`` the positions they
    hide become ``-inf`` in it, and SDPA takes the one float mask.
    """
    check_inputs(q, k, v, mask, bias)
    if causal and (mask is not None or bias is not None):  # one mask; the fused kernel takes it
        T, S = q.shape[2], k.shape[2]
        tril = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()[None, None]
        mask = tril if mask is None else mask & tril
        causal = False
    if bias is not None:
        mask = bias if mask is None else torch.where(mask, bias, torch.tensor(float("-inf"), dtype=bias.dtype))
    if backend_for(q, k, mask, causal=causal, use_flash=use_flash, bias=bias) == "flash":
        # flash_attn_func takes [B, T, H, D]
        out = _flash_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale, causal=causal)
        out = out[0] if isinstance(out, tuple) else out
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The explicit softmax (the ``[B, H, T, S]`` score matrix materialised): the reference the
    fused path is tested and benchmarked against.  Same contract as :func:`attention`."""
    check_inputs(q, k, v, mask, bias)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    if bias is not None:
        scores = scores + bias
    if causal:
        T, S = q.shape[2], k.shape[2]
        scores = scores.masked_fill(~torch.ones(T, S, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v
