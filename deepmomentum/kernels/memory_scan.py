"""Triton kernels for one chunk of in-context learning of a linear memory layer (Titans, HOPE).

A chunk of ``C`` tokens updates a memory matrix ``W`` (i × o) with momentum ``S`` by gradients
that all factor as outer products ``x_jᵀ δ_j`` and whose momentum/decay recursion is the scan of
:func:`deepmomentum.functional.scan_coefficients` (coefficients ``a_t`` = param_from_start,
``b_t`` = param_from_momentum, ``G_tj`` = param_from_grads). Two products make the chunk:

* :func:`chunk_read` — every token's read through its own updated state, without ever
  materializing a per-token state (an attention-like product)::

      out_t = a_t z_t W₀ + b_t z_t S₀ − Σ_j G_tj (z_t · x_j) δ_j

* :func:`chunk_end` — the state at the chunk's end::

      W = a W₀ + b S₀ − xᵀ u_W,      S = μ S₀ − xᵀ u_S

  with ``u_W = G_{C,j} δ_j`` and ``u_S`` (momentum_from_grads) the last row's coefficients
  folded into the factors.

Their plain-torch twins are :func:`deepmomentum.functional.memory_chunk_read` and
:func:`deepmomentum.functional.memory_chunk_end`; tests/test_memory_scan.py checks each kernel
against its twin under ``TRITON_INTERPRET=1`` (fp32/bf16, ragged sizes, strided and
batch-broadcast states, no momentum). One program per (memory, sequence, head) and column tile:
the chunk's rows (C ≤ 128) stay in registers, the inner dimension is a loop. Products accumulate
in fp32; fp32 inputs multiply in IEEE fp32 (torch's default for fp32 matmuls, no TF32), 16-bit
inputs are widened to fp32 first. The kernels are forward only: the example's autograd functions
(``examples/hope/model.py``) compute the backward with torch.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["chunk_read", "chunk_end", "MAX_CHUNK", "supported"]

#: The longest chunk a program holds in registers.
MAX_CHUNK = 128
_TILE = 64


def _tile(n: int) -> int:
    # tl.dot needs tiles of at least 16
    return max(16, min(_TILE, triton.next_power_of_2(n)))


def supported(*tensors: Optional[Tensor]) -> bool:
    """Whether the kernels take these tensors: one CUDA device (or the interpreter's CPU),
    fp32/bf16/fp16, any strides."""
    present = [t for t in tensors if t is not None]
    return bool(present) and all(
        t.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and t.device == present[0].device for t in present)


@triton.jit
def _read_kernel(z, w0, s0, x, d, a, b, g, out, H, C, I, O,
                 z_b, z_h, z_r, z_c, w_b, w_h, w_r, w_c, s_b, s_h, s_r, s_c,
                 x_b, x_h, x_r, x_c, d_b, d_h, d_r, d_c, a_b, a_h, a_r, b_b, b_h, b_r,
                 g_b, g_h, g_r, g_c, o_b, o_h, o_r, o_c,
                 HAS_S0: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BO: tl.constexpr,
                 PRECISION: tl.constexpr):
    """out[:, tile] = a ⊙ (z W₀) + b ⊙ (z S₀) − (G ⊙ z xᵀ) δ for one (sequence, head)."""
    pid = tl.program_id(0)
    bi = pid // H
    hi = pid % H
    rows = tl.arange(0, BC)
    cols = tl.program_id(1) * BO + tl.arange(0, BO)
    rmask = rows < C
    cmask = cols < O
    z += bi * z_b + hi * z_h
    x += bi * x_b + hi * x_h
    w0 += bi * w_b + hi * w_h
    s0 += bi * s_b + hi * s_h
    zw = tl.zeros((BC, BO), dtype=tl.float32)
    zs = tl.zeros((BC, BO), dtype=tl.float32)
    p = tl.zeros((BC, BC), dtype=tl.float32)
    for k in range(0, I, BK):
        ks = k + tl.arange(0, BK)
        kmask = ks < I
        zt = tl.load(z + rows[:, None] * z_r + ks[None, :] * z_c,
                     mask=rmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        xt = tl.load(x + rows[:, None] * x_r + ks[None, :] * x_c,
                     mask=rmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        wt = tl.load(w0 + ks[:, None] * w_r + cols[None, :] * w_c,
                     mask=kmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        zw = tl.dot(zt, wt, zw, input_precision=PRECISION)
        if HAS_S0:
            st = tl.load(s0 + ks[:, None] * s_r + cols[None, :] * s_c,
                         mask=kmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
            zs = tl.dot(zt, st, zs, input_precision=PRECISION)
        p = tl.dot(zt, tl.trans(xt), p, input_precision=PRECISION)
    gt = tl.load(g + bi * g_b + hi * g_h + rows[:, None] * g_r + rows[None, :] * g_c,
                 mask=rmask[:, None] & rmask[None, :], other=0.0).to(tl.float32)
    dt = tl.load(d + bi * d_b + hi * d_h + rows[:, None] * d_r + cols[None, :] * d_c,
                 mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    at = tl.load(a + bi * a_b + hi * a_h + rows * a_r, mask=rmask, other=0.0).to(tl.float32)
    result = at[:, None] * zw - tl.dot(gt * p, dt, input_precision=PRECISION)
    if HAS_S0:
        bt = tl.load(b + bi * b_b + hi * b_h + rows * b_r, mask=rmask, other=0.0).to(tl.float32)
        result += bt[:, None] * zs
    tl.store(out + bi * o_b + hi * o_h + rows[:, None] * o_r + cols[None, :] * o_c,
             result.to(out.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _end_kernel(w0, s0, x, uw, us, a, b, mu, w_out, s_out, NB, H, C, I, O,
                w_m, w_b, w_h, w_r, w_c, s_m, s_b, s_h, s_r, s_c,
                x_m, x_b, x_h, x_r, x_c, uw_m, uw_b, uw_h, uw_r, uw_c,
                us_m, us_b, us_h, us_r, us_c, a_b, a_h, b_b, b_h, mu_b, mu_h,
                ow_m, ow_b, ow_h, ow_r, ow_c, os_m, os_b, os_h, os_r, os_c,
                HAS_S0: tl.constexpr, BK: tl.constexpr, BI: tl.constexpr, BO: tl.constexpr,
                PRECISION: tl.constexpr):
    """W tile = a W₀ + b S₀ − xᵀ u_W and S tile = μ S₀ − xᵀ u_S for one (memory, sequence,
    head)."""
    pid = tl.program_id(0)
    mi = pid // (NB * H)
    bi = (pid // H) % NB
    hi = pid % H
    rows = tl.program_id(1) * BI + tl.arange(0, BI)
    cols = tl.program_id(2) * BO + tl.arange(0, BO)
    rmask = rows < I
    cmask = cols < O
    x += mi * x_m + bi * x_b + hi * x_h
    uw += mi * uw_m + bi * uw_b + hi * uw_h
    us += mi * us_m + bi * us_b + hi * us_h
    xu_w = tl.zeros((BI, BO), dtype=tl.float32)
    xu_s = tl.zeros((BI, BO), dtype=tl.float32)
    for k in range(0, C, BK):
        ks = k + tl.arange(0, BK)
        kmask = ks < C
        xt = tl.load(x + ks[:, None] * x_r + rows[None, :] * x_c,
                     mask=kmask[:, None] & rmask[None, :], other=0.0).to(tl.float32)
        uwt = tl.load(uw + ks[:, None] * uw_r + cols[None, :] * uw_c,
                      mask=kmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        ust = tl.load(us + ks[:, None] * us_r + cols[None, :] * us_c,
                      mask=kmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        xu_w = tl.dot(tl.trans(xt), uwt, xu_w, input_precision=PRECISION)
        xu_s = tl.dot(tl.trans(xt), ust, xu_s, input_precision=PRECISION)
    mask = rmask[:, None] & cmask[None, :]
    wt = tl.load(w0 + mi * w_m + bi * w_b + hi * w_h + rows[:, None] * w_r + cols[None, :] * w_c,
                 mask=mask, other=0.0).to(tl.float32)
    at = tl.load(a + bi * a_b + hi * a_h).to(tl.float32)
    w = at * wt - xu_w
    s = -xu_s
    if HAS_S0:
        st = tl.load(s0 + mi * s_m + bi * s_b + hi * s_h + rows[:, None] * s_r
                     + cols[None, :] * s_c, mask=mask, other=0.0).to(tl.float32)
        w += tl.load(b + bi * b_b + hi * b_h).to(tl.float32) * st
        s += tl.load(mu + bi * mu_b + hi * mu_h).to(tl.float32) * st
    tl.store(w_out + mi * ow_m + bi * ow_b + hi * ow_h + rows[:, None] * ow_r
             + cols[None, :] * ow_c, w.to(w_out.dtype.element_ty), mask=mask)
    tl.store(s_out + mi * os_m + bi * os_b + hi * os_h + rows[:, None] * os_r
             + cols[None, :] * os_c, s.to(s_out.dtype.element_ty), mask=mask)


def _precision(*tensors: Optional[Tensor]) -> str:
    return "ieee" if all(t.dtype == torch.float32 for t in tensors if t is not None) \
        else "tf32"


def _check(name: str, t: Tensor, shape: tuple) -> None:
    if t.dim() != len(shape) or any(s is not None and n != s for n, s in zip(t.shape, shape)):
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected "
                         f"{tuple('*' if s is None else s for s in shape)}")


def chunk_read(z: Tensor, W0: Tensor, S0: Optional[Tensor], x: Tensor, delta: Tensor,
               from_start: Tensor, from_momentum: Tensor, from_grads: Tensor) -> Tensor:
    """``out_t = a_t z_t W₀ + b_t z_t S₀ − Σ_j G_tj (z_t·x_j) δ_j`` for every token t.

    z (batch, H, C, i), W₀ and S₀ (batch or 1, H, i, o) — S₀ ``None`` for zero momentum —,
    x (batch, H, C, i), δ (batch, H, C, o), a = ``from_start`` and b = ``from_momentum``
    (batch, H, C), G = ``from_grads`` (batch, H, C, C). Returns (batch, H, C, o) in z's dtype.
    """
    batch, H, C, i = z.shape
    o = W0.shape[-1]
    if C > MAX_CHUNK:
        raise ValueError(f"chunk of {C} tokens; chunk_read takes at most {MAX_CHUNK}")
    _check("x", x, (batch, H, C, i))
    _check("delta", delta, (batch, H, C, o))
    _check("W0", W0, (None, H, i, o))
    for name, t in (("from_start", from_start), ("from_momentum", from_momentum)):
        _check(name, t, (batch, H, C))
    _check("from_grads", from_grads, (batch, H, C, C))
    W0 = W0.expand(batch, H, i, o)
    S0e = W0 if S0 is None else S0.expand(batch, H, i, o)
    out = torch.empty(batch, H, C, o, dtype=z.dtype, device=z.device)
    BO = _tile(o)
    BC = max(16, triton.next_power_of_2(C))  # the whole chunk: its rows mix through G
    _read_kernel[(batch * H, triton.cdiv(o, BO))](
        z, W0, S0e, x, delta, from_start, from_momentum, from_grads, out, H, C, i, o,
        *z.stride(), *W0.stride(), *S0e.stride(), *x.stride(), *delta.stride(),
        *from_start.stride(), *from_momentum.stride(), *from_grads.stride(), *out.stride(),
        HAS_S0=S0 is not None, BC=BC, BK=_tile(i), BO=BO,
        PRECISION=_precision(z, W0, S0, x, delta), num_warps=4 if BC <= 32 else 8)
    return out


def chunk_end(W0: Tensor, S0: Optional[Tensor], x: Tensor, uW: Tensor, uS: Tensor, a: Tensor,
              b: Tensor, mu: Tensor) -> tuple[Tensor, Tensor]:
    """``(W, S) = (a W₀ + b S₀ − xᵀ u_W, μ S₀ − xᵀ u_S)`` for every memory, sequence and head.

    W₀, S₀ (m, batch or 1, H, i, o) — S₀ ``None`` for zero momentum —, x (m, batch, H, C, i),
    u_W, u_S (m, batch, H, C, o), a, b, μ (batch, H). Returns two (m, batch, H, i, o) tensors
    in W₀'s dtype."""
    m, batch, H, C, i = x.shape
    o = W0.shape[-1]
    _check("W0", W0, (m, None, H, i, o))
    _check("uW", uW, (m, batch, H, C, o))
    _check("uS", uS, (m, batch, H, C, o))
    for name, t in (("a", a), ("b", b), ("mu", mu)):
        _check(name, t, (batch, H))
    W0 = W0.expand(m, batch, H, i, o)
    S0e = W0 if S0 is None else S0.expand(m, batch, H, i, o)
    W = torch.empty(m, batch, H, i, o, dtype=W0.dtype, device=W0.device)
    S = torch.empty_like(W)
    BI, BO = _tile(i), _tile(o)
    _end_kernel[(m * batch * H, triton.cdiv(i, BI), triton.cdiv(o, BO))](
        W0, S0e, x, uW, uS, a, b, mu, W, S, batch, H, C, i, o,
        *W0.stride(), *S0e.stride(), *x.stride(), *uW.stride(), *uS.stride(),
        *a.stride(), *b.stride(), *mu.stride(), *W.stride(), *S.stride(),
        HAS_S0=S0 is not None, BK=_tile(C), BI=BI, BO=BO,
        PRECISION=_precision(W0, S0, x, uW, uS))
    return W, S
