"""Shared ``torch.optim`` plumbing for every deepmomentum optimizer.

:class:`MemoryOptimizer` holds what all rules share, so a rule's class is only its
hyperparameters, its state and a call into :mod:`deepmomentum.functional`:

* hyperparameter validation per param group (``ValueError`` naming the argument and range);
* gathering parameters with gradients, rejecting sparse gradients and unsupported tensors by
  name, passing complex tensors through their real view;
* the ``foreach``/``fused`` switch with torch's meaning;
* state that keeps its own dtype through ``state_dict``/``load_state_dict`` (fp32 state of
  bf16 parameters stays fp32: torch's loader would cast it to bf16), compressed state
  (``state_dtype``: bf16, 8-bit; :mod:`deepmomentum.compressed`) stored and loaded bit for bit
  and converted on request;
* ``__setstate__`` that fills in hyperparameters added after a checkpoint was pickled.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Callable, Iterable, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from . import compressed, distributed
from . import functional as dmf
from . import kernels
from .distributed import local
from .functional import LOW_PRECISION_DTYPES, state_dtype

__all__ = ["MemoryOptimizer", "UnsupportedTensorError", "check_schedule", "IMPLEMENTATIONS",
           "WindowStats", "significant"]

#: The implementations a rule may have: the single-tensor reference (always), torch's
#: multi-tensor ops, torch's fused CPU kernel (only where the rule is torch's), the Triton
#: kernels (CUDA). A class lists those beyond "single" in ``supported_impls``.
IMPLEMENTATIONS = ("single", "foreach", "fused", "triton")


class UnsupportedTensorError(ValueError, RuntimeError):
    """A tensor this optimizer cannot update (sparse gradient, complex, wrong rank, …).

    A ``ValueError`` and a ``RuntimeError`` at once, so code written for torch's optimizers
    (which raise ``RuntimeError`` on sparse gradients) catches it too.
    """


# --- hyperparameter checks -------------------------------------------------------------------


def check_number(name: str, value: Any, low: float = -math.inf, high: float = math.inf, *,
                 low_open: bool = False, high_open: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``low (<)<= value (<)<= high``."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a 1-element tensor, got shape "
                             f"{tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if below or above:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"Invalid {name}: {value!r}; {name} must lie in {interval}")


def check_int(name: str, value: Any, low: int = 0, high: Optional[int] = None) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an integer (not a bool) in
    ``[low, high)`` (``high`` None: no upper bound)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (
            high is not None and value >= high):
        where = f"≥ {low}" if high is None else f"in [{low}, {high})"
        raise ValueError(f"Invalid {name}: {value!r}; {name} must be an integer {where}")


def check_choice(name: str, value: Any, choices: Iterable) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"Invalid {name}: {value!r}; {name} must be one of {choices}")


def check_flag(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {value!r}; {name} must be True or False"
                         + (" or None" if allow_none else ""))


ACCUMULATE_MODES = ("sum", "mean")
#: ``update_period="auto"``'s options and their defaults (every group has them).
AUTO_DEFAULTS = {"min_period": 1, "max_period": 64, "period_significance": 1.0}


def check_schedule(group: dict[str, Any]) -> None:
    """Validate a group's multi-frequency options (SPEC §7; ``update_period="auto"``)."""
    period = group["update_period"]
    check_choice("accumulate", group["accumulate"], ACCUMULATE_MODES)
    # Read, not set: a group without them (continuum_groups) takes its optimizer's defaults.
    auto = {key: group.get(key, value) for key, value in AUTO_DEFAULTS.items()}
    check_int("min_period", auto["min_period"], 1)
    check_int("max_period", auto["max_period"], auto["min_period"])
    check_number("period_significance", auto["period_significance"], 0.0, math.inf,
                 low_open=True, high_open=True)
    if period == "auto":
        if group["update_offset"] != 0:
            raise ValueError(f"Invalid update_offset: {group['update_offset']!r}; "
                             "update_period='auto' starts its first window at the first call: "
                             "update_offset must be 0")
        return
    if isinstance(period, bool) or not isinstance(period, int) or period < 1:
        raise ValueError(f"Invalid update_period: {period!r}; update_period must be an integer "
                         "≥ 1 or 'auto'")
    check_int("update_offset", group["update_offset"], 0, period)


def is_scheduled(group: dict[str, Any]) -> bool:
    """Whether the group accumulates its gradients (``update_period`` "auto" or > 1)."""
    return group["update_period"] == "auto" or group["update_period"] > 1


# --- the multi-frequency schedule (SPEC §7), shared by MemoryOptimizer and MultiFrequency ----


def accumulate_gradients(state, params: list[Tensor], grads: list[Tensor],
                         new_accumulator: Callable[[Tensor], Tensor]) -> None:
    """Add each gradient to its parameter's ``state[p]["grad_accumulator"]`` (created by
    ``new_accumulator(p)``): one fused launch on CUDA, the ``functional.accumulate`` stage
    elsewhere."""
    for p in params:
        if "grad_accumulator" not in state[p]:
            state[p]["grad_accumulator"] = new_accumulator(p)
    # FSDP2: each rank adds its own shards (DTensors with the same placement: no communication).
    accumulators = [local(state[p]["grad_accumulator"]) for p in params]
    grads = [local(g) for g in grads]
    params = [local(p) for p in params]
    if kernels.usable(params):
        from .kernels import elementwise

        elementwise.accumulate(accumulators, grads)
    else:
        dmf.accumulate(accumulators, grads)


def period_ends(group: dict[str, Any]) -> bool:
    """Count a ``step()`` call in ``group``'s period (``group["period_calls"]``); whether it
    ends one: ``(calls − update_offset) % update_period == 0``."""
    group["period_calls"] = group.get("period_calls", 0) + 1
    return (group["period_calls"] - group["update_offset"]) % group["update_period"] == 0


class WindowStats(NamedTuple):
    """What ``update_period="auto"`` knows of a window of ``calls`` gradients ``g_1 … g_n``
    (each a mini-batch mean) when it judges it: ``grad_sq_sum`` ``S = Σ_i ‖g_i‖²`` and
    ``sum_sq_norm`` ``Q = ‖Σ_i g_i‖²``, over the group's parameters."""

    calls: int
    grad_sq_sum: float
    sum_sq_norm: float


def significant(stats: WindowStats, significance: float) -> bool:
    """Whether a window's accumulated gradient is significant against its noise (the default
    criterion of ``update_period="auto"``).

    With ``g_i = G + ξ_i`` (``G`` the mean gradient, noise of covariance Σ, independent steps),
    ``E Q = n²‖G‖² + n tr Σ`` and ``E S = n‖G‖² + n tr Σ``, so ``(Q − S)/(n(n−1))`` and
    ``(nS − Q)/(n(n−1))`` are unbiased estimates of ``‖G‖²`` and ``tr Σ``. The window's mean
    ``Σ g_i / n`` has signal ``‖G‖²`` against noise ``tr Σ / n``; it fires when that ratio
    reaches ``κ = significance``:

        n (Q − S) ≥ κ (n S − Q),     i.e.  n ≥ κ · B_noise,  B_noise = tr Σ / ‖G‖²,

    the gradient noise scale (McCandlish et al. 2018) in steps, estimated in the window
    itself. A window of one step has no noise estimate: it never fires on its own
    (``max_period = 1`` still updates every call).
    """
    n, squares, total = stats
    if n < 2:
        return False
    return n * (total - squares) >= significance * (n * squares - total)


def window_ends(group: dict[str, Any], grads: Sequence, accumulators: Callable[[], list]
                ) -> bool:
    """Count a ``step()`` call in ``group``'s schedule; whether it ends its period (a fixed
    ``update_period``: :func:`period_ends`) or its window (``"auto"``: the window reaches
    ``max_period``, or it has ``min_period`` calls and :func:`significant` says so).

    ``grads``: this call's gradients; ``accumulators()``: the window's sums, this call's
    included (entries as :func:`distributed.squared_norm_sums` takes them). An "auto" group
    keeps ``window_calls`` (n) and ``window_sq_sum`` (S) and, when a window ends,
    ``last_period`` (its length) and ``auto_updates``: one host read per call until the
    window reaches ``max_period``.
    """
    if group["update_period"] != "auto":
        return period_ends(group)
    group["period_calls"] = group.get("period_calls", 0) + 1
    calls = group["window_calls"] = group.get("window_calls", 0) + 1
    fires = calls >= group["max_period"]
    if not fires:
        # The accumulator's norm only where the window is judged (at one call it is g's).
        judge = calls >= group["min_period"]
        read = judge and calls > 1
        sums = distributed.squared_norm_sums([grads, accumulators() if read else []])
        squares = group["window_sq_sum"] = float(group.get("window_sq_sum", 0.0)) + sums[0]
        fires = judge and significant(
            WindowStats(calls, squares, sums[1] if read else squares),
            group["period_significance"])
    if fires:
        group["last_period"] = calls
        group["auto_updates"] = group.get("auto_updates", 0) + 1
        group["window_calls"], group["window_sq_sum"] = 0, 0.0
    return fires


