"""The update rules of deepmomentum: stages, and each rule as a short composition of them.

Read top to bottom, this module is the package's maths (docs/spec.md, cited as "SPEC §n";
docs/nested_learning.md maps each Nested Learning equation to its function here).

**Stages** are plain-torch functions over lists of tensors, each one step of an optimizer read
as an associative memory: form the gradient the memories see (:func:`effective_gradients`,
:func:`decoupled_decay`), write a memory (:func:`momentum_write`, :func:`ema_write`,
:func:`second_moment_write`, :func:`accumulate`), erase along keys (:func:`erase_terms`),
precondition (:func:`preconditioner_denominators`, :func:`preconditioned_values`), read out
(:func:`nesterov_readout`, :func:`sign_readout`, :func:`orthogonalize`) and apply
(:func:`apply_updates`). Every stage takes ``foreach``: ``False`` loops over the tensors with
per-tensor ops, ``True`` makes the same calls with ``torch._foreach_*`` ops (torch's meaning of
the word, nothing else). Both are the same arithmetic: a rule's foreach path equals its
single-tensor path bit for bit on the CPU.

**Rules** (:func:`associative_momentum`, :func:`delta_momentum`,
:func:`preconditioned_momentum`, :func:`deep_momentum`, :func:`muon`, :func:`m3`) compose the
stages; the composition *is* the single-tensor reference. Each takes ``foreach`` and ``fused``
with torch's meaning; ``fused=True`` runs the rule's fused kernel — the Triton kernels of
:mod:`deepmomentum.kernels` for CUDA tensors (each fuses a run of the rule's stages and is
tested against them), or torch's own fused CPU kernel where the rule *is* torch's (SGD, Adam(W):
R1/R3 bit parity). Matrix stages (Newton–Schulz, DMGD's inner step) batch same-shape matrices
into one product whatever the flags (``batched=False`` on :func:`orthogonalize` and
:func:`deep_memory_reads` is the one-matrix-at-a-time reference).

Conventions shared by all rules:

* Tensors arrive as real tensors: complex parameters are passed through
  ``torch.view_as_real`` by the caller, so every elementwise stage is over reals.
* ``state_steps`` already count the update being applied (``t`` starts at 1); the caller
  advances them, so an update schedule (``update_period``) decides what counts.
* Buffers are stored lr-free, so LR schedulers act at read-out.
* Low-precision parameters (fp16/bf16) keep fp32 state: the step runs in fp32 on an fp32
  working copy of the parameter, rounded into the parameter once at the end.
* ``maximize`` negates the gradient out of place; ``.grad`` is never written.
* A memory entry that is ``None`` where the rule keeps one is created by the rule on the
  tensor's first step (``b₁ = g₁``, as torch's SGD) and put into the list.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections import defaultdict
from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from . import kernels
from .newton_schulz import (adjusted_lr_scale, as_matrix, matrix_shape, matrix_view,
                            matrix_view_shape, newton_schulz, stable_norm)

__all__ = [
    # stages
    "effective_gradients", "decoupled_decay", "working_copies", "momentum_write", "ema_write",
    "second_moment_write", "accumulate", "erase_terms", "preconditioner_denominators",
    "preconditioned_values", "nesterov_readout", "sign_readout", "orthogonalize", "apply_updates",
    # rules
    "associative_momentum", "delta_momentum", "preconditioned_momentum", "deep_momentum",
    "muon", "m3",
    # keys, DMGD's memory, the gated scan of the HOPE memories
    "as_matrix", "matrix_shape", "gradient_keys", "input_keys_matrix", "erase_along_keys", "delta_keys",
    "unit_rows", "activate", "deep_memory_gradient_factors", "deep_memory_gradients",
    "deep_memory_reads", "momentum_scan", "scan_coefficients", "memory_chunk_read",
    "memory_chunk_end", "batch_shared_matmul",
    "state_dtype", "LOW_PRECISION_DTYPES",
]

#: Parameter dtypes whose optimizer state is kept in float32.
LOW_PRECISION_DTYPES = (torch.float16, torch.bfloat16)

Steps = Union[float, Sequence[float]]


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the optimizer state kept for a (real) parameter of ``dtype``."""
    return torch.float32 if dtype in LOW_PRECISION_DTYPES else dtype


def _scalar(x) -> float:
    """A Python float from a number or a one-element tensor (a CPU read: no device sync for
    CPU tensors such as ``state['step']``)."""
    return x.item() if isinstance(x, Tensor) else float(x)


def _quotient(a: float, b):
    """``a / b`` for a number ``a`` and a number or 0-dim tensor ``b``, rounded once as
    Python's division (``a / tensor`` is ``tensor.reciprocal() * a``: two roundings)."""
    return b.new_full((), a) / b if isinstance(b, Tensor) else a / b


def _compiling() -> bool:
    """Whether torch.compile (dynamo) is tracing the caller (False under TorchScript)."""
    return not torch.jit.is_scripting() and torch.compiler.is_compiling()


def _step_count(t):
    """A step count ``t`` for the bias corrections' arithmetic, as torch's ``_get_value``
    (torch/optim/optimizer.py): a Python float in eager mode (a CPU read of ``state['step']``:
    the scalar arithmetic is Python's, in double precision, so eager results are unchanged),
    but while torch.compile traces, the counter itself as a float64 tensor — ``.item()`` would
    break the graph (a host read of data), and with the tensor the corrections are graph ops
    whose value follows the counter without a recompile. float64, not the counter's float32:
    the corrections are then computed in the precision of eager's Python floats, and their
    users round them to the tensors' dtype where eager's kernels round a Python float
    (:func:`preconditioner_denominators`, :func:`_apply_tensor_step_sizes`)."""
    if isinstance(t, Tensor) and _compiling():
        return t.to(torch.float64)
    return _scalar(t)


# =============================================================================================
# Dispatch: one switch for every rule
# =============================================================================================


def _implementation(params: Sequence[Tensor], foreach: Optional[bool], fused: Optional[bool],
                    *, rule: str, torch_fused: bool = False, triton: bool = True,
                    note: str = "") -> str:
    """'single', 'foreach', 'fused' (torch's CPU kernel) or 'triton' for a functional call.

    ``fused=True`` takes the rule's Triton kernel where :func:`deepmomentum.kernels.usable`
    accepts the tensors (``triton``: the rule has one), else torch's fused kernel where the rule
    is torch's (``torch_fused``), else raises ``ValueError`` (ending with ``note``)."""
    if foreach and fused:
        raise ValueError("foreach and fused cannot both be True")
    if not fused:
        return "foreach" if foreach else "single"
    if triton and kernels.usable(params):
        return "triton"
    if torch_fused:
        return "fused"
    raise ValueError(f"fused=True: {rule} has no fused kernel for these tensors; its Triton "
                     f"kernels take contiguous fp32/bf16/fp16 CUDA tensors{note}")


def _options(rule: Callable, arguments: dict) -> dict:
    """A rule's keyword arguments, from its ``locals()``, for its composition and kernels (the
    names of ``rule.options``, set below ``RULES``); ``lr`` as a Python float."""
    options = {name: arguments[name] for name in rule.options}
    options["lr"] = _scalar(options["lr"])
    return options


