"""Triton kernels for Newton–Schulz: a symmetric Gram product and the two fused NS lines.

One NS step on ``X`` (batch, r, c), r ≤ c::

    A  = X Xᵀ            gram(X)           symmetric: only tiles (i ≤ j) are computed, then
                                           mirrored — about half the products of a full matmul
    B  = b A + c A²       ns_poly(A, b, c)  A and A² are symmetric: upper tiles only, mirrored
    X' = a X + B X        ns_update(B, X, a)

Inputs are bf16 (or fp16/fp32); products accumulate in fp32; outputs take the input's dtype.
:func:`newton_schulz_triton` runs the whole iteration with them; tests/test_ns_kernels.py checks
each kernel against the matrix products it computes and the iteration against
:func:`deepmomentum.newton_schulz` (under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..newton_schulz import ns_coefficients, stable_norm

__all__ = ["gram", "ns_poly", "ns_update", "newton_schulz_triton"]

_TILE = 64


def _upcast(x: Tensor) -> bool:
    # Triton's CPU interpreter multiplies 16-bit tiles wrongly (numpy has no bf16 matmul), so
    # there the tiles are widened to fp32 before tl.dot; on a GPU they stay 16-bit.
    return os.environ.get("TRITON_INTERPRET") == "1" and x.dtype != torch.float32


def _tile(n: int) -> int:
    # tl.dot needs tiles of at least 16; small matrices use the smallest tile that fits.
    return max(16, min(_TILE, triton.next_power_of_2(n)))


@triton.jit
def _gram_kernel(x_ptr, a_ptr, r, c, stride_xb, stride_xr, stride_xc, stride_ab, stride_ar,
                 stride_ac, alpha, beta, ACC_ADD: tl.constexpr, BLOCK: tl.constexpr,
                 BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
    """A[i, j] tile = alpha · X_i X_jᵀ (+ beta · A_in[i, j] when ACC_ADD) for j ≥ i, mirrored."""
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    batch = tl.program_id(2)
    if pid_j >= pid_i:
        rows_i = pid_i * BLOCK + tl.arange(0, BLOCK)
        rows_j = pid_j * BLOCK + tl.arange(0, BLOCK)
        x = x_ptr + batch * stride_xb
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for k in range(0, c, BLOCK_K):
            cols = k + tl.arange(0, BLOCK_K)
            xi = tl.load(x + rows_i[:, None] * stride_xr + cols[None, :] * stride_xc,
                         mask=(rows_i[:, None] < r) & (cols[None, :] < c), other=0.0)
            xj = tl.load(x + rows_j[:, None] * stride_xr + cols[None, :] * stride_xc,
                         mask=(rows_j[:, None] < r) & (cols[None, :] < c), other=0.0)
            if UPCAST:
                xi, xj = xi.to(tl.float32), xj.to(tl.float32)
            acc = tl.dot(xi, tl.trans(xj), acc)
        acc = acc * alpha
        a = a_ptr + batch * stride_ab
        mask = (rows_i[:, None] < r) & (rows_j[None, :] < r)
        if ACC_ADD:  # B = beta·A + alpha·A² with A = X (square, symmetric)
            acc += beta * tl.load(x + rows_i[:, None] * stride_xr + rows_j[None, :] * stride_xc,
                                  mask=mask, other=0.0).to(tl.float32)
        out = acc.to(a_ptr.dtype.element_ty)
        tl.store(a + rows_i[:, None] * stride_ar + rows_j[None, :] * stride_ac, out, mask=mask)
        # the mirror tile (the diagonal tile writes itself twice, identically)
        tl.store(a + rows_j[:, None] * stride_ar + rows_i[None, :] * stride_ac, tl.trans(out),
                 mask=(rows_j[:, None] < r) & (rows_i[None, :] < r))


def _batched(x: Tensor) -> Tensor:
    return x if x.ndim == 3 else x.reshape(-1, *x.shape[-2:])


def _launch_gram(x: Tensor, alpha: float, beta: float, add: bool) -> Tensor:
    x3 = _batched(x)
    batch, r, c = x3.shape
    out = torch.empty(batch, r, r, dtype=x.dtype, device=x.device)
    block = _tile(r)
    tiles = triton.cdiv(r, block)
    _gram_kernel[(tiles, tiles, batch)](
        x3, out, r, c, *x3.stride(), *out.stride(), float(alpha), float(beta), ACC_ADD=add,
        BLOCK=block, BLOCK_K=_tile(c), UPCAST=_upcast(x))
    return out.reshape(*x.shape[:-2], r, r)


def gram(x: Tensor) -> Tensor:
    """``X Xᵀ`` for ``(…, r, c)`` computing upper-triangle tiles only."""
    return _launch_gram(x, 1.0, 0.0, False)


def ns_poly(a: Tensor, b: float, c: float) -> Tensor:
    """``b·A + c·A²`` for symmetric ``A`` (…, r, r): A² = A Aᵀ by the symmetric Gram kernel."""
    return _launch_gram(a, c, b, True)


@triton.jit
def _update_kernel(b_ptr, x_ptr, o_ptr, r, c, stride_bb, stride_br, stride_bc, stride_xb,
                   stride_xr, stride_xc, stride_ob, stride_or, stride_oc, alpha,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   UPCAST: tl.constexpr):
    """O tile = alpha · X tile + B_rows @ X_cols."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    batch = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    bb = b_ptr + batch * stride_bb
    xb = x_ptr + batch * stride_xb
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, r, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        bt = tl.load(bb + rows[:, None] * stride_br + ks[None, :] * stride_bc,
                     mask=(rows[:, None] < r) & (ks[None, :] < r), other=0.0)
        xt = tl.load(xb + ks[:, None] * stride_xr + cols[None, :] * stride_xc,
                     mask=(ks[:, None] < r) & (cols[None, :] < c), other=0.0)
        if UPCAST:
            bt, xt = bt.to(tl.float32), xt.to(tl.float32)
        acc = tl.dot(bt, xt, acc)
    mask = (rows[:, None] < r) & (cols[None, :] < c)
    x = tl.load(xb + rows[:, None] * stride_xr + cols[None, :] * stride_xc, mask=mask,
                other=0.0).to(tl.float32)
    out = alpha * x + acc
    tl.store(o_ptr + batch * stride_ob + rows[:, None] * stride_or + cols[None, :] * stride_oc,
             out.to(o_ptr.dtype.element_ty), mask=mask)