def window_length(group: dict[str, Any]) -> int:
    """The length of the period or window that has just ended."""
    period = group["update_period"]
    return group["last_period"] if period == "auto" else period


def release_gradients(group: dict[str, Any], state) -> tuple[list[Tensor], list[Tensor]]:
    """At a period's end: the group's parameters that received gradients during it, with
    their accumulated gradients (divided by the period's length for ``accumulate="mean"``),
    taken out of the state."""
    ready = [p for p in group["params"] if "grad_accumulator" in state.get(p, {})]
    grads = [state[p].pop("grad_accumulator") for p in ready]
    if group["accumulate"] == "mean":
        grads = [g.div_(window_length(group)) for g in grads]
    return ready, grads


def initializes_state(optimizer: torch.optim.Optimizer) -> bool:
    """Whether this ``step()`` is a state-initializing call: an optimizer with no state yet,
    every group at ``lr == 0`` and every gradient exactly zero — what
    ``torch.distributed.checkpoint.state_dict`` does to make a fresh optimizer's state exist
    before loading into it (``_init_optim_state``). Such a call initializes every group's
    state as torch's optimizers' first step does, whatever the group's ``update_period``: a
    group in the middle of its first period would otherwise hold only its accumulator, and
    DCP would load nothing else. (One host read, on an optimizer's first call only; under
    FSDP2 the ranks agree by one all-reduce.)"""
    if optimizer.state or any(float(g["lr"]) != 0 for g in optimizer.param_groups):
        return False
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if not grads:
        return False
    nonzero = torch.stack([local(g).count_nonzero().cpu() for g in grads]).sum()
    for process_group in distributed.process_groups(grads):
        nonzero = distributed.all_reduce_sum([nonzero.to(torch.float64)], process_group)[0]
    return int(nonzero) == 0


