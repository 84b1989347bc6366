"""BK-core: references vs dense inversion, emulated kernels vs reference, exact gradient,
causal variant and its step function, N = 1,000,000 without clamping, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from accel.bk_core import (
    BKCoreFunction,
    bk_core,
    causal_init,
    causal_step,
    dense_resolvent_diag,
    scan_launch,
    scan_reference,
)
from accel.emulate import emulated_module


def inputs(bsz: int, n: int, dtype: torch.dtype = torch.float64, seed: int = 0, grad: bool = False):
    gen = torch.Generator().manual_seed(seed)
    v = torch.rand(bsz, n, dtype=dtype, generator=gen) * 6 - 3  # the origin's v ~ U(-3, 3)
    b = torch.rand(bsz, max(n - 1, 0), dtype=dtype, generator=gen) + 0.5
    c = torch.rand(bsz, max(n - 1, 0), dtype=dtype, generator=gen) + 0.5
    return tuple(t.requires_grad_(grad) for t in (v, b, c))


def features(g: torch.Tensor) -> torch.Tensor:
    return torch.stack([g.real, g.imag], dim=-1)


@pytest.mark.parametrize(
    "n,causal",
    # the causal ground truth inverts every leading block, so it stays small
    [(1, False), (2, False), (3, False), (17, False), (64, False), (200, False),
     (1, True), (2, True), (3, True), (17, True), (40, True)],
)
def test_reference_matches_dense_inverse(n: int, causal: bool) -> None:
    v, b, c = inputs(3, n)
    z = 0.25 + 1j
    got = bk_core(v, b, c, z, causal=causal, backend="reference")
    want = features(dense_resolvent_diag(v, b, c, z, causal=causal))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_laplacian_defaults_match_the_origin_setting() -> None:
    """The origin's layer: diagonal -2 + v, off-diagonals 1, z = 1j; its accuracy was 2.5e-8."""
    v, _, _ = inputs(2, 64)
    ones = torch.ones(2, 63, dtype=torch.float64)
    got = bk_core(-2 + v, z=1j, backend="reference")
    want = features(dense_resolvent_diag(-2 + v, ones, ones, 1j))
    assert (got - want).abs().max() < 1e-12


def test_causal_last_entry_equals_full_diagonal_last_entry() -> None:
    v, b, c = inputs(2, 50)
    full = bk_core(v, b, c, causal=False, backend="reference")
    causal = bk_core(v, b, c, causal=True, backend="reference")
    torch.testing.assert_close(causal[:, -1], full[:, -1], rtol=1e-12, atol=1e-14)


def test_causal_output_ignores_the_future() -> None:
    v, b, c = inputs(1, 40)
    base = bk_core(v, b, c, causal=True, backend="reference")
    v2 = v.clone()
    v2[0, 25:] += 1.7
    moved = bk_core(v2, b, c, causal=True, backend="reference")
    assert torch.equal(base[:, :25], moved[:, :25])
    assert not torch.allclose(base[:, 25:], moved[:, 25:])


def test_causal_step_reproduces_the_causal_forward() -> None:
    v, b, c = inputs(4, 30)
    z = 1j
    want = bk_core(v, b, c, z, causal=True, backend="reference")
    state = causal_init(4)
    vn, pn = v.numpy(), (b * c).numpy()
    for i in range(30):
        g, state = causal_step(state, vn[:, i], z, pn[:, i - 1] if i else 0.0)
        np.testing.assert_allclose(np.stack([g.real, g.imag], -1), want[:, i].numpy(), rtol=1e-12, atol=1e-14)
    assert state.position == 30 and state.alpha.shape == (4,)


@pytest.mark.parametrize("chunk", [None, 1, 4, 7, 1000])
@pytest.mark.parametrize("dtype", [np.complex128, np.complex64])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("n", [1, 5, 33])
def test_emulated_scan_matches_reference_and_sequential(n: int, affine: bool, reverse: bool, dtype: type, chunk: int | None) -> None:
    rng = np.random.default_rng(n)
    rows = 3
    d = (rng.uniform(-3, 3, (rows, n)) - 1j).astype(dtype)
    e = (rng.uniform(0.1, 0.9, (rows, n)) + 0.1j * rng.uniform(-1, 1, (rows, n))).astype(dtype)
    e[:, -1 if reverse else 0] = 0
    # sequential ground truth, one position at a time
    seq = np.empty_like(d)
    x = np.ones(rows, dtype)
    for s in range(n):
        pos = n - 1 - s if reverse else s
        x = d[:, pos] + e[:, pos] * x if affine else d[:, pos] - e[:, pos] / x
        seq[:, pos] = x
    ref = scan_reference(d, e, reverse=reverse, affine=affine, chunk=chunk)
    emu = scan_launch(emulated_module("bk_core"), np, d, e, reverse=reverse, affine=affine, chunk=chunk)
    tol = 1e-12 if dtype == np.complex128 else 2e-5
    np.testing.assert_allclose(ref, seq, rtol=tol, atol=tol)
    np.testing.assert_allclose(emu, seq, rtol=tol, atol=tol)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("bsz,n", [(1, 1), (2, 9), (3, 64), (0, 5)])
