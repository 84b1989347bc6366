"""On a GPU: the CuPy kernels give the reference's results. Skipped where no GPU is usable
(CuPy missing, or a trivial device computation fails)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from accel import bk_core, dequantise, gpu_usable, kv, masked_matvec, quantise
from accel.precision import num_blocks

pytestmark = pytest.mark.skipif(not gpu_usable(), reason="no usable GPU (CuPy absent or device unusable)")


@pytest.fixture(scope="module")
def cp():
    import cupy

    return cupy


def test_kv_copy_gather_scatter_swap_on_device(cp) -> None:
    rng = np.random.default_rng(0)
    host = rng.standard_normal((32, 4, 2, 16, 4, 64)).astype(np.float16)
    want = host.copy()
    src, dst = np.arange(0, 10), np.arange(31, 21, -1)
    kv.copy_blocks(want, src, dst, backend="reference")
    dev = cp.asarray(host)
    kv.copy_blocks(dev, src, dst, backend="cupy")
    np.testing.assert_array_equal(dev.get(), want)
    back = np.zeros((8, 4, 2, 16, 4, 64), np.float16)
    kv.swap_out(dev, back, [3, 30, 7], [0, 5, 7], backend="cupy")
    np.testing.assert_array_equal(back[[0, 5, 7]], want[[3, 30, 7]])
    dev2 = cp.zeros_like(dev)
    kv.swap_in(back, dev2, [0, 5, 7], [1, 2, 3], backend="cupy")
    np.testing.assert_array_equal(dev2.get()[[1, 2, 3]], want[[3, 30, 7]])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
def test_bk_core_forward_backward_on_device(causal: bool, dtype: torch.dtype) -> None:
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA build here; CuPy alone cannot hand tensors to BKCoreFunction")
    gen = torch.Generator().manual_seed(0)
    v = torch.rand(4, 1000, dtype=dtype, generator=gen) * 6 - 3
    grads = {}
    for device in ("cpu", "cuda"):
        x = v.to(device).requires_grad_()
        out = bk_core(x, causal=causal)
        out.sum().backward()
        grads[device] = (out.detach().cpu(), x.grad.cpu())
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for a, b in zip(grads["cpu"], grads["cuda"]):
        torch.testing.assert_close(b, a, rtol=tol, atol=tol)


def test_precision_kernels_on_device(cp) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 300)).astype(np.float32)
    codes = rng.integers(0, 4, (64, num_blocks(300, 32)), dtype=np.uint8)
    ref = quantise(x, codes, 32, backend="reference")
    dev = quantise(cp.asarray(x), codes, 32, backend="cupy")
    np.testing.assert_array_equal(dev.payload.get(), ref.payload)
    np.testing.assert_array_equal(dequantise(dev, backend="cupy").get(), dequantise(ref, backend="reference"))
    vec = rng.standard_normal((2, 300)).astype(np.float32)
    np.testing.assert_allclose(masked_matvec(dev, cp.asarray(vec), backend="cupy").get(),
                               masked_matvec(ref, vec, backend="reference"), rtol=1e-4, atol=1e-4)