def _non_overlapping_and_dense(t: Tensor) -> bool:
    """Whether ``t``'s elements fill one block of memory exactly once (any dim order)."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _fused_layout_fits(param: Tensor, grad: Tensor, state: Optional[dict]) -> bool:
    """Whether torch's fused kernel computes the right thing for this tensor: the parameter
    dense and non-overlapping, the gradient and every state tensor laid out exactly as it.

    Strides and element count are compared, not shapes (``Tensor.shape`` costs ~3× a
    ``stride()`` call on this hot path): autograd already keeps ``.grad`` in the parameter's
    shape, state is created in it and ``load_state_dict`` refuses any other, and two dense
    tensors with the same strides and element count walk memory in the same index order.
    """
    param = local(param)
    strides = param.stride()
    if grad.stride() != strides or not _non_overlapping_and_dense(param):
        return False
    if state:
        numel = param.numel()
        for key, value in state.items():
            # 8-bit block scales are not of the parameter's shape; their codes are, and the
            # rule sees fp32 copies made in the codes' layout (compressed.decompress).
            if key != "step" and isinstance(value, Tensor) and not key.endswith("_scale"):
                value = local(value)
                if value.stride() != strides or value.numel() != numel:
                    return False
    return True


def _all_finite(tensors: list[Tensor], process_groups=()) -> bool:
    """Whether every entry of every tensor is finite (one reduction per device, one read).
    FSDP2 shards: of every rank's shards (an all-reduce per mesh dim), so all ranks skip
    together."""
    flags = [torch.isfinite(t).all() for t in tensors]
    finite = torch.stack([f.to(flags[0].device) for f in flags]).all()
    for group in process_groups:
        finite = distributed.all_reduce_max([(~finite).to(torch.float32)], group)[0] == 0
    return bool(finite)


class MemoryOptimizer(torch.optim.Optimizer):
    """Base class: a ``torch.optim.Optimizer`` whose step calls a functional rule.

    Group options every optimizer takes (constructor arguments, as the defaults of every
    group, and per group):

    * ``update_period`` (int ≥ 1, default 1), ``accumulate`` ("sum" or "mean"),
      ``update_offset`` (in [0, update_period), default 0): the multi-frequency schedule (SPEC
      §7) — the rule is applied once every ``update_period`` calls to the sum (or mean) of their
      gradients; see :meth:`step`.
    * ``update_period="auto"`` with ``min_period`` (int ≥ 1, default 1), ``max_period`` (int ≥
      ``min_period``, default 64) and ``period_significance`` (κ > 0, default 1): the group
      accumulates as with a fixed period and applies its rule when the window's accumulated
      gradient is significant against its noise — after ``n`` calls, when ``n ≥ κ·B_noise``,
      the gradient noise scale in steps estimated from the window's own gradients
      (:func:`significant`) — or when the window reaches ``max_period`` calls. The mean divides
      by the window's length. The group keeps its window (``window_calls``, ``window_sq_sum``)
      and the length of its last one (``last_period``) and counts its updates
      (``auto_updates``); one host read per call.
    * ``skip_nonfinite`` (bool, default False): a call whose gradients hold a NaN or inf leaves
      the group's parameters and state untouched and adds one to its ``nonfinite_skips`` (one
      host read per step).
    * ``state_dtype`` (``torch.float32`` default, ``torch.bfloat16`` or ``"8bit"``): how the
      group's memories (momenta, second moments, M3's slow memory, the multi-frequency
      accumulator, DMGD's memory weights; never step counts) are stored. A step reads them
      into fp32, runs the rule unchanged and writes them back rounded stochastically; 8-bit
      is blockwise absmax (blocks of 256 along a row, a square-root code for signed memories
      and a fourth-root code for second moments). See :mod:`deepmomentum.compressed`.
    * ``param_rounding`` (``"nearest"`` default, ``"kahan"``, ``"stochastic"``): how a
      bf16/fp16 parameter takes its fp32 update, without an fp32 master copy — rounded to
      nearest, with a Kahan compensation buffer (the ``compensation`` state entry, in the
      parameter's dtype), or stochastically (bf16).

    A subclass declares its rule and leaves the rest here:

    * :meth:`_validate_group` — the hyperparameters of one group;
    * :meth:`_rule` — the functional rule of a group and the state entries it takes, in its
      argument order; the group's options reach the rule by the rule's keyword names
      (:meth:`_rule_options` adds the derived ones, e.g. ``betas`` → ``beta1, beta2``);
    * :meth:`_state_shapes` — every state entry it keeps, with its shape (checkpoints are
      checked against it); state is created as zeros in the parameter's state dtype and
      layout (:meth:`_initial_state`), except the entries in ``LAZY_STATE``, which the rule
      creates on a parameter's first update (``b₁ = g₁``, as torch's SGD);
    * ``supported_impls`` and :meth:`_impl_unsupported` — the implementations it has.
    """

    #: Whether the rule is elementwise, so complex parameters can go through their real view.
    supports_complex: bool = True
    #: Implementations beyond the single-tensor reference (see :data:`IMPLEMENTATIONS`), as
    #: torch's ``OptimizerInfo.supported_impls``.
    supported_impls: tuple[str, ...] = ("foreach",)
    #: State entries the rule creates itself on a parameter's first update.
    LAZY_STATE: tuple[str, ...] = ()
    #: State entries that are not of the parameter's shape in kind (DMGD's memories), whatever
    #: their shape: under FSDP2 every rank holds them whole (replicated), never a shard.
    REPLICATED_STATE: tuple[str, ...] = ()

    #: Group options every optimizer takes. SPEC §7: a group with ``update_period = C``
    #: accumulates its gradients and applies its rule once every C ``step()`` calls.
    #: ``skip_nonfinite``: a call whose gradients hold a NaN or ±inf leaves the group's
    #: parameters and state untouched and adds one to the group's ``nonfinite_skips`` (one
    #: host read per step; off by default, as in torch).
    #: ``state_dtype``/``param_rounding``: compressed memories and 16-bit parameters without
    #: an fp32 master copy (:mod:`deepmomentum.compressed`).
    GROUP_DEFAULTS = {"update_period": 1, "accumulate": "sum", "update_offset": 0,
                      **AUTO_DEFAULTS, "skip_nonfinite": False, "state_dtype": torch.float32,
                      "param_rounding": "nearest"}
    #: Group keys a class sets beyond its constructor's arguments (Muon's AdamW groups).
    GROUP_KEYS: tuple[str, ...] = ()

    def __init__(self, params, defaults: dict[str, Any]):
        if isinstance(params, Tensor):  # torch's wording (code matches it), then the hint
            raise TypeError("params argument given to the optimizer should be an iterable of "
                            f"Tensors or dicts, but got {torch.typename(params)}; pass [tensor] "
                            "or model.parameters()")
        super().__init__(params, {**self.GROUP_DEFAULTS, **defaults})

    @staticmethod
    def _group_defaults(arguments: dict[str, Any]) -> dict[str, Any]:
        """A constructor's group defaults from its ``locals()`` (taken first thing): every
        argument but ``params``. Each argument of the signature — the class's own and the
        shared ``update_period``/``accumulate``/``update_offset``/``skip_nonfinite`` — is a
        group default without being typed a second time."""
        return {name: value for name, value in arguments.items()
                if name not in ("self", "params", "__class__")}

    # --- groups ------------------------------------------------------------------------------

    #: Counters a group keeps (its schedule's calls, its skipped calls), present from the
    #: start so that a checkpoint template (DCP loads only the keys a fresh optimizer has)
    #: carries them.
    #: ``rounding_calls`` counts the calls that wrote compressed state or stochastically rounded
    #: parameters: the seed of their random bits (:func:`compressed.seed_of`).
    #: ``window_calls``, ``window_sq_sum``, ``last_period``, ``auto_updates``: the window of
    #: ``update_period="auto"`` (:func:`window_ends`).
    GROUP_COUNTERS = ("period_calls", "nonfinite_skips", "rounding_calls", "window_calls",
                      "window_sq_sum", "last_period", "auto_updates")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for counter in self.GROUP_COUNTERS:
            group.setdefault(counter, 0)
        try:
            self._validate_common(group)
            self._validate_group(group)
        except ValueError:
            self.param_groups.pop()  # leave the optimizer as it was
            raise

    def _validate_common(self, group: dict[str, Any]) -> None:
        check_number("lr", group["lr"], 0.0)
        check_schedule(group)
        check_flag("maximize", group["maximize"])
        check_flag("skip_nonfinite", group["skip_nonfinite"])
        group["state_dtype"] = compressed.canonical_state_dtype(group["state_dtype"])
        check_choice("param_rounding", group["param_rounding"], compressed.PARAM_ROUNDINGS)
        if group["param_rounding"] == "stochastic":
            for p in group["params"]:
                if p.dtype == torch.float16:
                    raise ValueError(
                        "param_rounding='stochastic' rounds to bfloat16 only; "
                        f"{self._param_name(len(self.param_groups) - 1, p)} is float16: use "
                        "param_rounding='kahan' for it")
        check_flag("foreach", group["foreach"], allow_none=True)
        check_flag("fused", group["fused"], allow_none=True)
        if group["foreach"] and group["fused"]:
            raise ValueError("foreach and fused cannot both be True")
        reason = self._impl_unsupported(group, "fused") if group["fused"] else None
        if reason is not None:  # no fused CPU kernel: only a Triton path, if any
            if not self._has_triton_path(group):
                raise ValueError(f"fused=True is not available for {type(self).__name__}: "
                                 f"{reason}. Use fused=None (automatic) or foreach=True.")
            index = len(self.param_groups) - 1
            for p in group["params"]:
                if not p.is_cuda:
                    raise ValueError(
                        f"fused=True is not available for {type(self).__name__} on "
                        f"{p.device.type} tensors ({self._param_name(index, p)}): {reason}; its "
                        "only fused path is the Triton kernel for CUDA tensors. Use fused=None "
                        "(automatic) or foreach=True.")

    def _validate_group(self, group: dict[str, Any]) -> None:
        raise NotImplementedError

    def _impl_unsupported(self, group: dict[str, Any], implementation: str) -> Optional[str]:
        """Why this group has no ``implementation`` ("fused": torch's CPU kernel; "triton":
        the CUDA kernels), or None where it has one. Subclasses add the settings their kernels
        do not cover."""
        if implementation == "single" or implementation in self.supported_impls:
            return None
        what = {"fused": "fused CPU kernel", "triton": "Triton kernel"}.get(implementation,
                                                                            implementation)
        return f"no {what} exists for this rule"

    @classmethod
    def _signature_defaults(cls) -> dict[str, Any]:
        """Constructor defaults, read from the signature: the single source of truth used to
        fill groups unpickled from an older version (``__setstate__``)."""
        sig = inspect.signature(cls.__init__)
        return {
            **cls.GROUP_DEFAULTS,
            **{name: p.default for name, p in sig.parameters.items()
               if name not in ("self", "params") and p.default is not inspect.Parameter.empty},
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for key, value in self._signature_defaults().items():
            self.defaults.setdefault(key, value)
            for group in self.param_groups:
                group.setdefault(key, value)

    # --- tensors -----------------------------------------------------------------------------

    def _param_name(self, group_index: int, param: Tensor) -> str:
        group = self.param_groups[group_index]
        for i, p in enumerate(group["params"]):
            if p is param:
                names = group.get("param_names")
                where = f"param_groups[{group_index}]['params'][{i}]"
                shape = f"shape {tuple(p.shape)}, dtype {p.dtype}"
                return f"'{names[i]}' ({where}, {shape})" if names else f"{where} ({shape})"
        return f"a tensor of shape {tuple(param.shape)}"

    def _check_params(self, group_index: int, params: list[Tensor], grads: list[Tensor]) -> None:
        """Reject what this rule cannot update, naming the first such tensor. The dtype checks
        run once per dtype: this is on every step's path."""
        for p, g in zip(params, grads):
            if g.layout != torch.strided:
                raise UnsupportedTensorError(
                    f"{type(self).__name__} does not support sparse gradients; "
                    f"{self._param_name(group_index, p)} has one")
        first_of_dtype: dict[torch.dtype, Tensor] = {}
        for p in params:
            first_of_dtype.setdefault(p.dtype, p)
        for dtype, p in first_of_dtype.items():
            if dtype.is_complex and not self.supports_complex:
                raise UnsupportedTensorError(
                    f"{type(self).__name__} does not support complex parameters; "
                    f"{self._param_name(group_index, p)} is complex")
            if not (dtype.is_floating_point or dtype.is_complex):
                raise UnsupportedTensorError(
                    f"{self._param_name(group_index, p)} is not floating point")

    @staticmethod
    def _real(t: Optional[Tensor]) -> Optional[Tensor]:
        return torch.view_as_real(t) if t is not None and t.is_complex() else t

    @staticmethod
    def _like_param(t: Tensor, param: Tensor) -> Tensor:
        """Store a buffer created on the real view in the parameter's own (complex) form."""
        return torch.view_as_complex(t) if param.is_complex() and not t.is_complex() else t

    @staticmethod
    def _new_state_tensor(param: Tensor) -> Tensor:
        """A zero buffer of the parameter's shape in its state dtype (fp32 for bf16/fp16)."""
        dtype = param.dtype if param.is_complex() else state_dtype(param.dtype)
        return torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)

    def _implementation(self, group: dict[str, Any], params: list[Tensor]) -> str:
        """The one dispatcher: 'triton', 'fused', 'foreach' or 'single' for this group's
        tensors, with torch's meaning of the flags, among the implementations the class
        declares (``supported_impls``, :meth:`_impl_unsupported`). The Triton kernels where
        the tensors take them (CUDA) and ``fused`` is not False. Default: torch's fused CPU
        kernel where the rule is torch's and dtypes allow it; otherwise the single-tensor
        loop on CPU (torch's foreach ops are slower there: see
        benchmarks/step_time_cpu.py) and foreach on accelerators. Under ``torch.compile`` the
        automatic choice is foreach: torch's fused kernels cannot be traced."""
        if group["fused"] is not False and self._has_triton_path(group) and \
                kernels.usable(params):
            return "triton"
        kinds: dict[tuple, Tensor] = {}  # one check per kind of tensor, naming its first
        for p in params:
            kinds.setdefault((p.device.type, p.dtype), p)
        if group["fused"]:
            reason = self._impl_unsupported(group, "fused")
            if reason is not None:  # only the Triton path exists, and these tensors can't take it
                raise UnsupportedTensorError(
                    f"fused=True: {reason} for these tensors; the Triton kernels take "
                    "contiguous fp32/bf16/fp16 CUDA tensors (first: "
                    f"{self._param_name(self._group_index(group), params[0])})")
            for (device_type, dtype), p in kinds.items():
                reason = self._fused_tensor_unsupported(device_type, dtype)
                if reason:
                    raise UnsupportedTensorError(
                        f"fused=True cannot update {self._param_name(self._group_index(group), p)}"
                        f": {reason}")
            return "fused"
        if group["foreach"] is not None:
            return "foreach" if group["foreach"] else "single"
        if torch.compiler.is_compiling():
            # torch's fused CPU kernels have no fake/functional implementation, so they cannot
            # be traced; the multi-tensor path compiles to one graph (no host reads).
            return "foreach"
        if group["fused"] is None and self._impl_unsupported(group, "fused") is None and not any(
            self._fused_tensor_unsupported(*kind) for kind in kinds
        ):
            return "fused"
        return "single" if all(device_type == "cpu" for device_type, _ in kinds) else "foreach"

    def _has_triton_path(self, group: dict[str, Any]) -> bool:
        return self._impl_unsupported(group, "triton") is None and kernels.triton_available()

    def _fused_tensor_unsupported(self, device_type: str, dtype: torch.dtype) -> Optional[str]:
        # torch's fused CPU kernels keep state in the parameter's dtype; ours is fp32 for
        # 16-bit parameters, and our step counters live on the CPU.
        if device_type != "cpu":
            return f"no fused kernel for {device_type} tensors yet"
        if dtype.is_complex:
            return "complex parameters have no fused kernel"
        if state_dtype(dtype) != dtype:
            return f"{dtype} parameters keep float32 state, which torch's kernel cannot"
        return None

    def _group_index(self, group: dict[str, Any]) -> int:
        return next(i for i, g in enumerate(self.param_groups) if g is group)

    # --- step --------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss.

        A group with ``update_period = C > 1`` adds its gradients to an accumulator in the
        optimizer state on every call and applies its rule to the accumulated gradient (the sum,
        or the mean over C with ``accumulate="mean"``) on the calls where
        ``(calls − update_offset) % C == 0``; on the other calls neither the parameters nor the
        rule's state change. ``.grad`` is never written: ``zero_grad()`` clears the user's
        gradients, not the accumulator. LR schedulers see every call.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # GradScaler (we set _step_supports_amp_scaling) hands us grad_scale and found_inf and
        # leaves the gradients scaled: skip the step on inf, else unscale out of place.
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None:
            # FSDP2: a rank's shards may hold the inf alone; every rank must skip with it (a
            # rank that stepped alone would wait in the matrix stages' collectives).
            everyone = distributed.process_groups(
                [p for g in self.param_groups for p in g["params"]])
            for process_group in everyone:
                found_inf = distributed.all_reduce_max([found_inf.float().reshape(())],
                                                       process_group)[0]
            if found_inf.item() != 0:
                return loss
        # Not while compiling: DCP's state-initializing call is eager, and reading the state
        # before the groups makes dynamo guard every .grad by identity (a recompile per step).
        initializing = not torch.compiler.is_compiling() and initializes_state(self)
        for index, group in enumerate(self.param_groups):
            params, grads = [], []
            for p in group["params"]:
                grad = p.grad
                if grad is not None:
                    params.append(p)
                    grads.append(grad)
            self._check_params(index, params, grads)
            # FSDP2: the rule sees each rank's local shards (deepmomentum.distributed).
            shards = distributed.shards_of(params, functools.partial(self._param_name, index),
                                           grads, matrices=self._has_matrix_stages(group))
            if shards is not None:
                grads = [local(g) for g in grads]
            if grad_scale is not None and grads:
                inverse = grad_scale.double().reciprocal().float()  # on its device: no sync
                grads = [g * inverse.to(g.device) for g in grads]
            if group["skip_nonfinite"] and params and not _all_finite(
                    grads, distributed.process_groups(params) if shards is not None else ()):
                group["nonfinite_skips"] = group.get("nonfinite_skips", 0) + 1
                continue  # a poisoned gradient never reaches the memories
            if params and self._rounds(group):  # the seed of this call's random bits
                group["rounding_calls"] = group.get("rounding_calls", 0) + 1
            if is_scheduled(group) and initializing:  # accumulators (zeros) too
                self._add_to_accumulators(group, params, grads, shards)
            elif is_scheduled(group):
                ready, grads = self._accumulate(group, params, grads, shards)
                if shards is not None and len(ready) != len(params):
                    keep = {id(p) for p in ready}
                    shards = [s for p, s in zip(params, shards) if id(p) in keep]
                params = ready
            if params:
                implementation = self._implementation(
                    group, params if shards is None else [local(p) for p in params])
                if implementation == "fused":
                    self._update_fused(group, params, grads, shards)
                else:
                    self._update(group, params, grads, implementation, shards)
                if is_scheduled(group):
                    self._zero_accumulators(group, params, shards)
        return loss

    def _zero_accumulators(self, group: dict[str, Any], params: list[Tensor],
                           shards: Optional[list]) -> None:
        """After a period's update, fresh zero accumulators (in the stored form) for the
        parameters it released: a scheduled group has one at every call, at a period's end too,
        as DCP's template of a fresh optimizer has (its state-initializing call makes them).
        Fresh tensors, after the update: the rule may keep the released ones (a first
        momentum is the gradient itself), and the peak stays one accumulator per parameter."""
        key = "grad_accumulator"
        for i, p in enumerate(params):
            state = self.state[p]
            if key in state:
                continue
            if self._form(group, key, p) == "full":
                state[key] = self._new_state_tensor(p)
                continue
            zeros = torch.zeros_like(local(p), dtype=torch.float32,
                                     memory_format=torch.preserve_format)
            self._write_memory(group, key, p, state, zeros, None,
                               None if shards is None else shards[i])

    def _update_fused(self, group, params, grads, shards=None) -> None:
        """torch's fused kernels walk raw memory and check neither shapes nor strides: they
        get only the tensors that are dense and non-overlapping with gradient and state in the
        parameter's exact layout; the others take the single-tensor reference."""
        fits = [_fused_layout_fits(p, g, self.state.get(p)) for p, g in zip(params, grads)]
        if all(fits):
            self._update(group, params, grads, "fused", shards)
            return
        for take, implementation in ((True, "fused"), (False, "single")):
            idx = [i for i, fit in enumerate(fits) if fit == take]
            if idx:
                self._update(group, [params[i] for i in idx], [grads[i] for i in idx],
                             implementation, None if shards is None else [shards[i] for i in idx])

    #: GradScaler may pass grad_scale/found_inf instead of unscaling (see step()).
    _step_supports_amp_scaling = True

    def _accumulate(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                    shards: Optional[list] = None):
        """Add this call's gradients to the group's accumulators; at a period boundary return
        the parameters that received gradients with their accumulated gradients (and clear the
        accumulators), else nothing."""
        self._add_to_accumulators(group, params, grads, shards)

        def accumulators():  # fp32 local shards, each laid out as its parameter
            return [(self._read_memory(group, "grad_accumulator", p, self.state[p]), p)
                    for p in group["params"] if "grad_accumulator" in self.state.get(p, {})]

        if not window_ends(group, list(zip(grads, params)), accumulators):
            return [], []
        if compressed.is_compressed(group["state_dtype"]):  # fp32 copies of the stored sums
            for p in group["params"]:
                state = self.state.get(p, {})
                if "grad_accumulator" in state:
                    work = self._read_memory(group, "grad_accumulator", p, state)
                    state.pop("grad_accumulator_scale", None)
                    state["grad_accumulator"] = work  # local: release_gradients pops it
        ready, grads = release_gradients(group, self.state)
        grads = [local(g) for g in grads]
        # Torch's fused kernels want the gradient in the parameter's dtype.
        grads = [g if g.dtype == p.dtype or p.dtype in LOW_PRECISION_DTYPES else g.to(p.dtype)
                 for p, g in zip(ready, grads)]
        return ready, grads

    def _has_matrix_stages(self, group: dict[str, Any]) -> bool:
        """Whether the group's rule has stages that need a whole matrix (Newton–Schulz, key
        Grams, DMGD's inner step): under FSDP2 these take only Shard(0) parameters, while an
        elementwise rule takes any Shard/Replicate placement."""
        return False

    def _rule(self, group: dict[str, Any]) -> tuple[Callable, tuple[Optional[str], ...]]:
        """The functional rule that updates ``group`` and the state entries it takes after
        ``params`` and ``grads``, in its argument order (None: a list the group does not keep,
        passed as Nones)."""
        raise NotImplementedError

    def _rule_options(self, group: dict[str, Any]) -> dict[str, Any]:
        """Rule arguments derived from the group (its keys of the rule's names pass as they
        are)."""
        return {}

    def _rule_inputs(self, group: dict[str, Any], params: list[Tensor]) -> list:
        """Further per-tensor lists the rule takes after the state (DeltaMomentum's keys)."""
        return []

    def _initial_state(self, group: dict[str, Any], param: Tensor, key: str) -> Tensor:
        """A state entry as a parameter starts it: zeros in its state dtype and layout."""
        return self._new_state_tensor(param)

    # --- compressed state (deepmomentum.compressed) ------------------------------------------

    #: State entries that are second moments (≥ 0): their 8-bit code is unsigned.
    NONNEGATIVE_STATE: tuple[str, ...] = ("exp_avg_sq",)
    #: Parameters per compressed update at most (in elements): the fp32 working copies of the
    #: memories exist for one such chunk at a time, so compression lowers the peak too.
    COMPRESSED_CHUNK = 1 << 24

    @staticmethod
    def _rounds(group: dict[str, Any]) -> bool:
        """Whether the group writes compressed state or rounds parameters stochastically."""
        return compressed.is_compressed(group["state_dtype"]) or \
            group["param_rounding"] != "nearest"

    def _memories(self, group: dict[str, Any]) -> tuple[str, ...]:
        """The state entries ``state_dtype`` compresses: the rule's memories and the
        multi-frequency accumulator (not step counts, not DeltaMomentum's pending keys)."""
        _, keys = self._rule(group)
        return tuple(k for k in keys if k is not None) + ("grad_accumulator",)

    def _form(self, group: dict[str, Any], key: str, param: Tensor) -> str:
        """How ``key`` of ``param`` is stored under the group's ``state_dtype``."""
        if not compressed.is_compressed(group["state_dtype"]):
            return "full"
        return compressed.stored_form(group["state_dtype"], self._state_shapes(group, param)[key])

    def _read_memory(self, group: dict[str, Any], key: str, param: Tensor,
                     state: dict) -> Tensor:
        """The fp32 working copy (local shard) of a stored memory; the stored tensor itself
        where it is kept in full precision."""
        stored = local(state[key])
        if self._stored_form(group, key, param, state) == "full":
            return stored
        return compressed.decompress(stored, local(state.get(f"{key}_scale")))

    def _stored_form(self, group: dict[str, Any], key: str, param: Tensor, state: dict) -> str:
        """:meth:`_form`, read off an entry that exists (no shapes needed on the step path)."""
        if key not in state:
            return self._form(group, key, param)
        if f"{key}_scale" in state:
            return "8bit"
        return "bf16" if group["state_dtype"] is torch.bfloat16 else "full"

    def _write_memory(self, group: dict[str, Any], key: str, param: Tensor, state: dict,
                      work: Tensor, seed: Optional[int], shard) -> None:
        """Store the fp32 working copy ``work`` of ``key`` in the group's form (creating the
        entries on a first write), rounding stochastically with ``seed`` (None: to nearest)."""
        self._write_memories(group, key, [(param, state, work, shard)],
                             None if seed is None else [seed])

    def _write_memories(self, group: dict[str, Any], key: str, entries: list,
                        seeds: Optional[list[int]], kernel: bool = False) -> None:
        """:meth:`_write_memory` of ``(param, state, work, shard)`` entries, compressed per
        stored form in one pass over their concatenation (:func:`compressed.compress_many`;
        ``kernel``: one Triton launch, :func:`deepmomentum.kernels.compressed.compress`)."""
        whole = key in self.REPLICATED_STATE
        by_form: dict[str, list] = {}
        for i, (param, state, work, shard) in enumerate(entries):
            form = self._stored_form(group, key, param, state)
            if form != "full":
                by_form.setdefault(form, []).append(i)
            elif key not in state:
                state[key] = distributed.like_param(self._like_param(work, local(param)), param,
                                                    None if whole else shard)
        for form, idx in by_form.items():
            offsets = []
            for i in idx:
                shard = entries[i][3]
                offsets.append(0 if whole or shard is None else
                               shard.offset * math.prod(shard.shape[1:]))
            if kernel:
                from .kernels import compressed as fused

                many = fused.compress
            else:
                many = compressed.compress_many
            stored = many([entries[i][2] for i in idx], form, key not in self.NONNEGATIVE_STATE,
                          None if seeds is None else [seeds[i] for i in idx], offsets)
            for i, (codes, scale) in zip(idx, stored):
                param, state, work, _ = entries[i]
                if key in state:
                    local(state[key]).copy_(codes)
                    if scale is not None:
                        local(state[f"{key}_scale"]).copy_(scale)
                    continue
                out = torch.empty_like(work, dtype=codes.dtype,
                                       memory_format=torch.preserve_format)
                state[key] = distributed.stored_like(out.copy_(codes), param, whole)
                if scale is not None:
                    state[f"{key}_scale"] = distributed.stored_like(scale, param, whole)

    def _seed(self, group: dict[str, Any], param: Tensor, key: str) -> int:
        """The seed of ``key``'s write for ``param`` in this call (:func:`compressed.seed_of`)."""
        positions = getattr(self, "_positions", None)
        if positions is None or positions[0] is not group["params"] or \
                len(positions[1]) != len(group["params"]):
            positions = (group["params"], {id(p): i for i, p in enumerate(group["params"])})
            self._positions = positions
        return compressed.seed_of(group.get("rounding_calls", 0), self._group_index(group),
                                  positions[1][id(param)], key)

    def _add_to_accumulators(self, group: dict[str, Any], params: list[Tensor],
                             grads: list[Tensor], shards: Optional[list]) -> None:
        """Add this call's gradients to the accumulators (``update_period > 1``), stored in the
        group's ``state_dtype``."""
        if not compressed.is_compressed(group["state_dtype"]):
            accumulate_gradients(self.state, params, grads, self._new_state_tensor)
            return
        key = "grad_accumulator"
        full = [i for i, p in enumerate(params)
                if self._stored_form(group, key, p, self.state[p]) == "full"]
        if full:
            accumulate_gradients(self.state, [params[i] for i in full],
                                 [grads[i] for i in full], self._new_state_tensor)
        for i, (p, g) in enumerate(zip(params, grads)):
            if i in full:
                continue
            state = self.state[p]
            work = self._read_memory(group, key, p, state) if key in state else \
                torch.zeros_like(local(p), dtype=torch.float32,
                                 memory_format=torch.preserve_format)
            work.add_(local(g))
            self._write_memory(group, key, p, state, work, self._seed(group, p, key),
                               None if shards is None else shards[i])

    def _chunks(self, params: list[Tensor]) -> list[list[int]]:
        """Consecutive runs of ``params`` of at most :attr:`COMPRESSED_CHUNK` elements (one
        larger tensor alone); by global sizes, so every FSDP2 rank cuts alike."""
        chunks, size = [[]], 0
        for i, p in enumerate(params):
            if chunks[-1] and size + p.numel() > self.COMPRESSED_CHUNK:
                chunks.append([])
                size = 0
            chunks[-1].append(i)
            size += p.numel()
        return chunks

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                implementation: str, shards: Optional[list] = None) -> None:
        """One update of ``params`` by the group's rule; with compressed state or rounded
        parameters (:meth:`_rounds`), chunk by chunk through fp32 working copies."""
        if not self._rounds(group):
            self._apply_rule(group, params, grads, implementation, shards)
            return
        for idx in self._chunks(params):
            pick = (lambda xs: [xs[i] for i in idx]) if len(idx) < len(params) else list
            self._update_compressed(group, pick(params), pick(grads), implementation,
                                    None if shards is None else pick(shards))

    def _update_compressed(self, group: dict[str, Any], params: list[Tensor],
                           grads: list[Tensor], implementation: str,
                           shards: Optional[list]) -> None:
        """:meth:`_apply_rule` on fp32 working copies: each compressed memory read into fp32,
        16-bit parameters (``param_rounding`` "kahan"/"stochastic") as fp32 copies (plus their
        compensation), the rule's arithmetic unchanged, then everything stored back rounded."""
        rule, keys = self._rule(group)
        if implementation == "triton" and compressed.is_compressed(group["state_dtype"]):
            rest = self._fused_compressed(group, rule, keys, params, grads, shards)
            if len(rest) < len(params):  # the others (fp32 memories) as below
                params, grads = [params[i] for i in rest], [grads[i] for i in rest]
                shards = None if shards is None else [shards[i] for i in rest]
                if not params:
                    return
        states = [self.state[p] for p in params]
        index = self._group_index(group)
        for p in params:
            if p.is_complex() and compressed.is_compressed(group["state_dtype"]):
                raise UnsupportedTensorError(
                    f"state_dtype={group['state_dtype']!r} cannot store the state of complex "
                    f"{self._param_name(index, p)}: compressed state is real; put complex "
                    "parameters in a group with state_dtype=torch.float32")
        # On CUDA, reading and writing take one multi-tensor kernel per entry and form, whatever
        # kernels the rule itself has.
        kernel = compressed.is_compressed(group["state_dtype"]) and \
            kernels.usable([local(p) for p in params])
        lists = []
        for key in keys:
            column, pending = [], []
            for i, (p, state) in enumerate(zip(params, states)):
                if key is None:
                    column.append(None)
                elif key in state:
                    if kernel and self._stored_form(group, key, p, state) != "full":
                        pending.append(i)
                        column.append(None)  # filled below
                    else:
                        column.append(self._real(self._read_memory(group, key, p, state)))
                elif key in self.LAZY_STATE:
                    column.append(None)
                else:
                    initial = distributed.state_like(self._initial_state(group, p, key), p)
                    if self._stored_form(group, key, p, state) == "full":
                        state[key] = initial  # the rule writes it in place
                    column.append(self._real(local(initial)))
            if pending:
                from .kernels import compressed as fused

                works = fused.decompress([local(states[i][key]) for i in pending],
                                         [local(states[i].get(f"{key}_scale")) for i in pending])
                for i, work in zip(pending, works):
                    column[i] = work
            lists.append(column)
        rounding = group["param_rounding"]
        works = []
        for p, state in zip(params, states):
            mine = local(p)
            if mine.dtype in LOW_PRECISION_DTYPES and rounding != "nearest":
                work = mine.float()
                if rounding == "kahan" and "compensation" in state:
                    work.add_(local(state["compensation"]))
                works.append(work)
            else:
                works.append(self._real(mine))
        self._run_rule(group, rule, params, works, grads, lists, implementation, shards)
        for key, values in zip(keys, lists):
            if key is None:
                continue
            written = [i for i, value in enumerate(values) if value is not None]
            self._write_memories(
                group, key, [(params[i], states[i], values[i],
                              None if shards is None else shards[i]) for i in written],
                [self._seed(group, params[i], key) for i in written], kernel=kernel)
        for i, (p, state, work) in enumerate(zip(params, states, works)):
            mine = local(p)
            if work.dtype == mine.dtype or mine.is_complex():
                continue
            shard = None if shards is None else shards[i]
            offset = 0 if shard is None else shard.offset * math.prod(shard.shape[1:])
            if rounding == "kahan":
                rounded = work.to(mine.dtype)
                error = work.sub_(rounded)  # what rounding dropped, exact in fp32
                # The compensation is rounded stochastically (bf16): rounded to nearest, its
                # own errors add up with a sign under a steady update (measured: 3% of the
                # total change after 500 sub-ulp steps), stochastically they cancel.
                error = compressed.round_bf16(error, compressed.uniform_bits(
                    error.numel(), self._seed(group, p, "compensation"), offset,
                    error.device)) if mine.dtype == torch.bfloat16 else error.to(mine.dtype)
                mine.copy_(rounded)
                if "compensation" in state:
                    local(state["compensation"]).copy_(error)
                else:
                    state["compensation"] = distributed.like_param(
                        error, p, None if shards is None else shards[i])
            else:
                bits = compressed.uniform_bits(work.numel(), self._seed(group, p, "param"),
                                               offset, work.device)
                mine.copy_(compressed.round_bf16(work, bits))
        for p, state in zip(params, states):
            if not state:
                del self.state[p]

    def _fused_compressed(self, group: dict[str, Any], rule, keys, params: list[Tensor],
                          grads: list[Tensor], shards: Optional[list]) -> list[int]:
        """The Triton kernels that read and write compressed memories in one pass
        (:mod:`deepmomentum.kernels.compressed`) for the parameters whose memories are stored
        compressed; the indices of the others, which take the codec path (decompress → the
        rule's own kernels on fp32 copies → compress).

        Adam-style and SGD-momentum rules: the whole step in one kernel (``adam_step``,
        ``sgd_step``), every ``param_rounding``. Muon (:meth:`_fused_muon`): its momentum in
        one pass (``ema_step``), then the rule's own batched Newton–Schulz and apply kernel;
        its parameters that need rounding work (16-bit with ``param_rounding`` "kahan" or
        "stochastic") and FSDP2 shards take the codec path. Each kernel is the rule's
        single-tensor torch arithmetic op for op, so the memories it writes are the torch
        path's, bit for bit where torch's ops are correctly rounded; Muon's step is also the
        codec path's, parameters included (``elementwise.ema_momentum`` is the same ``lerp``;
        the same NS on the same fp32 update, the same apply kernel).

        The other rules stay on the codec path. DeltaMomentum's erase term ``b·K`` and DMGD's
        memory step read the whole fp32 memory in a matmul before its write, so no elementwise
        pass can read, update and requantize it at once; M3's default normalized form has no
        Triton kernel at all, and its literal form's write (``elementwise.m3_write``) is not
        fused with the codec yet."""
        if rule is dmf.preconditioned_momentum:
            kind = "adam"
        elif rule is dmf.associative_momentum:
            kind = "sgd"
        elif rule is dmf.muon:
            return self._fused_muon(group, keys, params, grads, shards)
        else:
            return list(range(len(params)))
        from .kernels import compressed as fused

        states = [self.state[p] for p in params]
        by_form: dict[str, list[int]] = {}
        rest = []
        for i, (p, state) in enumerate(zip(params, states)):
            form = self._stored_form(group, keys[0], p, state)
            (rest if form == "full" else by_form.setdefault(form, [])).append(i)
        options = {**_keyword_defaults(rule), **_rule_keywords(rule, group),
                   **self._rule_options(group)}
        options["lr"] = dmf._scalar(options["lr"])
        rounding = group["param_rounding"]
        for form, idx in by_form.items():
            ps = [params[i] for i in idx]
            sts = [states[i] for i in idx]
            shard = [None if shards is None else shards[i] for i in idx]
            offsets = [0 if s is None else s.offset * math.prod(s.shape[1:]) for s in shard]
            seeds = lambda key: [self._seed(group, p, key) for p in ps]  # noqa: E731
            extra = {"param_rounding": rounding, "offsets": offsets}
            if rounding == "stochastic":
                extra["param_seeds"] = seeds("param")
            if rounding == "kahan":
                for p, st, sh in zip(ps, sts, shard):
                    if p.dtype in LOW_PRECISION_DTYPES and "compensation" not in st:
                        st["compensation"] = distributed.like_param(
                            torch.zeros_like(local(p)), p, sh)
                extra["compensations"] = [local(st["compensation"]) if "compensation" in st
                                          else local(p) for p, st in zip(ps, sts)]
                extra["compensation_seeds"] = seeds("compensation")
            stored = lambda key: [local(st[key]) for st in sts]  # noqa: E731
            scales = lambda key: [local(st[f"{key}_scale"]) for st in sts] \
                if form == "8bit" else None  # noqa: E731
            locals_ = [local(p) for p in ps]
            gs = [grads[i] for i in idx]
            if kind == "adam":
                memories = [k for k in keys if k is not None]
                for key in memories:  # zeros, as Adam starts
                    missing = [j for j, st in enumerate(sts) if key not in st]
                    self._write_memories(group, key, [
                        (ps[j], sts[j], torch.zeros_like(locals_[j], dtype=torch.float32),
                         shard[j]) for j in missing], None)
                steps = [float(t) for t in self._advance_steps(ps)]
                adam = "exp_avg_sq" in memories
                fused.adam_step(
                    locals_, gs, stored("exp_avg"), stored("exp_avg_sq") if adam else None,
                    scales("exp_avg"), scales("exp_avg_sq") if adam else None, steps,
                    lr=options["lr"], beta1=options["beta1"], beta2=options["beta2"],
                    eps=options["eps"], weight_decay=options["weight_decay"],
                    decoupled_weight_decay=options["decoupled_weight_decay"],
                    precondition=options["precondition"],
                    preconditioner=options["preconditioner"], maximize=options["maximize"],
                    form=form, seeds_m=seeds("exp_avg"),
                    seeds_v=seeds("exp_avg_sq") if adam else None, **extra)
                continue
            momentum = options["momentum"]
            first = [j for j, st in enumerate(sts) if momentum != 0 and keys[0] not in st]
            self._write_memories(group, keys[0], [
                (ps[j], sts[j], torch.zeros_like(locals_[j], dtype=torch.float32), shard[j])
                for j in first], None)  # the buffer of a first step: written with b = g
            for is_first in (True, False):
                part = [j for j in range(len(ps)) if (j in first) == is_first]
                if not part:
                    continue
                pick = lambda xs: None if xs is None else [xs[j] for j in part]  # noqa: E731
                sub = {k: pick(v) if isinstance(v, list) else v for k, v in extra.items()}
                fused.sgd_step(
                    pick(locals_), pick(gs), pick(stored(keys[0])) if momentum else None,
                    pick(scales(keys[0])) if momentum else None, lr=options["lr"],
                    momentum=momentum, dampening=options["dampening"],
                    nesterov=options["nesterov"], weight_decay=options["weight_decay"],
                    decoupled_weight_decay=options["decoupled_weight_decay"],
                    maximize=options["maximize"], first_step=is_first, form=form,
                    seeds=pick(seeds(keys[0])) if momentum else None, **sub)
        return rest

    def _fused_muon(self, group: dict[str, Any], keys, params: list[Tensor],
                    grads: list[Tensor], shards: Optional[list]) -> list[int]:
        """Muon on compressed momentum buffers (``functional._triton_muon`` with the momentum
        read and written compressed): ``kernels.compressed.ema_step`` per stored form (a
        first step reads zeros, written as Muon's buffers start), one batched
        :func:`functional.orthogonalize` of the fp32 updates, ``elementwise.apply_update``
        on the parameters. For fp32 parameters and ``param_rounding="nearest"`` (16-bit ones
        rounded once by the apply kernel, as on the codec path), unsharded; the indices of the
        others."""
        if shards is not None and any(s is not None for s in shards):
            return list(range(len(params)))  # NS gathers across ranks: the codec path's call
        from .kernels import compressed as fused, elementwise

        key = keys[0]
        rounding = group["param_rounding"]
        by_form: dict[str, list[int]] = {}
        rest = []
        for i, p in enumerate(params):
            form = self._stored_form(group, key, p, self.state[p])
            if form == "full" or rounding != "nearest" and local(p).dtype != torch.float32:
                rest.append(i)
            else:
                by_form.setdefault(form, []).append(i)
        if not by_form:
            return rest
        options = {**_keyword_defaults(dmf.muon), **_rule_keywords(dmf.muon, group),
                   **self._rule_options(group)}
        done, updates = [], []
        for form, idx in by_form.items():
            ps = [params[i] for i in idx]
            sts = [self.state[p] for p in ps]
            self._write_memories(group, key, [  # zeros, as Muon's buffers start
                (p, st, self._initial_state(group, p, key), None)
                for p, st in zip(ps, sts) if key not in st], None)
            updates += fused.ema_step(
                [local(st[key]) for st in sts], [grads[i] for i in idx],
                [local(st[f"{key}_scale"]) for st in sts] if form == "8bit" else None,
                momentum=options["momentum"], nesterov=options["nesterov"],
                maximize=options["maximize"], form=form,
                seeds=[self._seed(group, p, key) for p in ps])
            done += idx
        batch_dims = options["batch_dims"]
        ns = dmf._ns_options(batch_dims, options["ns_steps"], options["ns_coefficients"],
                             options["eps"], options["ns_dtype"])
        mine = [local(params[i]) for i in done]
        elementwise.apply_update(mine, dmf.orthogonalize(updates, **ns),
                                 dmf._shape_scales(mine, options["adjust_lr_fn"], batch_dims),
                                 lr=dmf._scalar(options["lr"]),
                                 weight_decay=options["weight_decay"])
        return rest

    def _run_rule(self, group, rule, params, weights, grads, lists, implementation, shards):
        """Call the group's functional rule on ``weights`` (the local parameters, or their fp32
        working copies) and the state ``lists``."""
        inputs = self._rule_inputs(group, params)
        steps = [self._advance_steps(params)] if rule.takes_steps else []
        extra = {"shards": shards} if shards is not None and "shards" in rule.options else {}
        rule(weights, [self._real(g) for g in grads], *lists, *inputs, *steps,
             **{**_rule_keywords(rule, group), **self._rule_options(group)},
             **extra, foreach=implementation == "foreach",
             fused=implementation in ("fused", "triton"))

    def _apply_rule(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                    implementation: str, shards: Optional[list] = None) -> None:
        """One update of ``params`` by the group's rule (:meth:`_rule`), with the group's
        options by the rule's keyword names.

        FSDP2 (``shards``, :func:`deepmomentum.distributed.shards_of`): ``grads`` are local
        shards, the rule runs on the local shards of the parameters and their state, and the
        rules with matrix stages get ``shards`` to do their communication."""
        rule, keys = self._rule(group)
        states = [self.state[p] for p in params]
        for key in keys:
            if key is not None and key not in self.LAZY_STATE:
                for p, state in zip(params, states):
                    if key not in state:
                        state[key] = distributed.state_like(self._initial_state(group, p, key),
                                                            p)
        lists = [[None] * len(params) if key is None else
                 [self._real(local(state.get(key))) for state in states] for key in keys]
        self._run_rule(group, rule, params, [self._real(local(p)) for p in params], grads, lists,
                       implementation, shards)
        for key, values in zip(keys, lists):
            if key in self.LAZY_STATE:  # created by the rule on a first update
                for i, (p, state, value) in enumerate(zip(params, states, values)):
                    if value is not None and key not in state:
                        state[key] = distributed.like_param(
                            self._like_param(value, local(p)), p,
                            None if shards is None else shards[i])
        for p, state in zip(params, states):
            if not state:  # a rule with no memory (μ = 0) keeps no entry, as torch's SGD
                del self.state[p]

    def _advance_steps(self, params: list[Tensor]) -> list[Tensor]:
        """Create (at 0) and advance each parameter's ``step`` counter; return the counters.

        ``step`` is a float32 CPU tensor, as in torch: reading it costs no device sync."""
        steps = []
        for p in params:
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
            steps.append(state["step"])
        torch._foreach_add_(steps, 1.0)
        return steps

    # --- checkpoints -------------------------------------------------------------------------

    def _state_shapes(self, group: dict[str, Any], param: Tensor) -> dict[str, tuple]:
        """The state entries this rule may keep for ``param`` under ``group``'s settings, each
        with its expected shape (``-1``: any size in that dim). Subclasses add theirs."""
        return {"grad_accumulator": tuple(param.shape)}

    def _saved_shapes(self, group: dict[str, Any], param: Tensor) -> dict[str, tuple]:
        """The entries a checkpoint may hold for ``param`` (:meth:`_state_shapes`), with the
        block scales of its 8-bit memories and the compensation of ``param_rounding="kahan"``."""
        shapes = self._state_shapes(group, param)
        for key in self._memories(group):
            if key in shapes and self._form(group, key, param) == "8bit":
                shapes[f"{key}_scale"] = compressed.scale_shape(shapes[key])
        if group["param_rounding"] == "kahan" and param.dtype in LOW_PRECISION_DTYPES:
            shapes["compensation"] = tuple(param.shape)
        return shapes

    def _stored_dtype(self, group: dict[str, Any], key: str,
                      param: Tensor) -> Optional[torch.dtype]:
        """The dtype a compressed entry is stored in (None: full precision)."""
        if key == "compensation":
            return param.dtype
        if key.endswith("_scale") and key[:-len("_scale")] in self._memories(group):
            return torch.float32
        if key not in self._memories(group):
            return None
        form = self._form(group, key, param)
        if form == "bf16":
            return torch.bfloat16
        if form == "8bit":
            return torch.uint8 if key in self.NONNEGATIVE_STATE else torch.int8
        return None

    def _state_dtype(self, key: str, value: Tensor, param: Tensor) -> torch.dtype:
        """The dtype a loaded full-precision state tensor takes: step counters stay float32;
        floating state takes the parameter's state dtype (fp32 for bf16/fp16 parameters)."""
        if key == "step" or not (value.is_floating_point() or value.is_complex()):
            return value.dtype
        if param.is_complex():
            return param.dtype if value.is_complex() else param.real.dtype
        return state_dtype(param.dtype)

    def load_state_dict(self, state_dict: dict[str, Any], *,
                        state_dtype: Union[torch.dtype, str, None] = None) -> None:
        """Load a state saved by :meth:`state_dict`, after checking that it fits.

        ``state_dtype`` (optional): convert every group's state to it after loading (e.g. an
        fp32 checkpoint into bf16 or 8-bit state, or back; :meth:`convert_state`); by default
        the state keeps the form it was saved in, bit for bit, with the saved groups'
        ``state_dtype``.

        Refused with a ``ValueError`` naming the parameter (by name where the optimizer was
        built from ``named_parameters()``) and the entry, before anything is changed: another
        optimizer class's state (hyperparameters missing or foreign, unknown state keys), a
        group or parameter count that differs, a state tensor whose shape is not the one this
        rule keeps for its parameter. Loaded floating state takes the parameter's state dtype
        (fp32 for bf16/fp16 parameters — torch's loader would round it to bf16 —, the
        parameter's own dtype otherwise), device and memory layout, in tensors of its own.
        ``step`` entries become float32 CPU tensors of their own (also from Python numbers).
        """
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
            raise ValueError("state_dict must be a dict with 'state' and 'param_groups', as "
                             "returned by Optimizer.state_dict()")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(saved_groups)} param group(s); this "
                             f"{type(self).__name__} has {len(self.param_groups)}")
        foreign = _foreign_hyperparameters(type(self))
        pairs = []  # (saved id, group index, parameter, saved group)
        for index, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"state_dict param_groups[{index}] has {len(saved['params'])} "
                                 f"parameter(s); this optimizer's has {len(group['params'])}")
            # Options every class has gained since v0.1 may be absent: filled in below.
            missing = sorted(set(self.defaults) - set(saved) - set(self.GROUP_DEFAULTS))
            unknown = sorted(foreign & set(saved))
            if missing or unknown:
                raise ValueError(
                    f"state_dict param_groups[{index}] was not saved by {type(self).__name__}: "
                    + "; ".join(part for part in (
                        f"it lacks the hyperparameters {missing}" if missing else "",
                        f"it has the foreign hyperparameters {unknown}" if unknown else "")
                        if part))
            pairs += [(i, index, p, saved) for i, p in zip(saved["params"], group["params"])]
        for saved_id, index, param, saved_group in pairs:
            entries = state_dict["state"].get(saved_id)
            if entries:
                group = {**self.param_groups[index], **saved_group}
                for key, value in self.GROUP_DEFAULTS.items():  # as saved, or the default
                    group[key] = saved_group.get(key, value)
                group["state_dtype"] = compressed.canonical_state_dtype(group["state_dtype"])
                self._check_saved_state(index, param, group, entries)

        if state_dtype is not None:
            state_dtype = compressed.canonical_state_dtype(state_dtype)
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # options added after the checkpoint was written
            for key, value in self.GROUP_DEFAULTS.items():
                group.setdefault(key, value)
            for counter in self.GROUP_COUNTERS:
                group.setdefault(counter, 0)
            group["state_dtype"] = compressed.canonical_state_dtype(group["state_dtype"])
        for saved_id, index, param, _ in pairs:
            entries = state_dict["state"].get(saved_id)
            if not entries or param not in self.state:
                continue
            state = self.state[param]
            group = self.param_groups[index]
            for key, value in entries.items():
                stored = self._stored_dtype(group, key, param) if isinstance(value, Tensor) \
                    else None
                if key == "step":  # a float32 CPU counter of its own (steps advance in place)
                    state[key] = value.detach().to(dtype=torch.float32, device="cpu", copy=True) \
                        if isinstance(value, Tensor) else torch.tensor(float(value),
                                                                       dtype=torch.float32)
                elif stored is not None:  # compressed: as saved, bit for bit
                    memory = key[:-len("_scale")] if key.endswith("_scale") else key
                    whole = memory in self.REPLICATED_STATE
                    value = distributed.load_like(value, param, whole=whole,
                                                  rows=key.endswith("_scale"))
                    like = param if value.shape == param.shape and not whole else value
                    state[key] = torch.empty_like(
                        like, dtype=stored, device=param.device,
                        memory_format=torch.preserve_format).copy_(value)
                elif isinstance(value, Tensor):
                    # From the saved tensor (not torch's cast copy): no double rounding.
                    whole = key in self.REPLICATED_STATE  # even where its shape is param's
                    value = distributed.load_like(value, param, whole=whole)  # FSDP2
                    like = param if value.shape == param.shape and not whole else value
                    state[key] = torch.empty_like(
                        like, dtype=self._state_dtype(key, value, param), device=param.device,
                        memory_format=torch.preserve_format).copy_(value)
        if state_dtype is not None:
            self.convert_state(state_dtype)

    def convert_state(self, state_dtype: Union[torch.dtype, str],
                      groups: Optional[Iterable[int]] = None) -> None:
        """Store the state of every group (or of the group indices ``groups``) in
        ``state_dtype`` from now on, converting what it holds (each memory read into fp32 and
        rounded to nearest into the new form) and setting the groups' ``state_dtype``."""
        state_dtype = compressed.canonical_state_dtype(state_dtype)
        for index in range(len(self.param_groups)) if groups is None else groups:
            group = self.param_groups[index]
            if group["state_dtype"] is state_dtype:
                continue
            for p in group["params"]:  # refused before anything is converted
                if self.state.get(p) and p.is_complex() and compressed.is_compressed(state_dtype):
                    raise UnsupportedTensorError(
                        f"state_dtype={state_dtype!r} cannot store the state of complex "
                        f"{self._param_name(index, p)}")
            held = {}
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                for key in self._memories(group):
                    if key in state:
                        work = self._read_memory(group, key, p, state)
                        held[(id(p), key)] = work.float() if work.dtype != torch.float32 \
                            else work.clone()
                        del state[key]
                        state.pop(f"{key}_scale", None)
            group["state_dtype"] = state_dtype
            for p in group["params"]:
                state = self.state.get(p)
                for key in self._memories(group):
                    work = held.get((id(p), key))
                    if work is None:
                        continue
                    if self._form(group, key, p) == "full":
                        work = work.to(p.dtype if p.is_complex() else dmf.state_dtype(p.dtype))
                    self._write_memory(group, key, p, state, work, None,
                                       self._row_shard(p))

    @staticmethod
    def _row_shard(param: Tensor):
        """The :class:`~deepmomentum.distributed.Shard0` of a row-sharded DTensor (its offset,
        for stochastic rounding and global shapes), else None."""
        if not distributed.is_dtensor(param):
            return None
        found = distributed.shards_of([param], lambda p: "parameter", matrices=False)
        return found[0] if found else None

    def _check_saved_state(self, index: int, param: Tensor, group: dict[str, Any],
                           entries: dict[str, Any]) -> None:
        """Raise ``ValueError`` unless every saved state entry is one this rule keeps for
        ``param``, with its shape."""
        allowed = self._saved_shapes(group, param)
        unknown = sorted(set(entries) - set(allowed))
        if unknown:
            raise ValueError(
                f"state_dict holds state {unknown} for {self._param_name(index, param)}, which "
                f"{type(self).__name__} with these settings never keeps (it keeps "
                f"{sorted(allowed)}): was it saved by another optimizer or configuration?")
        for key in entries:
            if f"{key}_scale" in allowed and f"{key}_scale" not in entries:
                raise ValueError(
                    f"state_dict entry '{key}' of {self._param_name(index, param)} holds 8-bit "
                    f"codes (state_dtype={group['state_dtype']!r}) without their block scales "
                    f"'{key}_scale': the checkpoint is incomplete")
        for key, value in entries.items():
            expected = allowed[key]
            if key == "step" and not isinstance(value, Tensor):
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    continue
            if not isinstance(value, Tensor):
                raise ValueError(f"state_dict entry '{key}' of {self._param_name(index, param)}"
                                 f" must be a tensor, got {type(value).__name__}")
            stored = self._stored_dtype(group, key, param)
            if stored is not None and value.dtype != stored:
                raise ValueError(
                    f"state_dict entry '{key}' of {self._param_name(index, param)} is "
                    f"{value.dtype}; its group's state_dtype={group['state_dtype']!r} stores it "
                    f"as {stored}: the checkpoint is inconsistent (to convert a checkpoint, "
                    "load it as saved and pass state_dtype= to load_state_dict)")
            shape = tuple(value.shape)
            if len(shape) != len(expected) or any(e not in (-1, s)
                                                  for e, s in zip(expected, shape)):
                want = "×".join("n" if e == -1 else str(e) for e in expected) or "scalar"
                raise ValueError(
                    f"state_dict entry '{key}' of {self._param_name(index, param)} has shape "
                    f"{shape}; {type(self).__name__} keeps it with shape ({want}) for this "
                    "parameter: the checkpoint belongs to other parameters")


