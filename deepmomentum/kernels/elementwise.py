"""Fused multi-tensor Triton kernels for the elementwise stages of the rules, with torch twins.

One launch covers every tensor of a (device, dtype) group: the kernel gets tables of data
pointers and sizes, and a table mapping each program to (tensor, block start) — the
multi-tensor-apply layout. Parameters may be fp32, bf16 or fp16; state is fp32; math is fp32;
each parameter is rounded once at the end. GradScaler's ``grad_scale``/``found_inf`` are
consumed like torch's fused optimizers: gradients are multiplied by ``1/grad_scale`` and
nothing is written when ``found_inf`` is non-zero.

Each ``*_step`` launcher has a ``*_step_torch`` twin in plain torch with the same arguments;
tests compare the two (under ``TRITON_INTERPRET=1`` on the CPU).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = [
    "SUPPORTED_DTYPES",
    "sgd_step", "sgd_step_torch",
    "adam_step", "adam_step_torch",
    "accumulate", "accumulate_torch",
    "ema_momentum", "ema_momentum_torch",
    "apply_update", "apply_update_torch",
    "memory_step", "memory_step_torch",
    "m3_write", "m3_write_torch", "m3_apply", "m3_apply_torch",
]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
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


def _scaler_args(grad_scale: Optional[Tensor], found_inf: Optional[Tensor], device):
    """Device tensors holding 1/grad_scale and found_inf (dummies when no scaler)."""
    if grad_scale is None and found_inf is None:
        dummy = torch.zeros(1, dtype=torch.float32, device=device)
        return dummy, dummy, False
    inv = (1.0 / grad_scale.float()).reshape(1) if grad_scale is not None else \
        torch.ones(1, dtype=torch.float32, device=device)
    inf = found_inf.float().reshape(1) if found_inf is not None else \
        torch.zeros(1, dtype=torch.float32, device=device)
    return inv.to(device), inf.to(device), True


@triton.jit
def _program(sizes, tensor_of_block, block_start, found_inf_ptr, HAS_SCALE: tl.constexpr,
             BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(tensor_of_block + pid)
    offsets = tl.load(block_start + pid) + tl.arange(0, BLOCK)
    size = tl.load(sizes + t)
    if HAS_SCALE:  # an inf/NaN in the scaled gradients: touch nothing
        size = tl.where(tl.load(found_inf_ptr) == 0, size, 0)
    return t, offsets, offsets < size


@triton.jit
def _ptr(table, t, DTYPE: tl.constexpr):
    return tl.load(table + t).to(tl.pointer_type(DTYPE))


@triton.jit
def _weight_and_grad(p_ptr, g_ptr, offsets, mask, inv_scale_ptr, lr, weight_decay,
                     HAS_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr, DECOUPLED: tl.constexpr):
    """(W, g) in fp32 after unscaling, maximize and weight decay (decoupled scales W, coupled
    adds λW to g) — the preamble every update kernel shares."""
    w = tl.load(p_ptr + offsets, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + offsets, mask=mask).to(tl.float32)
    if HAS_SCALE:
        g = g * tl.load(inv_scale_ptr)
    if MAXIMIZE:
        g = -g
    if DECOUPLED:
        w = w * (1.0 - lr * weight_decay)
    else:
        g = g + weight_decay * w
    return w, g


# --- SGD-momentum (AssociativeMomentum, §1) --------------------------------------------------


@triton.jit
def _sgd_kernel(p_table, g_table, b_table, sizes, tensor_of_block, block_start, inv_scale_ptr,
                found_inf_ptr, lr, momentum, dampening, weight_decay,
                P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
                FIRST: tl.constexpr, NESTEROV: tl.constexpr, DECOUPLED: tl.constexpr,
                MAXIMIZE: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    t, offsets, mask = _program(sizes, tensor_of_block, block_start, found_inf_ptr, HAS_SCALE,
                                BLOCK)
    p_ptr = _ptr(p_table, t, P_DTYPE)
    w, g = _weight_and_grad(p_ptr, _ptr(g_table, t, G_DTYPE), offsets, mask, inv_scale_ptr, lr,
                            weight_decay, HAS_SCALE, MAXIMIZE, DECOUPLED)
    u = g
    if HAS_MOMENTUM:
        b_ptr = _ptr(b_table, t, tl.float32)
        if FIRST:
            b = g
        else:
            b = tl.load(b_ptr + offsets, mask=mask) * momentum + (1.0 - dampening) * g
        tl.store(b_ptr + offsets, b, mask=mask)
        if NESTEROV:
            u = g + momentum * b
        else:
            u = b
    tl.store(p_ptr + offsets, (w - lr * u).to(P_DTYPE), mask=mask)


def sgd_step(params, grads, momentum_buffers, *, lr, momentum, dampening, nesterov,
             weight_decay, decoupled_weight_decay=False, maximize=False, first_step=False,
             grad_scale=None, found_inf=None) -> None:
    """§1 in one launch per group. ``momentum_buffers`` are fp32 tensors of the parameters'
    shapes (ignored when ``momentum == 0``); ``first_step`` writes ``b = g``."""
    if not params:
        return
    _check("params", params)
    bufs = momentum_buffers if momentum != 0 else params
    if momentum != 0:
        _check("momentum_buffers", bufs, torch.float32)
    grads = [g.contiguous() for g in grads]
    device = params[0].device
    inv, inf, has_scale = _scaler_args(grad_scale, found_inf, device)
    for indices in _groups(params, grads):
        _launch(_sgd_kernel, indices, [params, grads, bufs],
                [inv, inf, float(lr), float(momentum), float(dampening), float(weight_decay)],
                dict(P_DTYPE=_TL[params[indices[0]].dtype], G_DTYPE=_TL[grads[indices[0]].dtype],
                     HAS_MOMENTUM=momentum != 0, FIRST=first_step, NESTEROV=nesterov,
                     DECOUPLED=decoupled_weight_decay, MAXIMIZE=maximize,
                     HAS_SCALE=has_scale), device)


def sgd_step_torch(params, grads, momentum_buffers, *, lr, momentum, dampening, nesterov,
                   weight_decay, decoupled_weight_decay=False, maximize=False, first_step=False,
                   grad_scale=None, found_inf=None) -> None:
    """The plain-torch twin of :func:`sgd_step`."""
    if found_inf is not None and found_inf.item() != 0:
        return
    for i, (p, grad) in enumerate(zip(params, grads)):
        w, g = p.float(), grad.float()
        if grad_scale is not None:
            g = g * (1.0 / grad_scale.float())
        if maximize:
            g = -g
        if decoupled_weight_decay:
            w = w * (1 - lr * weight_decay)
        else:
            g = g + weight_decay * w
        u = g
        if momentum != 0:
            b = momentum_buffers[i]
            b.copy_(g if first_step else b * momentum + (1 - dampening) * g)
            u = g + momentum * b if nesterov else b
        p.copy_(w - lr * u)


# --- Adam-style (PreconditionedMomentum, §3) -------------------------------------------------


@triton.jit
def _adam_kernel(p_table, g_table, m_table, v_table, sizes, tensor_of_block, block_start,
                 inv_scale_ptr, found_inf_ptr, step_size_ptr, bc2_sqrt_ptr, lr, beta1, beta2,
                 eps, weight_decay, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr,
                 ADAM: tl.constexpr, VALUE: tl.constexpr, DECOUPLED: tl.constexpr,
                 MAXIMIZE: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    t, offsets, mask = _program(sizes, tensor_of_block, block_start, found_inf_ptr, HAS_SCALE,
                                BLOCK)
    p_ptr = _ptr(p_table, t, P_DTYPE)
    m_ptr = _ptr(m_table, t, tl.float32)
    w, g = _weight_and_grad(p_ptr, _ptr(g_table, t, G_DTYPE), offsets, mask, inv_scale_ptr, lr,
                            weight_decay, HAS_SCALE, MAXIMIZE, DECOUPLED)
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
              preconditioner="adam", maximize=False, grad_scale=None, found_inf=None) -> None:
    """§3 in one launch per group; ``steps`` are each tensor's t (already advanced)."""
    if not params:
        return
    adam = preconditioner == "adam"
    _check("params", params)
    _check("exp_avgs", exp_avgs, torch.float32)
    if adam:
        _check("exp_avg_sqs", exp_avg_sqs, torch.float32)
    grads = [g.contiguous() for g in grads]
    device = params[0].device
    inv, inf, has_scale = _scaler_args(grad_scale, found_inf, device)
    for indices in _groups(params, grads):
        step_size = torch.tensor([lr / (1 - beta1 ** steps[i]) for i in indices],
                                 dtype=torch.float32, device=device)
        bc2_sqrt = torch.tensor([math.sqrt(1 - beta2 ** steps[i]) for i in indices],
                                dtype=torch.float32, device=device)
        sub = lambda xs: [xs[i] for i in indices]  # noqa: E731
        vs = exp_avg_sqs if adam else exp_avgs
        _launch(_adam_kernel, list(range(len(indices))),
                [sub(params), sub(grads), sub(exp_avgs), sub(vs)],
                [inv, inf, step_size, bc2_sqrt, float(lr), float(beta1), float(beta2),
                 float(eps), float(weight_decay)],
                dict(P_DTYPE=_TL[params[indices[0]].dtype], G_DTYPE=_TL[grads[indices[0]].dtype],
                     ADAM=adam, VALUE=precondition == "value",
                     DECOUPLED=decoupled_weight_decay, MAXIMIZE=maximize,
                     HAS_SCALE=has_scale), device)


