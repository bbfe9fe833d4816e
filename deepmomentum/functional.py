"""The update rules of deepmomentum as pure functions over lists of tensors.

Every optimizer class in the package collects its parameters, gradients and state and calls
one of these functions; the same functions serve the HOPE example's in-context memories and
the tests. Each rule has three implementations behind one switch, as ``torch.optim`` does:

* ``_single_tensor_*`` — the readable reference, one tensor at a time. It is the ground truth.
* ``_multi_tensor_*`` — the same arithmetic with ``torch._foreach_*`` ops over lists.
* ``_fused_*`` — torch's own fused kernels, used only where a rule *is* torch's rule.

Conventions shared by all rules (see docs/spec.md, cited as "SPEC §n" below):

* Tensors arrive as real tensors: complex parameters are passed through
  ``torch.view_as_real`` by the caller, so every rule here is elementwise over reals.
* ``state_steps`` already count the update being applied (``t`` starts at 1); the caller
  advances them, so an update schedule (``update_period``) can decide what counts.
* Buffers are stored lr-free, so LR schedulers act at read-out.
* Low-precision parameters (fp16/bf16) keep fp32 state: the step runs in fp32 on an fp32 copy
  of the parameter and is rounded into the parameter once at the end.
* ``maximize`` negates the gradient out of place; ``.grad`` is never written.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .newton_schulz import adjusted_lr_scale, matrix_view, newton_schulz, stable_norm

__all__ = [
    "associative_momentum",
    "preconditioned_momentum",
    "delta_momentum",
    "deep_momentum",
    "deep_memory_gradients",
    "deep_memory_gradient_factors",
    "deep_memory_reads",
    "muon",
    "m3",
    "momentum_scan",
    "scan_coefficients",
    "orthogonalize",
    "state_dtype",
    "LOW_PRECISION_DTYPES",
]

#: Parameter dtypes whose optimizer state is kept in float32.
LOW_PRECISION_DTYPES = (torch.float16, torch.bfloat16)


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the optimizer state kept for a (real) parameter of ``dtype``."""
    return torch.float32 if dtype in LOW_PRECISION_DTYPES else dtype


def _scalar(x) -> float:
    """A Python float from a number or a one-element tensor (a CPU read: no device sync for
    CPU tensors such as ``state['step']``)."""
    return x.item() if isinstance(x, Tensor) else float(x)


def _working_copy(p: Tensor) -> Tensor:
    """The tensor the step is computed on: the parameter itself, or an fp32 copy of it."""
    return p.float() if p.dtype in LOW_PRECISION_DTYPES else p


def _signed_grad(g: Tensor, maximize: bool) -> Tensor:
    """The gradient in the state dtype, negated out of place when maximizing."""
    g = g.float() if g.dtype in LOW_PRECISION_DTYPES else g
    return torch.neg(g) if maximize else g


def _decayed(param: Tensor, grad: Tensor, lr: float, weight_decay: float, decoupled: bool,
             maximize: bool) -> tuple[Tensor, Tensor]:
    """(working copy of W, gradient) after weight decay: decoupled decay scales W in place by
    (1 − γλ); coupled decay adds λW to the gradient out of place."""
    w = _working_copy(param)
    g = _signed_grad(grad, maximize)
    if weight_decay != 0:
        if decoupled:
            w.mul_(1 - lr * weight_decay)
        else:
            g = g.add(w, alpha=weight_decay)
    return w, g


def _group_indices(params: list[Tensor]) -> dict[tuple, list[int]]:
    """Indices of ``params`` grouped by (device, dtype): one foreach call per group."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        groups[(p.device, p.dtype)].append(i)
    return groups


def _check_implementation(foreach: Optional[bool], fused: Optional[bool]) -> str:
    if foreach and fused:
        raise ValueError("foreach and fused cannot both be True")
    if fused:
        return "fused"
    return "foreach" if foreach else "single"


# ---------------------------------------------------------------------------------------------
# §1 AssociativeMomentum
# ---------------------------------------------------------------------------------------------


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
    """
    impl = _check_implementation(foreach, fused)
    fn = {
        "single": _single_tensor_associative_momentum,
        "foreach": _multi_tensor_associative_momentum,
        "fused": _fused_associative_momentum,
    }[impl]
    fn(
        params,
        grads,
        momentum_buffers,
        lr=_scalar(lr),
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
        weight_decay=weight_decay,
        decoupled_weight_decay=decoupled_weight_decay,
        maximize=maximize,
    )