def ns_update(b: Tensor, x: Tensor, a: float) -> Tensor:
    """``a·X + B X`` for ``B`` (…, r, r) and ``X`` (…, r, c)."""
    b3, x3 = _batched(b), _batched(x)
    batch, r, c = x3.shape
    out = torch.empty_like(x3)
    block_m, block_n = _tile(r), _tile(c)
    _update_kernel[(triton.cdiv(r, block_m), triton.cdiv(c, block_n), batch)](
        b3, x3, out, r, c, *b3.stride(), *x3.stride(), *out.stride(), float(a),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=_tile(r), UPCAST=_upcast(x))
    return out.reshape(x.shape)


def newton_schulz_triton(X: Tensor, steps: int = 5, coefficients="keller", eps: float = 1e-7,
                         dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """:func:`deepmomentum.newton_schulz` with the three kernels above (same arguments)."""
    schedule, scale = ns_coefficients(coefficients, steps)
    Y = X.to(dtype)
    transposed = Y.size(-2) > Y.size(-1)
    if transposed:
        Y = Y.mT
    Y = (Y / (stable_norm(Y, dim=(-2, -1), keepdim=True) * scale + eps))
    Y = Y.contiguous()
    for a, b, c in schedule:
        A = gram(Y)
        B = ns_poly(A, b, c)
        Y = ns_update(B, Y, a)
    if transposed:
        Y = Y.mT
    return Y.to(X.dtype)
