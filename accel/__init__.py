"""reca's GPU core: wrappers over the CUDA kernels in ``cuda/`` with NumPy / torch references.

- :mod:`accel.kv` — paged KV-cache block copy / gather / scatter / swap;
- :mod:`accel.bk_core` — BK-core resolvent diagonal (exact O(N) backward, causal variant);
- :mod:`accel.precision` — per-block precision masks and the masked mixed-precision matvec;
- :mod:`accel.emulate` — the host-emulation harness (the CUDA sources compiled by g++).

Every wrapper takes ``backend=`` ("auto", "reference", "cupy", "emulate"); "auto" uses CuPy when
a GPU is usable (:func:`gpu_usable`) and the CPU reference otherwise. The Python package is not
named ``cuda`` on purpose: that would shadow NVIDIA's ``cuda`` namespace package CuPy imports.
"""

from accel._backend import BACKENDS, gpu_usable, resolve
from accel.bk_core import BKCoreFunction, CausalState, bk_core, causal_init, causal_step
from accel.kv import copy_between, copy_blocks, gather_blocks, scatter_blocks, swap_in, swap_out
from accel.precision import PRECISIONS, QuantisedMatrix, dequantise, masked_matvec, quantise

__all__ = [
    "BACKENDS",
    "BKCoreFunction",
    "CausalState",
    "PRECISIONS",
    "QuantisedMatrix",
    "bk_core",
    "causal_init",
    "causal_step",
    "copy_between",
    "copy_blocks",
    "dequantise",
    "gather_blocks",
    "gpu_usable",
    "masked_matvec",
    "quantise",
    "resolve",
    "scatter_blocks",
    "swap_in",
    "swap_out",
]