def _single_tensor_associative_momentum(
    params, grads, momentum_buffers, *, lr, momentum, dampening, nesterov, weight_decay,
    decoupled_weight_decay, maximize,
):
    for i, (param, grad) in enumerate(zip(params, grads)):
        w, g = _decayed(param, grad, lr, weight_decay, decoupled_weight_decay, maximize)
        if momentum != 0:
            buf = momentum_buffers[i]
            if buf is None:
                buf = momentum_buffers[i] = torch.clone(g).detach()
            else:
                buf.mul_(momentum).add_(g, alpha=1 - dampening)
            g = g.add(buf, alpha=momentum) if nesterov else buf
        w.add_(g, alpha=-lr)
        if w is not param:
            param.copy_(w)


def _multi_tensor_associative_momentum(
    params, grads, momentum_buffers, *, lr, momentum, dampening, nesterov, weight_decay,
    decoupled_weight_decay, maximize,
):
    for indices in _group_indices(params).values():
        ps = [params[i] for i in indices]
        low = ps[0].dtype in LOW_PRECISION_DTYPES
        ws = [p.float() for p in ps] if low else ps
        gs = [grads[i] for i in indices]
        fresh = low or maximize  # gs is our own copy and may be written in place
        if low:
            gs = [g.float() for g in gs]
        if maximize:
            gs = torch._foreach_neg(gs)
        if weight_decay != 0:
            if decoupled_weight_decay:
                torch._foreach_mul_(ws, 1 - lr * weight_decay)
            elif fresh:
                torch._foreach_add_(gs, ws, alpha=weight_decay)
            else:
                gs = torch._foreach_add(gs, ws, alpha=weight_decay)
        if momentum != 0:
            bufs = [momentum_buffers[i] for i in indices]
            if all(b is not None for b in bufs):
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, gs, alpha=1 - dampening)
            else:  # some tensors take their first step: b_1 = g_1
                for j, (b, g) in enumerate(zip(bufs, gs)):
                    if b is None:
                        bufs[j] = momentum_buffers[indices[j]] = torch.clone(g).detach()
                    else:
                        b.mul_(momentum).add_(g, alpha=1 - dampening)
            if nesterov:
                gs = torch._foreach_add(gs, bufs, alpha=momentum)
            else:
                gs = bufs
        torch._foreach_add_(ws, gs, alpha=-lr)
        if low:
            torch._foreach_copy_(ps, ws)


def _fused_associative_momentum(
    params, grads, momentum_buffers, *, lr, momentum, dampening, nesterov, weight_decay,
    decoupled_weight_decay, maximize,
):
    # torch's fused SGD is exactly §1 with coupled decay. Decoupled decay does not depend on
    # the update, so it is applied first and the kernel runs without decay.
    if weight_decay != 0 and decoupled_weight_decay:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
        weight_decay = 0.0
    # The kernel's is_first_step flag covers a whole call: split first and later steps.
    first = [i for i, b in enumerate(momentum_buffers) if b is None] if momentum != 0 else []
    first_set = set(first)
    later = [i for i in range(len(params)) if i not in first_set]
    for indices, is_first in ((first, True), (later, False)):
        if not indices:
            continue
        if is_first:
            for i in indices:
                momentum_buffers[i] = torch.empty_like(grads[i])
        for group in _group_indices([params[i] for i in indices]).values():
            sel = [indices[j] for j in group]
            torch._fused_sgd_(
                [params[i] for i in sel],
                [grads[i] for i in sel],
                [momentum_buffers[i] for i in sel] if momentum != 0 else [],
                weight_decay=weight_decay,
                momentum=momentum,
                lr=lr,
                dampening=dampening,
                nesterov=nesterov,
                maximize=maximize,
                is_first_step=is_first,
            )