def _kind_indices(params: Sequence[Tensor]) -> list[list[int]]:
    """Indices of ``params`` grouped by (device, dtype)."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        groups[(p.device, p.dtype)].append(i)
    return list(groups.values())


def _by_kind(composition: Callable = None, *, elementwise: bool = False) -> Callable:
    """Run a rule's composition over parts of its tensor lists: under foreach once per
    (device, dtype) of its parameters (a ``torch._foreach_*`` fast route takes one kind per
    call); on the single-tensor path of an ``elementwise`` rule once per tensor (each tensor's
    stages run back to back, so its temporaries are freed and their memory reused before the
    next tensor, as in torch's for-loop: measured, taking even four tensors at a time makes the
    value-preconditioned step 3× slower on the CPU, from fresh allocations), else once. List
    arguments are split, and the entries the composition creates (first-step memories) are
    written back."""
    if composition is None:
        return functools.partial(_by_kind, elementwise=elementwise)

    @functools.wraps(composition)
    def run(params, *lists, foreach: bool, **options):
        # ``shards`` (FSDP2: :mod:`deepmomentum.distributed`) is split with the lists.
        shards = options.pop("shards", None) if "shards" in options else False

        def part_of(idx):
            if shards is False:
                return {}
            return {"shards": None if shards is None else [shards[i] for i in idx]}

        sharded = shards and any(x is not None for x in shards)  # collectives: one call
        if elementwise and not foreach and len(params) > 1 and not sharded:
            # Lists with missing entries: the composition may create them (first steps).
            fill = [k for k, xs in enumerate(lists)
                    if xs is not None and any(x is None for x in xs)]
            for i, p in enumerate(params):
                sub = [None if xs is None else [xs[i]] for xs in lists]
                composition([p], *sub, foreach=False, **options, **part_of([i]))
                for k in fill:
                    if lists[k][i] is None:
                        lists[k][i] = sub[k][0]
            return
        parts = _kind_indices(params) if foreach else []
        if len(parts) <= 1:
            return composition(params, *lists, foreach=foreach, **options,
                               **part_of(range(len(params))))
        for idx in parts:
            sub = [None if xs is None else [xs[i] for i in idx] for xs in lists]
            composition([params[i] for i in idx], *sub, foreach=foreach, **options,
                        **part_of(idx))
            for xs, part in zip(lists, sub):
                if xs is not None:
                    for i, x in zip(idx, part):
                        if xs[i] is None:  # created by the composition
                            xs[i] = x

    return run


def _first_step_split(params: Sequence[Tensor], buffers: list[Optional[Tensor]],
                      momentum: float, like: Callable[[Tensor], Tensor]):
    """Yield ``(is_first, indices)`` for the fused kernels, which take ``b₁ = g₁`` as one flag
    per launch: missing buffers are allocated (``like(param)``) and put into ``buffers``. With
    ``momentum == 0`` there are no buffers and every index is a later step."""
    first = set()
    if momentum != 0:
        for i, (p, b) in enumerate(zip(params, buffers)):
            if b is None:
                buffers[i] = like(p)
                first.add(i)
    for is_first in (True, False):
        indices = [i for i in range(len(params)) if (i in first) == is_first]
        if indices:
            yield is_first, indices


def _fp32_like(p: Tensor) -> Tensor:
    return torch.empty_like(p, dtype=state_dtype(p.dtype))


# =============================================================================================
# Stages
# =============================================================================================


def working_copies(params: Sequence[Tensor]) -> list[Tensor]:
    """Stage: the tensors a step is computed on — each parameter itself, or an fp32 copy of a
    16-bit one (rounded back once by :func:`apply_updates`)."""
    return [p.float() if p.dtype in LOW_PRECISION_DTYPES else p for p in params]


def effective_gradients(weights: Sequence[Tensor], grads: Sequence[Tensor], *,
                        weight_decay: float = 0.0, maximize: bool = False,
                        foreach: bool = False) -> list[Tensor]:
    r"""Stage: the gradient the memories see, in the state dtype (fp32 for 16-bit gradients).

    .. math:: g = \pm G + \lambda W \qquad (\text{coupled decay; } -G \text{ when maximizing})

    Out of place: ``grads`` are never written. ``weight_decay`` here is the *coupled* λ (torch
    SGD/Adam style); pass 0 and use :func:`decoupled_decay` for AdamW-style decay.
    """
    gs = [g.float() if g.dtype in LOW_PRECISION_DTYPES else g for g in grads]
    if foreach:
        if maximize:
            gs = torch._foreach_neg(gs)
        if weight_decay != 0:
            gs = torch._foreach_add(gs, list(weights), alpha=weight_decay)
        return list(gs)
    if maximize:
        gs = [torch.neg(g) for g in gs]
    if weight_decay != 0:
        gs = [g.add(w, alpha=weight_decay) for g, w in zip(gs, weights)]
    return gs


def decoupled_decay(weights: Sequence[Tensor], *, lr: float, weight_decay: float,
                    foreach: bool = False) -> None:
    r"""Stage: decoupled weight decay, :math:`W \leftarrow W(1 - \gamma\lambda)`, in place
    (AdamW/Muon style: it does not touch the gradient, so it may run before the update)."""
    if weight_decay == 0 or not weights:
        return
    if foreach:
        torch._foreach_mul_(list(weights), 1 - lr * weight_decay)
    else:
        for w in weights:
            w.mul_(1 - lr * weight_decay)


def _weights_and_gradients(params, grads, *, lr, weight_decay, decoupled_weight_decay, maximize,
                           foreach) -> tuple[list[Tensor], list[Tensor]]:
    """:func:`working_copies`, :func:`effective_gradients` and :func:`decoupled_decay`: the
    prologue every rule starts with."""
    works = working_copies(params)
    gs = effective_gradients(works, grads, maximize=maximize, foreach=foreach,
                             weight_decay=0.0 if decoupled_weight_decay else weight_decay)
    if decoupled_weight_decay:
        decoupled_decay(works, lr=lr, weight_decay=weight_decay, foreach=foreach)
    return works, gs


def momentum_write(buffers: list[Optional[Tensor]], values: Sequence[Tensor], *,
                   momentum: float, write: float = 1.0, erase: float = 0.0,
                   erased: Optional[Sequence[Optional[Tensor]]] = None,
                   foreach: bool = False) -> list[Tensor]:
    r"""Stage: one gradient step of a momentum memory on its inner objective, in place.

    .. math:: b_t = \mu\, b_{t-1} - \beta E_t + \omega\, v_t, \qquad b_1 = v_1

    §1 (NL Eq 33–34): ``write`` ω = 1 − τ, no erase. §2 (NL Eq 48–49): ``erased`` holds
    :math:`E_t = b_{t-1} K_t` from :func:`erase_terms`, ``erase`` is β. M3's fast and slow
    memories (§6): μ and ω of their own, buffers that start at zero. An entry of ``buffers``
    that is ``None`` is created as a copy of its value (``b₁ = v₁``, torch's SGD) and put in the
    list. Returns the memories (the buffers). A rule with no memory at μ = 0 (§1, §2, §4)
    does not call it then.
    """
    erase_on = erase != 0 and erased is not None
    if foreach and all(b is not None for b in buffers):
        torch._foreach_mul_(buffers, momentum)
        if erase_on:
            torch._foreach_sub_(buffers, list(erased), alpha=erase)
        torch._foreach_add_(buffers, list(values), alpha=write)
        return list(buffers)
    for i, v in enumerate(values):
        b = buffers[i]
        if b is None:
            buffers[i] = torch.clone(v).detach()
            continue
        b.mul_(momentum)
        if erase_on and erased[i] is not None:
            b.sub_(erased[i], alpha=erase)
        b.add_(v, alpha=write)
    return list(buffers)


def ema_write(buffers: Sequence[Tensor], values: Sequence[Tensor], *, beta: float,
              foreach: bool = False) -> list[Tensor]:
    r"""Stage: an exponential moving average, :math:`b \leftarrow \beta b + (1-\beta) v` (as
    ``lerp``), in place — Muon's momentum (§5) and Adam's first moment (§3)."""
    if foreach:
        torch._foreach_lerp_(list(buffers), list(values), 1 - beta)
    else:
        for b, v in zip(buffers, values):
            b.lerp_(v, 1 - beta)
    return list(buffers)


def second_moment_write(buffers: Sequence[Tensor], values: Sequence[Tensor], *, decay: float,
                        write: float, foreach: bool = False) -> list[Tensor]:
    r"""Stage: a second-moment memory, :math:`v \leftarrow \delta v + \omega\, g^2`, in place —
    Adam's (δ = β₂, ω = 1 − β₂; §3, DMGD's preconditioned values §4) and M3's (§6)."""
    if foreach:
        torch._foreach_mul_(list(buffers), decay)
        torch._foreach_addcmul_(list(buffers), list(values), list(values), write)
    else:
        for b, v in zip(buffers, values):
            b.mul_(decay).addcmul_(v, v, value=write)
    return list(buffers)


def accumulate(accumulators: Sequence[Tensor], grads: Sequence[Tensor], *,
               foreach: bool = False) -> None:
    r"""Stage: :math:`a \leftarrow a + g`, in place — the multi-frequency accumulator (§7) and
    M3's chunk sums (§6)."""
    if foreach:
        torch._foreach_add_(list(accumulators), list(grads))
    else:
        for a, g in zip(accumulators, grads):
            a.add_(g)


def erase_terms(buffers: Sequence[Optional[Tensor]], grads: Sequence[Tensor],
                input_keys: Sequence[Optional[Tensor]], *, erase: float,
                shards: Optional[Sequence] = None) -> list[Optional[Tensor]]:
    r"""Stage (§2, NL Eq 48–49): :math:`E_t = b_{t-1} K_t` on each memory's matrix view, with
    the key Gram of :func:`delta_keys` (the gradient's own rows, or the captured input rows).
    ``None`` where there is no memory yet or β = 0 erases nothing.

    ``shards`` (FSDP2): the tensors are local shards. Rows of :math:`bK` are local, so a
    sharded matrix all-reduces only its gradient's norm and its Gram :math:`k^\top k`
    (c × c), a sharded vector (one row) its norm and :math:`b k^\top`; input keys are the
    same on every rank already (gathered by :meth:`DeltaMomentum.attach`)."""
    out = [None if b is None or erase == 0 or (shards is not None and shards[i] is not None
                                                and k is None) else
           erase_along_keys(as_matrix(b), delta_keys(g, k)).view_as(b)
           for i, (b, g, k) in enumerate(zip(buffers, grads, input_keys))]
    if shards is None:
        return out
    sharded = [i for i, (b, k) in enumerate(zip(buffers, input_keys))
               if shards[i] is not None and b is not None and erase != 0 and k is None]
    if sharded:
        for i, e in zip(sharded, _sharded_gradient_key_erase(
                [buffers[i] for i in sharded], [grads[i] for i in sharded],
                [shards[i] for i in sharded])):
            out[i] = e
    return out


def _sharded_gradient_key_erase(buffers, grads, shards) -> list[Tensor]:
    r""":math:`bK` with :math:`K = G^\top G/\lVert G\rVert^2` for row shards of ``b`` and
    ``G``, by whichever moves less without repeating matrix work on every rank:

    * a wide or square matrix (r ≤ c): ``G`` is all-gathered (r·c, no more than the c × c
      Gram) and each rank computes its rows :math:`(b k^\top) k` as one process would;
    * a tall matrix (r > c): the overflow-safe norm (global max and sum of squares) and the
      Gram :math:`k^\top k` (c × c, less than ``G``) are all-reduced;
    * a vector (one row, its columns sharded): the norm and :math:`b k^\top` are all-reduced.

    The reductions take one collective each for all tensors."""
    from . import distributed

    out: list[Optional[Tensor]] = [None] * len(buffers)
    gathered_ones, reduced_ones = [], []
    for j, s in enumerate(shards):
        r, c = matrix_shape(s.shape)
        (gathered_ones if len(s.shape) >= 2 and r <= c else reduced_ones).append(j)
    wholes = distributed.full_many([grads[j] for j in gathered_ones],
                                   [shards[j] for j in gathered_ones])
    for j, g in zip(gathered_ones, wholes):
        out[j] = erase_along_keys(as_matrix(buffers[j]), gradient_keys(g)).view_as(buffers[j])
    if not reduced_ones:
        return out
    group = shards[reduced_ones[0]].group
    gs = [as_matrix(grads[j]) for j in reduced_ones]
    scales = distributed.all_reduce_max(
        [g.abs().amax() if g.numel() else g.new_zeros(()) for g in gs], group)
    scales = [torch.where(m > 0, m, torch.ones_like(m)) for m in scales]
    sums = distributed.all_reduce_sum([(g / m).square().sum() for g, m in zip(gs, scales)],
                                      group)
    keys = []
    for g, m, total in zip(gs, scales, sums):
        norm = total.sqrt() * m
        keys.append(g / torch.where(norm > 0, norm, torch.ones_like(norm)))
    bs = [buffers[j] for j in reduced_ones]
    vector = [len(shards[j].shape) < 2 for j in reduced_ones]
    partial = [as_matrix(b) @ k.mT if v else k.mT @ k for b, k, v in zip(bs, keys, vector)]
    for j, b, k, red, v in zip(reduced_ones, bs, keys,
                               distributed.all_reduce_sum(partial, group), vector):
        out[j] = (red @ k if v else as_matrix(b) @ red).view_as(b)
    return out


def preconditioner_denominators(second_moments: Sequence[Tensor], *, eps: float,
                                bias_corrections: Optional[Sequence[float]] = None,
                                foreach: bool = False) -> list[Tensor]:
    r"""Stage (§3, §6): :math:`d = \sqrt{v} / \sqrt{1-\beta_2^t} + \epsilon` (without
    ``bias_corrections`` :math:`1-\beta_2^t`: :math:`\sqrt{v} + \epsilon`), in torch Adam's
    order of operations; the preconditioner is :math:`P_t(x) = x / d`."""
    # Tensor corrections (0-dim float64, from _step_count while compiling): their square
    # roots as tensors, as torch's Adam takes them (0-dim tensors for _foreach_div_), rounded
    # to each moment's dtype as eager rounds a Python float there (a 0-dim float64 divisor of
    # a 0-dim moment would otherwise promote, or compute, in float64).
    roots = None if bias_corrections is None else [
        c.sqrt().to(v.dtype) if isinstance(c, Tensor) else math.sqrt(c)
        for c, v in zip(bias_corrections, second_moments)]
    if foreach:
        denom = torch._foreach_sqrt(list(second_moments))
        if roots is not None:
            torch._foreach_div_(denom, roots)
        torch._foreach_add_(denom, eps)
        return list(denom)
    out = []
    for i, v in enumerate(second_moments):
        d = v.sqrt()
        if roots is not None:
            d = d / roots[i]
        out.append(d.add_(eps))
    return out


def preconditioned_values(values: Sequence[Tensor], denominators: Sequence[Tensor], *,
                          foreach: bool = False) -> list[Tensor]:
    r"""Stage: preconditioned values :math:`P_t(v) = v / d` (NL Eq 19; §3 ``"value"``, §4)."""
    if foreach:
        return list(torch._foreach_div(list(values), list(denominators)))
    return [v / d for v, d in zip(values, denominators)]


