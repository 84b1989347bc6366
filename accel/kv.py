"""Paged KV-cache block moves: copy within a pool, gather / scatter, swap between device and host.

Pool layout, block-major (see ``cuda/kv_block.cu`` and docs/gpu.md)::

    pool[num_blocks, num_layers, 2, block_size, num_heads, head_dim]     # axis 2: 0 = K, 1 = V

C-contiguous, any dtype; numpy arrays on the host, CuPy arrays on a GPU. A block's K and V of
every layer are one contiguous run of bytes, so moving a block is one memmove (one run of
consecutive blocks, one memmove) instead of ``2 * num_layers`` strided segments: the layer-major
layout (``[num_layers, 2, num_blocks, ...]``) it replaced copied at 0.55x memcpy, block-major
measured 1.15x in the same run (``python -m bench kv_copy``).  Every move is one mapping of
(source block, destination block) pairs applied to all layers and both K and V at once.
All validation happens before anything is written or launched: wrong rank / shapes / dtypes,
non-integer or out-of-range block ids, a duplicate destination, and (within one pool) a block
that is both a source and a destination raise ``ValueError``.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from accel._backend import array_module, kernel_module, resolve

#: Threads per CUDA block for kv_copy_blocks (they stride over one segment's words).
COPY_THREADS = 256
#: Small-block CPU path: bytes of blocks per numpy fancy-index call at most, so the gathered
#: temporary stays in cache.
REFERENCE_CHUNK_BYTES = 1 << 20
#: Blocks this large are moved with one memmove per run of consecutive pairs.
MEMMOVE_MIN_BYTES = 4096


def _is_cupy(a: Any) -> bool:
    return type(a).__module__.startswith("cupy")


def pool_geometry(pool: Any, what: str = "pool") -> tuple[int, int, int]:
    """(num_layers, num_blocks, elements per block segment) of a valid pool; else ValueError.
    A segment is one layer's K (or V) of one block; a block is ``2 * num_layers`` segments."""
    if not isinstance(pool, np.ndarray) and not _is_cupy(pool):
        raise ValueError(f"{what} must be a numpy or cupy array, got {type(pool).__name__}")
    if pool.ndim != 6 or pool.shape[2] != 2:
        raise ValueError(f"{what} must have shape (num_blocks, num_layers, 2, block_size, num_heads, head_dim), "
                         f"got {pool.shape}")
    if not pool.flags.c_contiguous:
        raise ValueError(f"{what} must be C-contiguous")
    blocks, layers, _, bs, heads, dim = pool.shape
    if 2 * layers > 65535:
        raise ValueError(f"{what}: at most 32767 layers (grid.y = 2 * num_layers), got {layers}")
    return layers, blocks, bs * heads * dim


def _block_ids(ids: Any, num_blocks: int, what: str) -> np.ndarray:
    arr = np.asarray(ids.get() if _is_cupy(ids) else ids)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be one-dimensional, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{what} must hold integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and (arr.min() < 0 or arr.max() >= num_blocks):
        bad = arr[(arr < 0) | (arr >= num_blocks)][0]
        raise ValueError(f"{what}: block id {bad} out of range [0, {num_blocks})")
    return arr


def validate_mapping(src_pool: Any, dst_pool: Any, src_ids: Any, dst_ids: Any) -> tuple[np.ndarray, np.ndarray]:
    """Check a (src, dst) block mapping between two pools (or within one); return int64 ids."""
    s_layers, s_blocks, s_elems = pool_geometry(src_pool, "source pool")
    d_layers, d_blocks, d_elems = pool_geometry(dst_pool, "destination pool")
    if src_pool.dtype != dst_pool.dtype:
        raise ValueError(f"pool dtypes differ: {src_pool.dtype} vs {dst_pool.dtype}")
    if src_pool.shape[1:] != dst_pool.shape[1:]:
        raise ValueError(f"pool shapes differ beyond num_blocks: {src_pool.shape} vs {dst_pool.shape}")
    src = _block_ids(src_ids, s_blocks, "src_ids")
    dst = _block_ids(dst_ids, d_blocks, "dst_ids")
    if src.shape != dst.shape:
        raise ValueError(f"src_ids and dst_ids differ in length: {src.size} vs {dst.size}")
    if np.unique(dst).size != dst.size:
        raise ValueError("dst_ids has a duplicate block: two sources would write one block")
    if _same_pool(src_pool, dst_pool):
        both = np.intersect1d(src, dst)
        if both.size:
            raise ValueError(f"block {both[0]} is both a source and a destination (overlapping mapping)")
    elif _may_overlap(src_pool, dst_pool):
        raise ValueError("source and destination pools are different views of overlapping memory")
    return src, dst


