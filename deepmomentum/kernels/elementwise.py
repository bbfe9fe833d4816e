"""Fused multi-tensor Triton kernels: each fuses a run of the stages of
:mod:`deepmomentum.functional` and is reached through that rule's functional entry point
(``fused=True`` on CUDA tensors).

One launch covers every tensor of a (device, dtype) group: the kernel gets tables of data
pointers and sizes, and a table mapping each program to (tensor, block start) — the
multi-tensor-apply layout. Parameters may be fp32, bf16 or fp16; state is fp32; math is fp32;
each parameter is rounded once at the end. Gradients arrive unscaled (``MemoryOptimizer.step``
unscales GradScaler's gradients and skips a step with ``found_inf``).

Each launcher names the stages it fuses; tests/test_kernels.py checks it against their
composition (under ``TRITON_INTERPRET=1`` on the CPU).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import SUPPORTED_DTYPES

__all__ = ["sgd_step", "adam_step", "accumulate", "ema_momentum", "apply_update",
           "memory_step", "m3_write", "m3_apply"]

_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
BLOCK = 1024


# --- tables ----------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _block_tables(sizes: tuple[int, ...], block: int, device: str):
    """(tensor index, start offset) of every block, and the sizes, as device tensors."""
    counts = torch.tensor([math.ceil(n / block) for n in sizes], dtype=torch.int64)
    tensor_of_block = torch.repeat_interleave(torch.arange(len(sizes)), counts)
    first_block = torch.cumsum(counts, 0) - counts
    start = (torch.arange(int(counts.sum())) - first_block[tensor_of_block]) * block
    return (tensor_of_block.to(device=device, dtype=torch.int32), start.to(device=device),
            torch.tensor(sizes, dtype=torch.int64, device=device))


def _pointers(tensors: Sequence[Tensor], device) -> Tensor:
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64, device=device)


def _check(name: str, tensors: Sequence[Tensor], dtype=None) -> None:
    for i, t in enumerate(tensors):
        if not t.is_contiguous():
            raise ValueError(f"{name}[{i}] (shape {tuple(t.shape)}) is not contiguous; the "
                             "fused kernels update tensors in place through flat pointers")
        if dtype is not None and t.dtype != dtype:
            raise ValueError(f"{name}[{i}] has dtype {t.dtype}, expected {dtype}")


def _groups(params: Sequence[Tensor], grads: Sequence[Tensor]):
    """Indices grouped by (device, param dtype, grad dtype): one launch each."""
    groups: dict[tuple, list[int]] = {}
    for i, (p, g) in enumerate(zip(params, grads)):
        if p.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"params[{i}] has dtype {p.dtype}; the fused kernels take "
                             f"{SUPPORTED_DTYPES}")
        groups.setdefault((p.device, p.dtype, g.dtype), []).append(i)
    return groups.values()


def _launch(kernel, indices, tensors_by_role, scalars, constexprs, device):
    sizes = tuple(tensors_by_role[0][i].numel() for i in indices)
    tensor_of_block, start, size_table = _block_tables(sizes, BLOCK, str(device))
    if tensor_of_block.numel() == 0:
        return
    tables = [_pointers([role[i] for i in indices], device) for role in tensors_by_role]
    kernel[(tensor_of_block.numel(),)](*tables, size_table, tensor_of_block, start, *scalars,
                                       BLOCK=BLOCK, **constexprs)


@triton.jit
def _program(sizes, tensor_of_block, block_start, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(tensor_of_block + pid)
    offsets = tl.load(block_start + pid) + tl.arange(0, BLOCK)
    return t, offsets, offsets < tl.load(sizes + t)


@triton.jit
def _ptr(table, t, DTYPE: tl.constexpr):
    return tl.load(table + t).to(tl.pointer_type(DTYPE))


@triton.jit
def _weight_and_grad(p_ptr, g_ptr, offsets, mask, lr, weight_decay, MAXIMIZE: tl.constexpr,
                     DECOUPLED: tl.constexpr):
    """(W, g) in fp32: the stages ``effective_gradients`` (maximize, coupled λW) and
    ``decoupled_decay`` (W(1 − γλ)) — the preamble every update kernel shares."""
    w = tl.load(p_ptr + offsets, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + offsets, mask=mask).to(tl.float32)
    if MAXIMIZE:
        g = -g
    if DECOUPLED:
        w = w * (1.0 - lr * weight_decay)
    else:
        g = g + weight_decay * w
    return w, g


# --- Adam-style (PreconditionedMomentum, §3) -------------------------------------------------


@triton.jit
def _adam_kernel(p_table, g_table, m_table, v_table, sizes, tensor_of_block, block_start,
                 step_size_ptr, bc2_sqrt_ptr, lr, beta1, beta2,
                 eps, weight_decay, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr,
                 ADAM: tl.constexpr, VALUE: tl.constexpr, DECOUPLED: tl.constexpr,
                 MAXIMIZE: tl.constexpr, BLOCK: tl.constexpr):
    t, offsets, mask = _program(sizes, tensor_of_block, block_start, BLOCK)
    p_ptr = _ptr(p_table, t, P_DTYPE)
    m_ptr = _ptr(m_table, t, tl.float32)
    w, g = _weight_and_grad(p_ptr, _ptr(g_table, t, G_DTYPE), offsets, mask, lr,
                            weight_decay, MAXIMIZE, DECOUPLED)
    step_size = tl.load(step_size_ptr + t)  # lr / (1 − β₁ᵗ)
    m = tl.load(m_ptr + offsets, mask=mask)
    if ADAM:
        v_ptr = _ptr(v_table, t, tl.float32)
        v = tl.load(v_ptr + offsets, mask=mask) * beta2 + (1.0 - beta2) * g * g
        tl.store(v_ptr + offsets, v, mask=mask)
        denom = tl.sqrt(v) / tl.load(bc2_sqrt_ptr + t) + eps
        if VALUE:
            m = m + (1.0 - beta1) * (g / denom - m)
            w = w - step_size * m
        else:
            m = m + (1.0 - beta1) * (g - m)
            w = w - step_size * m / denom
    else:
        m = m + (1.0 - beta1) * (g - m)
        w = w - step_size * m
    tl.store(m_ptr + offsets, m, mask=mask)
    tl.store(p_ptr + offsets, w.to(P_DTYPE), mask=mask)


def adam_step(params, grads, exp_avgs, exp_avg_sqs, steps: Sequence[float], *, lr, beta1, beta2,
              eps, weight_decay, decoupled_weight_decay=True, precondition="readout",
              preconditioner="adam", maximize=False) -> None:
    """§3 in one launch per group: effective_gradients → second_moment_write →
    preconditioner_denominators → (preconditioned_values) → ema_write → apply_updates of
    ``functional.preconditioned_momentum``; ``steps`` are each tensor's t (already advanced)."""
    if not params:
        return
    adam = preconditioner == "adam"
    _check("params", params)
    _check("exp_avgs", exp_avgs, torch.float32)
    if adam:
        _check("exp_avg_sqs", exp_avg_sqs, torch.float32)
    grads = [g.contiguous() for g in grads]
    device = params[0].device
    for indices in _groups(params, grads):
        step_size = torch.tensor([lr / (1 - beta1 ** steps[i]) for i in indices],
                                 dtype=torch.float32, device=device)
        bc2_sqrt = torch.tensor([math.sqrt(1 - beta2 ** steps[i]) for i in indices],
                                dtype=torch.float32, device=device)
        sub = lambda xs: [xs[i] for i in indices]  # noqa: E731
        vs = exp_avg_sqs if adam else exp_avgs
        _launch(_adam_kernel, list(range(len(indices))),
                [sub(params), sub(grads), sub(exp_avgs), sub(vs)],
                [step_size, bc2_sqrt, float(lr), float(beta1), float(beta2),
                 float(eps), float(weight_decay)],
                dict(P_DTYPE=_TL[params[indices[0]].dtype], G_DTYPE=_TL[grads[indices[0]].dtype],
                     ADAM=adam, VALUE=precondition == "value",
                     DECOUPLED=decoupled_weight_decay, MAXIMIZE=maximize), device)