def nesterov_readout(grads: Sequence[Tensor], memories: Sequence[Tensor], *, momentum: float,
                     ema: bool = False, write: float = 1.0, foreach: bool = False
                     ) -> list[Tensor]:
    r"""Stage: the Nesterov read-out, :math:`U = g + \mu M` (§1, §2, §4; M3's fast memory §6
    with its write strength: :math:`U = \omega g + \mu M`) or, for an EMA memory,
    :math:`U = \mathrm{lerp}(g, M, \mu)` (§5). Out of place."""
    if write != 1.0:
        if foreach:
            out = torch._foreach_mul(list(memories), momentum)
            torch._foreach_add_(out, list(grads), alpha=write)
            return list(out)
        return [m.mul(momentum).add_(g, alpha=write) for g, m in zip(grads, memories)]
    if foreach:
        if ema:
            return list(torch._foreach_lerp(list(grads), list(memories), momentum))
        return list(torch._foreach_add(list(grads), list(memories), alpha=momentum))
    if ema:
        return [g.lerp(m, momentum) for g, m in zip(grads, memories)]
    return [g.add(m, alpha=momentum) for g, m in zip(grads, memories)]


def sign_readout(updates: Sequence[Tensor], *, foreach: bool = False) -> list[Tensor]:
    r"""Stage: :math:`\sigma(U) = \mathrm{sign}(U)` (DMGD's ``output="sign"``, §4)."""
    if foreach:
        return list(torch._foreach_sign(list(updates)))
    return [torch.sign(u) for u in updates]


def orthogonalize(
    tensors: Sequence[Tensor],
    *,
    batch_dims: int = 0,
    steps: int = 5,
    coefficients="keller",
    eps: float = 1e-7,
    dtype: torch.dtype = torch.bfloat16,
    batched: bool = True,
    shards: Optional[Sequence] = None,
) -> list[Tensor]:
    r"""Stage (§5, NL Eq 42, 52): :math:`\sigma(U) = \mathrm{NS}(U)`, Newton–Schulz of each
    tensor's matrix view (:func:`matrix_view` with ``batch_dims``), returned in each tensor's
    shape and dtype, never aliasing its input.

    ``batched=True`` stacks all matrices of the same (rows, cols, dtype, device) and
    orthogonalizes them in one batched call; ``batched=False`` is the reference loop, one
    matrix at a time. ``shards`` (FSDP2, :func:`deepmomentum.distributed.shards_of`): the
    tensors are local shards; each whole matrix is assembled on its owner rank, orthogonalized
    there (batched with the owner's other matrices) and its rows sent back. Both ways travel
    in ``dtype`` where it is the narrower (Newton–Schulz's first step casts to it, and its
    result is that cast back), so the result is the same and the bytes are half for bf16.
    """
    if shards is not None and any(s is not None for s in shards):
        from . import distributed

        wire = [t.to(dtype) if dtype.itemsize < t.dtype.itemsize else t for t in tensors]
        fulls = distributed.gather_to_owners(wire, shards)
        plain = [i for i, s in enumerate(shards) if s is None]  # whole on every rank
        owned = sorted(fulls)
        done = orthogonalize([fulls[i] for i in owned] + [tensors[i] for i in plain],
                             batch_dims=batch_dims, steps=steps, coefficients=coefficients,
                             eps=eps, dtype=dtype, batched=batched)
        back = distributed.scatter_from_owners(dict(zip(owned, done)), wire, shards)
        back.update(zip(plain, done[len(owned):]))
        return [back[i].to(t.dtype) for i, t in enumerate(tensors)]
    views = [matrix_view(t, batch_dims) for t in tensors]  # (n, r, c) each
    ns = dict(steps=steps, coefficients=coefficients, eps=eps, dtype=dtype)
    out: list[Optional[Tensor]] = [None] * len(views)
    if not batched:
        for i, v in enumerate(views):
            out[i] = torch.stack([newton_schulz(m, **ns) for m in v.unbind(0)])
    else:
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, v in enumerate(views):
            groups[(tuple(v.shape[1:]), v.dtype, v.device)].append(i)
        for indices in groups.values():
            if len(indices) == 1 and views[indices[0]].shape[0] == 1:
                out[indices[0]] = newton_schulz(views[indices[0]][0], **ns)[None]
                continue
            stacked = torch.cat([views[i] for i in indices])
            result = newton_schulz(stacked, **ns).split([views[i].shape[0] for i in indices])
            for i, r in zip(indices, result):
                out[i] = r
    return [o.reshape(t.shape) for o, t in zip(out, tensors)]


def apply_updates(params: Sequence[Tensor], weights: Sequence[Tensor],
                  updates: Sequence[Tensor], step_sizes: Steps, *,
                  denominators: Optional[Sequence[Tensor]] = None,
                  foreach: bool = False) -> None:
    r"""Stage: the outer step, :math:`W \leftarrow W + s\,U` (or :math:`W + s\,U / d` with
    ``denominators``), then each 16-bit parameter takes its fp32 working copy, rounded once.

    ``step_sizes`` ``s`` is one float or one per tensor: :math:`-\gamma` times the rule's scale
    (Muon's shape factor, Adam's :math:`1/(1-\beta_1^t)`). Per-tensor sizes under foreach are
    applied one ``_foreach_add_`` per distinct size, so the arithmetic (``add`` with ``alpha``)
    is the single-tensor path's.
    """
    scalar = isinstance(step_sizes, (int, float))
    if not scalar and any(isinstance(s, Tensor) for s in step_sizes):
        return _apply_tensor_step_sizes(params, weights, updates, step_sizes,
                                        denominators=denominators, foreach=foreach)
    if not foreach:
        for i, (p, w, u) in enumerate(zip(params, weights, updates)):
            size = step_sizes if scalar else step_sizes[i]
            if denominators is None:
                w.add_(u, alpha=size)
            else:
                w.addcdiv_(u, denominators[i], value=size)
            if w is not p:
                p.copy_(w)
        return
    weights, updates = list(weights), list(updates)
    sizes = [float(step_sizes)] * len(weights) if scalar else [float(s) for s in step_sizes]
    if denominators is not None:
        torch._foreach_addcdiv_(weights, updates, list(denominators),
                                float(step_sizes) if scalar else sizes)
    else:
        by_size: dict[float, list[int]] = defaultdict(list)
        for i, s in enumerate(sizes):
            by_size[s].append(i)
        for s, idx in by_size.items():
            torch._foreach_add_([weights[i] for i in idx], [updates[i] for i in idx], alpha=s)
    rounded = [(p, w) for p, w in zip(params, weights) if w is not p]
    if rounded:
        torch._foreach_copy_([p for p, _ in rounded], [w for _, w in rounded])


def _apply_tensor_step_sizes(params, weights, updates, step_sizes, *, denominators, foreach):
    """:func:`apply_updates` with step sizes that are 0-dim tensors (Adam's bias-corrected
    sizes while torch.compile traces: :func:`_step_count`). ``alpha``/``value`` take only
    numbers, so the sizes multiply as tensors, in the eager order of operations: ``(s·u)/d``
    as the CPU ``addcdiv`` kernel's ``value * t1 / t2``. (``_foreach_addcdiv_`` with a
    stacked tensor of sizes, torch's Adam's way, fails under fake tensors in torch 2.13:
    "Expected scalars to be on CPU, got meta".)"""
    weights, updates = list(weights), list(updates)
    # Each size rounded to its update's dtype, as eager rounds alpha/value (and a 0-dim
    # update times a 0-dim float64 size would be float64).
    sizes = [s.to(u.dtype) if isinstance(s, Tensor) else torch.tensor(float(s), dtype=u.dtype)
             for s, u in zip(step_sizes, updates)]
    if foreach:
        scaled = torch._foreach_mul(updates, sizes)
        if denominators is not None:
            torch._foreach_div_(scaled, list(denominators))
        torch._foreach_add_(weights, scaled)
    else:
        for i, (w, u) in enumerate(zip(weights, updates)):
            scaled = u * sizes[i]
            w.add_(scaled if denominators is None else scaled / denominators[i])
    rounded = [(p, w) for p, w in zip(params, weights) if w is not p]
    for p, w in rounded:
        p.copy_(w)


# =============================================================================================
# §1 AssociativeMomentum
# =============================================================================================


def associative_momentum(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Optional[Tensor]],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
    foreach: Optional[bool] = None,
    fused: Optional[bool] = None,
) -> None:
    r"""Momentum as a value-less associative memory (NL Eq 33–34; SPEC §1), in place.

    .. math::
        g_t &= \pm G_t + \lambda W_{t-1}\ \text{(coupled decay)}\\
        b_1 &= g_1,\qquad b_t = \mu\, b_{t-1} + (1-\tau)\, g_t\\
        U_t &= g_t + \mu b_t \ \text{(nesterov)}\ \text{ else }\ b_t\\
        W_t &= W_{t-1}(1-\gamma\lambda_{\text{dec}}) - \gamma U_t

    ``momentum_buffers`` entries that are ``None`` are created (``b_1 = g_1``) and written back
    into the list. With ``momentum == 0`` no buffer is kept and ``U = g`` (torch's SGD).
    ``fused``: the Triton kernel on CUDA, torch's fused SGD on the CPU (R1, bit for bit).
    """
    impl = _implementation(params, foreach, fused, rule="associative_momentum",
                           torch_fused=True)
    options = _options(associative_momentum, locals())
    if impl == "fused":
        return _torch_fused_sgd(params, grads, momentum_buffers, **options)
    if impl == "triton":
        return _triton_sgd(params, grads, momentum_buffers, **options)
    _associative_momentum(params, grads, momentum_buffers, foreach=impl == "foreach", **options)


@_by_kind(elementwise=True)
def _associative_momentum(params, grads, momentum_buffers, *, lr, momentum, dampening, nesterov,
                          weight_decay, decoupled_weight_decay, maximize, foreach):
    works, gs = _weights_and_gradients(params, grads, lr=lr, weight_decay=weight_decay,
                                       decoupled_weight_decay=decoupled_weight_decay,
                                       maximize=maximize, foreach=foreach)
    memories = gs if momentum == 0 else momentum_write(  # μ = 0: no memory, U = g
        momentum_buffers, gs, momentum=momentum, write=1 - dampening, foreach=foreach)
    if nesterov:
        memories = nesterov_readout(gs, memories, momentum=momentum, foreach=foreach)
    apply_updates(params, works, memories, -lr, foreach=foreach)


def _torch_fused_sgd(params, grads, momentum_buffers, *, lr, momentum, dampening, nesterov,
                     weight_decay, decoupled_weight_decay, maximize):
    # torch's fused SGD is exactly §1 with coupled decay. Decoupled decay does not depend on
    # the update, so it is applied first and the kernel runs without decay.
    if weight_decay != 0 and decoupled_weight_decay:
        decoupled_decay(params, lr=lr, weight_decay=weight_decay, foreach=True)
        weight_decay = 0.0
    for is_first, indices in _first_step_split(params, momentum_buffers, momentum,
                                               lambda p: torch.empty_like(p)):
        for kind in _kind_indices([params[i] for i in indices]):
            sel = [indices[j] for j in kind]
            torch._fused_sgd_(
                [params[i] for i in sel], [grads[i] for i in sel],
                [momentum_buffers[i] for i in sel] if momentum != 0 else [],
                weight_decay=weight_decay, momentum=momentum, lr=lr, dampening=dampening,
                nesterov=nesterov, maximize=maximize, is_first_step=is_first)


def _triton_sgd(params, grads, momentum_buffers, **options):
    from .kernels import elementwise

    for is_first, idx in _first_step_split(params, momentum_buffers, options["momentum"],
                                           _fp32_like):
        elementwise.sgd_step([params[i] for i in idx], [grads[i] for i in idx],
                             [momentum_buffers[i] for i in idx], first_step=is_first,
                             **options)


# =============================================================================================
# §2 DeltaMomentum
# =============================================================================================