def _rule_keywords(rule: Callable, group: dict[str, Any]) -> dict[str, Any]:
    """The group's options a rule takes, by the rule's own keyword names
    (``functional.RULES``)."""
    return {name: group[name] for name in rule.options if name in group}


@functools.lru_cache(maxsize=None)
def _keyword_defaults(rule: Callable) -> dict[str, Any]:
    """A rule's keyword arguments with defaults (the options a group may leave out)."""
    return {name: p.default for name, p in inspect.signature(rule).parameters.items()
            if p.kind is p.KEYWORD_ONLY and p.default is not inspect.Parameter.empty}


def _optimizer_classes() -> list[type]:
    import deepmomentum

    found = [c for c in vars(torch.optim).values()
             if isinstance(c, type) and issubclass(c, torch.optim.Optimizer)]
    return found + [c for c in vars(deepmomentum).values()
                    if isinstance(c, type) and issubclass(c, MemoryOptimizer)]


@functools.lru_cache(maxsize=None)
def _foreign_hyperparameters(cls: type) -> frozenset:
    """Hyperparameter names of the other optimizers of torch.optim and deepmomentum that
    ``cls`` does not have: a saved group holding one was saved by another class."""
    own = set(cls._signature_defaults()) | set(cls.GROUP_KEYS)
    names = set()
    for other in _optimizer_classes():
        names |= {name for name, p in inspect.signature(other.__init__).parameters.items()
                  if name not in ("self", "params") and p.kind is p.POSITIONAL_OR_KEYWORD}
    return frozenset(names - own)
