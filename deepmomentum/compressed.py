"""Compressed optimizer memories: bf16 and 8-bit blockwise state, 16-bit parameters without an
fp32 master copy.

Every deepmomentum optimizer takes ``state_dtype`` per group (see
:class:`~deepmomentum.optimizer.MemoryOptimizer`). A step reads each compressed memory into
fp32, runs the rule's fp32 arithmetic unchanged, and writes the memory back compressed
(dequantize → update in fp32 → requantize). What is stored:

``torch.float32`` (default)
    Full precision, as before: fp32 for 16-bit and fp32 parameters, the parameter's own dtype
    for wider ones (fp64).
``torch.bfloat16``
    Every memory in bf16 (2 bytes per entry), rounded **stochastically**.
``"8bit"``
    Blockwise absmax quantization. A memory of shape ``(r, …)`` is read as ``r`` rows of
    ``c = numel/r`` entries; each row is cut into blocks of :data:`BLOCK` = 256 entries (the
    last one shorter), and each block keeps its absolute maximum ``s`` in fp32 (the entry
    ``"<key>_scale"``, shape ``(r, ⌈c/256⌉)``) and one byte per entry:

    * signed memories (momenta, accumulators, DMGD's weights): ``int8`` code
      ``q = sign(x)·127·√(|x|/s)``, read back as ``x = s·sign(q)(q/127)²``;
    * second moments (``exp_avg_sq``, ≥ 0): ``uint8`` code ``q = 255·(v/s)^{1/4}``, read back
      as ``v = s(q/255)⁴`` — the same square-root companding applied to √v, the quantity the
      step divides by.

    The companding spends the codes where small entries are (a linear code keeps 1/127 of the
    block's maximum as its finest step; this one 1/127² for momenta and 1/255⁴ for second
    moments). Blocks never cross a row, so under FSDP2 (rows sharded along dim 0) each block
    and its scale live on one rank, and a checkpoint reshards with them. Memories with fewer
    than :data:`MIN_8BIT_NUMEL` entries or fewer than two dims (biases, norm gains, M3's
    per-row second moment) stay fp32, as in bitsandbytes: they are a negligible share of the
    bytes, and a bias quantized in blocks would cross FSDP2's shards.

Rounding. Round-to-nearest stalls slow memories: with β₂ = 0.999 an Adam second moment moves by
0.1% of its gap per step, under half a bf16 ulp (0.39%) unless the gradient jumps 2×, so v
freezes (measured in ``benchmarks/compressed.py``). Every compressed write therefore rounds
stochastically, unbiased in value: bf16 by adding 16 random low bits before truncating; 8-bit
by choosing the code above with probability equal to the distance from the code below, in
value. The random bits are a counter-based hash (:func:`uniform_bits`) of the element's index
in the whole tensor and a seed made of the group's ``rounding_calls`` counter, the parameter's
place and the entry's name: the same data gives the same bits on every run, on every
implementation, sharded or not; a checkpoint carries the counter, so a resumed run rounds as
the uninterrupted one.

Parameters (``param_rounding``, for bf16/fp16 parameters): ``"nearest"`` (default) rounds the
fp32 result into the parameter once per step, as before; ``"kahan"`` keeps the rounding error
in a 16-bit ``"compensation"`` entry and adds it back into the next step's fp32 working copy
(Kahan summation: updates smaller than an ulp accumulate instead of vanishing); ``"stochastic"``
(bf16 only) rounds stochastically and keeps no buffer.
"""

from __future__ import annotations

import math
import zlib
from functools import lru_cache
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["STATE_DTYPES", "PARAM_ROUNDINGS", "BLOCK", "MIN_8BIT_NUMEL", "canonical_state_dtype",
           "stored_form", "uniform_bits", "round_bf16", "quantize", "dequantize",
           "compress", "decompress", "compress_many", "seed_of", "is_compressed",
           "scale_shape"]

#: The state dtypes a group may keep (``state_dtype``).
STATE_DTYPES = (torch.float32, torch.bfloat16, "8bit")
#: How 16-bit parameters take their fp32 update (``param_rounding``).
PARAM_ROUNDINGS = ("nearest", "kahan", "stochastic")
#: Entries per quantization block (along a row).
BLOCK = 256
#: Memories smaller than this (or 1-D) keep full precision under ``"8bit"``.
MIN_8BIT_NUMEL = 4096

_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "8bit": "8bit", "int8": "8bit"}

#: Rounding of compressed writes; "nearest" exists only to measure what stochastic rounding
#: buys (benchmarks/compressed.py), it is not an option of the optimizers.
_ROUNDING = "stochastic"