def gradient_keys(g: Tensor) -> Tensor:
    """The key matrix ``k = G / ‖G‖_F`` of ``keys="gradient"`` on ``g``'s matrix view, so that
    ``kᵀk = GᵀG / ‖G‖²`` (trace 1; zero for a zero gradient). Normalized before any product,
    with an overflow-safe norm: gradients of any finite scale give the same keys."""
    g = as_matrix(g)
    norm = stable_norm(g)
    return g / torch.where(norm > 0, norm, torch.ones_like(norm))


def input_keys_matrix(rows: Tensor, dtype: torch.dtype) -> Tensor:
    """The key matrix ``k = X̂ / √n`` of ``keys="input"`` from ``n`` unit-norm input rows, so
    that ``kᵀk = X̂ᵀX̂ / n`` (trace 1)."""
    return rows.to(dtype) / math.sqrt(rows.shape[0])


def erase_along_keys(b: Tensor, keys: Tensor) -> Tensor:
    """``b K`` for the key Gram ``K = kᵀk`` (c × c) of normalized keys (:func:`gradient_keys`,
    :func:`input_keys_matrix`), without forming K when the key count is the smaller side:
    ``(b kᵀ) k`` if ``n ≤ c`` else ``b (kᵀ k)``.

    ``b`` is ``r × c`` and ``keys`` is ``n × c``; cost ``4·r·c·min(n, c)`` flops. Since ``K``
    has spectral norm ≤ 1, ``‖b K‖ ≤ ‖b‖``: no intermediate grows beyond ``b``'s scale.
    """
    n, c = keys.shape
    if n <= c:
        return (b @ keys.mT) @ keys
    if keys.is_cuda and keys.dtype in kernels.SUPPORTED_DTYPES and c >= 64:
        from .kernels.newton_schulz import gram  # kᵀk by its upper-triangle tiles

        return b @ gram(keys.mT.contiguous())
    return b @ (keys.mT @ keys)


def delta_keys(g: Tensor, input_rows: Optional[Tensor]) -> Tensor:
    """The normalized key matrix of one tensor: its captured input rows where given, else the
    effective gradient's own rows."""
    return gradient_keys(g) if input_rows is None else input_keys_matrix(input_rows, g.dtype)


def delta_momentum(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Optional[Tensor]],
    input_keys: Optional[list[Optional[Tensor]]] = None,
    *,
    lr: float,
    momentum: float,
    erase: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
    shards: Optional[Sequence] = None,
    foreach: Optional[bool] = None,
    fused: Optional[bool] = None,
) -> None:
    r"""Momentum with the delta-rule (L2) objective over keys (NL Eq 48–49, 35–37; SPEC §2).

    .. math::
        b_1 = g_1,\qquad b_t = b_{t-1}(\mu I - \beta K_t) + (1-\tau)\, g_t

    then read-out and update as :func:`associative_momentum` (with ``μ = 0`` there is no memory
    and ``U = g``, as torch's SGD). ``K_t`` is a normalized key Gram
    (c × c, PSD, trace ≤ 1) on each tensor's matrix view (:func:`as_matrix`): the gradient's
    ``GᵀG/‖G‖²`` by default, or ``X̂ᵀX̂/n`` from ``input_keys[i]`` (rows already unit-normalized)
    where given. Since its eigenvalues lie in [0, 1] and β ∈ [0, μ], the memory never grows
    faster than plain momentum: ‖b_t‖ ≤ μ‖b_{t−1}‖ + (1−τ)‖g_t‖. ``shards``: FSDP2 shards
    (:func:`erase_terms`). ``fused``: the erase terms by
    matmul, the rest in one Triton kernel (CUDA).
    """
    impl = _implementation(params, foreach, fused, rule="delta_momentum")
    input_keys = input_keys if input_keys is not None else [None] * len(params)
    options = _options(delta_momentum, locals())
    if impl == "triton":
        return _triton_memory_step(params, grads, momentum_buffers, input_keys=input_keys,
                                   **options)
    _delta_momentum(params, grads, momentum_buffers, input_keys, foreach=impl == "foreach",
                    **options)


@_by_kind(elementwise=True)
def _delta_momentum(params, grads, momentum_buffers, input_keys, *, lr, momentum, erase,
                    dampening, nesterov, weight_decay, decoupled_weight_decay, maximize, shards,
                    foreach):
    works, gs = _weights_and_gradients(params, grads, lr=lr, weight_decay=weight_decay,
                                       decoupled_weight_decay=decoupled_weight_decay,
                                       maximize=maximize, foreach=foreach)
    memories = gs if momentum == 0 else momentum_write(  # μ = 0 (so β = 0): no memory, U = g
        momentum_buffers, gs, momentum=momentum, write=1 - dampening, erase=erase,
        erased=erase_terms(momentum_buffers, gs, input_keys, erase=erase, shards=shards),
        foreach=foreach)
    if nesterov:
        memories = nesterov_readout(gs, memories, momentum=momentum, foreach=foreach)
    apply_updates(params, works, memories, -lr, foreach=foreach)


def _triton_memory_step(params, grads, momentum_buffers, *, input_keys=None, reads=None,
                        sign=False, shards=None, **options):
    """DeltaMomentum's and DMGD's fused path: the erase terms (matmuls) or the keyed reads come
    in from the stages, :func:`deepmomentum.kernels.elementwise.memory_step` fuses the rest."""
    from .kernels import elementwise

    gs = None
    if input_keys is not None and options["erase"] != 0:
        gs = effective_gradients(params, grads, maximize=options["maximize"],
                                 weight_decay=0.0 if options["decoupled_weight_decay"]
                                 else options["weight_decay"])
    for is_first, idx in _first_step_split(params, momentum_buffers, options["momentum"],
                                           _fp32_like):
        erased = None  # index → b K (Delta's later steps)
        if gs is not None and not is_first:
            erased = dict(zip(idx, erase_terms(
                [momentum_buffers[i] for i in idx], [gs[i] for i in idx],
                [input_keys[i] for i in idx], erase=options["erase"],
                shards=None if shards is None else [shards[i] for i in idx])))
        # A launch takes reads for all of its tensors or for none (DMGD's hidden=0 tensors).
        parts = [idx] if reads is None else [[i for i in idx if reads[i] is not None],
                                             [i for i in idx if reads[i] is None]]
        for part in filter(None, parts):
            elementwise.memory_step(
                [params[i] for i in part], [grads[i] for i in part],
                [momentum_buffers[i] for i in part],
                None if erased is None else [erased[i] for i in part],
                None if reads is None or reads[part[0]] is None else [reads[i] for i in part],
                first_step=is_first, sign=sign, **options)


# =============================================================================================
# §3 PreconditionedMomentum
# =============================================================================================

PRECONDITION_MODES = ("readout", "value")
PRECONDITIONERS = ("adam", "none")


def preconditioned_momentum(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Optional[Tensor]],
    state_steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool = True,
    precondition: str = "readout",
    preconditioner: str = "adam",
    maximize: bool = False,
    foreach: Optional[bool] = None,
    fused: Optional[bool] = None,
) -> None:
    r"""Momentum whose values are preconditioned gradients (NL Eq 46–47, App. B; SPEC §3).

    With :math:`P_t(x) = x / (\sqrt{v_t / (1-\beta_2^t)} + \epsilon)` and the second-moment memory
    :math:`v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2`:

    * ``precondition="readout"``: :math:`b_t = \beta_1 b_{t-1} + (1-\beta_1) g_t`,
      :math:`U_t = P_t(b_t / (1-\beta_1^t))` — Adam/AdamW.
    * ``precondition="value"``: :math:`b_t = \beta_1 b_{t-1} + (1-\beta_1) P_t(g_t)`,
      :math:`U_t = b_t / (1-\beta_1^t)` — NL Eq 19 read literally.
    * ``preconditioner="none"``: :math:`P` is the identity (``exp_avg_sqs`` entries may be None).

    Then :math:`W_t = W_{t-1}(1-\gamma\lambda) - \gamma U_t` (decoupled decay) or
    :math:`g_t = G_t + \lambda W_{t-1}` (coupled). ``exp_avgs``/``exp_avg_sqs`` start at zero.
    ``fused``: the Triton kernel on CUDA; torch's fused Adam(W) on the CPU for readout + adam
    (R3a, bit for bit).
    """
    if precondition not in PRECONDITION_MODES:
        raise ValueError(f"precondition must be one of {PRECONDITION_MODES}, got {precondition!r}")
    if preconditioner not in PRECONDITIONERS:
        raise ValueError(f"preconditioner must be one of {PRECONDITIONERS}, got {preconditioner!r}")
    impl = _implementation(params, foreach, fused, rule="preconditioned_momentum",
                           torch_fused=precondition == "readout" and preconditioner == "adam",
                           note="; torch's fused CPU kernel (Adam/AdamW) takes only "
                                "precondition='readout', preconditioner='adam'")
    options = _options(preconditioned_momentum, locals())
    if impl == "fused":
        return _torch_fused_adam(params, grads, exp_avgs, exp_avg_sqs, state_steps, **options)
    if impl == "triton":
        from .kernels import elementwise

        return elementwise.adam_step(params, grads, exp_avgs, exp_avg_sqs,
                                     [_scalar(t) for t in state_steps], **options)
    _preconditioned_momentum(params, grads, exp_avgs, exp_avg_sqs, state_steps,
                             foreach=impl == "foreach", **options)


@_by_kind(elementwise=True)
def _preconditioned_momentum(params, grads, exp_avgs, exp_avg_sqs, state_steps, *, lr, beta1,
                             beta2, eps, weight_decay, decoupled_weight_decay, precondition,
                             preconditioner, maximize, foreach):
    works, gs = _weights_and_gradients(params, grads, lr=lr, weight_decay=weight_decay,
                                       decoupled_weight_decay=decoupled_weight_decay,
                                       maximize=maximize, foreach=foreach)
    ts = [_step_count(t) for t in state_steps]  # floats; tensors while compiling
    # the first moment's bias correction (a number over a tensor: _quotient)
    step_sizes = [_quotient(-lr, 1 - beta1**t) for t in ts]
    denominators = None
    if preconditioner == "adam":
        second_moment_write(exp_avg_sqs, gs, decay=beta2, write=1 - beta2, foreach=foreach)
        denominators = preconditioner_denominators(
            exp_avg_sqs, eps=eps, bias_corrections=[1 - beta2**t for t in ts], foreach=foreach)
    if denominators is not None and precondition == "value":
        gs = preconditioned_values(gs, denominators, foreach=foreach)
        denominators = None
    ema_write(exp_avgs, gs, beta=beta1, foreach=foreach)
    apply_updates(params, works, exp_avgs, step_sizes, denominators=denominators,
                  foreach=foreach)


def _torch_fused_adam(params, grads, exp_avgs, exp_avg_sqs, state_steps, *, lr, beta1, beta2,
                      eps, weight_decay, decoupled_weight_decay, precondition, preconditioner,
                      maximize):
    # Readout preconditioning with Adam's second moment *is* Adam(W): use torch's kernel.
    kernel = torch._fused_adamw_ if decoupled_weight_decay else torch._fused_adam_
    for indices in _kind_indices(params):
        kernel([params[i] for i in indices], [grads[i] for i in indices],
               [exp_avgs[i] for i in indices], [exp_avg_sqs[i] for i in indices], [],
               [state_steps[i] for i in indices], amsgrad=False, lr=lr, beta1=beta1,
               beta2=beta2, weight_decay=weight_decay, eps=eps, maximize=maximize)