# --- multi-frequency accumulation (§7) -------------------------------------------------------


@triton.jit
def _accumulate_kernel(a_table, g_table, sizes, tensor_of_block, block_start,
                       A_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    t, offsets, mask = _program(sizes, tensor_of_block, block_start, BLOCK)
    a_ptr = _ptr(a_table, t, A_DTYPE)
    a = tl.load(a_ptr + offsets, mask=mask).to(tl.float32)
    g = tl.load(_ptr(g_table, t, G_DTYPE) + offsets, mask=mask).to(tl.float32)
    tl.store(a_ptr + offsets, (a + g).to(A_DTYPE), mask=mask)


def accumulate(accumulators, grads) -> None:
    """The stage ``functional.accumulate`` (``accumulators[i] += grads[i]``) for all tensors
    in one launch per dtype pair."""
    if not accumulators:
        return
    _check("accumulators", accumulators)
    grads = [g.contiguous() for g in grads]
    device = accumulators[0].device
    for indices in _groups(accumulators, grads):
        _launch(_accumulate_kernel, indices, [accumulators, grads], [],
                dict(A_DTYPE=_TL[accumulators[indices[0]].dtype],
                     G_DTYPE=_TL[grads[indices[0]].dtype]), device)


# --- Muon's stages (§5): EMA momentum with nesterov, then the decayed, scaled apply -----------


@triton.jit
def _ema_kernel(b_table, g_table, u_table, sizes, tensor_of_block, block_start,
                write_coeff, read_coeff, G_DTYPE: tl.constexpr, NESTEROV: tl.constexpr,
                MAXIMIZE: tl.constexpr, WRITE_SMALL: tl.constexpr, READ_SMALL: tl.constexpr,
                BLOCK: tl.constexpr):
    t, offsets, mask = _program(sizes, tensor_of_block, block_start, BLOCK)
    b_ptr = _ptr(b_table, t, tl.float32)
    g = tl.load(_ptr(g_table, t, G_DTYPE) + offsets, mask=mask).to(tl.float32)
    if MAXIMIZE:
        g = -g
    b = tl.load(b_ptr + offsets, mask=mask)
    # b.lerp_(g, 1 − μ) and g.lerp(b, μ) as torch computes lerp: one fma from the nearer end
    if WRITE_SMALL:
        b = tl.fma(write_coeff, g - b, b)
    else:
        b = tl.fma(write_coeff, g - b, g)
    tl.store(b_ptr + offsets, b, mask=mask)
    if NESTEROV:
        if READ_SMALL:
            u = tl.fma(read_coeff, b - g, g)
        else:
            u = tl.fma(read_coeff, b - g, b)
    else:
        u = b
    tl.store(_ptr(u_table, t, tl.float32) + offsets, u, mask=mask)


def _lerp_coefficient(weight: float) -> tuple[float, bool]:
    """torch's ``lerp`` with the Python scalar ``weight``: (the fp32 coefficient of its one
    fma, whether it runs from the start, ``|w| < 0.5``)."""
    w = torch.tensor(weight, dtype=torch.float32).item()
    small = abs(w) < 0.5
    return torch.tensor(w if small else w - 1, dtype=torch.float32).item(), small


def ema_momentum(momentum_buffers, grads, *, momentum, nesterov, maximize=False) -> list[Tensor]:
    """Muon's effective_gradients → ema_write → nesterov_readout(ema=True): ``b ← lerp(b, g,
    1 − μ)``; returns new fp32 tensors ``U = lerp(g, b, μ)`` (nesterov) or copies of ``b`` —
    never the buffers themselves, so NS cannot alias the state. Bit for bit torch's ``lerp``
    (the fp32 weight of the Python scalar; ``start + w·(end − start)`` for ``|w| < 0.5``, else
    ``end + (w − 1)·(end − start)``, one fma each), as
    :func:`deepmomentum.kernels.compressed.ema_step` on compressed buffers."""
    if not grads:
        return []
    _check("momentum_buffers", momentum_buffers, torch.float32)
    grads = [g.contiguous() for g in grads]
    updates = [torch.empty_like(b) for b in momentum_buffers]
    device = grads[0].device
    write_coeff, write_small = _lerp_coefficient(1 - momentum)
    read_coeff, read_small = _lerp_coefficient(momentum)
    for indices in _groups(momentum_buffers, grads):
        _launch(_ema_kernel, indices, [momentum_buffers, grads, updates],
                [write_coeff, read_coeff],
                dict(G_DTYPE=_TL[grads[indices[0]].dtype], NESTEROV=nesterov,
                     MAXIMIZE=maximize, WRITE_SMALL=write_small, READ_SMALL=read_small),
                device)
    return updates


@triton.jit
def _apply_kernel(p_table, u_table, sizes, tensor_of_block, block_start,
                  scale_ptr, lr, weight_decay, P_DTYPE: tl.constexpr, U_DTYPE: tl.constexpr,
                  BLOCK: tl.constexpr):
    t, offsets, mask = _program(sizes, tensor_of_block, block_start, BLOCK)
    p_ptr = _ptr(p_table, t, P_DTYPE)
    w = tl.load(p_ptr + offsets, mask=mask).to(tl.float32)
    u = tl.load(_ptr(u_table, t, U_DTYPE) + offsets, mask=mask).to(tl.float32)
    w = w * (1.0 - lr * weight_decay) - lr * tl.load(scale_ptr + t) * u
    tl.store(p_ptr + offsets, w.to(P_DTYPE), mask=mask)


def apply_update(params, updates, scales: Sequence[float], *, lr, weight_decay) -> None:
    """Muon's decoupled_decay → apply_updates: ``W ← W(1 − γλ) − γ·s_i·U_i`` for all tensors
    (unadjusted γ in the decay)."""
    if not params:
        return
    _check("params", params)
    updates = [u.contiguous() for u in updates]
    device = params[0].device
    for indices in _groups(params, updates):
        scale = torch.tensor([scales[i] for i in indices], dtype=torch.float32, device=device)
        sub = lambda xs: [xs[i] for i in indices]  # noqa: E731
        _launch(_apply_kernel, list(range(len(indices))), [sub(params), sub(updates)],
                [scale, float(lr), float(weight_decay)],
                dict(P_DTYPE=_TL[params[indices[0]].dtype],
                     U_DTYPE=_TL[updates[indices[0]].dtype]), device)


# --- the momentum memory step of §1 (SGD), §2 (Delta) and §4 (DMGD's keyless part) ----------


@triton.jit
def _memory_kernel(p_table, g_table, b_table, e_table, r_table, sizes, tensor_of_block,
                   block_start, lr, momentum, dampening, erase, weight_decay,
                   P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
                   FIRST: tl.constexpr, HAS_ERASE: tl.constexpr, HAS_READ: tl.constexpr,
                   NESTEROV: tl.constexpr, DECOUPLED: tl.constexpr, MAXIMIZE: tl.constexpr,
                   SIGN: tl.constexpr, BLOCK: tl.constexpr):
    t, offsets, mask = _program(sizes, tensor_of_block, block_start, BLOCK)
    p_ptr = _ptr(p_table, t, P_DTYPE)
    w, g = _weight_and_grad(p_ptr, _ptr(g_table, t, G_DTYPE), offsets, mask, lr,
                            weight_decay, MAXIMIZE, DECOUPLED)
    memory = g
    if HAS_MOMENTUM:
        b_ptr = _ptr(b_table, t, tl.float32)
        if FIRST:
            b = g
        else:
            b = tl.load(b_ptr + offsets, mask=mask) * momentum
            if HAS_ERASE:
                b = b - erase * tl.load(_ptr(e_table, t, tl.float32) + offsets, mask=mask)
            b = b + (1.0 - dampening) * g
        tl.store(b_ptr + offsets, b, mask=mask)
        memory = b
    if HAS_READ:
        memory = memory + tl.load(_ptr(r_table, t, tl.float32) + offsets, mask=mask)
    u = memory
    if NESTEROV:
        u = g + momentum * memory
    if SIGN:
        u = tl.where(u > 0, 1.0, tl.where(u < 0, -1.0, 0.0))
    tl.store(p_ptr + offsets, (w - lr * u).to(P_DTYPE), mask=mask)


def sgd_step(params, grads, momentum_buffers, *, lr, momentum, dampening, nesterov,
             weight_decay, decoupled_weight_decay=False, maximize=False,
             first_step=False) -> None:
    """§1 in one launch per group — the stages effective_gradients → momentum_write →
    nesterov_readout → apply_updates of ``functional.associative_momentum``: the memory step
    without erase terms or reads. ``momentum_buffers`` are fp32 tensors of the parameters'
    shapes (ignored when ``momentum == 0``); ``first_step`` writes ``b = g``."""
    memory_step(params, grads, momentum_buffers, lr=lr, momentum=momentum, dampening=dampening,
                nesterov=nesterov, weight_decay=weight_decay,
                decoupled_weight_decay=decoupled_weight_decay, maximize=maximize,
                first_step=first_step)


def memory_step(params, grads, momentum_buffers, erase_terms=None, reads=None, *, lr, momentum,
                dampening, nesterov, weight_decay, erase=0.0, decoupled_weight_decay=False,
                maximize=False, first_step=False, sign=False) -> None:
    """DeltaMomentum's and DMGD's elementwise stages — effective_gradients → momentum_write
    (with erase) → ``M = b + R`` → nesterov_readout → sign_readout → apply_updates:
    ``b ← μb − β·E + (1 − τ)g`` (``b = g`` on the first step), ``M = b + R``,
    ``U = σ(g + μM)`` (nesterov) or ``σ(M)`` with σ identity or sign, ``W ← W − γU``.

    ``erase_terms`` E (fp32, DeltaMomentum's ``b K``) and ``reads`` R (fp32, DMGD's keyed read)
    are optional lists; an entry may be None only when the whole list is None."""
    if not params:
        return
    _check("params", params)
    has_momentum = momentum != 0
    bufs = momentum_buffers if has_momentum else params
    if has_momentum:
        _check("momentum_buffers", bufs, torch.float32)
    grads = [g.contiguous() for g in grads]
    device = params[0].device
    erase_terms = [e.contiguous() for e in erase_terms] if erase_terms is not None else params
    reads = [r.contiguous() for r in reads] if reads is not None else params
    for indices in _groups(params, grads):
        _launch(_memory_kernel, indices, [params, grads, bufs, erase_terms, reads],
                [float(lr), float(momentum), float(dampening), float(erase),
                 float(weight_decay)],
                dict(P_DTYPE=_TL[params[indices[0]].dtype], G_DTYPE=_TL[grads[indices[0]].dtype],
                     HAS_MOMENTUM=has_momentum, FIRST=first_step,
                     HAS_ERASE=erase_terms is not params and erase != 0,
                     HAS_READ=reads is not params, NESTEROV=nesterov,
                     DECOUPLED=decoupled_weight_decay, MAXIMIZE=maximize, SIGN=sign), device)


# --- M3 (§6): the per-step memories, then the apply with the second-moment denominator -------


@triton.jit
def _m3_write_kernel(g_table, m1_table, v_table, s_table, sizes, tensor_of_block, block_start,
                     beta1, beta2, mu1, mu2, G_DTYPE: tl.constexpr,
                     MAXIMIZE: tl.constexpr, BLOCK: tl.constexpr):
    t, offsets, mask = _program(sizes, tensor_of_block, block_start, BLOCK)
    g = tl.load(_ptr(g_table, t, G_DTYPE) + offsets, mask=mask).to(tl.float32)
    if MAXIMIZE:
        g = -g
    m1_ptr = _ptr(m1_table, t, tl.float32)
    v_ptr = _ptr(v_table, t, tl.float32)
    s_ptr = _ptr(s_table, t, tl.float32)
    tl.store(m1_ptr + offsets, tl.load(m1_ptr + offsets, mask=mask) * mu1 + beta1 * g, mask=mask)
    tl.store(v_ptr + offsets, tl.load(v_ptr + offsets, mask=mask) * mu2 + beta2 * g * g,
             mask=mask)
    tl.store(s_ptr + offsets, tl.load(s_ptr + offsets, mask=mask) + g, mask=mask)


def m3_write(grads, fast_buffers, second_moments, chunk_sums, *, betas, decays,
             maximize=False) -> None:
    """M3's effective_gradients → momentum_write, second_moment_write, accumulate:
    ``M¹ ← μ₁M¹ + β₁g``, ``V ← μ₂V + β₂g²``, ``S ← S + g`` in one launch per group."""
    if not grads:
        return
    for name, xs in (("fast_buffers", fast_buffers), ("second_moments", second_moments),
                     ("chunk_sums", chunk_sums)):
        _check(name, xs, torch.float32)
    grads = [g.contiguous() for g in grads]
    device = grads[0].device
    for indices in _groups(fast_buffers, grads):
        _launch(_m3_write_kernel, indices, [grads, fast_buffers, second_moments, chunk_sums],
                [float(betas[0]), float(betas[1]), float(decays[0]), float(decays[1])],
                dict(G_DTYPE=_TL[grads[indices[0]].dtype], MAXIMIZE=maximize), device)


@triton.jit
def _m3_apply_kernel(p_table, o1_table, o2_table, v_table, sizes, tensor_of_block, block_start,
                     lr, alpha, eps, weight_decay, P_DTYPE: tl.constexpr,
                     O_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    t, offsets, mask = _program(sizes, tensor_of_block, block_start, BLOCK)
    p_ptr = _ptr(p_table, t, P_DTYPE)
    w = tl.load(p_ptr + offsets, mask=mask).to(tl.float32)
    o1 = tl.load(_ptr(o1_table, t, O_DTYPE) + offsets, mask=mask).to(tl.float32)
    o2 = tl.load(_ptr(o2_table, t, tl.float32) + offsets, mask=mask)
    v = tl.load(_ptr(v_table, t, tl.float32) + offsets, mask=mask)
    w = w * (1.0 - lr * weight_decay) - lr * (o1 + alpha * o2) / (tl.sqrt(v) + eps)
    tl.store(p_ptr + offsets, w.to(P_DTYPE), mask=mask)


def m3_apply(params, fast_updates, slow_updates, second_moments, *, lr, alpha, eps,
             weight_decay) -> None:
    """M3's decoupled_decay → ``O¹ + αO²`` → preconditioner_denominators → apply_updates:
    ``W ← W(1 − γλ) − γ(O¹ + αO²)/(√V + ε)`` in one launch per group."""
    if not params:
        return
    _check("params", params)
    fast_updates = [o.contiguous() for o in fast_updates]
    device = params[0].device
    for indices in _groups(params, fast_updates):
        _launch(_m3_apply_kernel, indices, [params, fast_updates, slow_updates, second_moments],
                [float(lr), float(alpha), float(eps), float(weight_decay)],
                dict(P_DTYPE=_TL[params[indices[0]].dtype],
                     O_DTYPE=_TL[fast_updates[indices[0]].dtype]), device)