def test_emulated_forward_and_backward_match_reference(bsz: int, n: int, causal: bool) -> None:
    outs = {}
    for backend in ("reference", "emulate"):
        v, b, c = inputs(bsz, n, grad=True)
        f = bk_core(v, b, c, 0.5j, causal=causal, backend=backend)
        weights = torch.linspace(-1, 1, f.numel(), dtype=f.dtype).reshape(f.shape)
        (f * weights).sum().backward()
        outs[backend] = (f.detach(), v.grad, b.grad, c.grad)
    for ref, emu in zip(outs["reference"], outs["emulate"]):
        if ref is None:
            assert emu is None
        else:
            torch.testing.assert_close(emu, ref, rtol=1e-11, atol=1e-13)


def test_float32_uses_complex64_and_stays_close() -> None:
    v, b, c = inputs(2, 300, dtype=torch.float32)
    got = bk_core(v, b, c, backend="reference")
    assert got.dtype == torch.float32
    want = features(dense_resolvent_diag(v.double(), b.double(), c.double(), 1j))
    assert (got.double() - want).abs().max() < 1e-5
    emu = bk_core(v, b, c, backend="emulate")
    assert (emu.double() - want).abs().max() < 1e-5


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", ["reference", "emulate"])
def test_gradcheck_float64(causal: bool, backend: str) -> None:
    v, b, c = inputs(2, 11, grad=True, seed=3)
    fn = lambda v, b, c: BKCoreFunction.apply(v, b, c, 0.3 + 1j, causal, backend, 4)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (v, b, c), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_gradient_equals_autograd_through_dense_inverse(causal: bool) -> None:
    v, b, c = inputs(2, 24, grad=True, seed=5)
    weights = torch.randn(2, 24, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (bk_core(v, b, c, causal=causal, backend="reference") * weights).sum().backward()
    ours = (v.grad, b.grad, c.grad)
    v2, b2, c2 = (t.detach().clone().requires_grad_() for t in (v, b, c))
    (features(dense_resolvent_diag(v2, b2, c2, 1j, causal=causal)) * weights).sum().backward()
    for got, want in zip(ours, (v2.grad, b2.grad, c2.grad)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_gradient_only_for_inputs_that_need_it() -> None:
    v, b, c = inputs(1, 8)
    v.requires_grad_(True)
    bk_core(v, b, c, backend="reference").sum().backward()
    assert v.grad is not None and b.grad is None and c.grad is None


def test_one_million_positions_finite_without_clamping() -> None:
    """N = 1,000,000: finite values and gradients, and agreement with a dense inverse of a
    window around sampled positions (|G_ij| decays like exp(-|i-j|) here, so a 200-wide
    window gives G_ii to machine precision — the comparable part of a 1M x 1M inverse)."""
    n = 1_000_000
    v, _, _ = inputs(1, n, seed=7)
    v = (-2 + v).requires_grad_()
    out = bk_core(v, z=1j, backend="reference")
    out.sum().backward()
    f = out.detach()
    assert torch.isfinite(f).all() and torch.isfinite(v.grad).all()
    half = 100
    for i in (0, 123_456, 500_000, n - 1):
        lo, hi = max(0, i - half), min(n, i + half + 1)
        window = v.detach()[:, lo:hi]
        ones = torch.ones(1, hi - lo - 1, dtype=torch.float64)
        g = dense_resolvent_diag(window, ones, ones, 1j)[0, i - lo]
        assert abs(complex(f[0, i, 0], f[0, i, 1]) - complex(g)) < 1e-12


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda v, b, c: (v.float(), b, c), "match v's dtype"),
        (lambda v, b, c: (v.int(), b.int(), c.int()), "float32 or float64"),
        (lambda v, b, c: (v[0], b, c), r"shape \(B, N\)"),
        (lambda v, b, c: (v, b[:, :-1], c), "must have shape"),
        (lambda v, b, c: (v[:, :0], b[:, :0], c[:, :0]), "N >= 1"),
        (lambda v, b, c: (v, b.numpy(), c), "torch.Tensor"),
    ],
)
def test_bad_input_raises_value_error(make, message: str) -> None:
    v, b, c = make(*inputs(2, 6))
    with pytest.raises(ValueError, match=message):
        BKCoreFunction.apply(v, b, c, 1j, False, "reference", None)


def test_bad_z_and_step_shape() -> None:
    v, b, c = inputs(2, 6)
    with pytest.raises(ValueError, match="finite complex"):
        bk_core(v, b, c, z=complex("nan"), backend="reference")
    with pytest.raises(ValueError, match="must have shape"):
        causal_step(causal_init(2), np.zeros(3))
