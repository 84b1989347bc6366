"""KV block moves on block-major pools ``[num_blocks, num_layers, 2, ...]``: emulated kernel == NumPy
reference == plain numpy ground truth; bad input."""

from __future__ import annotations

import numpy as np
import pytest

from accel import kv

BACKENDS = ("reference", "emulate")


def make_pool(shape: tuple[int, ...], dtype: type, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, 200, shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def expected_copy(src_pool: np.ndarray, dst_pool: np.ndarray, src: list[int], dst: list[int]) -> np.ndarray:
    out = dst_pool.copy()
    for s, d in zip(src, dst):  # ground truth, one block at a time
        out[d] = src_pool[s]
    return out


# (pool shape, dtype): word sizes 16, 8, 4, 2, 1 and odd segment sizes
SHAPES = [
    ((8, 2, 2, 4, 2, 8), np.float16),  # 128 B segments: 16-byte words
    ((6, 3, 2, 1, 1, 2), np.float32),  # 8 B: 8-byte words
    ((5, 1, 2, 3, 1, 1), np.float32),  # 12 B: 4-byte words
    ((4, 2, 2, 1, 3, 1), np.float16),  # 6 B: 2-byte words
    ((7, 1, 2, 3, 1, 1), np.uint8),  # 3 B: 1-byte words
    ((1, 1, 2, 2, 2, 2), np.float64),  # a single block
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,dtype", SHAPES)
def test_copy_within_pool(backend: str, shape: tuple, dtype: type) -> None:
    pool = make_pool(shape, dtype)
    nb = shape[0]
    if nb == 1:
        src, dst = [], []
    else:
        src = list(range(0, nb // 2))
        dst = list(range(nb - 1, nb - 1 - len(src), -1))
    want = expected_copy(pool, pool, src, dst)
    kv.copy_blocks(pool, src, dst, backend=backend)
    np.testing.assert_array_equal(pool, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_source_to_many_destinations(backend: str) -> None:
    pool = make_pool((6, 2, 2, 2, 2, 4), np.float32)
    want = expected_copy(pool, pool, [1, 1, 1], [0, 3, 5])
    kv.copy_blocks(pool, np.array([1, 1, 1], np.int32), np.array([0, 3, 5], np.uint16), backend=backend)
    np.testing.assert_array_equal(pool, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_mapping_changes_nothing(backend: str) -> None:
    pool = make_pool((4, 2, 2, 2, 2, 2), np.float32)
    before = pool.copy()
    kv.copy_blocks(pool, [], [], backend=backend)
    np.testing.assert_array_equal(pool, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_then_scatter_round_trip(backend: str) -> None:
    pool = make_pool((9, 3, 2, 4, 2, 3), np.float16, seed=1)
    ids = [7, 2, 5]
    packed = kv.gather_blocks(pool, ids, backend=backend)
    np.testing.assert_array_equal(packed, pool[ids])
    target = np.zeros_like(pool)
    kv.scatter_blocks(packed, target, [0, 8, 4], backend=backend)
    np.testing.assert_array_equal(target[[0, 8, 4]], pool[ids])
    untouched = [i for i in range(9) if i not in (0, 8, 4)]
    assert not target[untouched].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_swap_out_and_in_between_pools_of_different_sizes(backend: str) -> None:
    device = make_pool((5, 2, 2, 2, 1, 4), np.float32, seed=2)
    host = make_pool((11, 2, 2, 2, 1, 4), np.float32, seed=3)
    want_host = expected_copy(device, host, [4, 0], [10, 3])
    kv.swap_out(device, host, [4, 0], [10, 3], backend=backend)
    np.testing.assert_array_equal(host, want_host)
    device[:] = 0
    kv.swap_in(host, device, [10, 3], [1, 2], backend=backend)
    np.testing.assert_array_equal(device[[1, 2]], want_host[[10, 3]])


@pytest.mark.parametrize("memmove_min,chunk", [(1, 1 << 20), (1 << 30, 100), (1 << 30, 1 << 20)])
@pytest.mark.parametrize("src,dst", [([0, 1, 2, 3], [9, 8, 7, 6]), ([0, 1, 2, 5, 6], [7, 8, 9, 3, 4]), ([4], [4 + 1])])
def test_both_cpu_paths_with_runs_and_chunks(monkeypatch: pytest.MonkeyPatch, memmove_min: int, chunk: int,
                                             src: list[int], dst: list[int]) -> None:
    """memmove per run of consecutive blocks, and fancy indexing in chunks (100 B: one pair a call)."""
    monkeypatch.setattr(kv, "MEMMOVE_MIN_BYTES", memmove_min)
    monkeypatch.setattr(kv, "REFERENCE_CHUNK_BYTES", chunk)
    for pools in ("one", "two"):
        a = make_pool((10, 2, 2, 2, 2, 2), np.float32, seed=4)
        b = a if pools == "one" else make_pool((10, 2, 2, 2, 2, 2), np.float32, seed=5)
        want = expected_copy(a, b, src, dst)
        kv.copy_between(a, b, src, dst, backend="reference")
        np.testing.assert_array_equal(b, want)


# ------------------------------------------------------------------ bad input, before any write

POOL_SHAPE = (4, 2, 2, 2, 2, 2)


@pytest.mark.parametrize(
    "src,dst,message",
    [
        ([0, 1], [2], "differ in length"),
        ([0], [4], "out of range"),
        ([-1], [2], "out of range"),
        ([0, 1], [2, 2], "duplicate"),
        ([0, 1], [1, 2], "both a source and a destination"),
        ([2], [2], "both a source and a destination"),
        ([0.0], [1.0], "integers"),
        ([[0]], [[1]], "one-dimensional"),
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_mappings_raise_before_writing(backend: str, src: list, dst: list, message: str) -> None:
    pool = make_pool(POOL_SHAPE, np.float32)
    before = pool.copy()
    with pytest.raises(ValueError, match=message):
        kv.copy_blocks(pool, src, dst, backend=backend)
    np.testing.assert_array_equal(pool, before)


def test_bad_pools_raise() -> None:
    pool = make_pool(POOL_SHAPE, np.float32)
    with pytest.raises(ValueError, match="shape"):
        kv.copy_blocks(pool[0], [0], [1])
    with pytest.raises(ValueError, match="shape"):
        kv.copy_blocks(np.zeros((2, 3, 4, 2, 2, 2), np.float32), [0], [1])
    with pytest.raises(ValueError, match="contiguous"):
        kv.copy_blocks(np.zeros((4, 2, 2, 2, 2, 4), np.float32)[..., ::2], [0], [1])
    with pytest.raises(ValueError, match="numpy or cupy"):
        kv.copy_blocks(pool.tolist(), [0], [1])
    with pytest.raises(ValueError, match="dtypes differ"):
        kv.copy_between(pool, pool.astype(np.float16), [0], [1])
    with pytest.raises(ValueError, match="shapes differ"):
        kv.copy_between(pool, np.zeros((4, 2, 2, 2, 2, 3), np.float32), [0], [1])
    flat = np.zeros(pool.size + 8, np.float32)
    a, b = flat[: pool.size].reshape(POOL_SHAPE), flat[8:].reshape(POOL_SHAPE)
    with pytest.raises(ValueError, match="overlapping memory"):
        kv.copy_between(a, b, [0], [1])


def test_unknown_backend_raises() -> None:
    with pytest.raises(ValueError, match="backend must be one of"):
        kv.copy_blocks(make_pool(POOL_SHAPE, np.float32), [0], [1], backend="tpu")