def _data_ptr(a: Any) -> int:
    return a.data.ptr if _is_cupy(a) else a.ctypes.data


def _same_pool(a: Any, b: Any) -> bool:
    return a is b or (type(a) is type(b) and _data_ptr(a) == _data_ptr(b) and a.shape == b.shape)


def _may_overlap(a: Any, b: Any) -> bool:
    if _is_cupy(a) != _is_cupy(b):
        return False
    lo_a, lo_b = _data_ptr(a), _data_ptr(b)
    return lo_a < lo_b + b.nbytes and lo_b < lo_a + a.nbytes


def copy_between_reference(src_pool: np.ndarray, dst_pool: np.ndarray, src: np.ndarray, dst: np.ndarray) -> None:
    """The CPU path for validated ids: ``dst[dst] = src[src]`` (block-major: a block is contiguous).

    Blocks of at least :data:`MEMMOVE_MIN_BYTES` are moved by one ``memmove`` per run of
    consecutive pairs (src and dst both ascending by one): no temporary, memcpy speed. Smaller
    blocks go through numpy fancy indexing in cache-sized chunks, where one call per block would
    cost more than the bytes it moves.
    """
    layers, _, elems = pool_geometry(src_pool)
    block_bytes = 2 * layers * elems * src_pool.itemsize
    if src.size == 0 or block_bytes == 0:
        return
    if block_bytes >= MEMMOVE_MIN_BYTES:
        breaks = np.flatnonzero((np.diff(src) != 1) | (np.diff(dst) != 1)) + 1
        starts = np.concatenate([[0], breaks])
        lengths = np.diff(np.concatenate([starts, [src.size]])) * block_bytes
        s_addr = src_pool.ctypes.data + src[starts] * block_bytes
        d_addr = dst_pool.ctypes.data + dst[starts] * block_bytes
        move = ctypes.memmove
        for s_at, d_at, nbytes in zip(s_addr.tolist(), d_addr.tolist(), lengths.tolist()):
            move(d_at, s_at, nbytes)
        return
    s2 = src_pool.reshape(src_pool.shape[0], -1)
    d2 = dst_pool.reshape(dst_pool.shape[0], -1)
    step = max(1, REFERENCE_CHUNK_BYTES // block_bytes)
    for lo in range(0, src.size, step):
        d2[dst[lo : lo + step]] = s2[src[lo : lo + step]]


def _word_bytes(*arrays: Any, segment_bytes: int) -> int:
    for word in (16, 8, 4, 2, 1):
        if segment_bytes % word == 0 and all(_data_ptr(a) % word == 0 for a in arrays):
            return word
    raise AssertionError("unreachable: 1 divides everything")


def launch_copy_blocks(module: Any, xp: Any, src_pool: Any, dst_pool: Any, src: np.ndarray, dst: np.ndarray) -> None:
    """Launch kv_copy_blocks for validated ids: grid (pairs, 2*layers), block (<=256 threads);
    CUDA block (p, s) copies segment s of pair p (block-major: segment s of block j starts at
    word ``(j * 2 * layers + s) * words``)."""
    if src.size == 0:
        return  # CUDA rejects an empty grid; nothing to copy
    layers, _, elems = pool_geometry(src_pool)
    segment_bytes = elems * src_pool.itemsize
    if segment_bytes == 0:
        return
    word = _word_bytes(src_pool, dst_pool, segment_bytes=segment_bytes)
    words = segment_bytes // word
    threads = min(COPY_THREADS, -(-words // 32) * 32)
    kernel = module.get_function(f"kv_copy_blocks_w{word}")
    kernel(
        (int(src.size), 2 * layers, 1),
        (threads, 1, 1),
        (src_pool, dst_pool, xp.asarray(src), xp.asarray(dst), np.int64(words)),
    )


def copy_between(src_pool: Any, dst_pool: Any, src_ids: Any, dst_ids: Any, *, backend: str = "auto") -> None:
    """``dst_pool[dst_ids[p]] = src_pool[src_ids[p]]`` for every pair p (all layers, K and V).

    Both pools live where the backend computes (numpy for "reference"/"emulate", CuPy for "cupy").
    ``src_pool`` may be ``dst_pool`` (a copy within one pool, e.g. copy-on-write of a forked
    sequence); then no block may be both a source and a destination.
    """
    src, dst = validate_mapping(src_pool, dst_pool, src_ids, dst_ids)
    on_device = _is_cupy(src_pool), _is_cupy(dst_pool)
    if on_device[0] != on_device[1]:
        raise ValueError("one pool is on the device and one on the host: use swap_out / swap_in")
    backend = "cupy" if on_device[0] else resolve(backend)
    if backend == "cupy" and not on_device[0]:
        backend = "reference"  # host pools are copied on the host even where a GPU exists
    if backend == "reference":
        copy_between_reference(src_pool, dst_pool, src, dst)
    else:
        launch_copy_blocks(kernel_module("kv_block", backend), array_module(backend), src_pool, dst_pool, src, dst)


def copy_blocks(pool: Any, src_ids: Any, dst_ids: Any, *, backend: str = "auto") -> None:
    """Copy blocks within one pool by the mapping src_ids[p] -> dst_ids[p] (one launch)."""
    copy_between(pool, pool, src_ids, dst_ids, backend=backend)


def gather_blocks(pool: Any, ids: Any, *, backend: str = "auto") -> Any:
    """A new packed pool (len(ids), num_layers, 2, ...) holding the blocks ``ids`` in order."""
    pool_geometry(pool)
    n = len(ids)
    xp = array_module("cupy") if _is_cupy(pool) else np
    packed = xp.empty((n, *pool.shape[1:]), dtype=pool.dtype)
    copy_between(pool, packed, ids, np.arange(n), backend=backend)
    return packed


def scatter_blocks(packed: Any, pool: Any, ids: Any, *, backend: str = "auto") -> None:
    """Write packed block p into pool block ids[p] for every p."""
    pool_geometry(packed, "packed blocks")
    copy_between(packed, pool, np.arange(packed.shape[0]), ids, backend=backend)


def swap_out(device_pool: Any, host_pool: np.ndarray, device_ids: Any, host_ids: Any, *, backend: str = "auto") -> None:
    """Move device blocks to host blocks: gather on the device, one transfer, scatter on the host.

    Without a GPU both pools are numpy arrays and this is a copy between them.
    """
    validate_mapping(device_pool, host_pool, device_ids, host_ids)
    if _is_cupy(device_pool):
        staging = gather_blocks(device_pool, device_ids, backend=backend).get()
        scatter_blocks(staging, host_pool, host_ids, backend="reference")
    else:
        copy_between(device_pool, host_pool, device_ids, host_ids, backend=backend)


def swap_in(host_pool: np.ndarray, device_pool: Any, host_ids: Any, device_ids: Any, *, backend: str = "auto") -> None:
    """Move host blocks to device blocks: gather on the host, one transfer, scatter on the device."""
    validate_mapping(host_pool, device_pool, host_ids, device_ids)
    if _is_cupy(device_pool):
        import cupy

        staging = cupy.asarray(gather_blocks(host_pool, host_ids, backend="reference"))
        scatter_blocks(staging, device_pool, device_ids, backend=backend)
    else:
        copy_between(host_pool, device_pool, host_ids, device_ids, backend=backend)