# =============================================================================================
# §4 DeepMomentum (DMGD): a momentum whose keyed memory is an MLP
# =============================================================================================

DMGD_OBJECTIVES = ("dot", "l2")
DMGD_VALUES = ("gradient", "preconditioned")
DMGD_OUTPUTS = ("identity", "sign", "newton_schulz")
# Activations with φ(0) = 0, so a zero key reads zero (P4); each with its closed-form φ'.
DMGD_ACTIVATIONS = ("tanh", "relu", "silu", "gelu")


def activate(name: str, z: Tensor) -> tuple[Tensor, Tensor]:
    """(φ(z), φ'(z)) of the memory activation ``name`` (:data:`DMGD_ACTIVATIONS`), in closed
    form — DMGD's inner step and the HOPE example's memories differentiate by hand."""
    if name == "tanh":
        h = torch.tanh(z)
        return h, 1 - h * h
    if name == "relu":
        return torch.relu(z), (z > 0).to(z.dtype)
    if name == "silu":
        s = torch.sigmoid(z)
        return z * s, s * (1 + z * (1 - s))
    if name == "gelu":  # exact (erf) GELU: φ = zΦ(z), φ' = Φ(z) + z·pdf(z)
        cdf = 0.5 * (1 + torch.erf(z * (0.5**0.5)))
        pdf = torch.exp(-0.5 * z * z) * (2 * math.pi) ** -0.5
        return z * cdf, cdf + z * pdf
    raise ValueError(f"Invalid activation: {name!r}; activation must be one of "
                     f"{DMGD_ACTIVATIONS}")


def unit_rows(x: Tensor) -> Tensor:
    """Rows of ``x`` (…, r, c) scaled to unit norm; a zero row stays zero."""
    norm = stable_norm(x, dim=-1, keepdim=True)  # huge or tiny rows give unit rows too
    return x / torch.where(norm > 0, norm, torch.ones_like(norm))


def deep_memory_gradient_factors(keys: Tensor, values: Tensor, A: Tensor, B: Tensor, *,
                                 objective: str, activation: str
                                 ) -> tuple[Tensor, Tensor, Tensor]:
    r"""The factors ``(H, dZ, D)`` of each row's gradient for ``f_θ(X) = φ(X A) B``.

    Row ``i``'s loss — ``−⟨F_i, V_i⟩`` for ``"dot"``, ``½‖F_i − V_i‖²`` for ``"l2"`` — has
    ``∇_B = H_iᵀ D_i`` and ``∇_A = X_iᵀ dZ_i``, outer products of ``H = φ(XA)``,
    ``D = ∂ℓ/∂F`` (``−V`` or ``F − V``) and ``dZ = (D Bᵀ) ⊙ φ'(XA)``. Kept factored, a
    sequence of per-row gradients never has to be materialized (the HOPE example's memories).
    Shapes: ``keys``/``values`` (…, r, c), ``A`` (…, c, h), ``B`` (…, h, c).
    """
    Z = keys @ A  # (…, r, h)
    H, dH = activate(activation, Z)
    D = -values if objective == "dot" else H @ B - values  # (…, r, c)
    return H, (D @ B.mT) * dH, D


def deep_memory_gradients(keys: Tensor, values: Tensor, A: Tensor, B: Tensor, *,
                          objective: str, activation: str) -> tuple[Tensor, Tensor]:
    r"""Closed-form ``(∇_A L, ∇_B L)`` of the inner objective for ``f_θ(X) = φ(X A) B``.

    Batched over a leading dim: ``keys``/``values`` (n, r, c), ``A`` (n, c, h), ``B`` (n, h, c).
    With ``D = ∂L/∂F`` — ``−V/r`` for ``"dot"``, ``(F − V)/r`` for ``"l2"`` —
    ``∇_B = φ(XA)ᵀ D`` and ``∇_A = Xᵀ((D Bᵀ) ⊙ φ'(XA))`` (the mean of the rows' gradients,
    :func:`deep_memory_gradient_factors`).
    """
    H, dZ, D = deep_memory_gradient_factors(keys, values, A, B, objective=objective,
                                            activation=activation)
    rows = keys.shape[-2]
    return keys.mT @ dZ / rows, H.mT @ D / rows


def deep_memory_reads(keys_from: Sequence[Tensor], values: Sequence[Tensor],
                      memory_A: Sequence[Optional[Tensor]], memory_B: Sequence[Optional[Tensor]],
                      *, momentum: float, memory_lr: float, key_decay: Optional[float],
                      objective: str, activation: str, batched: bool = True,
                      shards: Optional[Sequence] = None) -> list[Optional[Tensor]]:
    r"""Stage (§4, NL Eq 23–24, 50): DMGD's keyed memory, written then read, in place on (A, B).

    Keys ``X`` are the unit rows of each effective gradient's matrix view (``keys_from``),
    values ``V`` its ``values`` (the gradient, or its preconditioned form). One inner step at
    θ_{t−1}, :math:`(A, B)_t = (\mu_A A, \mu B)_{t-1} - \eta_m \nabla_{A,B} L^{(2)}`
    (:func:`deep_memory_gradients`; ``μ_A`` = ``key_decay``, None: μ), then the read
    :math:`\varphi(X A_t) B_t` in each gradient's shape (None where the entry has no memory).
    ``batched`` stacks same-shape tensors into one batched product; False is the
    one-tensor-at-a-time reference. ``shards`` (FSDP2): the tensors are local shards and the
    memories replicated; see :func:`_sharded_deep_memory_reads`.
    """
    n = len(keys_from)
    reads: list[Optional[Tensor]] = [None] * n
    inner = dict(momentum=momentum, memory_lr=memory_lr, key_decay=key_decay,
                 objective=objective, activation=activation)
    if shards is not None and any(s is not None for s in shards):
        sharded = [i for i in range(n) if shards[i] is not None and memory_A[i] is not None]
        if sharded:
            pick = (lambda xs: [xs[i] for i in sharded])
            for i, r in zip(sharded, _sharded_deep_memory_reads(
                    pick(keys_from), pick(values), pick(memory_A), pick(memory_B),
                    pick(shards), **inner)):
                reads[i] = r
        rest = [i for i in range(n) if shards[i] is None]
        for i, r in zip(rest, deep_memory_reads(
                [keys_from[i] for i in rest], [values[i] for i in rest],
                [memory_A[i] for i in rest], [memory_B[i] for i in rest],
                batched=batched, **inner)):
            reads[i] = r
        return reads
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i in range(n):
        if memory_A[i] is not None:
            key = (tuple(as_matrix(keys_from[i]).shape), memory_A[i].shape[-1],
                   keys_from[i].dtype) if batched else (i,)
            groups[key].append(i)
    for indices in groups.values():
        X = torch.stack([unit_rows(as_matrix(keys_from[i])) for i in indices])
        V = torch.stack([as_matrix(values[i]) for i in indices])
        A = torch.stack([memory_A[i] for i in indices])
        B = torch.stack([memory_B[i] for i in indices])
        grad_A, grad_B = deep_memory_gradients(X, V, A, B, objective=objective,
                                               activation=activation)
        A.mul_(momentum if key_decay is None else key_decay).sub_(grad_A, alpha=memory_lr)
        B.mul_(momentum).sub_(grad_B, alpha=memory_lr)
        read = activate(activation, X @ A)[0] @ B  # (k, r, c)
        for j, i in enumerate(indices):
            memory_A[i].copy_(A[j])
            memory_B[i].copy_(B[j])
            reads[i] = read[j].view_as(keys_from[i])
    return reads


