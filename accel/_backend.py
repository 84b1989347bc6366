"""Where the kernels come from and which backend runs them.

Backends (the ``backend=`` argument of every public wrapper):

- ``"reference"``: the NumPy / torch reference on the CPU (also the fallback without a GPU);
- ``"cupy"``: the CUDA sources in ``cuda/`` compiled by CuPy ``RawModule`` and launched on a GPU;
- ``"emulate"``: the same CUDA sources compiled with g++ through ``cuda/host_shim.h`` and launched
  on the host (``accel.emulate``), used by the tests to prove the kernels without a GPU;
- ``"auto"``: ``"cupy"`` when :func:`gpu_usable`, else ``"reference"``.

A module object handed to the launch code has ``get_function(name)`` returning a callable
``f(grid, block, args)`` — CuPy's ``RawModule`` and :class:`accel.emulate.EmulatedModule` both do,
so one piece of launch code (grid, block, argument types) serves the GPU and the emulator.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

CUDA_DIR = Path(__file__).resolve().parent.parent / "cuda"

#: Each CUDA source file (without ``.cu``) and the ``extern "C"`` entry points it defines.
ENTRY_POINTS: dict[str, tuple[str, ...]] = {
    "kv_block": tuple(f"kv_copy_blocks_w{w}" for w in (16, 8, 4, 2, 1)),
    "bk_core": tuple(
        f"bk_scan_{stage}_{ct}" for ct in ("c128", "c64") for stage in ("maps", "carry", "fill")
    ),
    "precision": ("prec_quantise", "prec_dequantise", "prec_matvec"),
    "demopack": ("dp_decode", "dp_matvec"),  # spark/codebook.py (seed 003)
}

BACKENDS = ("auto", "reference", "cupy", "emulate")

#: Environment variable that forces the CPU reference even where a GPU is usable.
FORCE_CPU_ENV = "RECA_ACCEL_CPU"


def source_path(module: str) -> Path:
    if module not in ENTRY_POINTS:
        raise ValueError(f"unknown CUDA module {module!r}; known: {sorted(ENTRY_POINTS)}")
    return CUDA_DIR / f"{module}.cu"


@functools.cache
def gpu_usable() -> bool:
    """True when CuPy imports *and* a trivial computation on the device gives the right answer.

    Importing CuPy is not enough: it imports on machines without a driver and fails on first use.
    """
    if os.environ.get(FORCE_CPU_ENV):
        return False
    try:
        import cupy

        probe = cupy.arange(4, dtype=cupy.int64)
        return int(probe.sum()) == 6
    except Exception:  # any failure to initialise the device means "no usable GPU"
        return False


def resolve(backend: str) -> str:
    """The concrete backend for ``backend`` ("auto" resolved); ValueError for an unknown name."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "cupy" if gpu_usable() else "reference"
    if backend == "cupy" and not gpu_usable():
        raise RuntimeError("backend='cupy' requested but no usable GPU (CuPy missing or device failed)")
    return backend


@functools.cache
def cupy_module(module: str) -> Any:
    """The CuPy ``RawModule`` for one CUDA source (compiled by NVRTC on first use, then cached)."""
    import cupy

    return cupy.RawModule(code=source_path(module).read_text(), options=("--std=c++17",))


def kernel_module(module: str, backend: str) -> Any:
    """The module object for a concrete launching backend ("cupy" or "emulate")."""
    if backend == "cupy":
        return cupy_module(module)
    if backend == "emulate":
        from accel.emulate import emulated_module

        return emulated_module(module)
    raise ValueError(f"backend {backend!r} does not launch kernels")


def array_module(backend: str) -> Any:
    """numpy for "reference" and "emulate", cupy for "cupy"."""
    if backend == "cupy":
        import cupy

        return cupy
    import numpy

    return numpy


def grid_1d(n: int, threads: int) -> tuple[int, int, int]:
    return ((n + threads - 1) // threads, 1, 1)
