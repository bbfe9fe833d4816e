"""Triton Newton–Schulz kernels against the matrix products they compute, and the Triton
iteration against ``deepmomentum.newton_schulz`` (TRITON_INTERPRET=1 on the CPU)."""

from __future__ import annotations

import pytest
import torch

import deepmomentum as dm
from deepmomentum import kernels

pytestmark = pytest.mark.skipif(not kernels.triton_available(), reason="needs triton")
N = pytest.importorskip("deepmomentum.kernels.newton_schulz")

# square, tall→wide, wide, batched, ragged (not multiples of a tile), smaller than a tile
SHAPES = [(32, 32), (20, 37), (3, 16, 16), (2, 70, 90), (5, 5), (1, 17, 65)]
# Against fp32 products: fp32 accumulates alike; 16-bit outputs differ by their own rounding.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", sorted(TOL, key=str))
@pytest.mark.parametrize("shape", SHAPES)
def test_kernels_equal_the_products_they_compute(shape, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(dtype)
    if x.shape[-2] > x.shape[-1]:
        x = x.mT.contiguous()
    xf = x.float()
    assert _rel(N.gram(x), xf @ xf.mT) < TOL[dtype]  # A = X Xᵀ
    a = (xf @ xf.mT).to(dtype)
    af = a.float()
    b, c = -4.775, 2.0315
    assert _rel(N.ns_poly(a, b, c), b * af + c * (af @ af)) < TOL[dtype]  # B = bA + cA²
    assert _rel(N.ns_update(a, x, 3.4445), 3.4445 * xf + af @ xf) < TOL[dtype]  # X' = aX + BX


def test_gram_is_symmetric_and_the_mirror_is_written():
    x = torch.randn(100, 40, generator=torch.Generator().manual_seed(1))
    out = N.gram(x)
    torch.testing.assert_close(out, x @ x.T, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out, out.T, rtol=1e-6, atol=1e-5)  # lower tiles come from upper


@pytest.mark.parametrize("preset", ["keller", "you", "polar_express"])
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_newton_schulz_equals_the_torch_iteration(shape, preset):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    ours = dm.newton_schulz(x, coefficients=preset, dtype=torch.float32, backend="triton")
    torch_ns = dm.newton_schulz(x, coefficients=preset, dtype=torch.float32, backend="torch")
    assert ours.shape == x.shape and ours.dtype == x.dtype
    assert _rel(ours, torch_ns) < 1e-5
    # bf16: both approximate the float64 iteration. The CPU interpreter's bf16 stores do not
    # round like a GPU's (up to 5.8% here against torch's 1.6%, with Polar Express's steep
    # first step), so the bound is loose; benchmarks/ns_gpu.py checks the same on a card.
    exact = dm.newton_schulz(x.double(), coefficients=preset, dtype=torch.float64)
    ours16 = dm.newton_schulz(x, coefficients=preset, backend="triton")
    torch16 = dm.newton_schulz(x, coefficients=preset, backend="torch")
    assert _rel(ours16, exact) <= 4 * _rel(torch16, exact) + 0.02


def test_backend_choice_and_errors():
    x = torch.randn(8, 8)
    with pytest.raises(ValueError, match="backend"):
        dm.newton_schulz(x, backend="cuda")
    # On the CPU, backend=None is torch (bit-identical to backend="torch").
    assert torch.equal(dm.newton_schulz(x), dm.newton_schulz(x, backend="torch"))
