"""Fused Triton kernels on compressed optimizer state (:mod:`deepmomentum.compressed`): each
step reads the stored memories (bf16, or 8-bit codes with their block scales), dequantizes them
in registers, updates in fp32, and writes the parameter and the requantized memories back — one
pass over the data, where the torch path makes a decompress, an update and a compress pass.

The codec is :mod:`deepmomentum.compressed`'s, bit for bit:

* random bits: ``lowbias32((offset + flat index) ⊕ seed)`` on uint32 (:func:`_bits`, equal to
  :func:`compressed.uniform_bits`);
* bf16: the low 16 random bits added to the fp32 pattern, truncated (:func:`_bf16_stochastic`,
  equal to :func:`compressed.round_bf16`); to nearest (even) without bits;
* 8-bit: one program per quantization block — (tensor, row, block of :data:`QBLOCK` = 256
  columns of the row), the tensor read as ``(shape[0], numel/shape[0])`` — so the block's
  absmax is a register reduction; then exactly the ops of :func:`compressed.quantize` with
  IEEE-rounded division and square root (``tl.div_rn``, ``tl.sqrt_rn``), and the kernels
  launch with ``enable_fp_fusion=False`` so no multiply-add is contracted behind the code's
  back.

Steps: :func:`adam_step` (PreconditionedMomentum's whole step), :func:`sgd_step`
(AssociativeMomentum's), and :func:`ema_step` — Muon's momentum, the one elementwise pass of its
step: it reads and rewrites the compressed buffer and returns the fp32 Newton–Schulz input, and
the optimizer runs the rule's batched NS and apply kernel on it as ``functional._triton_muon``
does (``MemoryOptimizer._fused_compressed``).

The update arithmetic is the single-tensor torch composition of the rule
(:func:`deepmomentum.functional.preconditioned_momentum`, ``associative_momentum``, ``muon``'s
``ema_write`` and ``nesterov_readout``) op for op, including the fused multiply-adds torch's
CPU and CUDA kernels make (``lerp``, ``addcmul``, ``add(alpha=)`` are one ``fma`` each there;
written here as ``tl.fma``), and the same fp32 scalars (``1 − β`` computed in double then
rounded, as torch's scalar arguments are). On the CPU (the interpreter) a kernel step therefore
equals ``decompress → rule → compress`` bit for bit wherever torch's own ops are correctly
rounded — all but ``torch.sqrt``, which on the CPU goes through MKL's vector math (not
correctly rounded: about one fp32 result in six differs in its last bit); with an IEEE square
root in the reference, parameters, codes and scales are equal bit for bit
(tests/test_kernels_compressed.py). Muon's momentum has no square root of its own: ``ema_step``'s
fp32 update and bf16 buffers equal the torch reference as it is, its 8-bit codes and scales
with the reference codec's sqrt made IEEE, as every 8-bit comparison.

Tables: one launch per (device, param dtype, grad dtype) group, multi-tensor-apply style: an
int64 table of per-tensor values (data pointers of every role, seeds, offsets) and an fp32 table
of per-tensor scalars (bias-corrected step sizes), both ``(rows, tensors)``, and a static table
mapping each program to its tensor (cached per list of shapes).

``form`` is ``"bf16"`` (memories bf16, ``scales`` None) or ``"8bit"`` (signed memories int8,
second moments uint8, scales fp32 of :func:`compressed.scale_shape`). Seeds (one per tensor per
memory, :func:`compressed.seed_of`) and offsets (one per tensor: the index of its first element
in the whole tensor, a shard's, 0 unless sharded) are the optimizer's.

Parameters are fp32, bf16 or fp16 and take the fp32 result rounded to nearest
(``param_rounding="nearest"``), or — the optimizer's ``param_rounding`` for 16-bit parameters —
stochastically (bf16, with ``param_seeds``), or with a Kahan compensation (``compensations``:
16-bit tensors of the parameters' dtype, added to the fp32 working copy first and rewritten
with what rounding dropped; bf16 compensations rounded stochastically with
``compensation_seeds``, fp16 ones to nearest).
"""

from __future__ import annotations

import math
import os
from functools import lru_cache
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import SUPPORTED_DTYPES
from .elementwise import _lerp_coefficient
from .. import compressed as codec

__all__ = ["adam_step", "sgd_step", "ema_step", "compress", "decompress", "uniform_bits",
           "QBLOCK", "FORMS", "PARAM_ROUNDINGS"]

#: Entries per 8-bit quantization block (one program each): :data:`compressed.BLOCK`.
QBLOCK = codec.BLOCK
#: Elements per program for bf16 state (no blocks: flat).
FLAT_BLOCK = 1024
#: Stored forms the kernels read and write.
FORMS = ("bf16", "8bit")
#: How 16-bit parameters take the fp32 result.
PARAM_ROUNDINGS = ("nearest", "stochastic", "kahan")
#: Warps per program, by form (benchmarks/compressed_gpu.py may sweep them).
NUM_WARPS = {"bf16": 4, "8bit": 2}

assert QBLOCK == 256, "the 8-bit kernels take one 256-entry block per program"

_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_PARAM_MODE = {"nearest": 0, "stochastic": 1, "kahan": 2}


def _f32(x: float) -> float:
    """``x`` rounded to fp32 (as torch rounds a Python scalar argument), as a Python float."""
    return torch.tensor(x, dtype=torch.float32).item()


# =============================================================================================
# The codec in registers
# =============================================================================================


@triton.jit
def _bits(index, seed):
    """32 random bits (uint32) of the elements at global ``index`` (int64; its low 32 bits)
    for ``seed`` (uint32): :func:`compressed.uniform_bits`, lowbias32 of ``index ⊕ seed``
    (``compressed._mix_int``)."""
    x = index.to(tl.uint32) ^ seed
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    x ^= x >> 16
    return x


@triton.jit
def _bf16_stochastic(x, h):
    """fp32 ``x`` rounded to bf16 with the low 16 of the bits ``h``: the bf16 pattern (uint16);
    :func:`compressed.round_bf16` (NaN payloads aside)."""
    return ((x.to(tl.uint32, bitcast=True) + (h & 0xFFFF)) >> 16).to(tl.uint16)


