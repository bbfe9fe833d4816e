"""DeepMomentum (DMGD): a momentum whose memory is an MLP trained online (SPEC §4)."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch

from . import functional as dmf
from .momentum import _validate_momentum
from .muon import _NS_DTYPES
from .newton_schulz import ADJUST_LR_FNS, ns_coefficients
from .optimizer import MemoryOptimizer, check_choice, check_int, check_number

__all__ = ["DeepMomentum", "DMGD"]


class DeepMomentum(MemoryOptimizer):
    r"""Deep Momentum Gradient Descent: momentum whose memory is a small MLP (NL Eq 23–24, 50–52).

    Nested Learning writes ``W_{i+1} = W_i + σ(m_{i+1}(u_i))``,
    ``m_{i+1} = α m_i − η ∇L⁽²⁾(m_i; u_i)``: the momentum is a *network* trained online by its
    own inner objective. Per parameter (matrix view ``r × c``: 2-D as is, ≥3-D as
    ``(shape[0], rest)``, 1-D as one row) the memory is ``M(Ĝ) = b + f_θ(Ĝ)`` with a keyless
    buffer ``b`` and a keyed MLP ``f_θ(X) = φ(X A) B`` (``A`` c×h starts N(0, 1), ``B`` h×c
    starts at 0) read on the keys ``Ĝ`` = rows of the gradient at unit norm:

    .. math::
        b_t &= \mu\, b_{t-1} + (1-\tau)\, g_t \qquad (b_1 = g_1)\\
        \theta_t &= (\mu_A A, \mu B)_{t-1} - \eta_m \nabla_\theta L^{(2)}(\theta_{t-1};
                    \hat G_t, V_t), \qquad \theta = (A, B)\\
        U_t &= \sigma\big(b_t + f_{\theta_t}(\hat G_t)\big)
               \quad(\sigma(g_t + \mu(\cdot)) \text{ with nesterov}), \qquad
        W_t = W_{t-1} - \gamma\, s\, U_t

    Values ``V = g`` (``values="gradient"``) or Adam-preconditioned ``g/(√v̂ + ε)``
    (``"preconditioned"``). Inner objective ``"dot"``: ``L = −Σ_j⟨f(ĝ_j), v_j⟩/r`` (a Hebbian
    memory: linear attention over the gradient history in a learned feature space) or ``"l2"``:
    ``L = ½Σ_j‖f(ĝ_j) − v_j‖²/r`` (the delta rule). The inner gradients are closed-form matrix
    products (no autograd in ``step()``), batched over same-shape parameters. ``s`` is Muon's lr
    adjustment when ``output="newton_schulz"``, else 1.

    Memory: ``b`` plus ``2·c·h`` numbers per parameter (GPT-2 small at the defaults: see
    README, Measured: DeepMomentum (DMGD)).

    Args:
        params: iterable of parameters, named parameters or group dicts.
        lr (float, default 1e-3): γ ≥ 0.
        momentum (float, default 0.9): μ in [0, 1), the decay of ``b`` and of θ.
        hidden (int, default 16): h ≥ 0, the MLP width; 0 removes the keyed memory.
        memory_lr (float, default 0.01): η_m ≥ 0, the inner learning rate; a larger one needs
            a smaller ``lr``. The defaults (``memory_lr``, ``objective``) were chosen by
            ``benchmarks/dmgd.py``; see README, Measured: DeepMomentum (DMGD). Re-derived on the
            benchmarks' char-GPT task (issue 17, ``benchmarks/results/defaults_lm.json``):
            ``memory_lr`` 0.001–0.1 and ``hidden`` 4–64 tie within the seed noise at the best
            lr (``hidden=64`` diverged on one seed of three), so they stand.
        key_decay (float or None, default 1.0): the decay of ``A``, in [0, 1]; None decays it
            by μ like ``b`` and ``B`` (SPEC §4 to the letter). Decaying ``A`` by μ shrinks the
            feature map to zero within a few 1/(1 − μ) steps unless the inner gradient holds it
            up, after which the keyed memory reads nothing (see README, Measured: DeepMomentum
            (DMGD)); so by default the key projection learns without forgetting while ``b`` and
            the value layer ``B`` decay. With an unbounded φ (relu, silu, gelu) and large
            gradients an undecayed ``A`` can grow until the inner step is unstable: use the
            bounded default tanh there, or ``key_decay=None``.
        objective (str, default "dot"): "dot" or "l2".
        values (str, default "gradient"): "gradient" or "preconditioned" (uses ``beta2``,
            ``eps``).
        output (str, default "identity"): σ — "identity", "sign" or "newton_schulz".
        activation (str, default "tanh"): φ — "tanh", "relu", "silu" or "gelu" (φ(0) = 0, so
            a zero gradient reads zero).
        dampening, nesterov, weight_decay, decoupled_weight_decay, maximize: as
            :class:`AssociativeMomentum`.
        adjust_lr_fn, ns_coefficients, ns_steps, ns_dtype: the Newton–Schulz read-out, as
            :class:`Muon`.
        seed (int, default 0): seeds the initial ``A`` (a function of seed, c and h only), so
            runs, groupings and implementations repeat exactly.
        foreach (bool or None): torch's meaning for the elementwise stages; same-shape
            matrices are always batched (``batched=False`` on
            :func:`deepmomentum.functional.deep_memory_reads` is the reference loop).
        fused: the Triton kernel (CUDA tensors only; not with the Newton–Schulz read-out),
            picked by default where it applies.
        state_dtype, param_rounding, skip_nonfinite, update_period, accumulate, update_offset,
        min_period, max_period, period_significance:
            the group options every optimizer shares (defaults torch.float32, "nearest",
            False, 1, "sum", 0, 1, 64, 1.0; ``update_period="auto"``: the group updates when
            its accumulated gradient is significant); see :class:`MemoryOptimizer` and
            :mod:`deepmomentum.compressed`.

    Non-finite gradients and scale: the MLP memory couples a matrix's entries, so one NaN or
    inf entry poisons the whole matrix and its memory weights; a group with
    ``skip_nonfinite=True`` skips such calls (parameters and state untouched, counted in the
    group's ``nonfinite_skips``). The keys are unit rows (overflow-safe norm), but the inner
    gradient for A grows like |G|²: with ``"l2"`` or an unbounded activation the inner step
    diverges for large gradients at the default ``memory_lr`` (see README, Measured:
    DeepMomentum (DMGD)); scale ``memory_lr`` with the gradients or use
    ``values="preconditioned"``.

    Reductions (tested as properties): ``hidden=0`` or ``memory_lr=0`` equals
    ``torch.optim.SGD`` (R4a); ``hidden=0, output="newton_schulz"`` equals the Muon-style loop
    ``W ← W(1 − γλ) − γ·s·NS(b_t)``, and with ``momentum=0`` ``torch.optim.Muon`` (R4b); a zero
    gradient reads zero from the keyed part (P4).

    Example:
        >>> import torch, deepmomentum as dm
        >>> model = torch.nn.Linear(8, 4)
        >>> opt = dm.DMGD(model.parameters(), lr=0.05, hidden=8)
        >>> model(torch.randn(16, 8)).pow(2).mean().backward()
        >>> opt.step(); opt.zero_grad()

    References: Behrouz et al., Nested Learning (NeurIPS 2025), Eq 23–24, 50–52.
    """

    supports_complex = False

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        momentum: float = 0.9,
        hidden: int = 16,
        memory_lr: float = 0.01,
        key_decay: Optional[float] = 1.0,
        objective: str = "dot",
        values: str = "gradient",
        output: str = "identity",
        activation: str = "tanh",
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        adjust_lr_fn: Optional[str] = None,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        decoupled_weight_decay: bool = False,
        beta2: float = 0.999,
        eps: float = 1e-8,
        ns_coefficients="keller",
        ns_steps: int = 5,
        ns_dtype: torch.dtype = torch.bfloat16,
        seed: int = 0,
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
        _validate_momentum(group)
        for name in ("hidden", "seed", "ns_steps"):
            check_int(name, group[name], 0)
        check_number("memory_lr", group["memory_lr"], 0.0)
        if group["key_decay"] is not None:
            check_number("key_decay", group["key_decay"], 0.0, 1.0)
        check_choice("objective", group["objective"], dmf.DMGD_OBJECTIVES)
        check_choice("values", group["values"], dmf.DMGD_VALUES)
        check_choice("output", group["output"], dmf.DMGD_OUTPUTS)
        check_choice("activation", group["activation"], dmf.DMGD_ACTIVATIONS)
        check_choice("adjust_lr_fn", group["adjust_lr_fn"], ADJUST_LR_FNS)
        check_number("beta2", group["beta2"], 0.0, 1.0, high_open=True)
        check_number("eps", group["eps"], 0.0)
        check_choice("ns_dtype", group["ns_dtype"], _NS_DTYPES)
        if group["output"] == "newton_schulz":
            ns_coefficients(group["ns_coefficients"], group["ns_steps"])

    def _state_shapes(self, group, param):
        shape = tuple(param.shape)
        shapes = {**super()._state_shapes(group, param), "step": (), "momentum_buffer": shape}
        if group["hidden"] > 0:
            cols = dmf.matrix_shape(param.shape)[1]
            shapes.update(memory_A=(cols, group["hidden"]), memory_B=(group["hidden"], cols))
        if group["values"] == "preconditioned":
            shapes["exp_avg_sq"] = shape
        return shapes

    supported_impls = ("foreach", "triton")
    LAZY_STATE = ("momentum_buffer",)

    def _impl_unsupported(self, group, implementation):
        if implementation == "triton" and group["output"] == "newton_schulz":
            return "the Newton–Schulz read-out has no Triton path yet"
        return super()._impl_unsupported(group, implementation)

    def _rule(self, group):
        keyed = group["hidden"] > 0
        return dmf.deep_momentum, ("momentum_buffer", "memory_A" if keyed else None,
                                   "memory_B" if keyed else None,
                                   "exp_avg_sq" if group["values"] == "preconditioned" else None)

    REPLICATED_STATE = ("memory_A", "memory_B")

    def _has_matrix_stages(self, group):
        return group["hidden"] > 0 or group["output"] == "newton_schulz"

    def _initial_state(self, group, param, key):
        if key not in ("memory_A", "memory_B"):
            return super()._initial_state(group, param, key)
        cols, hidden = dmf.matrix_shape(param.shape)[1], group["hidden"]
        dtype = dmf.state_dtype(param.dtype)
        if key == "memory_B":  # B₀ = 0: the keyed part reads zero until it has learned
            return torch.zeros(hidden, cols, device=param.device, dtype=dtype)
        # A₀ depends on (seed, c, h) only, so a parameter starts alike whatever its group,
        # position or implementation (B₀ = 0 makes same-shape tensors diverge at once).
        generator = torch.Generator().manual_seed((group["seed"] * 1_000_003 + cols) * 10_007
                                                  + hidden)
        A = torch.randn(cols, hidden, generator=generator, dtype=torch.float64)
        return A.to(device=param.device, dtype=dtype)


#: The name Nested Learning uses.
DMGD = DeepMomentum