def _sharded_deep_memory_reads(keys_from, values, memory_A, memory_B, shards, *, momentum,
                               memory_lr, key_decay, objective, activation) -> list[Tensor]:
    """:func:`deep_memory_reads` on FSDP2 row shards with replicated memories ``(A, B)``.

    A matrix's keys, values and read are row-local and its inner gradient is a sum over rows:
    each rank computes its rows' part and one all-reduce (all tensors at once) gives every
    rank the same gradient, so the replicated memories stay identical. A vector (one row,
    its columns sharded) is small: it is all-gathered and its step computed whole on every
    rank."""
    from . import distributed

    inner = dict(objective=objective, activation=activation)
    # Vectors: gathered whole (one all-gather for all; the values only where not the keys),
    # their step computed like unsharded.
    whole = {i for i, s in enumerate(shards) if len(s.shape) < 2}
    own_values = [i for i in sorted(whole) if values[i] is not keys_from[i]]
    gathered = iter(distributed.full_many(
        [keys_from[i] for i in sorted(whole)] + [values[i] for i in own_values],
        [shards[i] for i in sorted(whole)] + [shards[i] for i in own_values]))
    wholes = {i: next(gathered) for i in sorted(whole)}
    whole_values = {**wholes, **{i: next(gathered) for i in own_values}}
    xs, partial = [], []
    for i, (g, v, A, B, s) in enumerate(zip(keys_from, values, memory_A, memory_B, shards)):
        if i in whole:
            g, v = wholes[i], whole_values[i]
        X, V = unit_rows(as_matrix(g)), as_matrix(v)
        H, dZ, D = deep_memory_gradient_factors(X, V, A, B, **inner)
        rows = distributed.matrix_shape(s.shape)[0]
        xs.append(X)
        partial += [X.mT @ dZ / rows, H.mT @ D / rows]
    reduced = iter(distributed.all_reduce_sum(
        [p for k, p in enumerate(partial) if k // 2 not in whole], shards[0].group))
    reads = []
    for i, (g, A, B, s, X) in enumerate(zip(keys_from, memory_A, memory_B, shards, xs)):
        grad_A, grad_B = (partial[2 * i], partial[2 * i + 1]) if i in whole else (
            next(reduced), next(reduced))
        A.mul_(momentum if key_decay is None else key_decay).sub_(grad_A, alpha=memory_lr)
        B.mul_(momentum).sub_(grad_B, alpha=memory_lr)
        read = activate(activation, X @ A)[0] @ B
        if i in whole:  # this rank's columns of the vector
            read = read.reshape(-1)[s.offset:s.offset + s.rows[s.rank]]
        reads.append(read.reshape(g.shape))
    return reads


def deep_momentum(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Optional[Tensor]],
    memory_A: list[Optional[Tensor]],
    memory_B: list[Optional[Tensor]],
    exp_avg_sqs: list[Optional[Tensor]],
    state_steps: list[Tensor],
    *,
    lr: float,
    momentum: float,
    memory_lr: float,
    key_decay: Optional[float] = None,
    objective: str = "dot",
    values: str = "gradient",
    output: str = "identity",
    activation: str = "tanh",
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    beta2: float = 0.999,
    eps: float = 1e-8,
    adjust_lr_fn: Optional[str] = None,
    ns_coefficients="keller",
    ns_steps: int = 5,
    ns_dtype: torch.dtype = torch.bfloat16,
    maximize: bool = False,
    shards: Optional[Sequence] = None,
    foreach: Optional[bool] = None,
    fused: Optional[bool] = None,
) -> None:
    r"""DMGD (NL Eq 23–24, 50–52; SPEC §4): momentum whose memory is ``b + f_θ``, in place.

    Per tensor, on its matrix view (r × c) with keys ``X = Ĝ`` (unit rows of ``g``) and values
    ``V = g`` (or ``P_t(g)`` with ``values="preconditioned"``):

    .. math::
        b_t &= \mu b_{t-1} + (1-\tau) g_t \quad (b_1 = g_1)\\
        (A, B)_t &= (\mu_A A, \mu B)_{t-1} - \eta_m \nabla_{A,B} L^{(2)}(A_{t-1}, B_{t-1};
        X_t, V_t)\\
        M_t &= b_t + \varphi(X_t A_t) B_t, \qquad U_t = \sigma(g_t + \mu M_t)\ \text{(nesterov)}
        \text{ else } \sigma(M_t)\\
        W_t &= W_{t-1}(1-\gamma\lambda_{\text{dec}}) - \gamma\, s\, U_t

    ``μ_A`` is ``key_decay`` (None: μ, SPEC §4 to the letter). ``s`` is Muon's lr adjustment
    when σ is Newton–Schulz, else 1. Tensors whose ``memory_A`` entry is None have no keyed
    part (``hidden=0``): the rule is then §1's. ``shards``: FSDP2 shards
    (:func:`deep_memory_reads`, :func:`orthogonalize`). ``fused``: the inner step by batched matmul,
    the rest in one Triton kernel (CUDA; not with the Newton–Schulz read-out).
    """
    impl = _implementation(params, foreach, fused, rule="deep_momentum",
                           triton=output != "newton_schulz")
    options = _options(deep_momentum, locals())
    if impl == "triton":
        return _triton_deep_momentum(params, grads, momentum_buffers, memory_A, memory_B,
                                     exp_avg_sqs, state_steps, **options)
    _deep_momentum(params, grads, momentum_buffers, memory_A, memory_B, exp_avg_sqs,
                   state_steps, foreach=impl == "foreach", **options)


def _dmgd_reads(gs, memory_A, memory_B, exp_avg_sqs, state_steps, *, values, beta2, eps,
                foreach, **inner):
    """The values DMGD's memory stores (the gradient, or Adam-preconditioned: the stages of
    §3), then its write and read (:func:`deep_memory_reads`)."""
    vs = gs
    if values == "preconditioned":
        second_moment_write(exp_avg_sqs, gs, decay=beta2, write=1 - beta2, foreach=foreach)
        vs = preconditioned_values(gs, preconditioner_denominators(
            exp_avg_sqs, eps=eps, foreach=foreach,
            bias_corrections=[1 - beta2 ** _step_count(t) for t in state_steps]), foreach=foreach)
    return deep_memory_reads(gs, vs, memory_A, memory_B, **inner)


@_by_kind
def _deep_momentum(params, grads, momentum_buffers, memory_A, memory_B, exp_avg_sqs,
                   state_steps, *, lr, momentum, memory_lr, key_decay, objective, values, output,
                   activation, dampening, nesterov, weight_decay, decoupled_weight_decay, beta2,
                   eps, adjust_lr_fn, ns_coefficients, ns_steps, ns_dtype, maximize, shards,
                   foreach):
    works, gs = _weights_and_gradients(params, grads, lr=lr, weight_decay=weight_decay,
                                       decoupled_weight_decay=decoupled_weight_decay,
                                       maximize=maximize, foreach=foreach)
    reads = _dmgd_reads(gs, memory_A, memory_B, exp_avg_sqs, state_steps, values=values,
                        beta2=beta2, eps=eps, foreach=foreach, momentum=momentum,
                        memory_lr=memory_lr, key_decay=key_decay, objective=objective,
                        activation=activation, shards=shards)
    memories = gs if momentum == 0 else momentum_write(
        momentum_buffers, gs, momentum=momentum, write=1 - dampening, foreach=foreach)
    memories = [m if r is None else m + r for m, r in zip(memories, reads)]
    if nesterov:
        memories = nesterov_readout(gs, memories, momentum=momentum, foreach=foreach)
    step_sizes: Steps = -lr
    if output == "sign":
        memories = sign_readout(memories, foreach=foreach)
    elif output == "newton_schulz":
        memories = orthogonalize(memories, steps=ns_steps, coefficients=ns_coefficients,
                                 dtype=ns_dtype, shards=shards)
        step_sizes = [-lr * s for s in _shape_scales(gs, adjust_lr_fn, 0, shards)]
    apply_updates(params, works, memories, step_sizes, foreach=foreach)


def _triton_deep_momentum(params, grads, momentum_buffers, memory_A, memory_B, exp_avg_sqs,
                          state_steps, *, memory_lr, key_decay, objective, values, output,
                          activation, beta2, eps, adjust_lr_fn, ns_coefficients, ns_steps,
                          ns_dtype, shards, **options):
    gs = effective_gradients(params, grads, maximize=options["maximize"],
                             weight_decay=0.0 if options["decoupled_weight_decay"]
                             else options["weight_decay"])
    reads = _dmgd_reads(gs, memory_A, memory_B, exp_avg_sqs, state_steps, values=values,
                        beta2=beta2, eps=eps, foreach=False, momentum=options["momentum"],
                        memory_lr=memory_lr, key_decay=key_decay, objective=objective,
                        activation=activation, shards=shards)
    _triton_memory_step(params, grads, momentum_buffers, reads=reads, sign=output == "sign",
                        erase=0.0, **options)


def _ns_options(batch_dims, steps, coefficients, eps, dtype) -> dict:
    """:func:`orthogonalize`'s arguments from a rule's ``ns_*`` options (Muon's NS guard is its
    ``eps``, M3's is ``ns_eps``)."""
    return dict(batch_dims=batch_dims, steps=steps, coefficients=coefficients, eps=eps,
                dtype=dtype)


def _shape_scales(tensors: Sequence[Tensor], adjust_lr_fn, batch_dims: int,
                  shards: Optional[Sequence] = None) -> list[float]:
    """Muon's lr factor s(r, c) of each tensor's matrix view (§5): of the whole tensor where
    ``tensors`` are FSDP2 shards."""
    shapes = [t.shape if shards is None or shards[i] is None else shards[i].shape
              for i, t in enumerate(tensors)]
    return [adjusted_lr_scale(adjust_lr_fn, *matrix_view_shape(shape, batch_dims)[1:])
            for shape in shapes]


# =============================================================================================
# §5 Muon and §6 M3: Newton–Schulz read-out of matrix memories
# =============================================================================================


def muon(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    lr: float,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    ns_coefficients="keller",
    ns_steps: int = 5,
    eps: float = 1e-7,
    ns_dtype: torch.dtype = torch.bfloat16,
    adjust_lr_fn: Optional[str] = None,
    batch_dims: int = 0,
    maximize: bool = False,
    shards: Optional[Sequence] = None,
    foreach: Optional[bool] = None,
    fused: Optional[bool] = None,
) -> None:
    r"""Muon (NL Eq 42, 52; SPEC §5): Newton–Schulz read-out of an EMA momentum, in place.

    .. math::
        b_t = \mu b_{t-1} + (1-\mu) G_t,\quad U = \mathrm{lerp}(G_t, b_t, \mu)\ \text{(nesterov)}
        \text{ else } b_t,\quad W \leftarrow W(1-\gamma\lambda) - \gamma\, s(r, c)\, \mathrm{NS}(U)

    ``momentum_buffers`` start at zero; same-shape matrices are orthogonalized in one batched
    call. ``shards``: the tensors are FSDP2 shards (:mod:`deepmomentum.distributed`); each
    matrix is orthogonalized on its owner rank. ``fused``: the momentum and the apply in Triton kernels around the batched NS (CUDA).
    """
    if not params:
        return
    impl = _implementation(params, foreach, fused, rule="muon")
    options = _options(muon, locals())
    if impl == "triton":
        return _triton_muon(params, grads, momentum_buffers, **options)
    _muon(params, grads, momentum_buffers, foreach=impl == "foreach", **options)


@_by_kind
def _muon(params, grads, momentum_buffers, *, lr, momentum, nesterov, weight_decay,
          ns_coefficients, ns_steps, eps, ns_dtype, adjust_lr_fn, batch_dims, maximize, shards,
          foreach):
    ns = _ns_options(batch_dims, ns_steps, ns_coefficients, eps, ns_dtype)
    works, gs = _weights_and_gradients(params, grads, lr=lr, weight_decay=weight_decay,
                                       decoupled_weight_decay=True, maximize=maximize,
                                       foreach=foreach)
    memories = ema_write(momentum_buffers, gs, beta=momentum, foreach=foreach)
    if nesterov:
        memories = nesterov_readout(gs, memories, momentum=momentum, ema=True, foreach=foreach)
    apply_updates(params, works, orthogonalize(memories, **ns, shards=shards),
                  [-lr * s for s in _shape_scales(params, adjust_lr_fn, batch_dims, shards)],
                  foreach=foreach)


def _triton_muon(params, grads, momentum_buffers, *, lr, momentum, nesterov, weight_decay,
                 ns_coefficients, ns_steps, eps, ns_dtype, adjust_lr_fn, batch_dims, maximize,
                 shards):
    from .kernels import elementwise

    ns = _ns_options(batch_dims, ns_steps, ns_coefficients, eps, ns_dtype)
    updates = elementwise.ema_momentum(momentum_buffers, grads, momentum=momentum,
                                       nesterov=nesterov, maximize=maximize)
    elementwise.apply_update(params, orthogonalize(updates, **ns, shards=shards),
                             _shape_scales(params, adjust_lr_fn, batch_dims, shards), lr=lr,
                             weight_decay=weight_decay)


def m3(
    params: list[Tensor],
    grads: list[Tensor],
    fast_buffers: list[Tensor],
    second_moments: list[Tensor],
    slow_buffers: list[Tensor],
    slow_updates: list[Tensor],
    chunk_sums: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float,
    betas: tuple[float, float, float],
    decays: tuple[float, float, float],
    alpha: float,
    chunk: int,
    eps: float,
    weight_decay: float,
    form: str = "normalized",
    nesterov: Optional[bool] = None,
    adjust_lr_fn: Optional[str] = None,
    ns_coefficients="keller",
    ns_steps: int = 5,
    ns_eps: float = 1e-7,
    ns_dtype: torch.dtype = torch.bfloat16,
    batch_dims: int = 0,
    maximize: bool = False,
    shards: Optional[Sequence] = None,
    foreach: Optional[bool] = None,
    fused: Optional[bool] = None,
) -> None:
    r"""M3, multi-scale momentum Muon (NL §7.2, Algorithm 1; SPEC §6), in place.

    Both forms keep a fast memory written every step and a slow memory written once per chunk
    of Ĉ steps (``t`` = ``state_steps``, already advanced; at ``t % chunk == 0`` the slow memory
    takes the chunk's summed gradients, :math:`M^2 \leftarrow \mu_3 M^2 + \omega_3 \sum_{chunk}
    G`, and :math:`O^2 = \mathrm{NS}(M^2)` is kept for the next chunk; the first reads
    :math:`O^2 = 0`), both read out by Newton–Schulz, and a second-moment memory:

    .. math::
        M^1_t = \mu_1 M^1_{t-1} + \omega_1 G_t,\qquad
        U_t = \omega_1 G_t + \mu_1 M^1_t\ \text{(nesterov) else}\ M^1_t,\qquad
        O_t = \mathrm{NS}(U_t) + \alpha O^2

    ``form="normalized"`` (the default; nesterov unless told otherwise): the second moment is
    kept per row of the read-out, :math:`v_t = \mu_2 v_{t-1} + \omega_2\,
    \mathrm{mean}_{cols}(O_t^2)` (one entry per row of each matrix: shape
    ``param.shape[:batch_dims + 1]``), and the row-normalized read-out is scaled back to the
    fast read-out's norm and Muon's shape factor :math:`s(r, c)` (``adjust_lr_fn``), so γ is
    on Muon's scale:

    .. math::
        \hat O_t = O_t / (\sqrt{v_t} + \epsilon),\qquad
        W_t = W_{t-1}(1-\gamma\lambda) - \gamma\, s(r, c)\,
        \frac{\lVert \mathrm{NS}(U_t) \rVert_F}{\lVert \hat O_t \rVert_F}\, \hat O_t

    (norms per matrix of the matrix view; a zero :math:`\hat O` steps by zero). A row whose
    gradients vanish has a vanishing numerator too, so no entry's step exceeds the matrix's.

    ``form="literal"`` (Algorithm 1; no nesterov unless told, no shape factor): the second
    moment is of the raw gradients, elementwise,

    .. math::
        V_t = \mu_2 V_{t-1} + \omega_2 G_t^2,\qquad
        W_t = W_{t-1}(1-\gamma\lambda) - \gamma\, O_t / (\sqrt{V_t} + \epsilon)

    With decays (1, 1, 1) this is SPEC §6 to the letter. ``betas`` are the write strengths
    (ω₁, ω₂, ω₃). ``shards``: FSDP2 shards, as :func:`muon`. ``fused``: the literal form's
    memory writes and apply in Triton kernels around the batched NS (CUDA); the normalized
    form has no kernel yet (``fused=True`` raises ``ValueError``).
    """
    if not params:
        return
    if form not in M3_FORMS:
        raise ValueError(f"Invalid form: {form!r}; form must be one of {M3_FORMS}")
    if nesterov is None:
        nesterov = form == "normalized"
    if form == "literal" and adjust_lr_fn is not None:
        raise ValueError("adjust_lr_fn applies to form='normalized' only (the literal rule "
                         "has no shape factor); leave it None")
    impl = _implementation(params, foreach, fused, rule="m3",
                           triton=form == "literal" and not nesterov,
                           note="" if form == "literal" and not nesterov else
                           "; only the literal form without nesterov has them (use fused=None)")
    options = _options(m3, locals())
    memories = (fast_buffers, second_moments, slow_buffers, slow_updates, chunk_sums)
    if impl == "triton":
        return _triton_m3(params, grads, *memories, state_steps, **options)
    _m3(params, grads, *memories, state_steps, foreach=impl == "foreach", **options)


#: M3's forms: the stable default and Algorithm 1 to the letter (SPEC §6).
M3_FORMS = ("normalized", "literal")


@_by_kind
def _m3(params, grads, fast_buffers, second_moments, slow_buffers, slow_updates, chunk_sums,
        state_steps, *, lr, betas, decays, alpha, chunk, eps, weight_decay, form, nesterov,
        adjust_lr_fn, ns_coefficients, ns_steps, ns_eps, ns_dtype, batch_dims, maximize, shards,
        foreach):
    ns = dict(_ns_options(batch_dims, ns_steps, ns_coefficients, ns_eps, ns_dtype),
              shards=shards)
    works, gs = _weights_and_gradients(params, grads, lr=lr, weight_decay=weight_decay,
                                       decoupled_weight_decay=True, maximize=maximize,
                                       foreach=foreach)
    momentum_write(fast_buffers, gs, momentum=decays[0], write=betas[0], foreach=foreach)
    if form == "literal":
        second_moment_write(second_moments, gs, decay=decays[1], write=betas[1],
                            foreach=foreach)
    accumulate(chunk_sums, gs, foreach=foreach)
    memories = nesterov_readout(gs, fast_buffers, momentum=decays[0], write=betas[0],
                                foreach=foreach) if nesterov else fast_buffers
    fast = orthogonalize(memories, **ns)
    if form == "literal":
        readout = [o1.add_(o2, alpha=alpha)  # O¹ + α O²
                   for o1, o2 in zip(fast, slow_updates)]
        apply_updates(params, works, readout, -lr, foreach=foreach,
                      denominators=preconditioner_denominators(second_moments, eps=eps,
                                                               foreach=foreach))
    else:
        readout = [o1.add(o2, alpha=alpha) if alpha else o1  # O¹ + α O² (O¹ kept: its norm)
                   for o1, o2 in zip(fast, slow_updates)]
        row_moment_write(second_moments, readout, decay=decays[1], write=betas[1],
                         batch_dims=batch_dims)
        normalized = row_normalized(readout, second_moments, fast, eps=eps,
                                    batch_dims=batch_dims, shards=shards)
        apply_updates(params, works, normalized,
                      [-lr * s for s in _shape_scales(params, adjust_lr_fn, batch_dims, shards)],
                      foreach=foreach)
    _m3_slow_memory(slow_buffers, slow_updates, chunk_sums, state_steps, chunk=chunk,
                    decay=decays[2], write=betas[2], ns=ns)


def row_shape(shape, batch_dims: int = 0) -> tuple[int, ...]:
    """The shape of a per-row statistic of a tensor of ``shape``: one entry per row of each
    matrix of its matrix view (:func:`matrix_view`), ``shape[:batch_dims + 1]`` — a prefix of
    the tensor's shape, so an FSDP2 ``Shard(0)`` splits it as it splits the tensor."""
    return tuple(shape)[:batch_dims + 1]


def _rows(x: Tensor, batch_dims: int) -> Tensor:
    """``x`` as ``(*row_shape, row length)``; explicit sizes, so an empty shard reshapes too."""
    return x.reshape(*row_shape(x.shape, batch_dims), math.prod(x.shape[batch_dims + 1:]))


def row_moment_write(buffers: Sequence[Tensor], values: Sequence[Tensor], *, decay: float,
                     write: float, batch_dims: int = 0) -> list[Tensor]:
    r"""Stage (§6, M3's normalized form): a per-row second moment,
    :math:`v \leftarrow \delta v + \omega\, \mathrm{mean}_{cols}(x^2)`, in place; each buffer
    has :func:`row_shape` of its value."""
    for v, x in zip(buffers, values):
        v.mul_(decay).add_(_rows(x, batch_dims).square().mean(-1), alpha=write)
    return list(buffers)


def row_normalized(values: Sequence[Tensor], row_moments: Sequence[Tensor],
                   references: Sequence[Tensor], *, eps: float, batch_dims: int = 0,
                   shards: Optional[Sequence] = None) -> list[Tensor]:
    r"""Stage (§6, M3's normalized form): :math:`\hat X = X / (\sqrt{v} + \epsilon)` row by row,
    then scaled matrix by matrix of the matrix view to the Frobenius norm of ``references``,
    :math:`\hat X \lVert R \rVert_F / \lVert \hat X \rVert_F` (0 where :math:`\hat X = 0`).
    Out of place.

    ``shards`` (FSDP2): with ``batch_dims = 0`` a matrix's rows lie on several ranks, so its
    two squared norms are summed over its process group (one ``all_reduce`` per group); with
    batch dims a ``Shard(0)`` splits whole matrices and the norms are local."""
    def per_matrix(t):  # t as (matrices, entries); explicit sizes: an empty shard too
        n = math.prod(t.shape[:batch_dims])
        return t.reshape(n, math.prod(t.shape[batch_dims:]))

    hats, squares = [], []  # squares per tensor (2, matrices): ‖R‖², ‖X̂‖² of each matrix
    for x, v, ref in zip(values, row_moments, references):
        hat = (_rows(x, batch_dims) / (v.sqrt() + eps).unsqueeze(-1)).reshape(x.shape)
        hats.append(hat)
        squares.append(torch.stack([per_matrix(ref).square().sum(-1),
                                    per_matrix(hat).square().sum(-1)]))
    if shards is not None and batch_dims == 0 and any(s is not None for s in shards):
        from . import distributed

        for group, idx in distributed._by_group(shards).items():
            for i, total in zip(idx, distributed.all_reduce_sum([squares[i] for i in idx],
                                                                group)):
                squares[i] = total
    out = []
    for hat, (ref, sq) in zip(hats, squares):
        scale = torch.where(sq > 0, ref.div(sq.clamp_min(torch.finfo(sq.dtype).tiny)).sqrt(),
                            torch.zeros_like(sq))
        out.append(per_matrix(hat).mul_(scale.unsqueeze(-1)).reshape(hat.shape))
    return out


def _m3_slow_memory(slow_buffers, slow_updates, chunk_sums, state_steps, *, chunk, decay, write,
                    ns):
    """M3's slow memory at a chunk boundary: ``M² ← μ₃M² + ω₃ΣG``, the sum cleared, ``O² =
    NS(M²)`` kept for the next chunk; untouched on every other step."""
    if _compiling():
        return _m3_slow_memory_traced(slow_buffers, slow_updates, chunk_sums, state_steps,
                                      chunk=chunk, decay=decay, write=write, ns=ns)
    boundary = [i for i, t in enumerate(state_steps) if int(_scalar(t)) % chunk == 0]
    if not boundary:
        return
    if ns.get("shards") is not None:
        ns = dict(ns, shards=[ns["shards"][i] for i in boundary])
    slow = [slow_buffers[i] for i in boundary]
    momentum_write(slow, [chunk_sums[i] for i in boundary], momentum=decay, write=write)
    for i in boundary:
        chunk_sums[i].zero_()
    for i, o2 in zip(boundary, orthogonalize(slow, **ns)):
        slow_updates[i].copy_(o2)


def _m3_slow_memory_traced(slow_buffers, slow_updates, chunk_sums, state_steps, *, chunk,
                           decay, write, ns):
    """:func:`_m3_slow_memory` while torch.compile traces, without a graph break.

    Eager reads each step counter on the host to choose the boundary tensors; traced, that read
    (``.item()``) is a graph break, and a Python-int counter would be a guard that recompiles
    every step. So the boundary test stays a tensor, ``t % chunk == 0`` in int64 (exact, as
    eager's ``int(t) % chunk``), and a ``torch.cond`` on "some tensor is at a boundary" runs the
    slow write and its Newton–Schulz only then: computing both sides and selecting with
    ``torch.where`` would run a second Newton–Schulz (the step's costliest stage) on every
    step, not once per chunk. The predicate is a CPU tensor (the counters are), so the branch
    choice costs no device sync. Branches may not mutate their inputs, so they return new
    memories, copied back in place after; within the boundary branch ``torch.where`` per
    tensor leaves a tensor whose own counter is not at a boundary (counters can differ: a
    parameter without a gradient on some step) as it was, so the result is eager's, tensor by
    tensor (bit for bit when run eagerly: tests/test_compile.py); such a step orthogonalizes
    every slow memory, the unchanged ones too. Untested with FSDP2 shards: a sharded
    Newton–Schulz's collectives would run inside the branch (every rank takes the same one,
    the counters being equal across ranks)."""
    slow_buffers, slow_updates = list(slow_buffers), list(slow_updates)
    chunk_sums = list(chunk_sums)
    at = [t.to(torch.int64).remainder(chunk).eq(0) for t in state_steps]

    def boundary(slow, updates, sums, at):
        written = [torch.where(b, m.mul(decay).add(c, alpha=write), m)  # μ₃M² + ω₃ΣG
                   for m, c, b in zip(slow, sums, at)]
        return ([m.contiguous() for m in written],  # both branches' outputs contiguous
                [torch.where(b, o2, u).contiguous()  # (NS transposes wide matrices)
                 for o2, u, b in zip(orthogonalize(written, **ns), updates, at)],
                [torch.where(b, torch.zeros_like(c), c).contiguous() for c, b in zip(sums, at)])

    def between(slow, updates, sums, at):
        return tuple([x.clone(memory_format=torch.contiguous_format) for x in xs]
                     for xs in (slow, updates, sums))

    new = torch.cond(torch.stack(at).any(), boundary, between,
                     (slow_buffers, slow_updates, chunk_sums, at))
    for olds, news in zip((slow_buffers, slow_updates, chunk_sums), new):
        torch._foreach_copy_(olds, list(news))


def _triton_m3(params, grads, fast_buffers, second_moments, slow_buffers, slow_updates,
               chunk_sums, state_steps, *, lr, betas, decays, alpha, chunk, eps, weight_decay,
               form, nesterov, adjust_lr_fn, ns_coefficients, ns_steps, ns_eps, ns_dtype,
               batch_dims, maximize, shards):
    from .kernels import elementwise

    ns = dict(_ns_options(batch_dims, ns_steps, ns_coefficients, ns_eps, ns_dtype),
              shards=shards)
    elementwise.m3_write(grads, fast_buffers, second_moments, chunk_sums, betas=betas,
                         decays=decays, maximize=maximize)
    elementwise.m3_apply(params, orthogonalize(fast_buffers, **ns), slow_updates, second_moments,
                         lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay)
    _m3_slow_memory(slow_buffers, slow_updates, chunk_sums, state_steps, chunk=chunk,
                    decay=decays[2], write=betas[2], ns=ns)


#: The rules an optimizer class calls. Each carries what the class layer reads from its
#: signature once, here, rather than on every step: ``options``, its keyword arguments (a
#: group's options of these names reach it as they are), and ``takes_steps``, whether it takes
#: the ``state_steps`` counters.
RULES = (associative_momentum, delta_momentum, preconditioned_momentum, deep_momentum, muon, m3)
for _rule in RULES:
    _parameters = inspect.signature(_rule).parameters
    _rule.options = tuple(name for name, p in _parameters.items()
                          if p.kind is p.KEYWORD_ONLY and name not in ("foreach", "fused"))
    _rule.takes_steps = "state_steps" in _parameters
del _rule, _parameters


# =============================================================================================
# The gated momentum scan of the HOPE example's in-context memories (Titans Eq 13–14)
# =============================================================================================


def _segment_log_products(log_x: Tensor) -> Tensor:
    r"""``out[..., t, j] = Σ_{j<s≤t} log x_s`` for ``j ≤ t`` and ``−∞`` above the diagonal, so
    that ``exp(out)`` is the lower-triangular matrix of products ``∏_{j<s≤t} x_s``. Sums are
    taken directly (never as differences of cumulative sums), so a zero gate gives exact zeros
    and no ``∞ − ∞``."""
    n = log_x.shape[-1]
    ones = torch.ones(n, n, dtype=torch.bool, device=log_x.device)
    repeated = log_x.unsqueeze(-1).expand(*log_x.shape, n)  # [..., s, j] = log x_s
    sums = repeated.masked_fill(~ones.tril(-1), 0).cumsum(dim=-2)  # [..., t, j] = Σ_{j<s≤t}
    return sums.masked_fill(~ones.tril(0), float("-inf"))


class ScanCoefficients(NamedTuple):
    r"""The linear maps of :func:`momentum_scan`, for a block of C steps (each (*batch, C[, C])):

    ``S_t = momentum_from_start[t]·S_0 − Σ_j momentum_from_grads[t, j]·g_j`` and
    ``W_t = param_from_start[t]·W_0 + param_from_momentum[t]·S_0 − Σ_j param_from_grads[t, j]·g_j``.
    """

    momentum_from_start: Tensor
    momentum_from_grads: Tensor
    param_from_start: Tensor
    param_from_momentum: Tensor
    param_from_grads: Tensor


def _log_gate(x: Tensor) -> Tensor:
    """``log x`` for a gate in [0, 1], with ``log 0 = −∞`` exactly and a zero (not NaN)
    gradient there: a gate that saturates to 0 (σ underflows in float32) must not poison the
    backward pass, where ``torch.log``'s gradient ``1/x`` times the zero that follows is NaN."""
    positive = x > 0
    return torch.where(positive, torch.log(torch.where(positive, x, torch.ones_like(x))),
                       torch.full_like(x, float("-inf")))


def scan_coefficients(momentum: Tensor, lr: Tensor, decay: Tensor) -> ScanCoefficients:
    r"""The coefficients that map ``(S_0, W_0, g_1..g_C)`` to every ``S_t`` and ``W_t`` of
    :func:`momentum_scan`. With ``P^x_{t,j} = ∏_{j<s≤t} x_s`` (lower-triangular):
    ``S_t = P^η_{t,0} S_0 − Σ_j P^η_{t,j} θ_j g_j`` and, since
    ``W_t = P^{1−α}_{t,0} W_0 + Σ_i P^{1−α}_{t,i} S_i``, the ``W`` maps are ``P^{1−α}``
    composed with the ``S`` maps. Gates: (*batch, C)."""
    log_keep = _log_gate(1 - decay)
    keep_within = torch.exp(_segment_log_products(log_keep))  # (*batch, C, C)
    log_eta = _log_gate(momentum)
    eta_within = torch.exp(_segment_log_products(log_eta))
    eta_from_start = torch.exp(torch.cumsum(log_eta, dim=-1))  # ∏_{s≤t} η_s
    momentum_from_grads = eta_within * lr.unsqueeze(-2)  # [t, j]: P^η_{t,j} θ_j
    return ScanCoefficients(
        momentum_from_start=eta_from_start,
        momentum_from_grads=momentum_from_grads,
        param_from_start=torch.exp(torch.cumsum(log_keep, dim=-1)),
        param_from_momentum=(keep_within @ eta_from_start.unsqueeze(-1)).squeeze(-1),
        param_from_grads=keep_within @ momentum_from_grads,
    )


def momentum_scan(grads: Tensor, momentum: Tensor, lr: Tensor, decay: Tensor,
                  momentum_buffer: Tensor, param: Tensor) -> tuple[Tensor, Tensor]:
    r"""A block of steps of momentum with data-dependent gates, all at once (Titans Eq 13–14).

    .. math::
        S_t = \eta_t S_{t-1} - \theta_t g_t,\qquad W_t = (1-\alpha_t) W_{t-1} + S_t

    for ``t = 1..C`` from ``S_0 = momentum_buffer`` and ``W_0 = param``: §1's associative
    momentum (``S = −θ b``) with a per-step momentum ``η_t``, learning rate ``θ_t`` and a
    forgetting gate ``α_t``. With constant η, θ and ``α = 0`` it is ``torch.optim.SGD`` with
    ``momentum=η, lr=θ`` (dampening 0) step for step. The whole block is computed in parallel
    from :func:`scan_coefficients`; the HOPE example's in-context memories use the same
    coefficients on factored gradients (:func:`deep_memory_gradient_factors`).

    Shapes: ``grads`` ``(*batch, C, *event)``; ``momentum``, ``lr``, ``decay`` ``(*batch, C)``;
    ``momentum_buffer`` and ``param`` ``(*batch, *event)``. Returns ``(S, W)``, each
    ``(*batch, C, *event)``: the state after every step of the block. Differentiable in every
    input. Gates must lie in [0, 1] (η, 1 − α; a gate of exactly 0 has a zero gradient); they
    are not checked, so that the function stays traceable.
    """
    batch, steps = momentum.shape[:-1], momentum.shape[-1]
    if grads.shape[:momentum.dim()] != momentum.shape:
        raise ValueError(f"grads {tuple(grads.shape)} must start with the gates' shape "
                         f"{tuple(momentum.shape)} (*batch, C)")
    event = grads.shape[momentum.dim():]
    g = grads.reshape(*batch, steps, -1)
    s0 = momentum_buffer.reshape(*batch, 1, -1)
    w0 = param.reshape(*batch, 1, -1)
    c = scan_coefficients(momentum, lr, decay)
    S = c.momentum_from_start.unsqueeze(-1) * s0 - c.momentum_from_grads @ g
    W = c.param_from_start.unsqueeze(-1) * w0 + c.param_from_momentum.unsqueeze(-1) * s0 \
        - c.param_from_grads @ g
    return S.reshape(*batch, steps, *event), W.reshape(*batch, steps, *event)


def memory_chunk_read(z: Tensor, W0: Tensor, S0: Optional[Tensor], x: Tensor, delta: Tensor,
                      from_start: Tensor, from_momentum: Tensor, from_grads: Tensor) -> Tensor:
    r"""Every token's read ``z_t W_t`` of a linear memory through its own state within a chunk
    of :func:`momentum_scan` whose gradients factor as ``g_j = x_jᵀ δ_j``:

    .. math::
        z_t W_t = a_t\, z_t W_0 + b_t\, z_t S_0 - \sum_j G_{tj} (z_t \cdot x_j)\, \delta_j

    with ``a = from_start`` (``param_from_start``), ``b = from_momentum`` and
    ``G = from_grads`` of :func:`scan_coefficients`: no per-token state is formed. z (…, C, i),
    W₀ and S₀ (…, i, o) broadcasting over z's batch dims (S₀ ``None``: zero momentum),
    x (…, C, i), δ (…, C, o), a and b (…, C), G (…, C, C). The plain-torch twin of
    :func:`deepmomentum.kernels.memory_scan.chunk_read`."""
    out = from_start[..., None] * batch_shared_matmul(z, W0) - (from_grads * (z @ x.mT)) @ delta
    if S0 is not None:
        out = out + from_momentum[..., None] * batch_shared_matmul(z, S0)
    return out


def batch_shared_matmul(z: Tensor, W: Tensor) -> Tensor:
    """``z @ W`` for z (…, batch, H, r, i) and W (…, batch or 1, H, i, o). A W shared by the
    batch (dim −4 of size 1: a memory's start state) takes the batch as rows of one product
    per head, instead of the copy of W per sequence that broadcasting in ``@`` makes."""
    if W.dim() < 4 or z.dim() < 4 or W.shape[-4] != 1 or z.shape[-4] == 1:
        return z @ W
    batch, rows = z.shape[-4], z.shape[-2]
    flat = z.transpose(-4, -3).flatten(-3, -2)  # (…, H, batch·r, i)
    return (flat @ W.squeeze(-4)).unflatten(-2, (batch, rows)).transpose(-4, -3)


def memory_chunk_end(W0: Tensor, S0: Optional[Tensor], x: Tensor, uW: Tensor, uS: Tensor,
                     a: Tensor, b: Tensor, mu: Tensor) -> tuple[Tensor, Tensor]:
    r"""A linear memory's state at the end of a chunk of :func:`momentum_scan` with factored
    gradients ``g_j = x_jᵀ δ_j``:

    .. math::
        W = a\, W_0 + b\, S_0 - x^\top u_W,\qquad S = \mu\, S_0 - x^\top u_S

    where ``u_W,j = G_{Cj} δ_j`` and ``u_S,j = P^η_{Cj} θ_j δ_j`` fold the last row of
    :func:`scan_coefficients` into the factors, ``a``, ``b``, ``μ`` its last
    param_from_start, param_from_momentum and momentum_from_start. W₀, S₀ (…, i, o) (S₀
    ``None``: zero momentum), x (…, C, i), u (…, C, o), a, b, μ the batch dims (…). The
    plain-torch twin of :func:`deepmomentum.kernels.memory_scan.chunk_end`."""
    xt = x.mT
    W = (xt @ -uW).addcmul_(a[..., None, None], W0)
    S = xt @ -uS
    if S0 is not None:
        W.addcmul_(b[..., None, None], S0)
        S.addcmul_(mu[..., None, None], S0)
    return W, S