@triton.jit
def _bf16_nearest(x):
    """fp32 ``x`` rounded to the nearest bf16, ties to even: the pattern (uint16), torch's
    conversion (quiet NaN 0x7FC0)."""
    u = x.to(tl.uint32, bitcast=True)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return tl.where(x != x, 0x7FC0, r).to(tl.uint16)


@triton.jit
def _from_bf16(bits16):
    """A bf16 pattern (uint16) as fp32 (exact)."""
    return (bits16.to(tl.uint32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _quantize(x, mask, h, SIGNED: tl.constexpr, STOCHASTIC: tl.constexpr):
    """One block: codes (fp32 integers, signed for SIGNED) and the absmax scale of the fp32
    values ``x`` (lanes outside ``mask`` count as 0), with the ops of
    :func:`compressed.quantize` in its order; stochastic with the bits ``h``, else to the
    nearest code value."""
    magnitude = tl.where(mask, tl.abs(x), 0.0)
    scale = tl.max(magnitude, axis=0)
    a = tl.div_rn(magnitude, tl.where(scale > 0, scale, 1.0))
    if SIGNED:
        below = tl.minimum(tl.floor(tl.sqrt_rn(a) * 127.0), 126.0)
        low = below * below
        fraction = tl.div_rn(a * 16129.0 - low, below * 2.0 + 1.0)
    else:
        below = tl.minimum(tl.floor(tl.sqrt_rn(tl.sqrt_rn(a)) * 255.0), 254.0)
        low = below * below
        low = low * low
        above = below + 1.0
        above = above * above
        above = above * above
        fraction = tl.div_rn(a * 4228250624.0 - low, above - low)  # fp32(255⁴)
    if STOCHASTIC:
        # u in [0, 1) from the upper 24 of the 32 bits (``compressed._uniform``)
        up = ((h >> 8) & 0xFFFFFF).to(tl.float32) * 5.9604644775390625e-08 < fraction
    else:
        up = fraction >= 0.5
    code = below + up.to(tl.float32)
    if SIGNED:
        code = tl.where(x < 0, -code, code)
    return code, scale


@triton.jit
def _dequantize(q, scale, SIGNED: tl.constexpr):
    """fp32 values of the codes ``q`` (int8/uint8) with the block ``scale``:
    :func:`compressed.dequantize`'s ops."""
    q = q.to(tl.float32)
    if SIGNED:
        v = (tl.abs(q) * q) * 6.200012285262346e-05  # fp32(1/127²)
    else:
        q = q * q
        v = (q * q) * 2.365044271535055e-10  # fp32(1/255⁴)
    return v * scale


# --- programs and tables ----------------------------------------------------------------------


@triton.jit
def _locate(tensor_of_block, tab_a, tab_b, tab_c, EIGHT_BIT: tl.constexpr,
            BLOCK: tl.constexpr):
    """This program's (tensor, element offsets (int64), mask, block index within the tensor).
    8-bit: one block of one row (tab_a: first program of each tensor, tab_b: columns, tab_c:
    blocks per row; the block index is the scale's flat index); flat: ``BLOCK`` elements
    (tab_a: block start, tab_b: sizes)."""
    pid = tl.program_id(0)
    t = tl.load(tensor_of_block + pid)
    if EIGHT_BIT:
        k = pid - tl.load(tab_a + t)
        per_row = tl.load(tab_c + t)
        cols = tl.load(tab_b + t)
        row = k // per_row
        col = (k - row * per_row) * BLOCK + tl.arange(0, BLOCK)
        return t, row * cols + col, col < cols, k
    else:
        offsets = tl.load(tab_a + pid) + tl.arange(0, BLOCK)
        return t, offsets, offsets < tl.load(tab_b + t), pid


@triton.jit
def _load_f32(ptr_int, offsets, mask, KIND: tl.constexpr):
    """fp32 values of a tensor of KIND (0 fp32, 1 bf16 — read as its uint16 patterns —,
    2 fp16) at the int64 address ``ptr_int``."""
    if KIND == 0:
        return tl.load(ptr_int.to(tl.pointer_type(tl.float32)) + offsets, mask=mask)
    elif KIND == 1:
        return _from_bf16(tl.load(ptr_int.to(tl.pointer_type(tl.uint16)) + offsets, mask=mask))
    else:
        return tl.load(ptr_int.to(tl.pointer_type(tl.float16)) + offsets,
                       mask=mask).to(tl.float32)


@triton.jit
def _store_nearest(ptr_int, offsets, mask, x, KIND: tl.constexpr):
    """fp32 ``x`` into a tensor of KIND, rounded to nearest (even)."""
    if KIND == 0:
        tl.store(ptr_int.to(tl.pointer_type(tl.float32)) + offsets, x, mask=mask)
    elif KIND == 1:
        tl.store(ptr_int.to(tl.pointer_type(tl.uint16)) + offsets, _bf16_nearest(x), mask=mask)
    else:
        tl.store(ptr_int.to(tl.pointer_type(tl.float16)) + offsets, x.to(tl.float16), mask=mask)


@triton.jit
def _read_memory(code_int, scale_int, offsets, mask, block, EIGHT_BIT: tl.constexpr,
                 SIGNED: tl.constexpr):
    """The fp32 working values of a stored memory: bf16 widened, or 8-bit dequantized."""
    if EIGHT_BIT:
        scale = tl.load(scale_int.to(tl.pointer_type(tl.float32)) + block)
        if SIGNED:
            q = tl.load(code_int.to(tl.pointer_type(tl.int8)) + offsets, mask=mask)
        else:
            q = tl.load(code_int.to(tl.pointer_type(tl.uint8)) + offsets, mask=mask)
        return _dequantize(q, scale, SIGNED)
    else:
        return _from_bf16(tl.load(code_int.to(tl.pointer_type(tl.uint16)) + offsets, mask=mask))


@triton.jit
def _write_memory(code_int, scale_int, offsets, mask, block, x, seed, offset,
                  EIGHT_BIT: tl.constexpr, SIGNED: tl.constexpr, STOCHASTIC: tl.constexpr):
    """Store the fp32 values ``x`` compressed, rounded stochastically with the bits of
    (``offset`` + offsets, ``seed``) or (not STOCHASTIC) to nearest."""
    h = offsets.to(tl.uint32)
    if STOCHASTIC:
        h = _bits(offsets + offset, seed)
    if EIGHT_BIT:
        code, scale = _quantize(x, mask, h, SIGNED, STOCHASTIC)
        tl.store(scale_int.to(tl.pointer_type(tl.float32)) + block, scale)
        if SIGNED:
            tl.store(code_int.to(tl.pointer_type(tl.int8)) + offsets, code.to(tl.int8),
                     mask=mask)
        else:
            tl.store(code_int.to(tl.pointer_type(tl.uint8)) + offsets, code.to(tl.uint8),
                     mask=mask)
    else:
        if STOCHASTIC:
            bits16 = _bf16_stochastic(x, h)
        else:
            bits16 = _bf16_nearest(x)
        tl.store(code_int.to(tl.pointer_type(tl.uint16)) + offsets, bits16, mask=mask)


@triton.jit
def _write_param(meta, T, t, p_int, offsets, mask, w, P_KIND: tl.constexpr,
                 PARAM_MODE: tl.constexpr, R_OFFSET: tl.constexpr, R_PSEED: tl.constexpr,
                 R_COMP: tl.constexpr, R_CSEED: tl.constexpr):
    """The fp32 result ``w`` into the parameter: to nearest (PARAM_MODE 0), stochastically
    (1, bf16), or to nearest with the Kahan compensation rewritten (2)."""
    if PARAM_MODE == 1:
        h = _bits(offsets + tl.load(meta + R_OFFSET * T + t),
                  tl.load(meta + R_PSEED * T + t).to(tl.uint32))
        tl.store(p_int.to(tl.pointer_type(tl.uint16)) + offsets, _bf16_stochastic(w, h),
                 mask=mask)
    elif PARAM_MODE == 2:
        c_int = tl.load(meta + R_COMP * T + t)
        if P_KIND == 1:
            rounded16 = _bf16_nearest(w)
            tl.store(p_int.to(tl.pointer_type(tl.uint16)) + offsets, rounded16, mask=mask)
            error = w - _from_bf16(rounded16)  # exact
            h = _bits(offsets + tl.load(meta + R_OFFSET * T + t),
                      tl.load(meta + R_CSEED * T + t).to(tl.uint32))
            tl.store(c_int.to(tl.pointer_type(tl.uint16)) + offsets, _bf16_stochastic(error, h),
                     mask=mask)
        else:
            rounded = w.to(tl.float16)
            tl.store(p_int.to(tl.pointer_type(tl.float16)) + offsets, rounded, mask=mask)
            error = w - rounded.to(tl.float32)
            tl.store(c_int.to(tl.pointer_type(tl.float16)) + offsets, error.to(tl.float16),
                     mask=mask)
    else:
        _store_nearest(p_int, offsets, mask, w, P_KIND)


@triton.jit
def _weight_and_grad(meta, T, t, p_int, offsets, mask, decay, weight_decay,
                     P_KIND: tl.constexpr, G_DTYPE: tl.constexpr, PARAM_MODE: tl.constexpr,
                     MAXIMIZE: tl.constexpr, HAS_WD: tl.constexpr, DECOUPLED: tl.constexpr,
                     R_G: tl.constexpr, R_COMP: tl.constexpr):
    """(W, g) in fp32 as ``functional._weights_and_gradients`` makes them: the working copy
    (plus the Kahan compensation), ``−G`` when maximizing, ``g.add(W, alpha=λ)`` (one fma) for
    coupled decay, ``W·(1 − γλ)`` for decoupled."""
    w = _load_f32(p_int, offsets, mask, P_KIND)
    if PARAM_MODE == 2:
        w = w + _load_f32(tl.load(meta + R_COMP * T + t), offsets, mask, P_KIND)
    g_ptr = tl.load(meta + R_G * T + t).to(tl.pointer_type(G_DTYPE))
    g = tl.load(g_ptr + offsets, mask=mask).to(tl.float32)
    if MAXIMIZE:
        g = -g
    if HAS_WD:
        if DECOUPLED:
            w = w * decay
        else:
            g = tl.fma(weight_decay, w, g)
    return w, g


# =============================================================================================
# Adam-style (PreconditionedMomentum, §3)
# =============================================================================================

# The int64 table's rows: 0 params, 1 grads, 2 exp_avgs, 3 exp_avg_sqs, 4/5 their scales,
# 6/7 their seeds, 8 offsets, 9 param seeds, 10 compensations, 11 compensation seeds; the fp32
# table's: 0 step sizes −γ/(1 − β₁ᵗ), 1 √(1 − β₂ᵗ).


@triton.jit
def _adam_kernel(meta, f32_table, T, tensor_of_block, tab_a, tab_b, tab_c,
                 lerp_coeff, beta2, write2, eps, decay, weight_decay,
                 P_KIND: tl.constexpr, G_DTYPE: tl.constexpr, EIGHT_BIT: tl.constexpr,
                 ADAM: tl.constexpr, VALUE: tl.constexpr, LERP_SMALL: tl.constexpr,
                 HAS_WD: tl.constexpr, DECOUPLED: tl.constexpr, MAXIMIZE: tl.constexpr,
                 STOCHASTIC: tl.constexpr, PARAM_MODE: tl.constexpr, BLOCK: tl.constexpr):
    t, offsets, mask, block = _locate(tensor_of_block, tab_a, tab_b, tab_c, EIGHT_BIT, BLOCK)
    p_int = tl.load(meta + 0 * T + t)
    w, g = _weight_and_grad(meta, T, t, p_int, offsets, mask, decay, weight_decay, P_KIND,
                            G_DTYPE, PARAM_MODE, MAXIMIZE, HAS_WD, DECOUPLED, 1, 10)
    offset = tl.load(meta + 8 * T + t)
    step_size = tl.load(f32_table + t)  # −γ / (1 − β₁ᵗ)
    m_int = tl.load(meta + 2 * T + t)
    ms_int = tl.load(meta + 4 * T + t)
    m = _read_memory(m_int, ms_int, offsets, mask, block, EIGHT_BIT, True)
    if ADAM:
        v_int = tl.load(meta + 3 * T + t)
        vs_int = tl.load(meta + 5 * T + t)
        v = _read_memory(v_int, vs_int, offsets, mask, block, EIGHT_BIT, False)
        v = tl.fma(write2 * g, g, v * beta2)  # v.mul_(β₂).addcmul_(g, g, value=1 − β₂)
        _write_memory(v_int, vs_int, offsets, mask, block, v,
                      tl.load(meta + 7 * T + t).to(tl.uint32), offset, EIGHT_BIT, False,
                      STOCHASTIC)
        denom = tl.div_rn(tl.sqrt_rn(v), tl.load(f32_table + T + t)) + eps
        if VALUE:
            g = tl.div_rn(g, denom)
    # m.lerp_(g, 1 − β₁): torch's lerp, one fma from the nearer end
    if LERP_SMALL:
        m = tl.fma(lerp_coeff, g - m, m)
    else:
        m = tl.fma(lerp_coeff, g - m, g)
    _write_memory(m_int, ms_int, offsets, mask, block, m,
                  tl.load(meta + 6 * T + t).to(tl.uint32), offset, EIGHT_BIT, True, STOCHASTIC)
    if ADAM and not VALUE:
        w = w + tl.div_rn(step_size * m, denom)  # w.addcdiv_(m, d, value=s)
    else:
        w = tl.fma(step_size, m, w)  # w.add_(m, alpha=s)
    _write_param(meta, T, t, p_int, offsets, mask, w, P_KIND, PARAM_MODE, 8, 9, 10, 11)


def adam_step(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
              exp_avg_sqs: Optional[Sequence[Tensor]],
              exp_avg_scales: Optional[Sequence[Tensor]],
              exp_avg_sq_scales: Optional[Sequence[Tensor]], steps: Sequence[float], *,
              lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
              decoupled_weight_decay: bool = True, precondition: str = "readout",
              preconditioner: str = "adam", maximize: bool = False, form: str,
              seeds_m: Optional[Sequence[int]], seeds_v: Optional[Sequence[int]],
              offsets: Optional[Sequence[int]] = None, param_rounding: str = "nearest",
              param_seeds: Optional[Sequence[int]] = None,
              compensations: Optional[Sequence[Tensor]] = None,
              compensation_seeds: Optional[Sequence[int]] = None) -> None:
    """``functional.preconditioned_momentum`` (every ``precondition``/``preconditioner`` of
    ``elementwise.adam_step``) on compressed memories, in one pass per group: read
    ``exp_avgs`` (and ``exp_avg_sqs``) in ``form``, update in fp32, write them back rounded
    (stochastically with ``seeds_m``/``seeds_v``; to nearest where those are None) and the
    parameters. ``steps``: each tensor's t (already advanced). With ``preconditioner="none"``
    the second-moment lists may be None."""
    _check_choice("precondition", precondition, ("readout", "value"))
    _check_choice("preconditioner", preconditioner, ("adam", "none"))
    if not params:
        return
    adam = preconditioner == "adam"
    n = len(params)
    offsets = _offsets(offsets, n)
    grads = [g.contiguous() for g in grads]
    _check_lengths(n, grads=grads, exp_avgs=exp_avgs, steps=steps, offsets=offsets,
                   seeds_m=seeds_m,
                   **({"exp_avg_sqs": exp_avg_sqs, "seeds_v": seeds_v} if adam else {}))
    _check_params(params, grads)
    _check_memories("exp_avgs", exp_avgs, exp_avg_scales, params, form, signed=True,
                    scale_name="exp_avg_scales")
    if adam:
        _check_memories("exp_avg_sqs", exp_avg_sqs, exp_avg_sq_scales, params, form,
                        signed=False, scale_name="exp_avg_sq_scales")
    stochastic = _stochastic(seeds_m, seeds_v if adam else seeds_m)
    mode = _check_param_rounding(param_rounding, params, param_seeds, compensations,
                                 compensation_seeds)
    lerp_weight = _f32(1 - beta1)
    small = abs(lerp_weight) < 0.5
    for indices in _groups(params, grads):
        sub = lambda xs: [xs[i] for i in indices]  # noqa: E731
        ptr = lambda xs: _pointer_row(xs, n)  # noqa: E731
        rows = [ptr(params), ptr(grads), ptr(exp_avgs), ptr(exp_avg_sqs if adam else None),
                ptr(exp_avg_scales if form == "8bit" else None),
                ptr(exp_avg_sq_scales if adam and form == "8bit" else None),
                _seed_row(seeds_m, n), _seed_row(seeds_v if adam else None, n), list(offsets),
                _seed_row(param_seeds, n), ptr(compensations), _seed_row(compensation_seeds, n)]
        scalars = [[-lr / (1 - beta1 ** steps[i]) for i in indices],
                   [math.sqrt(1 - beta2 ** steps[i]) for i in indices]]
        p_dtype = params[indices[0]].dtype
        _launch(_adam_kernel, [params[i] for i in indices], [sub(r) for r in rows], scalars,
                [_f32(lerp_weight if small else lerp_weight - 1), float(beta2),
                 float(1 - beta2), float(eps), float(1 - lr * weight_decay),
                 float(weight_decay)],
                dict(P_KIND=_KIND[p_dtype], G_DTYPE=_TL[grads[indices[0]].dtype],
                     EIGHT_BIT=form == "8bit", ADAM=adam, VALUE=precondition == "value",
                     LERP_SMALL=small, HAS_WD=weight_decay != 0,
                     DECOUPLED=decoupled_weight_decay, MAXIMIZE=maximize,
                     STOCHASTIC=stochastic,
                     PARAM_MODE=_PARAM_MODE[mode] if p_dtype != torch.float32 else 0), form)


# =============================================================================================
# SGD momentum (AssociativeMomentum, §1)
# =============================================================================================

# The int64 table's rows: 0 params, 1 grads, 2 momentum buffers, 3 their scales, 4 their seeds,
# 5 offsets, 6 param seeds, 7 compensations, 8 compensation seeds.


@triton.jit
def _sgd_kernel(meta, f32_table, T, tensor_of_block, tab_a, tab_b, tab_c,
                lr, momentum, write, decay, weight_decay,
                P_KIND: tl.constexpr, G_DTYPE: tl.constexpr, EIGHT_BIT: tl.constexpr,
                HAS_MOMENTUM: tl.constexpr, FIRST: tl.constexpr, NESTEROV: tl.constexpr,
                HAS_WD: tl.constexpr, DECOUPLED: tl.constexpr, MAXIMIZE: tl.constexpr,
                STOCHASTIC: tl.constexpr, PARAM_MODE: tl.constexpr, BLOCK: tl.constexpr):
    t, offsets, mask, block = _locate(tensor_of_block, tab_a, tab_b, tab_c, EIGHT_BIT, BLOCK)
    p_int = tl.load(meta + 0 * T + t)
    w, g = _weight_and_grad(meta, T, t, p_int, offsets, mask, decay, weight_decay, P_KIND,
                            G_DTYPE, PARAM_MODE, MAXIMIZE, HAS_WD, DECOUPLED, 1, 7)
    u = g
    if HAS_MOMENTUM:
        b_int = tl.load(meta + 2 * T + t)
        bs_int = tl.load(meta + 3 * T + t)
        if FIRST:
            b = g  # b₁ = g₁
        else:
            b = _read_memory(b_int, bs_int, offsets, mask, block, EIGHT_BIT, True)
            b = tl.fma(write, g, b * momentum)  # b.mul_(μ).add_(g, alpha=1 − τ)
        _write_memory(b_int, bs_int, offsets, mask, block, b,
                      tl.load(meta + 4 * T + t).to(tl.uint32), tl.load(meta + 5 * T + t),
                      EIGHT_BIT, True, STOCHASTIC)
        u = b
    if NESTEROV:
        u = tl.fma(momentum, u, g)  # g.add(b, alpha=μ)
    w = tl.fma(-lr, u, w)  # w.add_(u, alpha=−γ)
    _write_param(meta, T, t, p_int, offsets, mask, w, P_KIND, PARAM_MODE, 5, 6, 7, 8)


def sgd_step(params: Sequence[Tensor], grads: Sequence[Tensor],
             momentum_buffers: Optional[Sequence[Tensor]], scales: Optional[Sequence[Tensor]],
             *, lr: float, momentum: float, dampening: float, nesterov: bool,
             weight_decay: float, decoupled_weight_decay: bool = False, maximize: bool = False,
             first_step: bool = False, form: str, seeds: Optional[Sequence[int]],
             offsets: Optional[Sequence[int]] = None, param_rounding: str = "nearest",
             param_seeds: Optional[Sequence[int]] = None,
             compensations: Optional[Sequence[Tensor]] = None,
             compensation_seeds: Optional[Sequence[int]] = None) -> None:
    """``functional.associative_momentum`` (``elementwise.sgd_step``'s stages) on compressed
    momentum buffers, one pass per group: ``b ← μb + (1 − τ)g`` (``b = g`` with
    ``first_step``: the stored buffer is only written), ``U = g + μb`` (nesterov) or ``b``,
    ``W ← W − γU``; the buffer written back in ``form`` (stochastically with ``seeds``, to
    nearest where None). With ``momentum == 0`` there is no buffer (lists may be None)."""
    if not params:
        return
    has_momentum = momentum != 0
    n = len(params)
    offsets = _offsets(offsets, n)
    grads = [g.contiguous() for g in grads]
    _check_lengths(n, grads=grads, offsets=offsets,
                   **({"momentum_buffers": momentum_buffers, "seeds": seeds}
                      if has_momentum else {}))
    _check_params(params, grads)
    if has_momentum:
        _check_memories("momentum_buffers", momentum_buffers, scales, params, form, signed=True,
                        scale_name="scales")
    elif form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    stochastic = _stochastic(seeds, seeds) if has_momentum else False
    mode = _check_param_rounding(param_rounding, params, param_seeds, compensations,
                                 compensation_seeds)
    for indices in _groups(params, grads):
        sub = lambda xs: [xs[i] for i in indices]  # noqa: E731
        ptr = lambda xs: _pointer_row(xs, n)  # noqa: E731
        rows = [ptr(params), ptr(grads), ptr(momentum_buffers if has_momentum else None),
                ptr(scales if has_momentum and form == "8bit" else None),
                _seed_row(seeds if has_momentum else None, n), list(offsets),
                _seed_row(param_seeds, n), ptr(compensations), _seed_row(compensation_seeds, n)]
        p_dtype = params[indices[0]].dtype
        _launch(_sgd_kernel, [params[i] for i in indices], [sub(r) for r in rows], [],
                [float(lr), float(momentum), float(1 - dampening), float(1 - lr * weight_decay),
                 float(weight_decay)],
                dict(P_KIND=_KIND[p_dtype], G_DTYPE=_TL[grads[indices[0]].dtype],
                     EIGHT_BIT=form == "8bit" and has_momentum, HAS_MOMENTUM=has_momentum,
                     FIRST=first_step, NESTEROV=nesterov, HAS_WD=weight_decay != 0,
                     DECOUPLED=decoupled_weight_decay, MAXIMIZE=maximize,
                     STOCHASTIC=stochastic,
                     PARAM_MODE=_PARAM_MODE[mode] if p_dtype != torch.float32 else 0),
                form if has_momentum else "bf16")


# =============================================================================================
# Muon's EMA momentum (§5): the memory step before Newton–Schulz
# =============================================================================================

# The int64 table's rows: 0 momentum buffers, 1 their scales, 2 grads, 3 the fp32 updates U,
# 4 seeds, 5 offsets.


@triton.jit
def _ema_kernel(meta, f32_table, T, tensor_of_block, tab_a, tab_b, tab_c,
                write_coeff, read_coeff, G_DTYPE: tl.constexpr, EIGHT_BIT: tl.constexpr,
                WRITE_SMALL: tl.constexpr, NESTEROV: tl.constexpr, READ_SMALL: tl.constexpr,
                MAXIMIZE: tl.constexpr, STOCHASTIC: tl.constexpr, BLOCK: tl.constexpr):
    t, offsets, mask, block = _locate(tensor_of_block, tab_a, tab_b, tab_c, EIGHT_BIT, BLOCK)
    b_int = tl.load(meta + 0 * T + t)
    bs_int = tl.load(meta + 1 * T + t)
    g_ptr = tl.load(meta + 2 * T + t).to(tl.pointer_type(G_DTYPE))
    g = tl.load(g_ptr + offsets, mask=mask).to(tl.float32)
    if MAXIMIZE:
        g = -g
    b = _read_memory(b_int, bs_int, offsets, mask, block, EIGHT_BIT, True)
    # b.lerp_(g, 1 − μ): torch's lerp, one fma from the nearer end
    if WRITE_SMALL:
        b = tl.fma(write_coeff, g - b, b)
    else:
        b = tl.fma(write_coeff, g - b, g)
    _write_memory(b_int, bs_int, offsets, mask, block, b,
                  tl.load(meta + 4 * T + t).to(tl.uint32), tl.load(meta + 5 * T + t),
                  EIGHT_BIT, True, STOCHASTIC)
    u = b
    if NESTEROV:  # g.lerp(b, μ), from the fp32 b (before its rounding), as the rule reads it
        if READ_SMALL:
            u = tl.fma(read_coeff, b - g, g)
        else:
            u = tl.fma(read_coeff, b - g, b)
    tl.store(tl.load(meta + 3 * T + t).to(tl.pointer_type(tl.float32)) + offsets, u, mask=mask)


def ema_step(momentum_buffers: Sequence[Tensor], grads: Sequence[Tensor],
             scales: Optional[Sequence[Tensor]], *, momentum: float, nesterov: bool,
             maximize: bool = False, form: str, seeds: Optional[Sequence[int]],
             offsets: Optional[Sequence[int]] = None) -> list[Tensor]:
    """Muon's momentum (``functional.muon``'s ``effective_gradients → ema_write →
    nesterov_readout(ema=True)``, :func:`elementwise.ema_momentum` on fp32 buffers) on
    compressed buffers, one pass per group: read ``momentum_buffers`` in ``form`` (signed),
    ``b ← lerp(b, g, 1 − μ)`` (``g = −G`` when maximizing), write ``b`` back rounded
    (stochastically with ``seeds``, to nearest where None), and return new fp32 tensors
    ``U = lerp(g, b, μ)`` (nesterov) or ``b`` — of the fp32 ``b``, before its rounding: the
    Newton–Schulz input. A first step reads buffers that hold zeros (Muon's start)."""
    n = len(grads)
    if not n:
        return []
    offsets = _offsets(offsets, n)
    grads = [g.contiguous() for g in grads]
    _check_lengths(n, momentum_buffers=momentum_buffers, offsets=offsets,
                   **({} if seeds is None else {"seeds": seeds}))
    for i, g in enumerate(grads):
        if g.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"grads[{i}] has dtype {g.dtype}; the fused kernels take "
                             f"{SUPPORTED_DTYPES}")
    _check_memories("momentum_buffers", momentum_buffers, scales, grads, form, signed=True,
                    scale_name="scales")
    write_coeff, write_small = _lerp_coefficient(1 - momentum)
    read_coeff, read_small = _lerp_coefficient(momentum)
    updates = [torch.empty_like(b, dtype=torch.float32) for b in momentum_buffers]
    for indices in _groups(momentum_buffers, grads):
        rows = [_pointer_row(momentum_buffers, n),
                _pointer_row(scales if form == "8bit" else None, n), _pointer_row(grads, n),
                _pointer_row(updates, n), _seed_row(seeds, n), list(offsets)]
        _launch(_ema_kernel, [grads[i] for i in indices],
                [[r[i] for i in indices] for r in rows], [], [write_coeff, read_coeff],
                dict(G_DTYPE=_TL[grads[indices[0]].dtype], EIGHT_BIT=form == "8bit",
                     WRITE_SMALL=write_small, NESTEROV=nesterov, READ_SMALL=read_small,
                     MAXIMIZE=maximize, STOCHASTIC=seeds is not None), form)
    return updates


# =============================================================================================
# The codec alone: compress / decompress / random bits (multi-tensor, one launch per group)
# =============================================================================================


@triton.jit
def _compress_kernel(meta, f32_table, T, tensor_of_block, tab_a, tab_b, tab_c,
                     EIGHT_BIT: tl.constexpr, SIGNED: tl.constexpr, STOCHASTIC: tl.constexpr,
                     BLOCK: tl.constexpr):
    t, offsets, mask, block = _locate(tensor_of_block, tab_a, tab_b, tab_c, EIGHT_BIT, BLOCK)
    x = tl.load(tl.load(meta + 0 * T + t).to(tl.pointer_type(tl.float32)) + offsets, mask=mask)
    _write_memory(tl.load(meta + 1 * T + t), tl.load(meta + 2 * T + t), offsets, mask, block, x,
                  tl.load(meta + 3 * T + t).to(tl.uint32), tl.load(meta + 4 * T + t), EIGHT_BIT,
                  SIGNED, STOCHASTIC)


@triton.jit
def _decompress_kernel(meta, f32_table, T, tensor_of_block, tab_a, tab_b, tab_c,
                       EIGHT_BIT: tl.constexpr, SIGNED: tl.constexpr, BLOCK: tl.constexpr):
    t, offsets, mask, block = _locate(tensor_of_block, tab_a, tab_b, tab_c, EIGHT_BIT, BLOCK)
    x = _read_memory(tl.load(meta + 1 * T + t), tl.load(meta + 2 * T + t), offsets, mask, block,
                     EIGHT_BIT, SIGNED)
    tl.store(tl.load(meta + 0 * T + t).to(tl.pointer_type(tl.float32)) + offsets, x, mask=mask)


@triton.jit(do_not_specialize=["numel", "seed", "offset"])  # seed 1 stays a tensor
def _bits_kernel(out_ptr, numel, seed, offset, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    h = _bits(offsets + offset, seed.to(tl.uint32))
    tl.store(out_ptr + offsets, h.to(tl.int32, bitcast=True), mask=offsets < numel)


def uniform_bits(numel: int, seed: int, offset: int = 0, device=None) -> Tensor:
    """:func:`compressed.uniform_bits` computed in a kernel (int32 holding the uint32 bits)."""
    out = torch.empty(numel, dtype=torch.int32, device=device)
    if numel:
        _bits_kernel[(triton.cdiv(numel, FLAT_BLOCK),)](out, numel, int(seed) & 0xFFFFFFFF,
                                                        int(offset), BLOCK=FLAT_BLOCK)
    return out


def compress(works: Sequence[Tensor], form: str, signed: bool, seeds: Optional[Sequence[int]],
             offsets: Optional[Sequence[int]] = None) -> list[tuple[Tensor, Optional[Tensor]]]:
    """:func:`compressed.compress` of each fp32 tensor in ``works`` (one launch per device):
    (bf16 tensor or 8-bit codes, block scales or None); ``seeds`` None rounds to nearest."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    works = [w.contiguous() for w in works]
    n = len(works)
    offsets = _offsets(offsets, n)
    _check_lengths(n, offsets=offsets, **({} if seeds is None else {"seeds": seeds}))
    for i, w in enumerate(works):
        if w.dtype != torch.float32:
            raise ValueError(f"works[{i}] has dtype {w.dtype}, expected torch.float32")
    if form == "8bit":
        for i, w in enumerate(works):
            _check_rows(f"works[{i}]", w)
    out = []
    for w in works:
        if form == "bf16":
            out.append((torch.empty_like(w, dtype=torch.bfloat16), None))
        else:
            out.append((torch.empty_like(w, dtype=torch.int8 if signed else torch.uint8),
                        torch.empty(codec.scale_shape(w.shape), dtype=torch.float32,
                                    device=w.device)))
    stochastic = seeds is not None
    for indices in _groups_by_device(works):
        rows = [_pointer_row(works, n), _pointer_row([c for c, _ in out], n),
                _pointer_row([s for _, s in out], n),
                _seed_row(seeds, n), list(offsets)]
        _launch(_compress_kernel, [works[i] for i in indices],
                [[r[i] for i in indices] for r in rows], [], [],
                dict(EIGHT_BIT=form == "8bit", SIGNED=signed, STOCHASTIC=stochastic), form)
    return out


def decompress(stored: Sequence[Tensor], scales: Optional[Sequence[Optional[Tensor]]] = None
               ) -> list[Tensor]:
    """:func:`compressed.decompress` of each stored memory (bf16, or int8/uint8 codes with
    their scales): new fp32 tensors, one launch per (device, form, code)."""
    n = len(stored)
    scales = [None] * n if scales is None else list(scales)
    _check_lengths(n, scales=scales)
    groups: dict[tuple, list[int]] = {}
    for i, (c, s) in enumerate(zip(stored, scales)):
        if not c.is_contiguous():
            raise ValueError(f"stored[{i}] (shape {tuple(c.shape)}) is not contiguous")
        if s is None:
            if c.dtype != torch.bfloat16:
                raise ValueError(f"stored[{i}] has dtype {c.dtype} and no scale; expected "
                                 "torch.bfloat16 (or 8-bit codes with their scales)")
            form = "bf16"
        else:
            if c.dtype not in (torch.int8, torch.uint8):
                raise ValueError(f"stored[{i}] has dtype {c.dtype}, expected torch.int8 or "
                                 "torch.uint8 with a scale")
            _check_rows(f"stored[{i}]", c)
            _check_scale(f"scales[{i}]", s, c)
            form = "8bit"
        groups.setdefault((c.device, form, c.dtype), []).append(i)
    out = [torch.empty_like(c, dtype=torch.float32) for c in stored]
    for (device, form, dtype), indices in groups.items():
        rows = [[out[i].data_ptr() for i in indices], [stored[i].data_ptr() for i in indices],
                [0 if scales[i] is None else scales[i].data_ptr() for i in indices]]
        _launch(_decompress_kernel, [stored[i] for i in indices], rows, [], [],
                dict(EIGHT_BIT=form == "8bit", SIGNED=dtype == torch.int8), form)
    return out


# =============================================================================================
# Launch plumbing
# =============================================================================================


@lru_cache(maxsize=128)
def _tables(shapes: tuple[tuple[int, ...], ...], form: str, device: str):
    """The program → tensor table and the three per-tensor tables of :func:`_locate`."""
    if form == "8bit":
        rows = [s[0] for s in shapes]
        cols = [math.prod(s[1:]) for s in shapes]
        per_row = [-(-c // QBLOCK) for c in cols]
        counts = torch.tensor([r * b for r, b in zip(rows, per_row)], dtype=torch.int64)
        first = torch.cumsum(counts, 0) - counts
        tensor_of_block = torch.repeat_interleave(torch.arange(len(shapes)), counts)
        tabs = (first, torch.tensor(cols, dtype=torch.int64),
                torch.tensor(per_row, dtype=torch.int64))
    else:
        sizes = [math.prod(s) for s in shapes]
        counts = torch.tensor([-(-n // FLAT_BLOCK) for n in sizes], dtype=torch.int64)
        tensor_of_block = torch.repeat_interleave(torch.arange(len(shapes)), counts)
        first = torch.cumsum(counts, 0) - counts
        start = (torch.arange(int(counts.sum())) - first[tensor_of_block]) * FLAT_BLOCK
        tabs = (start, torch.tensor(sizes, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))
    return (tensor_of_block.to(device=device, dtype=torch.int32),
            *(t.to(device) for t in tabs))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _launch(kernel, tensors: Sequence[Tensor], int_rows: list[list[int]],
            f32_rows: list[list[float]], scalars: list, constexprs: dict, form: str) -> None:
    """One launch over ``tensors`` (their shapes lay out the programs): the int64 table
    ``int_rows`` and the fp32 table ``f32_rows``, each (rows, tensors), uploaded in one copy
    each."""
    device = tensors[0].device
    tensor_of_block, tab_a, tab_b, tab_c = _tables(tuple(tuple(t.shape) for t in tensors),
                                                   form, str(device))
    if tensor_of_block.numel() == 0:
        return
    meta = torch.tensor(int_rows, dtype=torch.int64).to(device, non_blocking=True)
    f32 = torch.tensor(f32_rows if f32_rows else [[0.0]], dtype=torch.float32).to(
        device, non_blocking=True)
    options = {} if _interpreting() else dict(num_warps=NUM_WARPS[form], enable_fp_fusion=False)
    kernel[(tensor_of_block.numel(),)](meta, f32, len(tensors), tensor_of_block, tab_a, tab_b,
                                       tab_c, *scalars, **constexprs,
                                       BLOCK=QBLOCK if form == "8bit" else FLAT_BLOCK,
                                       **options)


# --- checks -----------------------------------------------------------------------------------


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _check_lengths(n: int, **lists) -> None:
    for name, xs in lists.items():
        if xs is None:
            raise ValueError(f"{name} is None; expected a list of {n}")
        if len(xs) != n:
            raise ValueError(f"{name} has {len(xs)} entries, expected {n} (one per parameter)")


def _offsets(offsets, n):
    return [0] * n if offsets is None else [int(o) for o in offsets]


def _pointer_row(tensors, n):
    """Data pointers (0 for a missing list or entry: a role the kernel does not read)."""
    return [0] * n if tensors is None else [0 if t is None else t.data_ptr() for t in tensors]


def _seed_row(seeds, n):
    return [0] * n if seeds is None else [int(s) & 0xFFFFFFFF for s in seeds]


def _stochastic(*seed_lists) -> bool:
    present = [s is not None for s in seed_lists]
    if any(present) and not all(present):
        raise ValueError("give seeds for every memory (stochastic rounding) or for none "
                         "(round to nearest)")
    return all(present)


def _check_contiguous(name: str, i: int, t: Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{name}[{i}] (shape {tuple(t.shape)}) is not contiguous; the "
                         "fused kernels update tensors in place through flat pointers")


def _check_params(params, grads) -> None:
    for i, (p, g) in enumerate(zip(params, grads)):
        _check_contiguous("params", i, p)
        if p.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"params[{i}] has dtype {p.dtype}; the fused kernels take "
                             f"{SUPPORTED_DTYPES}")
        if g.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"grads[{i}] has dtype {g.dtype}; the fused kernels take "
                             f"{SUPPORTED_DTYPES}")
        if g.shape != p.shape:
            raise ValueError(f"grads[{i}] has shape {tuple(g.shape)}, expected "
                             f"{tuple(p.shape)}")
        if g.device != p.device:
            raise ValueError(f"grads[{i}] is on {g.device}, params[{i}] on {p.device}")


def _check_rows(name: str, t: Tensor) -> None:
    if t.dim() == 0:
        raise ValueError(f"{name} is 0-dim; 8-bit blocks run along the rows of "
                         "(shape[0], numel/shape[0])")


def _check_scale(name: str, scale: Optional[Tensor], codes: Tensor) -> None:
    if scale is None:
        raise ValueError(f"{name} is None; 8-bit memories need their block scales")
    expected = codec.scale_shape(codes.shape)
    if scale.dtype != torch.float32 or tuple(scale.shape) != expected or \
            not scale.is_contiguous() or scale.device != codes.device:
        raise ValueError(f"{name} must be a contiguous fp32 tensor of shape {expected} on "
                         f"{codes.device}; got {scale.dtype} {tuple(scale.shape)} on "
                         f"{scale.device}" + ("" if scale.is_contiguous() else
                                               " (not contiguous)"))


def _check_memories(name, memories, scales, params, form, *, signed, scale_name) -> None:
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    dtype = torch.bfloat16 if form == "bf16" else torch.int8 if signed else torch.uint8
    if form == "8bit":
        _check_lengths(len(params), **{scale_name: scales})
    for i, (m, p) in enumerate(zip(memories, params)):
        _check_contiguous(name, i, m)
        if m.dtype != dtype:
            raise ValueError(f"{name}[{i}] has dtype {m.dtype}, expected {dtype} ({form})")
        if m.shape != p.shape or m.device != p.device:
            raise ValueError(f"{name}[{i}] has shape {tuple(m.shape)} on {m.device}, expected "
                             f"{tuple(p.shape)} on {p.device}")
        if form == "8bit":
            _check_rows(f"{name}[{i}]", m)
            _check_scale(f"{scale_name}[{i}]", scales[i], m)


def _check_param_rounding(mode, params, param_seeds, compensations, compensation_seeds) -> str:
    _check_choice("param_rounding", mode, PARAM_ROUNDINGS)
    low = [i for i, p in enumerate(params) if p.dtype != torch.float32]
    if mode == "stochastic":
        _check_lengths(len(params), param_seeds=param_seeds)
        for i in low:
            if params[i].dtype != torch.bfloat16:
                raise ValueError(f"params[{i}] has dtype {params[i].dtype}; "
                                 "param_rounding='stochastic' takes bf16 parameters")
    if mode == "kahan" and low:
        _check_lengths(len(params), compensations=compensations)
        if any(params[i].dtype == torch.bfloat16 for i in low):
            _check_lengths(len(params), compensation_seeds=compensation_seeds)
        for i in low:
            c = compensations[i]
            _check_contiguous("compensations", i, c)
            if c.dtype != params[i].dtype or c.shape != params[i].shape:
                raise ValueError(f"compensations[{i}] has dtype {c.dtype} shape "
                                 f"{tuple(c.shape)}, expected the parameter's "
                                 f"({params[i].dtype}, {tuple(params[i].shape)})")
    return mode


def _groups(params, grads):
    """Indices grouped by (device, param dtype, grad dtype): one launch each."""
    groups: dict[tuple, list[int]] = {}
    for i, (p, g) in enumerate(zip(params, grads)):
        groups.setdefault((p.device, p.dtype, g.dtype), []).append(i)
    return groups.values()


def _groups_by_device(tensors):
    groups: dict = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.device, []).append(i)
    return groups.values()
