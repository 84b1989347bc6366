"""seed004 section ``attention`` (S-2): the one attention entry point, fused vs unfused.

Peers, same inputs, interleaved repetitions, forward + backward, causal, float32, B=4, H=4, D=32:

* ``entry`` — :func:`lm.attention.attention` (what every model calls): SDPA on 4-D tensors with
  ``is_causal``, torch's fused CPU kernel here (FlashAttention where it imports, on CUDA);
* ``explicit-mask`` — SDPA given the causal triangle as an explicit boolean mask (the call shape
  the fused-path rule forbids);
* ``reference`` — :func:`lm.attention.reference_attention`, the explicit softmax that
  materialises the ``[B, H, T, T]`` score matrix.

Figures: median ms per peer and length, the reference's time over the entry point's, and the
largest output difference between them.  Full run: T = 256, 1024, 2048; quick: T = 128, 256, 2 reps.
"""

from __future__ import annotations

import statistics
import time

import torch

from bench._common import Result
from lm import attention as attn_mod
from lm.attention import attention, reference_attention

B, H, D = 4, 4, 32


def _time(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def run(quick: bool) -> Result:
    lengths, reps = ((128, 256), 2) if quick else ((256, 1024, 2048), 5)
    res = Result(metrics={})
    for T in lengths:
        g = torch.Generator().manual_seed(T)
        q, k, v = (torch.randn(B, H, T, D, generator=g).requires_grad_() for _ in range(3))
        tri = torch.ones(T, T, dtype=torch.bool).tril()

        def entry() -> None:
            attention(q, k, v, causal=True).sum().backward()

        def explicit() -> None:
            torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=tri).sum().backward()

        def reference() -> None:
            reference_attention(q, k, v, causal=True).sum().backward()

        peers = {"entry": entry, "explicit-mask": explicit, "reference": reference}
        for fn in peers.values():  # warm-up
            fn()
        times: dict[str, list[float]] = {p: [] for p in peers}
        for _ in range(reps):  # interleaved, so load drifts hit every peer alike
            for p, fn in peers.items():
                times[p] += _time(fn, 1)
        with torch.no_grad():
            diff = float((attention(q, k, v, causal=True) - reference_attention(q, k, v, causal=True)).abs().max())
        ms = {p: statistics.median(t) * 1e3 for p, t in times.items()}
        for p in peers:
            res.table.append({"T": T, "peer": p, "fwd_bwd_ms": round(ms[p], 3)})
        res.metrics[f"T{T}_entry_ms"] = ms["entry"]
        res.metrics[f"T{T}_reference_over_entry"] = ms["reference"] / ms["entry"]
        res.metrics[f"T{T}_explicit_mask_over_entry"] = ms["explicit-mask"] / ms["entry"]
        res.metrics[f"T{T}_max_abs_diff"] = diff
        res.targets[f"T{T}_max_abs_diff"] = ("<=", 1e-4)
    top = lengths[-1]
    res.targets[f"T{top}_reference_over_entry"] = (">=", 1.0)
    res.metrics["has_flash"] = float(attn_mod.HAS_FLASH)
    res.notes.append(
        f"backend here: {attn_mod.backend_for(q, k, causal=True)} (FlashAttention "
        f"{'v' + attn_mod.FLASH_VERSION if attn_mod.FLASH_VERSION else 'not installed'}); forward + backward, "
        f"causal, float32, B={B} H={H} D={D}, median of {reps} interleaved reps, 1 thread"
    )
    return res