def adam_step_torch(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps,
                    weight_decay, decoupled_weight_decay=True, precondition="readout",
                    preconditioner="adam", maximize=False, grad_scale=None,
                    found_inf=None) -> None:
    """The plain-torch twin of :func:`adam_step`."""
    if found_inf is not None and found_inf.item() != 0:
        return
    for i, (p, grad) in enumerate(zip(params, grads)):
        w, g, m = p.float(), grad.float(), exp_avgs[i]
        if grad_scale is not None:
            g = g * (1.0 / grad_scale.float())
        if maximize:
            g = -g
        if decoupled_weight_decay:
            w = w * (1 - lr * weight_decay)
        else:
            g = g + weight_decay * w
        step_size = lr / (1 - beta1 ** steps[i])
        if preconditioner == "adam":
            v = exp_avg_sqs[i]
            v.copy_(v * beta2 + (1 - beta2) * g * g)
            denom = v.sqrt() / math.sqrt(1 - beta2 ** steps[i]) + eps
            if precondition == "value":
                m.copy_(m + (1 - beta1) * (g / denom - m))
                w = w - step_size * m
            else:
                m.copy_(m + (1 - beta1) * (g - m))
                w = w - step_size * m / denom
        else:
            m.copy_(m + (1 - beta1) * (g - m))
            w = w - step_size * m
        p.copy_(w)


