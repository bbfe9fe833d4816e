"""Momentum read as an associative memory of the gradient stream (SPEC §1–2)."""

from __future__ import annotations

from typing import Any, Optional

from . import functional as F
from .optimizer import MemoryOptimizer, check_flag, check_number

__all__ = ["AssociativeMomentum"]


class AssociativeMomentum(MemoryOptimizer):
    r"""Momentum SGD as a value-less associative memory (Nested Learning Eq 33–34).

    Nested Learning reads the momentum buffer as a memory ``b`` that compresses the gradient
    stream by one gradient step per update on the inner objective ``⟨b, −G⟩`` with decay μ.
    The update, per parameter ``W`` with gradient ``G`` (negated first when ``maximize``):

    .. math::
        g_t &= G_t + \lambda W_{t-1} \quad\text{(coupled decay; default)}\\
        b_1 &= g_1, \qquad b_t = \mu\, b_{t-1} + (1-\tau)\, g_t\\
        U_t &= g_t + \mu\, b_t \ \text{if nesterov, else}\ b_t\\
        W_t &= W_{t-1} - \gamma\, U_t
        \quad(\text{or } W_{t-1}(1-\gamma\lambda) - \gamma U_t \text{ with decoupled decay})

    The buffer is stored lr-free (``m_t = −γ b_t`` in NL's notation), so LR schedulers act at
    read-out. With ``momentum=0`` there is no memory and ``U = g``.

    Args:
        params: iterable of parameters, named parameters or param-group dicts.
        lr (float or 1-element Tensor, default 1e-3): γ, the outer learning rate (≥ 0).
        momentum (float, default 0.9): μ, the memory's decay, in [0, 1).
        dampening (float, default 0): τ, scales the write ``(1 − τ) g``, in [0, 1].
        nesterov (bool, default False): read ``g + μ b`` instead of ``b``; needs μ > 0, τ = 0.
        weight_decay (float, default 0): λ ≥ 0.
        decoupled_weight_decay (bool, default False): ``W ← W(1 − γλ)`` (AdamW style) instead of
            adding ``λW`` to the gradient (torch SGD style).
        maximize (bool, default False): ascend instead of descend.
        foreach, fused (bool or None): torch's meaning. ``fused`` uses torch's fused SGD kernel
            (CPU; parameters that keep their state in their own dtype); by default it is picked
            where it applies, else the single-tensor loop on CPU and foreach elsewhere.

    Reductions (tested as properties): equals ``torch.optim.SGD(lr, momentum, dampening,
    nesterov, weight_decay, maximize)`` step for step (R1).

    Example:
        >>> import torch, deepmomentum as dm
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = dm.AssociativeMomentum(model.parameters(), lr=0.1, momentum=0.9)
        >>> model(torch.randn(8, 4)).pow(2).mean().backward()
        >>> opt.step(); opt.zero_grad()

    References: Behrouz et al., Nested Learning (NeurIPS 2025), §4, Eq 33–34.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        momentum: float = 0.9,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        decoupled_weight_decay: bool = False,
    ):
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            nesterov=nesterov,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            maximize=maximize,
            foreach=foreach,
            fused=fused,
        )
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_number("momentum", group["momentum"], 0.0, 1.0, high_open=True)
        check_number("dampening", group["dampening"], 0.0, 1.0)
        check_number("weight_decay", group["weight_decay"], 0.0)
        check_flag("nesterov", group["nesterov"])
        check_flag("decoupled_weight_decay", group["decoupled_weight_decay"])
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("nesterov=True requires momentum > 0 and dampening = 0, got "
                             f"momentum={group['momentum']}, dampening={group['dampening']}")

    def _fused_unsupported(self, group: dict[str, Any]) -> Optional[str]:
        return None  # torch's fused SGD kernel covers every setting of §1

    def _update(self, group, params, implementation):
        bufs = [self._real(self.state[p].get("momentum_buffer")) for p in params]
        F.associative_momentum(
            [self._real(p) for p in params],
            [self._real(p.grad) for p in params],
            bufs,
            lr=group["lr"],
            momentum=group["momentum"],
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            weight_decay=group["weight_decay"],
            decoupled_weight_decay=group["decoupled_weight_decay"],
            maximize=group["maximize"],
            foreach=implementation == "foreach",
            fused=implementation == "fused",
        )
        if group["momentum"] != 0:
            for p, b in zip(params, bufs):
                self.state[p]["momentum_buffer"] = self._like_param(b, p)
