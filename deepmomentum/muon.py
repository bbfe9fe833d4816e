"""Muon and M3: momentum memories read out through Newton–Schulz (SPEC §5–6).

Both optimize matrices; everything else (embeddings, the output head, norms, biases) goes in
``use_muon=False`` groups, which the same optimizer updates with AdamW. :func:`muon_param_groups`
builds both kinds of group from a model.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable, Optional, Union

import torch
from torch import nn

from . import distributed, functional as dmf
from .newton_schulz import ADJUST_LR_FNS, ns_coefficients
from .optimizer import MemoryOptimizer, UnsupportedTensorError, check_choice, check_flag, \
    check_int, check_number
from .preconditioned import adam_options, adam_rule

__all__ = ["Muon", "M3", "muon_param_groups", "HEAD_NAMES", "EMBEDDING_NAMES"]

_ADAMW_KEYS = ("lr", "betas", "eps", "weight_decay")
_NS_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)

#: Names of output heads (their shape is the vocabulary's): :func:`muon_param_groups` sends a
#: parameter with one of them as a part of its dotted name to AdamW, and Muon/M3 warn when a
#: matrix group built from named parameters holds one.
HEAD_NAMES = ("lm_head", "head", "output", "classifier", "fc_out")
#: Common names of embedding modules. :func:`muon_param_groups` finds embeddings by module type;
#: an optimizer sees only names, and warns on these (GPT-2's wte/wpe, HF and Llama's).
EMBEDDING_NAMES = ("embedding", "embed", "embed_tokens", "tok_embeddings", "word_embeddings",
                   "wte", "wpe", "tok_emb", "pos_emb")


def _looks_like_embedding_or_head(name: str) -> bool:
    """Whether a dotted parameter name has a part that names an output head
    (:data:`HEAD_NAMES`, the exclusions of :func:`muon_param_groups`) or an embedding."""
    return bool(set(name.split(".")) & (set(HEAD_NAMES) | set(EMBEDDING_NAMES)))


class _MatrixOptimizer(MemoryOptimizer):
    """Shared by Muon and M3: matrix groups (``use_muon=True``) take the subclass's rule on the
    matrix view of each tensor; ``use_muon=False`` groups take AdamW with their own ``lr``,
    ``betas``, ``eps`` and ``weight_decay`` (defaults: the constructor's ``adamw_*``)."""

    supports_complex = False
    GROUP_KEYS = _ADAMW_KEYS

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not param_group.get("use_muon", self.defaults["use_muon"]):
            for key in _ADAMW_KEYS:
                param_group.setdefault(key, self.defaults[f"adamw_{key}"])
        super().add_param_group(param_group)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_flag("use_muon", group["use_muon"])
        check_int("batch_dims", group["batch_dims"], 0)
        batch_dims = group["batch_dims"]
        check_number("adamw_lr", group["adamw_lr"], 0.0)
        if not group["use_muon"]:
            self._validate_adamw(group, "")
            return
        self._validate_adamw(group, "adamw_")
        ns_coefficients(group["ns_coefficients"], group["ns_steps"])  # raises ValueError
        if group["ns_dtype"] not in _NS_DTYPES:
            raise ValueError(f"Invalid ns_dtype: {group['ns_dtype']!r}; ns_dtype must be one of "
                             f"{_NS_DTYPES}")
        self._validate_matrix_group(group)
        index = len(self.param_groups) - 1
        for p in group["params"]:
            if p.ndim < batch_dims + 2:
                raise UnsupportedTensorError(
                    f"{type(self).__name__} updates matrices; "
                    f"{self._param_name(index, p)} has {p.ndim} dim(s), fewer than "
                    f"batch_dims + 2 = {batch_dims + 2}. Put it in a group with use_muon=False "
                    "(AdamW), e.g. with deepmomentum.muon_param_groups(model)")
        flagged = [name for name in group.get("param_names") or ()
                   if _looks_like_embedding_or_head(name)]
        if flagged:
            warnings.warn(
                f"{type(self).__name__}: the Newton–Schulz group param_groups[{index}] holds "
                f"{flagged}, named like an embedding or output head; Muon is meant for hidden "
                "matrices (an embedding's rows are looked up, a head's shape is the "
                "vocabulary). Put them in a use_muon=False (AdamW) group, e.g. with "
                "deepmomentum.muon_param_groups(model).", UserWarning, stacklevel=2)

    @staticmethod
    def _validate_adamw(group: dict[str, Any], prefix: str) -> None:
        betas = group[f"{prefix}betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"Invalid {prefix}betas: {betas!r}; {prefix}betas must be a pair")
        check_number(f"{prefix}betas[0]", betas[0], 0.0, 1.0, high_open=True)
        check_number(f"{prefix}betas[1]", betas[1], 0.0, 1.0, high_open=True)
        check_number(f"{prefix}eps", group[f"{prefix}eps"], 0.0)
        check_number(f"{prefix}weight_decay", group[f"{prefix}weight_decay"], 0.0)

    def _validate_matrix_group(self, group: dict[str, Any]) -> None:
        raise NotImplementedError

    #: State of the matrix groups (each of the parameter's shape); AdamW groups keep Adam's.
    MATRIX_STATE: tuple[str, ...] = ()

    def _state_shapes(self, group, param):
        shape = tuple(param.shape)
        shapes = super()._state_shapes(group, param)
        if group["use_muon"]:
            shapes.update({key: shape for key in self.MATRIX_STATE})
        else:
            shapes.update(step=(), exp_avg=shape, exp_avg_sq=shape)
        return shapes

    supported_impls = ("foreach", "fused", "triton")  # fused: torch's AdamW for AdamW groups

    def _impl_unsupported(self, group, implementation):
        if implementation == "fused" and group["use_muon"]:
            return "Newton–Schulz groups have no fused kernel yet"
        return super()._impl_unsupported(group, implementation)

    def _rule(self, group):
        return self._matrix_rule(group) if group["use_muon"] else adam_rule(group)

    def _has_matrix_stages(self, group):
        return group["use_muon"]

    def _rule_options(self, group):
        return self._matrix_options(group) if group["use_muon"] else adam_options(group)

    def _matrix_rule(self, group):
        raise NotImplementedError

    def _matrix_options(self, group) -> dict[str, Any]:
        return {}


class Muon(_MatrixOptimizer):
    r"""Muon: momentum whose read-out is orthogonalized by Newton–Schulz (NL Eq 42, 52).

    In Nested Learning's reading the momentum is a linear memory of the gradients and σ = NS is
    its output map. Per matrix ``W`` (the matrix view of conv kernels; ``batch_dims`` leading
    dims index stacked independent matrices):

    .. math::
        b_t &= \mu\, b_{t-1} + (1-\mu)\, G_t \qquad (b_0 = 0)\\
        U_t &= \mathrm{lerp}(G_t, b_t, \mu)\ \text{if nesterov, else}\ b_t\\
        W_t &= W_{t-1}(1-\gamma\lambda) - \gamma\, s(r, c)\, \mathrm{NS}(U_t)

    with ``s`` from ``adjust_lr_fn``: None/"original" √max(1, r/c), "match_rms_adamw"
    0.2·√max(r, c), "spectral" √(r/c). Same-shape matrices of a group are orthogonalized in one
    batched call whatever ``foreach`` (``batched=False`` on
    :func:`deepmomentum.functional.orthogonalize` is the one-matrix-at-a-time reference). The
    NS input is always a copy: unlike ``torch.optim.Muon`` with bf16 gradients, the momentum
    buffer is never normalized in place.

    Groups with ``use_muon=False`` (1-D tensors, embeddings, the output head) are updated by
    AdamW with their own ``lr``, ``betas``, ``eps`` and ``weight_decay`` — the ``adamw_*``
    arguments are their defaults. :func:`muon_param_groups` builds both groups from a model.
    ``Muon(model.parameters())`` cannot tell an embedding or a head from a hidden matrix (it
    sees tensors only) and puts them in the Newton–Schulz group: use
    ``Muon(dm.muon_param_groups(model))``. Built from ``named_parameters()``, a matrix group
    warns (``UserWarning`` naming them) on names like an embedding's or a head's
    (:data:`HEAD_NAMES` — :func:`muon_param_groups`'s exclusions — and
    :data:`EMBEDDING_NAMES`).

    Defaults: the matrix part takes ``torch.optim.Muon``'s (lr 1e-3, weight_decay 0.1,
    momentum 0.95, nesterov, Keller's coefficients, 5 steps, eps 1e-7), so it is a drop-in for
    it; the AdamW part takes ``torch.optim.AdamW``'s (lr 1e-3, betas (0.9, 0.999), eps 1e-8,
    weight_decay 0.01), so the non-matrix parameters train as they did under the AdamW this
    replaces. (deepmomentum 0.1.0 used 3e-4, (0.9, 0.95), 1e-10, 0 — the modded-nanoGPT
    speedrun's settings; pass them as ``adamw_*`` to repeat an old run.)

    Args:
        params: iterable of ≥2-D parameters, named parameters or group dicts.
        lr (float, default 1e-3): γ ≥ 0 for the matrices.
        weight_decay (float, default 0.1, as ``torch.optim.Muon``): λ ≥ 0, decoupled
            (W ← W(1 − γλ), unadjusted γ).
        momentum (float, default 0.95): μ in [0, 1).
        nesterov (bool, default True).
        ns_coefficients (default "keller"): "keller", "you", "polar_express", one (a, b, c)
            triple for every step, or a list of per-step triples.
        ns_steps (int, default 5); eps (float, default 1e-7): NS normalisation guard.
        adjust_lr_fn (str or None, default None): see above.
        ns_dtype (torch.dtype, default bfloat16): NS arithmetic dtype.
        batch_dims (int, default 0): leading dims that index independent matrices.
        use_muon (bool, default True): False makes a group AdamW.
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay: AdamW-group defaults
            (1e-3, (0.9, 0.999), 1e-8, 0.01: ``torch.optim.AdamW``'s).
        maximize, foreach, fused: as in torch. ``fused``: the Triton kernels around the batched
            NS for CUDA tensors (picked by default there); AdamW groups also take torch's fused
            AdamW on the CPU.
        state_dtype, param_rounding, skip_nonfinite, update_period, accumulate, update_offset,
        min_period, max_period, period_significance:
            the group options every optimizer shares (defaults torch.float32, "nearest",
            False, 1, "sum", 0, 1, 64, 1.0; ``update_period="auto"``: the group updates when
            its accumulated gradient is significant); see :class:`MemoryOptimizer` and
            :mod:`deepmomentum.compressed`.

    Reductions (tested): with ``ns_coefficients="keller"`` and torch's defaults, equals
    ``torch.optim.Muon`` — identical momentum buffers, updates within bf16 rounding (R5).

    Example:
        >>> import torch, deepmomentum as dm
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
        ...                             torch.nn.Linear(16, 4))
        >>> opt = dm.Muon(dm.muon_param_groups(model), lr=0.02)
        >>> model(torch.randn(32, 8)).pow(2).mean().backward()
        >>> opt.step()

    References: Jordan et al., Muon (2024); Liu et al., Muon is Scalable for LLM Training
    (2025); Amsel et al., The Polar Express (2025); Behrouz et al., Nested Learning (2025).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients="keller",
        ns_steps: int = 5,
        eps: float = 1e-7,
        adjust_lr_fn: Optional[str] = None,
        ns_dtype: torch.dtype = torch.bfloat16,
        batch_dims: int = 0,
        use_muon: bool = True,
        adamw_lr: float = 1e-3,
        adamw_betas: tuple[float, float] = (0.9, 0.999),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = 0.01,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
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

    MATRIX_STATE = ("momentum_buffer",)

    def _validate_matrix_group(self, group):
        check_number("momentum", group["momentum"], 0.0, 1.0, high_open=True)
        check_number("weight_decay", group["weight_decay"], 0.0)
        check_number("eps", group["eps"], 0.0)
        check_flag("nesterov", group["nesterov"])
        check_choice("adjust_lr_fn", group["adjust_lr_fn"], ADJUST_LR_FNS)

    def _matrix_rule(self, group):
        return dmf.muon, self.MATRIX_STATE


_DEFAULT_WRITES = (1.0, 1.0, 1.0)


def _check_triple(name: str, values: Any, low: float, high: float) -> None:
    if not isinstance(values, (tuple, list)) or len(values) != 3:
        raise ValueError(f"Invalid {name}: {values!r}; {name} must be a triple")
    for i, v in enumerate(values):
        check_number(f"{name}[{i}]", v, low, high)


def _deprecated_betas(betas: Any, stacklevel: int) -> Any:
    """M3's write strengths passed under their old name: checked under it, then warned."""
    _check_triple("betas", betas, 0.0, float("inf"))
    warnings.warn("M3: betas= is deprecated, the write strengths are writes= now (LR schedulers "
                  "that cycle momentum rewrite betas[0] as Adam's β₁)", DeprecationWarning,
                  stacklevel=stacklevel)
    return betas


def _writes_from_betas(group: dict[str, Any], matrix: bool, writes: Any = _DEFAULT_WRITES
                       ) -> dict[str, Any]:
    """A group (or defaults) of an M3 saved before ``betas`` became ``writes``: a Newton–Schulz
    group's ``betas`` are its write strengths; an AdamW group's are Adam's and stay."""
    group = dict(group)
    if matrix and "betas" in group:
        group["writes"] = tuple(group.pop("betas"))
    else:
        group["writes"] = writes
    return group


#: The options M3 gained with its normalized form, as a group saved before them ran: the
#: literal rule (deepmomentum ≤ 0.1 had no other), no nesterov, no shape factor.
_BEFORE_FORMS = {"form": "literal", "nesterov": None, "adjust_lr_fn": None}


def _with_forms(group: dict[str, Any]) -> dict[str, Any]:
    """A group (or defaults) of an M3 saved before ``form`` existed, as it ran (literal)."""
    return group if "form" in group or "decays" not in group else {**group, **_BEFORE_FORMS}


class M3(_MatrixOptimizer):
    r"""M3, multi-scale momentum Muon (NL arXiv §7.2, Algorithm 1).

    A fast momentum read every step and a slow momentum that learns once per chunk of
    ``chunk`` (Ĉ) steps, both orthogonalized, scaled by a second-moment memory:

    .. math::
        M^1_t &= \mu_1 M^1_{t-1} + \omega_1 G_t, \qquad
        U_t = \omega_1 G_t + \mu_1 M^1_t\ \text{(nesterov) or}\ M^1_t, \qquad
        O_t = \mathrm{NS}(U_t) + \alpha\, O^2\\
        \text{every Ĉ steps: }\ M^2 &\leftarrow \mu_3 M^2 + \omega_3 \textstyle\sum_{chunk} G,
        \qquad O^2 = \mathrm{NS}(M^2)

    :math:`O^2` is kept between chunks (zero during the first chunk), so the slow memory and its
    read-out change only at chunk boundaries (tested). The two forms differ in the second
    moment and the step:

    * ``form="normalized"`` (default) keeps the second moment per row of the read-out and
      scales the row-normalized read-out back to the fast read-out's norm times Muon's shape
      factor, so γ lives on Muon's scale and no entry can step further than its matrix:

      .. math::
          v_t = \mu_2 v_{t-1} + \omega_2\, \mathrm{mean}_{cols}(O_t^2),\qquad
          \hat O_t = O_t / (\sqrt{v_t} + \epsilon),\qquad
          W_t = W_{t-1}(1-\gamma\lambda) - \gamma\, s(r,c)\,
          \frac{\lVert \mathrm{NS}(U_t)\rVert_F}{\lVert \hat O_t\rVert_F}\,\hat O_t

      (its ``exp_avg_sq`` has one entry per row: shape ``param.shape[:batch_dims + 1]``).
    * ``form="literal"`` is Algorithm 1: an elementwise second moment of the raw gradients,
      :math:`V_t = \mu_2 V_{t-1} + \omega_2 G_t^2`, and
      :math:`W_t = W_{t-1}(1-\gamma\lambda) - \gamma\, O_t / (\sqrt{V_t} + \epsilon)`.
      It divides an orthogonalized matrix (entries ~1/√n) by √V of raw gradients, so an entry
      whose gradient is ~0 (a constant input pixel, a dead unit) steps by ~γ/ε: measured, it
      blows up at every lr of the benchmarks' grids (README, Measured: M3). Kept as an option,
      tested against a loop of the algorithm; it needs γ far below Muon's (~γ/|G| per entry).

    Why the normalized form (benchmarks/results/m3_forms.json: char-GPT at the benchmarks' full
    size, val bits/char, Muon 2.725/2.728/2.751 over seeds 0–2 at its best lr): with the
    paper's α = 1 and Ĉ = 16 every stable candidate lost ≥ 0.18 to Muon — preconditioning
    before NS 3.006, a per-row √V of raw gradients after NS 3.057, no second moment 2.962, a
    per-row second moment of the read-out (as NorMuon, Li et al. 2025, normalizes Muon's
    output) 2.906. The stale slow memory was the cost: at α = 0 the first reached 2.741 and the
    last 2.730; with a light, fresh one (α = 0.25, Ĉ = 4) the read-out's row moment reached
    2.733/2.735/2.765 (mean +0.009 on Muon), without a second moment 2.765, with μ₂ = 0.999
    2.752. On Permuted-Digits (ACC, 3 seeds) it was ahead of Muon at each lr tried. Those runs
    had no weight decay; with Muon's 0.1 (needed there, see below) the slow memory cost more
    (3 seeds, lr 0.03: μ₃ = 0.9 2.783, α = 0.1 2.775, α = 0 2.760, no second moment 2.804),
    unless it holds only the last chunk: μ₃ = 0, 2.766 (Muon 2.750 in the same protocol).

    The paper's text is partly garbled. Its Algorithm 1 writes the three memories as plain sums
    (``M ← M + β·…``); that is ``decays=(1, 1, 1)`` here, tested against a literal loop. Plain
    sums never forget, so the defaults add the decays the text omits: μ₁ = 0.95 (Muon's
    momentum), μ₂ = 0.95, and μ₃ = 0: the slow memory is the last chunk's summed gradients, a
    less noisy, lower-frequency read than the fast one (measured above; μ₃ = 0.9 keeps ~10
    chunks and was worse). The write strengths ω₁ and ω₃ (the paper's β₁,
    β₃) only scale M¹ and M², which NS does not see (it is scale-invariant), so they default to
    1; in the normalized form ω₂ cancels too (up to ε). M3 of deepmomentum 0.1 is
    ``M3(form="literal", decays=(0.95, 0.999, 0.9), alpha=1.0, chunk=16, weight_decay=0)``, and
    its checkpoints and pickles load as that.

    The write strengths are ``writes``, not ``betas``: LR schedulers that cycle momentum
    (``OneCycleLR``, ``CyclicLR`` with ``cycle_momentum=True``) rewrite ``betas[0]`` of every
    group as Adam's β₁, which here would silently change ω₁. M3 has neither ``betas`` nor
    ``momentum`` among its defaults, so those schedulers raise torch's ``ValueError`` unless
    given ``cycle_momentum=False``. ``betas=`` (and a group's ``"betas"`` in a Newton–Schulz
    group) is still accepted for old code, with a ``DeprecationWarning``; checkpoints and
    pickles of earlier versions load, their ``betas`` read as ``writes``.

    Weight decay defaults to ``torch.optim.Muon``'s 0.1, decoupled, ``W(1 − γλ)``: the
    normalized form's γ is Muon's, and without the decay its weights grew to 4× Muon's on
    Permuted-Digits at lr ≥ 0.1 (the row normalization gives weakly driven rows full-size
    steps), so its losses at a task switch peaked at 23–150× the first (diverged, by the
    benchmarks' rule); with it ≤ 5.3×, as Muon's. (The literal form's γ is on another scale,
    ~γ/|G| per entry: there λ means something else; 0.1's M3 had 0.) The AdamW part
    (``adamw_*``) takes ``torch.optim.AdamW``'s defaults, as :class:`Muon`.

    Args:
        params: ≥2-D parameters (AdamW groups via ``use_muon=False`` as in :class:`Muon`).
        lr (float, default 1e-3): γ ≥ 0 (the normalized form's is on Muon's scale).
        writes (tuple, default (1, 1, 1)): write strengths (ω₁, ω₂, ω₃) ≥ 0 (the paper's
            β₁, β₂, β₃; ``betas=`` is a deprecated alias).
        decays (tuple, default (0.95, 0.95, 0.0)): (μ₁, μ₂, μ₃), each in [0, 1].
        alpha (float, default 0.25): α ≥ 0, weight of the slow read-out.
        chunk (int, default 4): Ĉ ≥ 1, steps per slow update.
        eps (float, default 1e-8): ε ≥ 0 in the denominator.
        weight_decay (float, default 0.1; see above): decoupled λ ≥ 0.
        form (str, default "normalized"): "normalized" or "literal" (see above).
        nesterov (bool or None, default None): the fast read-out ``ω₁G + μ₁M¹`` instead of
            ``M¹``; None: the form's own (normalized: True, as Muon; literal: False).
        adjust_lr_fn (str or None, default None): the normalized form's shape factor, as
            :class:`Muon`'s (None: √max(1, r/c)); the literal form has none (must be None).
        ns_coefficients, ns_steps, ns_eps, ns_dtype, batch_dims: as :class:`Muon` (``ns_eps`` is
            Muon's ``eps``).
        use_muon, adamw_*: as :class:`Muon`.
        maximize, foreach, fused: as :class:`Muon`.
        state_dtype, param_rounding, skip_nonfinite, update_period, accumulate, update_offset,
        min_period, max_period, period_significance:
            the group options every optimizer shares (defaults torch.float32, "nearest",
            False, 1, "sum", 0, 1, 64, 1.0; ``update_period="auto"``: the group updates when
            its accumulated gradient is significant); see :class:`MemoryOptimizer` and
            :mod:`deepmomentum.compressed`.

    References: Behrouz et al., Nested Learning (NeurIPS 2025; arXiv 2512.24695), §7.2.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        writes: tuple[float, float, float] = _DEFAULT_WRITES,
        decays: tuple[float, float, float] = (0.95, 0.95, 0.0),
        alpha: float = 0.25,
        chunk: int = 4,
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        form: str = "normalized",
        nesterov: Optional[bool] = None,
        adjust_lr_fn: Optional[str] = None,
        ns_coefficients="keller",
        ns_steps: int = 5,
        ns_eps: float = 1e-7,
        ns_dtype: torch.dtype = torch.bfloat16,
        batch_dims: int = 0,
        use_muon: bool = True,
        adamw_lr: float = 1e-3,
        adamw_betas: tuple[float, float] = (0.9, 0.999),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = 0.01,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        state_dtype: Union[torch.dtype, str] = torch.float32,
        param_rounding: str = "nearest",
        skip_nonfinite: bool = False,
        update_period: Union[int, str] = 1,
        accumulate: str = "sum",
        update_offset: int = 0,
        min_period: int = 1,
        max_period: int = 64,
        period_significance: float = 1.0,
        **deprecated,
    ):
        defaults = self._group_defaults(locals())
        deprecated = defaults.pop("deprecated")
        unknown = sorted(set(deprecated) - {"betas"})
        if unknown:
            raise TypeError(f"M3.__init__() got an unexpected keyword argument {unknown[0]!r}")
        if "betas" in deprecated:
            if writes is not _DEFAULT_WRITES:
                raise TypeError("M3: pass the write strengths as writes= only (betas= is its "
                                "deprecated alias)")
            defaults["writes"] = _deprecated_betas(deprecated["betas"], stacklevel=3)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "betas" in param_group and "writes" not in param_group and \
                param_group.get("use_muon", self.defaults["use_muon"]):
            param_group = dict(param_group)
            param_group["writes"] = _deprecated_betas(param_group.pop("betas"), stacklevel=4)
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A pickle of an earlier version: its write strengths are under "betas".
        state = dict(state)
        defaults = state.get("defaults", {})
        if "writes" not in defaults and "decays" in defaults:
            state["defaults"] = _writes_from_betas(defaults, True)  # betas= of then
            state["param_groups"] = [
                _writes_from_betas(g, g.get("use_muon", True), state["defaults"]["writes"])
                for g in state.get("param_groups", [])]
        # ... and one from before the normalized form ran the literal rule.
        if "defaults" in state:
            state["defaults"] = _with_forms(state["defaults"])
        state["param_groups"] = [_with_forms(g) for g in state.get("param_groups", [])]
        super().__setstate__(state)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As :meth:`MemoryOptimizer.load_state_dict`; a checkpoint of an earlier version, with
        the write strengths of its Newton–Schulz groups under ``"betas"``, loads them as
        ``writes`` (and its AdamW groups take this optimizer's ``writes``, which they do not
        use); one saved before M3 had ``form`` (deepmomentum ≤ 0.1) loads as what it ran,
        ``form="literal"``, whatever this optimizer's form."""
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if isinstance(groups, list) and len(groups) == len(self.param_groups) and any(
                isinstance(g, dict) and "writes" not in g and "decays" in g for g in groups):
            state_dict = {**state_dict, "param_groups": [
                _writes_from_betas(saved, saved.get("use_muon", True), own["writes"])
                if "writes" not in saved and "decays" in saved else saved
                for saved, own in zip(groups, self.param_groups)]}
        if isinstance(groups, list) and any(isinstance(g, dict) and "form" not in g
                                            for g in state_dict["param_groups"]):
            state_dict = {**state_dict, "param_groups": [
                _with_forms(g) if isinstance(g, dict) else g
                for g in state_dict["param_groups"]]}
        super().load_state_dict(state_dict)

    MATRIX_STATE = ("fast_buffer", "exp_avg_sq", "slow_buffer", "slow_update", "chunk_sum")

    def _state_shapes(self, group, param):
        shapes = super()._state_shapes(group, param)
        if group["use_muon"]:
            shapes["step"] = ()
            if group["form"] == "normalized":  # one second moment per row of the read-out
                shapes["exp_avg_sq"] = dmf.row_shape(param.shape, group["batch_dims"])
        return shapes

    def _initial_state(self, group, param, key):
        if key == "exp_avg_sq" and group["use_muon"] and group["form"] == "normalized":
            return distributed.rows_like(param, group["batch_dims"],
                                         dmf.state_dtype(param.dtype))
        return super()._initial_state(group, param, key)

    def _impl_unsupported(self, group, implementation):
        if implementation == "triton" and group["use_muon"] and (
                group["form"] == "normalized" or group["nesterov"]):
            return "only M3's literal form without nesterov has Triton kernels"
        return super()._impl_unsupported(group, implementation)

    def _validate_matrix_group(self, group):
        _check_triple("writes", group["writes"], 0.0, float("inf"))
        _check_triple("decays", group["decays"], 0.0, 1.0)
        check_number("alpha", group["alpha"], 0.0)
        check_number("eps", group["eps"], 0.0)
        check_number("ns_eps", group["ns_eps"], 0.0)
        check_number("weight_decay", group["weight_decay"], 0.0)
        check_int("chunk", group["chunk"], 1)
        check_choice("form", group["form"], dmf.M3_FORMS)
        check_flag("nesterov", group["nesterov"], allow_none=True)
        check_choice("adjust_lr_fn", group["adjust_lr_fn"], ADJUST_LR_FNS)
        if group["form"] == "literal" and group["adjust_lr_fn"] is not None:
            raise ValueError(f"Invalid adjust_lr_fn: {group['adjust_lr_fn']!r}; adjust_lr_fn "
                             "applies to form='normalized' only (the literal rule has no shape "
                             "factor): leave it None")

    def _matrix_rule(self, group):
        return dmf.m3, self.MATRIX_STATE

    def _matrix_options(self, group):
        return {"betas": tuple(group["writes"]), "decays": tuple(group["decays"])}


def muon_param_groups(
    model: nn.Module,
    *,
    adamw_modules: Iterable[type] = (nn.Embedding, nn.EmbeddingBag),
    exclude: Iterable[str] = HEAD_NAMES,
    muon_options: Optional[dict[str, Any]] = None,
    adamw_options: Optional[dict[str, Any]] = None,
) -> list[dict[str, Any]]:
    """Split a model's trainable parameters into a Muon group and an AdamW group.

    A parameter goes to the Muon (matrix) group when it has ≥ 2 dims, does not belong to a
    module of a type in ``adamw_modules`` (embeddings by default: their rows are looked up, not
    multiplied), and no part of its dotted name is in ``exclude`` (common names of output
    heads, whose shape is the vocabulary). Everything else — biases, norm gains, embeddings,
    the head — goes to the ``use_muon=False`` group. Parameters tied to two modules (an
    embedding shared with the head) are counted once, with the first module that owns them.

    Override by passing other ``adamw_modules``/``exclude``, or by building the groups by hand;
    ``muon_options``/``adamw_options`` are merged into the two groups (e.g. their ``lr``).
    Groups with no parameters are left out. Named parameters are used, so errors and
    ``state_dict`` carry the names.
    """
    exclude = set(exclude)
    adamw_types = tuple(adamw_modules)
    muon_params, adamw_params, seen = [], [], set()
    for module_name, module in model.named_modules():
        for param_name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            name = f"{module_name}.{param_name}" if module_name else param_name
            parts = set(name.split("."))
            is_matrix = p.ndim >= 2 and not isinstance(module, adamw_types) and not parts & exclude
            (muon_params if is_matrix else adamw_params).append((name, p))
    groups = []
    if muon_params:
        groups.append({"params": muon_params, "use_muon": True, **(muon_options or {})})
    if adamw_params:
        groups.append({"params": adamw_params, "use_muon": False, **(adamw_options or {})})
    return groups
