"""The host-emulation harness itself: signatures, argument checks, CUDA's launch limits, and
the shim's refusal of constructs whose serial emulation would be wrong."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from accel._backend import CUDA_DIR, ENTRY_POINTS
from accel.emulate import CXX_FLAGS, _compiler, emulated_module


def kv_args(pool: np.ndarray, src: np.ndarray, dst: np.ndarray) -> tuple:
    return (pool, pool, src, dst, np.int64(4))  # block-major pool; 4 words per segment


def test_signatures_follow_the_kernel_parameters() -> None:
    assert emulated_module("kv_block").get_function("kv_copy_blocks_w4").signature == "ppppq"
    assert emulated_module("bk_core").get_function("bk_scan_fill_c128").signature == "ppppqqqqii"
    assert emulated_module("precision").get_function("prec_matvec").signature == "ppppppqqqqq"


def test_every_entry_point_is_exported() -> None:
    for module, names in ENTRY_POINTS.items():
        mod = emulated_module(module)
        assert all(mod.get_function(n).name == n for n in names)
    with pytest.raises(ValueError, match="no entry point"):
        emulated_module("kv_block").get_function("kv_copy_blocks_w3")


def test_launch_runs_every_thread_of_every_block() -> None:
    pool = np.arange(3 * 1 * 2 * 4, dtype=np.float32).reshape(3, 1, 2, 4, 1, 1)
    fn = emulated_module("kv_block").get_function("kv_copy_blocks_w4")
    src, dst = np.array([0, 1], np.int64), np.array([2, 0], np.int64)
    want = pool.copy()
    want[[2, 0]] = pool[[0, 1]]
    fn((2, 2, 1), (3, 1, 1), kv_args(pool, src, dst))  # 3 threads striding over 4 words
    np.testing.assert_array_equal(pool, want)


@pytest.mark.parametrize("grid,block", [((0, 1, 1), (32, 1, 1)), ((1, 1, 1), (0, 1, 1)),
                                        ((1, 1, 1), (1025, 1, 1)), ((1, 65536, 1), (32, 1, 1)),
                                        ((1, 1, 1), (1, 1, 65))])
def test_invalid_launch_configurations_are_rejected(grid: tuple, block: tuple) -> None:
    pool = np.zeros((2, 1, 2, 4, 1, 1), np.float32)
    before = pool.copy()
    fn = emulated_module("kv_block").get_function("kv_copy_blocks_w4")
    with pytest.raises(ValueError, match="invalid launch configuration"):
        fn(grid, block, kv_args(pool, np.array([0], np.int64), np.array([1], np.int64)))
    np.testing.assert_array_equal(pool, before)


def test_argument_types_are_checked_against_the_signature() -> None:
    pool = np.zeros((2, 1, 2, 4, 1, 1), np.float32)
    fn = emulated_module("kv_block").get_function("kv_copy_blocks_w4")
    ids = np.array([0], np.int64)
    with pytest.raises(TypeError, match="expected int64"):
        fn((1, 2, 1), (32, 1, 1), (pool, pool, ids, ids, 4))
    with pytest.raises(TypeError, match="C-contiguous ndarray"):
        fn((1, 2, 1), (32, 1, 1), (pool, pool, ids, [1], np.int64(4)))
    with pytest.raises(TypeError, match="takes 5 arguments"):
        fn((1, 2, 1), (32, 1, 1), (pool, pool))


@pytest.mark.parametrize("construct", ["__syncthreads();", "__shared__ float tile[32];"])
def test_shim_refuses_constructs_it_cannot_emulate(tmp_path, construct: str) -> None:
    src = tmp_path / "k.cpp"
    src.write_text('#include "host_shim.h"\n__global__ void k(float* x) { ' + construct + " x[0] = 1; }\n")
    proc = subprocess.run([_compiler(), *CXX_FLAGS, f"-I{CUDA_DIR}", "-fsyntax-only", str(src)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode != 0
    assert "host emulation" in proc.stderr