# --- multi-frequency accumulation (§7) -------------------------------------------------------


@triton.jit
def _accumulate_kernel(a_table, g_table, sizes, tensor_of_block, block_start, found_inf_ptr,
                       A_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, HAS_SCALE: tl.constexpr,
                       BLOCK: tl.constexpr):
    t, offsets, mask = _program(sizes, tensor_of_block, block_start, found_inf_ptr, HAS_SCALE,
                                BLOCK)
    a_ptr = _ptr(a_table, t, A_DTYPE)
    a = tl.load(a_ptr + offsets, mask=mask).to(tl.float32)
    g = tl.load(_ptr(g_table, t, G_DTYPE) + offsets, mask=mask).to(tl.float32)
    tl.store(a_ptr + offsets, (a + g).to(A_DTYPE), mask=mask)


def accumulate(accumulators, grads) -> None:
    """``accumulators[i] += grads[i]`` for all tensors in one launch per dtype pair."""
    if not accumulators:
        return
    _check("accumulators", accumulators)
    grads = [g.contiguous() for g in grads]
    device = accumulators[0].device
    dummy = torch.zeros(1, dtype=torch.float32, device=device)
    for indices in _groups(accumulators, grads):
        _launch(_accumulate_kernel, indices, [accumulators, grads], [dummy],
                dict(A_DTYPE=_TL[accumulators[indices[0]].dtype],
                     G_DTYPE=_TL[grads[indices[0]].dtype], HAS_SCALE=False), device)


