"""Momentum with preconditioned values: Adam read as an associative memory (SPEC §3)."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch

from . import functional as dmf
from .optimizer import MemoryOptimizer, check_choice, check_flag, check_number

__all__ = ["PreconditionedMomentum"]


class PreconditionedMomentum(MemoryOptimizer):
    r"""Momentum whose memory stores preconditioned gradients (NL Eq 46–47; Adam as memory, App. B).

    A second-moment memory ``v`` sets the preconditioner
    :math:`P_t(x) = x / (\sqrt{v_t/(1-\beta_2^t)} + \epsilon)`,
    :math:`v_t = \beta_2 v_{t-1} + (1-\beta_2) G_t^2`, and the momentum memory ``b`` is an EMA:

    * ``precondition="readout"`` (default): :math:`b_t = \beta_1 b_{t-1} + (1-\beta_1) G_t`,
      :math:`U_t = P_t(b_t / (1-\beta_1^t))` — this is AdamW.
    * ``precondition="value"``: the values written are preconditioned (NL Eq 19 literally),
      :math:`b_t = \beta_1 b_{t-1} + (1-\beta_1) P_t(G_t)`, :math:`U_t = b_t / (1-\beta_1^t)`.
    * ``preconditioner="none"``: :math:`P` is the identity; ``U`` is the bias-corrected EMA of
      the gradients and no second moment is stored.

    Then :math:`W_t = W_{t-1}(1-\gamma\lambda) - \gamma U_t` (decoupled decay, default), or with
    ``decoupled_weight_decay=False`` the decay is added to the gradient (torch Adam style).

    Args:
        params: iterable of parameters, named parameters or param-group dicts.
        lr (float or 1-element Tensor, default 1e-3): γ ≥ 0.
        betas (tuple, default (0.9, 0.999)): (β₁, β₂), each in [0, 1).
        eps (float, default 1e-8): ε ≥ 0, added to the preconditioner's denominator.
        weight_decay (float, default 0.01, as ``torch.optim.AdamW``): λ ≥ 0. (deepmomentum
            0.1.0 defaulted to 0; ``weight_decay=0`` with decoupled decay is ``torch.optim.Adam``.)
        precondition (str, default "readout"): "readout" or "value" (see above).
        preconditioner (str, default "adam"): "adam" or "none".
        decoupled_weight_decay (bool, default True): AdamW-style decay; False couples it.
        maximize (bool, default False): ascend instead of descend.
        foreach, fused (bool or None): torch's meaning; ``fused`` is the Triton kernel for CUDA
            tensors (every setting) and torch's fused Adam(W) kernel on the CPU (for
            ``precondition="readout"``, ``preconditioner="adam"``); by default the fused kernel
            is picked where it applies, else the single-tensor loop on CPU and foreach
            elsewhere.
        state_dtype, param_rounding, skip_nonfinite, update_period, accumulate, update_offset,
        min_period, max_period, period_significance:
            the group options every optimizer shares (defaults torch.float32, "nearest",
            False, 1, "sum", 0, 1, 64, 1.0; ``update_period="auto"``: the group updates when
            its accumulated gradient is significant); see :class:`MemoryOptimizer` and
            :mod:`deepmomentum.compressed`.

    Defaults are ``torch.optim.AdamW``'s (lr 1e-3, betas (0.9, 0.999), eps 1e-8,
    weight_decay 0.01, decoupled), so ``PreconditionedMomentum(params)`` is a drop-in for
    ``torch.optim.AdamW(params)``.
    With ``precondition="value"`` they were re-derived on the benchmarks' char-GPT task (issue
    17, ``benchmarks/results/defaults_lm.json``): betas (0.9, 0.999) and (0.9, 0.95) tie (2.779
    and 2.777 bits/char at the best lr, 1e-2), so the value form keeps AdamW's.

    Reductions (tested as properties): readout + decoupled decay equals
    ``torch.optim.AdamW(lr, betas, eps, weight_decay)``; λ = 0 equals ``torch.optim.Adam`` (R3a);
    ``preconditioner="none"`` gives the bias-corrected EMA of the gradients (R3b).

    Example:
        >>> import torch, deepmomentum as dm
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = dm.PreconditionedMomentum(model.parameters(), lr=1e-3, weight_decay=0.01)
        >>> model(torch.randn(8, 4)).pow(2).mean().backward()
        >>> opt.step(); opt.zero_grad()

    References: Behrouz et al., Nested Learning (NeurIPS 2025), Eq 19, 46–47 and App. B;
    Kingma & Ba, Adam (2015); Loshchilov & Hutter, AdamW (2019).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        precondition: str = "readout",
        preconditioner: str = "adam",
        maximize: bool = False,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        decoupled_weight_decay: bool = True,
        state_dtype: Union[torch.dtype, str] = torch.float32,
        param_rounding: str = "nearest",
        skip_nonfinite: bool = False,
        update_period: Union[int, str] = 1,
        accumulate: str = "sum",
        update_offset: int = 0,
        min_period: int = 1,
        max_period: int = 64,
        period_significance: float = 1.0,
    ):
        defaults = self._group_defaults(locals())
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"Invalid betas: {betas!r}; betas must be a pair (beta1, beta2)")
        check_number("betas[0]", betas[0], 0.0, 1.0, high_open=True)
        check_number("betas[1]", betas[1], 0.0, 1.0, high_open=True)
        check_number("eps", group["eps"], 0.0)
        check_number("weight_decay", group["weight_decay"], 0.0)
        check_choice("precondition", group["precondition"], dmf.PRECONDITION_MODES)
        check_choice("preconditioner", group["preconditioner"], dmf.PRECONDITIONERS)
        check_flag("decoupled_weight_decay", group["decoupled_weight_decay"])

    def _state_shapes(self, group, param):
        shape = tuple(param.shape)
        shapes = {**super()._state_shapes(group, param), "step": (), "exp_avg": shape}
        if group["preconditioner"] == "adam":
            shapes["exp_avg_sq"] = shape
        return shapes

    supported_impls = ("foreach", "fused", "triton")

    def _impl_unsupported(self, group, implementation):
        if implementation == "fused" and (group["precondition"] != "readout"
                                          or group["preconditioner"] != "adam"):
            return ("only precondition='readout' with preconditioner='adam' (Adam/AdamW) has a "
                    "fused kernel")
        return super()._impl_unsupported(group, implementation)

    def _rule(self, group):
        return adam_rule(group)

    def _rule_options(self, group):
        return adam_options(group)


def adam_rule(group: dict[str, Any]):
    """§3's rule and state for a group: PreconditionedMomentum's, and the AdamW groups' of
    Muon and M3."""
    kept = group.get("preconditioner", "adam") == "adam"
    return dmf.preconditioned_momentum, ("exp_avg", "exp_avg_sq" if kept else None)


def adam_options(group: dict[str, Any]) -> dict[str, Any]:
    beta1, beta2 = group["betas"]
    return {"beta1": beta1, "beta2": beta2}