def canonical_state_dtype(value) -> Union[torch.dtype, str]:
    """``value`` as one of :data:`STATE_DTYPES` (names such as ``"bf16"`` accepted), or
    ``ValueError`` naming the allowed values."""
    if isinstance(value, str) and value in _NAMES:
        return _NAMES[value]
    if isinstance(value, torch.dtype) and value in STATE_DTYPES:
        return value
    raise ValueError(f"Invalid state_dtype: {value!r}; expected torch.float32 (full precision), "
                     "torch.bfloat16 or '8bit'")


def is_compressed(state_dtype) -> bool:
    return state_dtype is not torch.float32


def stored_form(state_dtype, shape) -> str:
    """How a memory of ``shape`` is stored under ``state_dtype``: "full", "bf16" or "8bit"."""
    if state_dtype is torch.bfloat16:
        return "bf16"
    if state_dtype == "8bit" and len(shape) >= 2 and math.prod(shape) >= MIN_8BIT_NUMEL:
        return "8bit"
    return "full"


def scale_shape(shape) -> tuple[int, int]:
    """The shape of an 8-bit memory's block scales: (rows, blocks per row)."""
    rows = shape[0]
    cols = math.prod(shape[1:])
    return (rows, -(-cols // BLOCK))


# --- random bits ------------------------------------------------------------------------------

_MASK = 0xFFFFFFFF


def _mix_int(x: int) -> int:
    """lowbias32 (Wellons), a 32-bit integer hash: every input bit changes about half the
    output bits."""
    x &= _MASK
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK
    x ^= x >> 15
    x = (x * 0x846CA68B) & _MASK
    return x ^ (x >> 16)


def seed_of(calls: int, group_index: int, param_index: int, key: str) -> int:
    """The 32-bit seed of one memory's write: a call of the group, the parameter's place, the
    entry's name (so two memories of one parameter draw different bits)."""
    seed = _mix_int(calls)
    for part in (group_index, param_index, zlib.crc32(key.encode())):
        seed = _mix_int(seed ^ part)
    return seed


def _int32(x: int) -> int:
    """A uint32 constant as the int32 with its bits."""
    return x - (1 << 32) if x >= 1 << 31 else x


def uniform_bits(numel: int, seed: int, offset: int = 0, device=None) -> Tensor:
    """32 random bits per element (an int32 tensor holding uint32 bit patterns) for the
    elements ``offset … offset + numel − 1`` of a tensor, in row-major order:
    ``lowbias32(index ⊕ seed)``, a function of (index, seed) only, so a shard (``offset``: its
    first element in the whole tensor) draws what the whole tensor would draw there, and a
    kernel can draw the same bits in registers. In int32 with torch's wrapping products and
    masked (logical) shifts: the uint32 arithmetic, bit for bit."""
    if offset + numel <= 1 << 31:
        x = torch.arange(offset, offset + numel, dtype=torch.int32, device=device)
    else:  # indices past 2³¹: their low 32 bits
        x = (torch.arange(offset, offset + numel, dtype=torch.int64, device=device)
             & _MASK).sub_(1 << 32).to(torch.int32)
    x ^= _int32(seed & _MASK)
    return _lowbias32_(x)


def _lowbias32_(x: Tensor) -> Tensor:
    """:func:`_mix_int` in place on an int32 tensor of uint32 bit patterns (wrapping products,
    masked shifts)."""
    x ^= (x >> 16) & 0xFFFF
    x *= 0x7FEB352D
    x ^= (x >> 15) & 0x1FFFF
    x *= _int32(0x846CA68B)
    x ^= (x >> 16) & 0xFFFF
    return x


# --- bf16 -------------------------------------------------------------------------------------


def round_bf16(x: Tensor, bits: Optional[Tensor]) -> Tensor:
    """``x`` (fp32) rounded to bf16: stochastically with ``bits`` (one int32 per element, row
    major; the low 16 are used), to nearest with None. Adding a uniform 16-bit integer to the
    fp32 pattern and truncating rounds up with probability equal to the dropped fraction, in
    either sign (the magnitude bits are what is rounded). ±inf and quiet NaNs keep their
    pattern's upper half, so they stay what they are; a finite value can round up to inf only
    from above bf16's largest finite value, as to nearest."""
    if bits is None:
        return x.to(torch.bfloat16)
    noisy = x.contiguous().view(torch.int32) + (bits & 0xFFFF).view(x.shape)
    return noisy.bitwise_and_(-65536).view(torch.float32).to(torch.bfloat16)  # 0xFFFF0000


# --- 8-bit ------------------------------------------------------------------------------------


def _blocks(x: Tensor) -> tuple[Tensor, int]:
    """``x`` (logical row-major order) as (rows, blocks, BLOCK), zero-padded; the number of
    columns."""
    rows = x.reshape(x.shape[0], -1)
    cols = rows.shape[1]
    pad = (-cols) % BLOCK
    if pad:
        rows = F.pad(rows, (0, pad))
    return rows.view(rows.shape[0], -1, BLOCK), cols


def _unblock(blocks: Tensor, cols: int, shape) -> Tensor:
    flat = blocks.flatten(1)
    return (flat if flat.shape[1] == cols else flat[:, :cols]).reshape(shape)


def quantize(x: Tensor, signed: bool, bits: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """``x`` (fp32) as 8-bit codes of its shape (int8 if ``signed``, else uint8 for x ≥ 0) and
    fp32 block scales (:func:`scale_shape`); rounded stochastically in value with ``bits``
    (row-major, one per element), to the nearest code value with None.

    With ``a = |x|/s`` in [0, 1] and top code T (127 signed, 255 unsigned) the code values are
    ``(q/T)^p`` (p = 2, 4): the code below is ``b = ⌊T·a^{1/p}⌋`` and ``a`` sits the fraction
    ``(T^p·a − b^p) / ((b+1)^p − b^p)`` of the way to the next."""
    blocks, cols = _blocks(x)
    u = None if bits is None else _blocks(_uniform(bits).view(x.shape))[0]
    code, scale = _quantize_blocks(blocks, signed, u)
    return _unblock(code, cols, x.shape).to(torch.int8 if signed else torch.uint8), scale


def _uniform(bits: Tensor) -> Tensor:
    """Uniform fp32 numbers in [0, 1) from the upper 24 of 32 random bits."""
    return ((bits >> 8) & 0xFFFFFF).to(torch.float32).mul_(1.0 / (1 << 24))


def _quantize_blocks(blocks: Tensor, signed: bool, u: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Codes (as fp32 integers) and absmax scales of blocks along the last dim."""
    magnitude = blocks.abs()
    scale = magnitude.amax(-1)
    a = magnitude.div_(torch.where(scale > 0, scale, 1.0).unsqueeze(-1))  # in [0, 1]
    if signed:
        below = a.sqrt().mul_(127).floor_().clamp_(max=126)
        low = below.square()
        fraction = a.mul_(127.0 ** 2).sub_(low).div_(below * 2 + 1)
    else:
        below = a.sqrt().sqrt_().mul_(255).floor_().clamp_(max=254)
        low = below.square().square_()
        fraction = a.mul_(255.0 ** 4).sub_(low).div_((below + 1).square_().square_().sub_(low))
    up = fraction >= 0.5 if u is None else u < fraction
    code = below.add_(up)
    if signed:
        code.copysign_(blocks)
    return code, scale


def dequantize(codes: Tensor, scale: Tensor) -> Tensor:
    """The fp32 values of 8-bit ``codes`` (int8: signed code; uint8: second-moment code) with
    block ``scale``: ``s·sign(q)(q/127)²`` and ``s(q/255)⁴``."""
    blocks, cols = _blocks(codes.to(torch.float32))
    if codes.dtype == torch.int8:
        values = blocks.abs().mul_(blocks).mul_(1.0 / 127 ** 2)
    else:
        values = blocks.square_().square_().mul_(1.0 / 255 ** 4)
    return _unblock(values.mul_(scale.unsqueeze(-1)), cols, codes.shape)


# --- one memory -------------------------------------------------------------------------------


def compress(work: Tensor, form: str, signed: bool, seed: Optional[int], offset: int = 0
             ) -> tuple[Tensor, Optional[Tensor]]:
    """The stored form of the fp32 memory ``work``: (bf16 tensor or 8-bit codes, block scales
    or None). ``seed``: stochastic rounding (:func:`seed_of`), None: to nearest. ``offset``: the
    index of ``work``'s first element in the whole tensor (a shard's)."""
    bits = None
    if seed is not None and _ROUNDING == "stochastic":
        bits = uniform_bits(work.numel(), seed, offset, work.device)
    if form == "bf16":
        return round_bf16(work.float(), bits), None
    if form == "8bit":
        return quantize(work.float(), signed, bits)
    raise ValueError(f"unknown stored form {form!r}")


def decompress(stored: Tensor, scale: Optional[Tensor]) -> Tensor:
    """The fp32 working copy of a stored memory, in ``stored``'s memory layout."""
    out = torch.empty_like(stored, dtype=torch.float32, memory_format=torch.preserve_format)
    if scale is None:
        return out.copy_(stored)
    return out.copy_(dequantize(stored, scale))


# --- many memories at once (one set of torch calls per list: the step path) ------------------


#: Tensors at least this large are compressed one by one (their torch calls cost little next
#: to their size); smaller ones together.
_MANY_MAX_NUMEL = 1 << 16


@lru_cache(maxsize=64)
def _layout(numels: tuple[int, ...], offsets: tuple[int, ...], device: str
            ) -> tuple[Tensor, Tensor]:
    """For concatenated tensors: each element's index in its own (whole) tensor, and its
    tensor's number — static for an optimizer's small tensors, so computed once."""
    counts = torch.tensor(numels, dtype=torch.int64)
    starts = torch.cumsum(counts, 0) - counts
    segment = torch.repeat_interleave(torch.arange(len(numels)), counts)
    index = torch.arange(int(counts.sum()), dtype=torch.int64) - starts[segment] + \
        torch.tensor(offsets, dtype=torch.int64)[segment]
    return index.to(torch.int32).to(device), segment.to(device)


def _many_bits(numels: list[int], seeds: list[int], offsets: list[int], device) -> Tensor:
    """:func:`uniform_bits` of several small tensors, concatenated, in one pass: the same
    bits."""
    index, segment = _layout(tuple(numels), tuple(offsets), str(device))
    x = torch.tensor([_int32(s & _MASK) for s in seeds], dtype=torch.int32,
                     device=device)[segment]
    x ^= index
    return _lowbias32_(x)


def compress_many(works: list[Tensor], form: str, signed: bool,
                  seeds: Optional[list[int]], offsets: list[int]
                  ) -> list[tuple[Tensor, Optional[Tensor]]]:
    """:func:`compress` of each tensor (same form and code): the small ones of one device
    together, in a fixed number of torch calls whatever their number (:func:`_compress_together`),
    the large ones one by one. Equal to one-by-one results bit for bit (the bits are each
    element's own; blocks never span two tensors)."""
    seed = (lambda i: None) if seeds is None else (lambda i: seeds[i])  # noqa: E731
    together = [i for i, w in enumerate(works) if w.numel() < _MANY_MAX_NUMEL and
                offsets[i] + w.numel() <= 1 << 31 and w.device == works[0].device]
    if len(together) < 2:
        together = []
    out = [None] * len(works)
    for i, result in zip(together, _compress_together(
            [works[i] for i in together], form, signed,
            None if seeds is None else [seeds[i] for i in together],
            [offsets[i] for i in together]) if together else []):
        out[i] = result
    for i, w in enumerate(works):
        if out[i] is None:
            out[i] = compress(w, form, signed, seed(i), offsets[i])
    return out


def _compress_together(works: list[Tensor], form: str, signed: bool,
                       seeds: Optional[list[int]], offsets: list[int]
                       ) -> list[tuple[Tensor, Optional[Tensor]]]:
    """:func:`compress` of small tensors of one device, on their concatenation."""
    numels = [w.numel() for w in works]
    device = works[0].device
    bits = None
    if seeds is not None and _ROUNDING == "stochastic":
        bits = _many_bits(numels, seeds, offsets, device)
    if form == "bf16":
        flat = torch.cat([w.reshape(-1).float() for w in works])
        rounded = round_bf16(flat, bits).split(numels)
        return [(r.view(w.shape), None) for r, w in zip(rounded, works)]
    if form != "8bit":
        raise ValueError(f"unknown stored form {form!r}")
    shaped = [_blocks(w.float()) for w in works]  # (rows, blocks, BLOCK), cols
    counts = [b.shape[0] * b.shape[1] for b, _ in shaped]
    blocks = torch.cat([b.reshape(-1, BLOCK) for b, _ in shaped])
    u = None
    if bits is not None:
        u = torch.cat([_blocks(part.view(w.shape))[0].reshape(-1, BLOCK) for part, w in
                       zip(_uniform(bits).split(numels), works)])
    code, scale = _quantize_blocks(blocks, signed, u)
    code = code.to(torch.int8 if signed else torch.uint8)
    return [(_unblock(c.view(b.shape), cols, w.shape), sc.view(b.shape[:2]))
            for (b, cols), w, c, sc in zip(shaped, works, code.split(counts), scale.split(counts))]
