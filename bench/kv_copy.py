"""KV block copy bandwidth of the CPU path against a plain contiguous memcpy of the same bytes.

A decode-worker-sized fp16 pool in the shipped block-major layout (num_blocks, num_layers, 2,
block_size=16, heads=8, head_dim=64: 16 KiB per segment, 2 * num_layers segments contiguous per
block); a random mapping of disjoint source and destination blocks, copied within the pool by
``accel.kv.copy_blocks`` (backend "reference", the CPU path: one memmove per block); the peer is
``np.copyto`` of one contiguous buffer of the same byte count. Both are warmed up, then timed
alternately; figures are medians. Also reported: the numpy fancy-index path (used for small
blocks), the same bytes moved contiguously in segment-sized memmoves, and the layer-major layout
the engine used before (num_layers, 2, num_blocks, ...: one memmove per segment).
"""

from __future__ import annotations

import ctypes
import time

import numpy as np

from accel import kv
from bench._common import Result


#: headline metric -> the strongest peer it is measured against (the report's headline table)
HEADLINE = {"block_copy_vs_memcpy_cpu": "np.copyto of one contiguous buffer (memcpy)",
            "block_major_over_layer_major_cpu": "the layer-major layout it replaced"}
def _median_time(fn, reps: int) -> tuple[float, float]:
    """(median wall seconds, median CPU seconds of this thread).  On a machine with more runnable
    work than cores, wall time also counts the time the copy spent descheduled; the thread's CPU
    time counts only the copy."""
    fn()  # warm-up: page faults and caches
    wall, cpu = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.thread_time()
        fn()
        cpu.append(time.thread_time() - c0)
        wall.append(time.perf_counter() - t0)
    return float(np.median(wall)), float(np.median(cpu))


def run(quick: bool) -> Result:
    layers, num_blocks, pairs = (4, 256, 64) if quick else (8, 1024, 256)
    block_size, heads, head_dim = 16, 8, 64
    reps = 3 if quick else 11
    rounds = 1 if quick else 3
    rng = np.random.default_rng(0)
    pool = rng.standard_normal((num_blocks, layers, 2, block_size, heads, head_dim)).astype(np.float16)
    perm = rng.permutation(num_blocks)
    src, dst = perm[:pairs], perm[pairs : 2 * pairs]
    nbytes = pairs * 2 * layers * block_size * heads * head_dim * pool.itemsize
    a = np.empty(nbytes, np.uint8)
    b = np.ones(nbytes, np.uint8)

    seg_bytes = block_size * heads * head_dim * pool.itemsize
    pieces = [(a.ctypes.data + o, b.ctypes.data + o) for o in range(0, nbytes, seg_bytes)]

    def memcpy_in_pieces() -> None:  # same bytes, segment-sized, but contiguous and in order
        for dst_at, src_at in pieces:
            ctypes.memmove(dst_at, src_at, seg_bytes)

    # the layout the engine used before: layer-major (layers, 2, blocks, ...), 2 * layers
    # scattered segments per block, one memmove each
    layer_major = np.ascontiguousarray(np.moveaxis(pool.reshape(num_blocks, 2 * layers, -1), 0, 1))
    segs = np.arange(2 * layers, dtype=np.int64)[:, None]
    lm_src = (layer_major.ctypes.data + (segs * num_blocks + src[None, :]) * seg_bytes).ravel().tolist()
    lm_dst = (layer_major.ctypes.data + (segs * num_blocks + dst[None, :]) * seg_bytes).ravel().tolist()

    def copy_layer_major() -> None:
        for s_at, d_at in zip(lm_src, lm_dst):
            ctypes.memmove(d_at, s_at, seg_bytes)

    t_memcpy, t_copy, t_fancy, t_pieces, t_layer = [], [], [], [], []
    for _ in range(rounds):  # interleave the peers so background load hits all alike
        t_layer.append(_median_time(copy_layer_major, reps))
        t_memcpy.append(_median_time(lambda: np.copyto(a, b), reps))
        t_pieces.append(_median_time(memcpy_in_pieces, reps))
        t_copy.append(_median_time(lambda: kv.copy_blocks(pool, src, dst, backend="reference"), reps))
        saved = kv.MEMMOVE_MIN_BYTES
        kv.MEMMOVE_MIN_BYTES = 1 << 62
        try:
            t_fancy.append(_median_time(lambda: kv.copy_blocks(pool, src, dst, backend="reference"), reps))
        finally:
            kv.MEMMOVE_MIN_BYTES = saved
    med = lambda ts, i: float(np.median([t[i] for t in ts]))  # noqa: E731
    memcpy_s, copy_s, fancy_s, pieces_s, layer_s = (med(t, 0) for t in (t_memcpy, t_copy, t_fancy, t_pieces, t_layer))
    memcpy_c, copy_c, fancy_c, pieces_c, layer_c = (med(t, 1) for t in (t_memcpy, t_copy, t_fancy, t_pieces, t_layer))
    gbps = lambda s: nbytes / s / 1e9  # noqa: E731
    table = [
        {"path": name, "MB": nbytes / 1e6, "wall ms": w * 1e3, "GB/s (wall)": gbps(w), "cpu ms": c * 1e3,
         "GB/s (cpu)": gbps(c), "vs memcpy (cpu)": memcpy_c / c}
        for name, w, c in (("np.copyto contiguous (peer)", memcpy_s, memcpy_c),
                           ("copy_blocks cpu, block-major (shipped: one memmove per block)", copy_s, copy_c),
                           ("copy_blocks cpu (fancy index)", fancy_s, fancy_c),
                           ("memmove contiguous, segment-sized pieces", pieces_s, pieces_c),
                           ("layer-major pool, one memmove per segment (the layout before)", layer_s, layer_c))
    ]
    return Result(
        metrics={
            "memcpy_GBps": gbps(memcpy_s),
            "block_copy_GBps": gbps(copy_s),
            "block_copy_vs_memcpy_wall": memcpy_s / copy_s,
            "block_copy_vs_memcpy_cpu": memcpy_c / copy_c,
            "fancy_index_vs_memcpy_cpu": memcpy_c / fancy_c,
            "contiguous_pieces_vs_memcpy_cpu": memcpy_c / pieces_c,
            "layer_major_layout_vs_memcpy_cpu": memcpy_c / layer_c,
            "block_major_over_layer_major_cpu": layer_c / copy_c,
        },
        targets={"block_copy_vs_memcpy_cpu": (">=", 0.8), "block_copy_vs_memcpy_wall": (">=", 0.8)},
        table=table,
        notes=[
            f"pool {pool.shape} fp16 = {pool.nbytes / 1e6:.0f} MB (block-major); {pairs} random pairs x "
            f"{2 * layers * seg_bytes // 1024} KiB per block ({2 * layers} segments of {seg_bytes // 1024} KiB)",
            "layer-major row: the same copies on the layout the engine, kernels and tests used before this change "
            "(one memmove per 16 KiB segment at scattered addresses)",
            "the GPU kernel (cuda/kv_block.cu) is not timed here: no GPU on this machine",
            f"wall: perf_counter; cpu: this thread's CPU time (time.thread_time); medians of {reps} timings in each of "
            f"{rounds} interleaved round(s)",
        ],
    )