# ---------------------------------------------------------------------------------------------
# §3 PreconditionedMomentum
# ---------------------------------------------------------------------------------------------

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
    """
    if precondition not in PRECONDITION_MODES:
        raise ValueError(f"precondition must be one of {PRECONDITION_MODES}, got {precondition!r}")
    if preconditioner not in PRECONDITIONERS:
        raise ValueError(f"preconditioner must be one of {PRECONDITIONERS}, got {preconditioner!r}")
    impl = _check_implementation(foreach, fused)
    if impl == "fused" and not (precondition == "readout" and preconditioner == "adam"):
        raise ValueError(
            "fused=True is only available for precondition='readout', preconditioner='adam'"
        )
    fn = {
        "single": _single_tensor_preconditioned_momentum,
        "foreach": _multi_tensor_preconditioned_momentum,
        "fused": _fused_preconditioned_momentum,
    }[impl]
    fn(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        state_steps,
        lr=_scalar(lr),
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        decoupled_weight_decay=decoupled_weight_decay,
        precondition=precondition,
        preconditioner=preconditioner,
        maximize=maximize,
    )


def _single_tensor_preconditioned_momentum(
    params, grads, exp_avgs, exp_avg_sqs, state_steps, *, lr, beta1, beta2, eps, weight_decay,
    decoupled_weight_decay, precondition, preconditioner, maximize,
):
    adam = preconditioner == "adam"
    for i, (param, grad) in enumerate(zip(params, grads)):
        w = _working_copy(param)
        g = _signed_grad(grad, maximize)
        b, v = exp_avgs[i], exp_avg_sqs[i]
        t = _scalar(state_steps[i])
        if weight_decay != 0:
            if decoupled_weight_decay:
                w.mul_(1 - lr * weight_decay)
            else:
                g = g.add(w, alpha=weight_decay)
        bias_correction1 = 1 - beta1**t
        if adam:
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            # P_t's denominator, in torch Adam's order of operations.
            denom = (v.sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
        if adam and precondition == "readout":
            b.lerp_(g, 1 - beta1)
            w.addcdiv_(b, denom, value=-lr / bias_correction1)
        else:
            b.lerp_(g / denom if adam else g, 1 - beta1)
            w.add_(b, alpha=-lr / bias_correction1)
        if w is not param:
            param.copy_(w)


def _multi_tensor_preconditioned_momentum(
    params, grads, exp_avgs, exp_avg_sqs, state_steps, *, lr, beta1, beta2, eps, weight_decay,
    decoupled_weight_decay, precondition, preconditioner, maximize,
):
    adam = preconditioner == "adam"
    for indices in _group_indices(params).values():
        ps = [params[i] for i in indices]
        low = ps[0].dtype in LOW_PRECISION_DTYPES
        ws = [p.float() for p in ps] if low else ps
        gs = [grads[i] for i in indices]
        if low:
            gs = [g.float() for g in gs]
        if maximize:
            gs = torch._foreach_neg(gs)
        bs = [exp_avgs[i] for i in indices]
        ts = [_scalar(state_steps[i]) for i in indices]
        if weight_decay != 0:
            if decoupled_weight_decay:
                torch._foreach_mul_(ws, 1 - lr * weight_decay)
            else:
                gs = torch._foreach_add(gs, ws, alpha=weight_decay)
        step_sizes = [-lr / (1 - beta1**t) for t in ts]
        if adam:
            vs = [exp_avg_sqs[i] for i in indices]
            torch._foreach_mul_(vs, beta2)
            torch._foreach_addcmul_(vs, gs, gs, 1 - beta2)
            denom = torch._foreach_sqrt(vs)
            torch._foreach_div_(denom, [math.sqrt(1 - beta2**t) for t in ts])
            torch._foreach_add_(denom, eps)
        if adam and precondition == "readout":
            torch._foreach_lerp_(bs, gs, 1 - beta1)
            torch._foreach_addcdiv_(ws, bs, denom, step_sizes)
        else:
            torch._foreach_lerp_(bs, torch._foreach_div(gs, denom) if adam else gs, 1 - beta1)
            torch._foreach_add_(ws, torch._foreach_mul(bs, step_sizes))
        if low:
            torch._foreach_copy_(ps, ws)


def _fused_preconditioned_momentum(
    params, grads, exp_avgs, exp_avg_sqs, state_steps, *, lr, beta1, beta2, eps, weight_decay,
    decoupled_weight_decay, precondition, preconditioner, maximize,
):
    # Readout preconditioning with Adam's second moment *is* Adam(W): use torch's kernel.
    kernel = torch._fused_adamw_ if decoupled_weight_decay else torch._fused_adam_
    for indices in _group_indices(params).values():
        kernel(
            [params[i] for i in indices],
            [grads[i] for i in indices],
            [exp_avgs[i] for i in indices],
            [exp_avg_sqs[i] for i in indices],
            [],
            [state_steps[i] for i in indices],
            amsgrad=False,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            weight_decay=weight_decay,
            eps=eps,
            maximize=maximize,
        )


# ---------------------------------------------------------------------------------------------
# §5 Muon and §6 M3: Newton–Schulz read-out of matrix memories
# ---------------------------------------------------------------------------------------------


def orthogonalize(
    tensors: list[Tensor],
    *,
    batch_dims: int = 0,
    steps: int = 5,
    coefficients="keller",
    eps: float = 1e-7,
    dtype: torch.dtype = torch.bfloat16,
    batched: bool = True,
) -> list[Tensor]:
    """Newton–Schulz of each tensor's matrix view, returned in each tensor's shape and dtype.

    ``batched=True`` stacks all matrices of the same (rows, cols, dtype, device) and
    orthogonalizes them in one batched call; ``batched=False`` is the reference loop, one
    matrix at a time.
    """
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
    foreach: Optional[bool] = None,
) -> None:
    r"""Muon (NL Eq 42, 52; SPEC §5): Newton–Schulz read-out of an EMA momentum, in place.

    .. math::
        b_t = \mu b_{t-1} + (1-\mu) G_t,\quad U = \mathrm{lerp}(G_t, b_t, \mu)\ \text{(nesterov)}
        \text{ else } b_t,\quad W \leftarrow W(1-\gamma\lambda) - \gamma\, s(r, c)\, \mathrm{NS}(U)

    ``momentum_buffers`` start at zero. ``foreach`` (default on) orthogonalizes same-shape
    matrices in one batched call; ``foreach=False`` is the one-matrix-at-a-time reference.
    """
    if not params:
        return
    lr = _scalar(lr)
    updates = []
    for grad, buf in zip(grads, momentum_buffers):
        g = _signed_grad(grad, maximize)
        buf.lerp_(g, 1 - momentum)
        updates.append(g.lerp(buf, momentum) if nesterov else buf)
    orthogonal = orthogonalize(updates, batch_dims=batch_dims, steps=ns_steps,
                               coefficients=ns_coefficients, eps=eps, dtype=ns_dtype,
                               batched=foreach is not False)
    for param, o in zip(params, orthogonal):
        rows, cols = matrix_view(param, batch_dims).shape[-2:]
        w = _working_copy(param)
        w.mul_(1 - lr * weight_decay)  # decoupled decay with the unadjusted lr, as torch does
        w.add_(o, alpha=-lr * adjusted_lr_scale(adjust_lr_fn, rows, cols))
        if w is not param:
            param.copy_(w)


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
    ns_coefficients="keller",
    ns_steps: int = 5,
    ns_eps: float = 1e-7,
    ns_dtype: torch.dtype = torch.bfloat16,
    batch_dims: int = 0,
    maximize: bool = False,
    foreach: Optional[bool] = None,
) -> None:
    r"""M3, multi-scale momentum Muon (NL §7.2, Algorithm 1; SPEC §6), in place.

    Every step (``t`` = ``state_steps``, already advanced):

    .. math::
        M^1_t = \mu_1 M^1_{t-1} + \beta_1 G_t,\quad V_t = \mu_2 V_{t-1} + \beta_2 G_t^2,\quad
        O^1_t = \mathrm{NS}(M^1_t)\\
        W_t = W_{t-1}(1-\gamma\lambda) - \gamma\,(O^1_t + \alpha O^2) / (\sqrt{V_t} + \epsilon)

    and at the end of every chunk of Ĉ steps (``t % chunk == 0``) the slow memory takes the
    chunk's summed gradients, :math:`M^2 \leftarrow \mu_3 M^2 + \beta_3 \sum_{chunk} G`,
    :math:`O^2 = \mathrm{NS}(M^2)`, which the next chunk reads (the first chunk reads
    :math:`O^2 = 0`). With decays (1, 1, 1) this is SPEC §6 to the letter.
    """
    if not params:
        return
    lr = _scalar(lr)
    (beta1, beta2, beta3), (mu1, mu2, mu3) = betas, decays
    ns = dict(batch_dims=batch_dims, steps=ns_steps, coefficients=ns_coefficients, eps=ns_eps,
              dtype=ns_dtype, batched=foreach is not False)
    for grad, m1, v, s in zip(grads, fast_buffers, second_moments, chunk_sums):
        g = _signed_grad(grad, maximize)
        m1.mul_(mu1).add_(g, alpha=beta1)
        v.mul_(mu2).addcmul_(g, g, value=beta2)
        s.add_(g)
    fast = orthogonalize(fast_buffers, **ns)
    for param, o1, o2, v in zip(params, fast, slow_updates, second_moments):
        w = _working_copy(param)
        w.mul_(1 - lr * weight_decay)
        w.addcdiv_(o1.add_(o2, alpha=alpha), v.sqrt().add_(eps), value=-lr)
        if w is not param:
            param.copy_(w)
    boundary = [i for i, t in enumerate(state_steps) if int(_scalar(t)) % chunk == 0]
    for i in boundary:
        slow_buffers[i].mul_(mu3).add_(chunk_sums[i], alpha=beta3)
        chunk_sums[i].zero_()
    if boundary:
        for i, o2 in zip(boundary, orthogonalize([slow_buffers[i] for i in boundary], **ns)):
            slow_updates[i].copy_(o2)


# ---------------------------------------------------------------------------------------------
# §2 DeltaMomentum
# ---------------------------------------------------------------------------------------------


def effective_grads(params, grads, *, maximize, weight_decay, decoupled_weight_decay):
    """The gradients the memories see, in the state dtype: negated when maximizing, with
    coupled weight decay added (out of place). Used by the fused paths to form keys."""
    out = []
    for p, grad in zip(params, grads):
        g = _signed_grad(grad, maximize)
        if weight_decay != 0 and not decoupled_weight_decay:
            g = g.add(_working_copy(p), alpha=weight_decay)
        out.append(g)
    return out


def as_matrix(t: Tensor) -> Tensor:
    """The matrix view of §2: 2-D as is, ≥3-D as (shape[0], rest), 1-D and 0-D as one row."""
    return t.reshape(1, -1) if t.ndim < 2 else t.reshape(t.shape[0], -1)


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
    if keys.is_cuda and keys.dtype in (torch.float32, torch.bfloat16, torch.float16) and c >= 64:
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
    foreach: Optional[bool] = None,
) -> None:
    r"""Momentum with the delta-rule (L2) objective over keys (NL Eq 48–49, 35–37; SPEC §2).

    .. math::
        b_1 = g_1,\qquad b_t = b_{t-1}(\mu I - \beta K_t) + (1-\tau)\, g_t

    then read-out and update as :func:`associative_momentum` (with ``μ = 0`` there is no memory
    and ``U = g``, as torch's SGD). ``K_t`` is a normalized key Gram
    (c × c, PSD, trace ≤ 1) on each tensor's matrix view (:func:`as_matrix`): the gradient's
    ``GᵀG/‖G‖²`` by default, or ``X̂ᵀX̂/n`` from ``input_keys[i]`` (rows already unit-normalized)
    where given. Since its eigenvalues lie in [0, 1] and β ∈ [0, μ], the memory never grows
    faster than plain momentum: ‖b_t‖ ≤ μ‖b_{t−1}‖ + (1−τ)‖g_t‖.
    """
    lr = _scalar(lr)
    input_keys = input_keys if input_keys is not None else [None] * len(params)
    works, updates = [], []
    for i, (param, grad) in enumerate(zip(params, grads)):
        w, g = _decayed(param, grad, lr, weight_decay, decoupled_weight_decay, maximize)
        if momentum == 0:  # no memory (β ≤ μ = 0 erases nothing): U = g, as in §1
            works.append(w)
            updates.append(g)
            continue
        buf = momentum_buffers[i]
        if buf is None:
            buf = momentum_buffers[i] = torch.clone(g).detach()
        else:
            erased = None
            if erase != 0:
                keys = delta_keys(g, input_keys[i])
                erased = erase_along_keys(as_matrix(buf), keys).view_as(buf)
            buf.mul_(momentum)
            if erased is not None:
                buf.sub_(erased, alpha=erase)
            buf.add_(g, alpha=1 - dampening)
        works.append(w)
        updates.append(g.add(buf, alpha=momentum) if nesterov else buf)
    if foreach:
        torch._foreach_add_(works, updates, alpha=-lr)
    else:
        for w, u in zip(works, updates):
            w.add_(u, alpha=-lr)
    for param, w in zip(params, works):
        if w is not param:
            param.copy_(w)


# ---------------------------------------------------------------------------------------------
# §4 DeepMomentum (DMGD): a momentum whose keyed memory is an MLP
# ---------------------------------------------------------------------------------------------

DMGD_OBJECTIVES = ("dot", "l2")
DMGD_VALUES = ("gradient", "preconditioned")
DMGD_OUTPUTS = ("identity", "sign", "newton_schulz")
# Activations with φ(0) = 0, so a zero key reads zero (P4); each with its closed-form φ'.
DMGD_ACTIVATIONS = ("tanh", "relu", "silu", "gelu")


def _activation(name: str, z: Tensor) -> tuple[Tensor, Tensor]:
    """(φ(z), φ'(z)) in closed form."""
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
    H, dH = _activation(activation, Z)
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


def deep_memory_reads(gs, memory_A, memory_B, exp_avg_sqs, state_steps, *, momentum,
                      memory_lr, key_decay, objective, values, activation, beta2, eps,
                      batched=True) -> list[Optional[Tensor]]:
    """DMGD's keyed memory: one inner step on (A, B) at θ_{t−1} from the effective gradients
    ``gs``, then the read ``φ(X A_t) B_t`` in each gradient's shape (None where no memory).
    Same-shape tensors are stacked into one batched product when ``batched``."""
    n = len(gs)
    reads: list[Optional[Tensor]] = [None] * n
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i in range(n):
        if memory_A[i] is not None:
            key = (tuple(as_matrix(gs[i]).shape), memory_A[i].shape[-1], gs[i].dtype) \
                if batched else (i,)
            groups[key].append(i)
    for indices in groups.values():
        X = torch.stack([unit_rows(as_matrix(gs[i])) for i in indices])
        V = torch.stack([as_matrix(gs[i]) for i in indices])
        if values == "preconditioned":
            for j, i in enumerate(indices):
                v2 = exp_avg_sqs[i]
                v2.mul_(beta2).addcmul_(gs[i], gs[i], value=1 - beta2)
                bias = 1 - beta2 ** _scalar(state_steps[i])
                V[j] = as_matrix(gs[i] / ((v2 / bias).sqrt_() + eps))
        A = torch.stack([memory_A[i] for i in indices])
        B = torch.stack([memory_B[i] for i in indices])
        grad_A, grad_B = deep_memory_gradients(X, V, A, B, objective=objective,
                                               activation=activation)
        A.mul_(momentum if key_decay is None else key_decay).sub_(grad_A, alpha=memory_lr)
        B.mul_(momentum).sub_(grad_B, alpha=memory_lr)
        read = _activation(activation, X @ A)[0] @ B  # (k, r, c)
        for j, i in enumerate(indices):
            memory_A[i].copy_(A[j])
            memory_B[i].copy_(B[j])
            reads[i] = read[j].view_as(gs[i])
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
    foreach: Optional[bool] = None,
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
    when σ is Newton–Schulz, else 1. Tensors whose ``memory_A``
    entry is None have no keyed part (``hidden=0``): the rule is then §1's. ``foreach`` (the
    default) runs the inner step and the read-out for all same-shape tensors as one batched
    product; ``foreach=False`` is the one-tensor-at-a-time reference.
    """
    lr = _scalar(lr)
    n = len(params)
    works, gs = [], []
    for i, (param, grad) in enumerate(zip(params, grads)):
        w, g = _decayed(param, grad, lr, weight_decay, decoupled_weight_decay, maximize)
        works.append(w)
        gs.append(g)

    reads = deep_memory_reads(gs, memory_A, memory_B, exp_avg_sqs, state_steps,
                              momentum=momentum, memory_lr=memory_lr, key_decay=key_decay,
                              objective=objective, values=values, activation=activation,
                              beta2=beta2, eps=eps, batched=foreach is not False)

    # The keyless part (§1) and the read-out.
    outs = []
    for i in range(n):
        g, buf = gs[i], momentum_buffers[i]
        if momentum == 0:
            memory = g
        else:
            if buf is None:
                buf = momentum_buffers[i] = torch.clone(g).detach()
            else:
                buf.mul_(momentum).add_(g, alpha=1 - dampening)
            memory = buf
        if reads[i] is not None:
            memory = memory + reads[i]
        outs.append(g.add(memory, alpha=momentum) if nesterov else memory)
    if output == "sign":
        outs = [torch.sign(u) for u in outs]
    elif output == "newton_schulz":
        outs = orthogonalize([as_matrix(u) for u in outs], steps=ns_steps,
                             coefficients=ns_coefficients, dtype=ns_dtype,
                             batched=foreach is not False)
    for param, w, u, g in zip(params, works, outs, gs):
        scale = 1.0
        if output == "newton_schulz":
            rows, cols = as_matrix(g).shape
            scale = adjusted_lr_scale(adjust_lr_fn, rows, cols)
        w.add_(u.view_as(w), alpha=-lr * scale)
        if w is not param:
            param.copy_(w)


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