def accumulate_torch(accumulators, grads) -> None:
    """The plain-torch twin of :func:`accumulate`."""
    for a, g in zip(accumulators, grads):
        a.copy_(a.float() + g.float())


# --- Muon's stages (§5): EMA momentum with nesterov, then the decayed, scaled apply -----------


@triton.jit
def _ema_kernel(b_table, g_table, u_table, sizes, tensor_of_block, block_start, found_inf_ptr,
                momentum, G_DTYPE: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
                HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    t, offsets, mask = _program(sizes, tensor_of_block, block_start, found_inf_ptr, HAS_SCALE,
                                BLOCK)
    b_ptr = _ptr(b_table, t, tl.float32)
    g = tl.load(_ptr(g_table, t, G_DTYPE) + offsets, mask=mask).to(tl.float32)
    if MAXIMIZE:
        g = -g
    b = tl.load(b_ptr + offsets, mask=mask)
    b = b + (1.0 - momentum) * (g - b)
    tl.store(b_ptr + offsets, b, mask=mask)
    if NESTEROV:
        u = g + momentum * (b - g)
    else:
        u = b
    tl.store(_ptr(u_table, t, tl.float32) + offsets, u, mask=mask)


def ema_momentum(momentum_buffers, grads, *, momentum, nesterov, maximize=False) -> list[Tensor]:
    """``b ← lerp(b, g, 1 − μ)``; returns new fp32 tensors ``U = lerp(g, b, μ)`` (nesterov) or
    copies of ``b`` — never the buffers themselves, so NS cannot alias the state."""
    if not grads:
        return []
    _check("momentum_buffers", momentum_buffers, torch.float32)
    grads = [g.contiguous() for g in grads]
    updates = [torch.empty_like(b) for b in momentum_buffers]
    device = grads[0].device
    dummy = torch.zeros(1, dtype=torch.float32, device=device)
    for indices in _groups(momentum_buffers, grads):
        _launch(_ema_kernel, indices, [momentum_buffers, grads, updates],
                [dummy, float(momentum)],
                dict(G_DTYPE=_TL[grads[indices[0]].dtype], NESTEROV=nesterov,
                     MAXIMIZE=maximize, HAS_SCALE=False), device)
    return updates


def ema_momentum_torch(momentum_buffers, grads, *, momentum, nesterov, maximize=False):
    """The plain-torch twin of :func:`ema_momentum`."""
    out = []
    for b, grad in zip(momentum_buffers, grads):
        g = -grad.float() if maximize else grad.float()
        b.lerp_(g, 1 - momentum)
        out.append(g.lerp(b, momentum) if nesterov else b.clone())
    return out


@triton.jit
def _apply_kernel(p_table, u_table, sizes, tensor_of_block, block_start, found_inf_ptr,
                  scale_ptr, lr, weight_decay, P_DTYPE: tl.constexpr, U_DTYPE: tl.constexpr,
                  HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    t, offsets, mask = _program(sizes, tensor_of_block, block_start, found_inf_ptr, HAS_SCALE,
                                BLOCK)
    p_ptr = _ptr(p_table, t, P_DTYPE)
    w = tl.load(p_ptr + offsets, mask=mask).to(tl.float32)
    u = tl.load(_ptr(u_table, t, U_DTYPE) + offsets, mask=mask).to(tl.float32)
    w = w * (1.0 - lr * weight_decay) - lr * tl.load(scale_ptr + t) * u
    tl.store(p_ptr + offsets, w.to(P_DTYPE), mask=mask)


def apply_update(params, updates, scales: Sequence[float], *, lr, weight_decay) -> None:
    """``W ← W(1 − γλ) − γ·s_i·U_i`` for all tensors (decoupled decay, unadjusted γ)."""
    if not params:
        return
    _check("params", params)
    updates = [u.contiguous() for u in updates]
    device = params[0].device
    dummy = torch.zeros(1, dtype=torch.float32, device=device)
    for indices in _groups(params, updates):
        scale = torch.tensor([scales[i] for i in indices], dtype=torch.float32, device=device)
        sub = lambda xs: [xs[i] for i in indices]  # noqa: E731
        _launch(_apply_kernel, list(range(len(indices))), [sub(params), sub(updates)],
                [dummy, scale, float(lr), float(weight_decay)],
                dict(P_DTYPE=_TL[params[indices[0]].dtype],
                     U_DTYPE=_TL[updates[indices[0]].dtype], HAS_SCALE=False), device)


def apply_update_torch(params, updates, scales, *, lr, weight_decay) -> None:
    """The plain-torch twin of :func:`apply_update`."""
    for p, u, s in zip(params, updates, scales):
        p.copy_(p.float() * (1 - lr * weight_decay) - lr * s * u.float())


# --- DeltaMomentum / DMGD keyless stage (§2, §4): b, erase, read, read-out, apply ------------


@triton.jit
def _memory_kernel(p_table, g_table, b_table, e_table, r_table, sizes, tensor_of_block,
                   block_start, found_inf_ptr, lr, momentum, dampening, erase, weight_decay,
                   P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
                   FIRST: tl.constexpr, HAS_ERASE: tl.constexpr, HAS_READ: tl.constexpr,
                   NESTEROV: tl.constexpr, DECOUPLED: tl.constexpr, MAXIMIZE: tl.constexpr,
                   SIGN: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    t, offsets, mask = _program(sizes, tensor_of_block, block_start, found_inf_ptr, HAS_SCALE,
                                BLOCK)
    p_ptr = _ptr(p_table, t, P_DTYPE)
    w, g = _weight_and_grad(p_ptr, _ptr(g_table, t, G_DTYPE), offsets, mask, found_inf_ptr, lr,
                            weight_decay, False, MAXIMIZE, DECOUPLED)
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


def memory_step(params, grads, momentum_buffers, erase_terms=None, reads=None, *, lr, momentum,
                dampening, nesterov, weight_decay, erase=0.0, decoupled_weight_decay=False,
                maximize=False, first_step=False, sign=False) -> None:
    """``b ← μb − β·E + (1 − τ)g`` (``b = g`` on the first step), ``M = b + R``,
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
    dummy = torch.zeros(1, dtype=torch.float32, device=device)
    erase_terms = [e.contiguous() for e in erase_terms] if erase_terms is not None else params
    reads = [r.contiguous() for r in reads] if reads is not None else params
    for indices in _groups(params, grads):
        _launch(_memory_kernel, indices, [params, grads, bufs, erase_terms, reads],
                [dummy, float(lr), float(momentum), float(dampening), float(erase),
                 float(weight_decay)],
                dict(P_DTYPE=_TL[params[indices[0]].dtype], G_DTYPE=_TL[grads[indices[0]].dtype],
                     HAS_MOMENTUM=has_momentum, FIRST=first_step,
                     HAS_ERASE=erase_terms is not params and erase != 0,
                     HAS_READ=reads is not params, NESTEROV=nesterov,
                     DECOUPLED=decoupled_weight_decay, MAXIMIZE=maximize, SIGN=sign,
                     HAS_SCALE=False), device)


def memory_step_torch(params, grads, momentum_buffers, erase_terms=None, reads=None, *, lr,
                      momentum, dampening, nesterov, weight_decay, erase=0.0,
                      decoupled_weight_decay=False, maximize=False, first_step=False,
                      sign=False) -> None:
    """The plain-torch twin of :func:`memory_step`."""
    for i, (p, grad) in enumerate(zip(params, grads)):
        w, g = p.float(), grad.float()
        g = -g if maximize else g
        if decoupled_weight_decay:
            w = w * (1 - lr * weight_decay)
        else:
            g = g + weight_decay * w
        memory = g
        if momentum != 0:
            b = momentum_buffers[i]
            if first_step:
                b.copy_(g)
            else:
                new = b * momentum
                if erase_terms is not None:
                    new = new - erase * erase_terms[i]
                b.copy_(new + (1 - dampening) * g)
            memory = b
        if reads is not None:
            memory = memory + reads[i]
        u = g + momentum * memory if nesterov else memory
        p.copy_(w - lr * (torch.sign(u) if sign else u))


# --- M3 (§6): the per-step memories, then the apply with the second-moment denominator -------


@triton.jit
def _m3_write_kernel(g_table, m1_table, v_table, s_table, sizes, tensor_of_block, block_start,
                     found_inf_ptr, beta1, beta2, mu1, mu2, G_DTYPE: tl.constexpr,
                     MAXIMIZE: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    t, offsets, mask = _program(sizes, tensor_of_block, block_start, found_inf_ptr, HAS_SCALE,
                                BLOCK)
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
    """``M¹ ← μ₁M¹ + β₁g``, ``V ← μ₂V + β₂g²``, ``S ← S + g`` in one launch per group."""
    if not grads:
        return
    for name, xs in (("fast_buffers", fast_buffers), ("second_moments", second_moments),
                     ("chunk_sums", chunk_sums)):
        _check(name, xs, torch.float32)
    grads = [g.contiguous() for g in grads]
    device = grads[0].device
    dummy = torch.zeros(1, dtype=torch.float32, device=device)
    for indices in _groups(fast_buffers, grads):
        _launch(_m3_write_kernel, indices, [grads, fast_buffers, second_moments, chunk_sums],
                [dummy, float(betas[0]), float(betas[1]), float(decays[0]), float(decays[1])],
                dict(G_DTYPE=_TL[grads[indices[0]].dtype], MAXIMIZE=maximize,
                     HAS_SCALE=False), device)


def m3_write_torch(grads, fast_buffers, second_moments, chunk_sums, *, betas, decays,
                   maximize=False) -> None:
    """The plain-torch twin of :func:`m3_write`."""
    for g, m1, v, s in zip(grads, fast_buffers, second_moments, chunk_sums):
        g = -g.float() if maximize else g.float()
        m1.copy_(m1 * decays[0] + betas[0] * g)
        v.copy_(v * decays[1] + betas[1] * g * g)
        s.add_(g)


@triton.jit
def _m3_apply_kernel(p_table, o1_table, o2_table, v_table, sizes, tensor_of_block, block_start,
                     found_inf_ptr, lr, alpha, eps, weight_decay, P_DTYPE: tl.constexpr,
                     O_DTYPE: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    t, offsets, mask = _program(sizes, tensor_of_block, block_start, found_inf_ptr, HAS_SCALE,
                                BLOCK)
    p_ptr = _ptr(p_table, t, P_DTYPE)
    w = tl.load(p_ptr + offsets, mask=mask).to(tl.float32)
    o1 = tl.load(_ptr(o1_table, t, O_DTYPE) + offsets, mask=mask).to(tl.float32)
    o2 = tl.load(_ptr(o2_table, t, tl.float32) + offsets, mask=mask)
    v = tl.load(_ptr(v_table, t, tl.float32) + offsets, mask=mask)
    w = w * (1.0 - lr * weight_decay) - lr * (o1 + alpha * o2) / (tl.sqrt(v) + eps)
    tl.store(p_ptr + offsets, w.to(P_DTYPE), mask=mask)


def m3_apply(params, fast_updates, slow_updates, second_moments, *, lr, alpha, eps,
             weight_decay) -> None:
    """``W ← W(1 − γλ) − γ(O¹ + αO²)/(√V + ε)`` in one launch per group."""
    if not params:
        return
    _check("params", params)
    fast_updates = [o.contiguous() for o in fast_updates]
    device = params[0].device
    dummy = torch.zeros(1, dtype=torch.float32, device=device)
    for indices in _groups(params, fast_updates):
        _launch(_m3_apply_kernel, indices, [params, fast_updates, slow_updates, second_moments],
                [dummy, float(lr), float(alpha), float(eps), float(weight_decay)],
                dict(P_DTYPE=_TL[params[indices[0]].dtype],
                     O_DTYPE=_TL[fast_updates[indices[0]].dtype], HAS_SCALE=False), device)


def m3_apply_torch(params, fast_updates, slow_updates, second_moments, *, lr, alpha, eps,
                   weight_decay) -> None:
    """The plain-torch twin of :func:`m3_apply`."""
    for p, o1, o2, v in zip(params, fast_updates, slow_updates, second_moments):
        p.copy_(p.float() * (1 - lr * weight_decay)
                - lr * (o1.float() + alpha * o2) / (v.sqrt() + eps))
