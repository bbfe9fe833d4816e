"""Momentum read as an associative memory of the gradient stream (SPEC §1–2)."""

from __future__ import annotations

import weakref
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from . import functional as dmf
from .distributed import _all_gather_single
from .optimizer import MemoryOptimizer, check_choice, check_flag, check_int, check_number

__all__ = ["AssociativeMomentum", "DeltaMomentum"]


def _validate_momentum(group: dict[str, Any]) -> None:
    """The hyperparameters AssociativeMomentum and DeltaMomentum share."""
    check_number("momentum", group["momentum"], 0.0, 1.0, high_open=True)
    check_number("dampening", group["dampening"], 0.0, 1.0)
    check_number("weight_decay", group["weight_decay"], 0.0)
    check_flag("nesterov", group["nesterov"])
    check_flag("decoupled_weight_decay", group["decoupled_weight_decay"])
    if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError("nesterov=True requires momentum > 0 and dampening = 0, got "
                         f"momentum={group['momentum']}, dampening={group['dampening']}")


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
        foreach, fused (bool or None): torch's meaning. ``fused`` is the Triton kernel for CUDA
            tensors and torch's fused SGD kernel on the CPU (parameters that keep their state in
            their own dtype); by default the fused kernel is picked where it applies, else the
            single-tensor loop on CPU and foreach elsewhere.
        state_dtype, param_rounding, skip_nonfinite, update_period, accumulate, update_offset,
        min_period, max_period, period_significance:
            the group options every optimizer shares (defaults torch.float32, "nearest",
            False, 1, "sum", 0, 1, 64, 1.0; ``update_period="auto"``: the group updates when
            its accumulated gradient is significant); see :class:`MemoryOptimizer` and
            :mod:`deepmomentum.compressed`.

    Defaults are ``torch.optim.SGD``'s (lr 1e-3, dampening 0, no nesterov, weight_decay 0)
    except ``momentum``: 0.9 where SGD's is 0 (at 0 there is no memory: plain SGD).

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

    supported_impls = ("foreach", "fused", "triton")  # torch's fused SGD covers all of §1
    LAZY_STATE = ("momentum_buffer",)

    def _validate_group(self, group: dict[str, Any]) -> None:
        _validate_momentum(group)

    def _state_shapes(self, group, param):
        return {**super()._state_shapes(group, param), "momentum_buffer": tuple(param.shape)}

    def _rule(self, group):
        return dmf.associative_momentum, ("momentum_buffer",)


KEY_SOURCES = ("gradient", "input")


class DeltaMomentum(MemoryOptimizer):
    r"""Momentum with a delta-rule (L2) objective over keys (Nested Learning Eq 48–49, 35–37).

    Plain momentum only adds to its memory. With the inner objective ``½‖b k − v‖²`` instead of
    ``⟨b, −G⟩``, one gradient step first *erases* what the memory holds along the current keys
    and then writes. With a normalized key Gram ``K_t`` (c × c on the matrix view, PSD,
    trace 1):

    .. math::
        b_1 = g_1, \qquad b_t = b_{t-1}(\mu I - \beta K_t) + (1-\tau)\, g_t

    and the read-out and update of :class:`AssociativeMomentum`
    (``U = g + μb`` with nesterov, else ``b``; ``W ← W − γU``).

    Keys:

    * ``keys="gradient"`` (default): ``K_t = GᵀG / ‖G‖_F²``, erasing along the gradient's row
      space; with the keys normalized first, ``k = G / ‖G‖`` (an overflow-safe norm), ``b K``
      is computed as ``(b kᵀ) k`` or ``b (kᵀ k)``, whichever side is smaller
      (``4·r·c·min(r, c)`` flops, ``min(r, c)²`` memory). No product is formed before the
      normalization, so the rule is homogeneous in the gradient's scale (``b(cG) = c·b(G)``)
      for any finite scale.
    * ``keys="input"``: the unit-normalized rows of each layer's input, ``K_t = X̂ᵀX̂ / n``
      (NL: keys are the layer inputs, values the local error). Call :meth:`attach` with the
      model: forward hooks on its ``nn.Linear`` modules (subclasses included) keep at most
      ``key_samples`` rows per update (evenly spaced, deterministic; micro-batches and, with
      ``update_period = C > 1``, the C calls of a period accumulate). The rows are detached
      copies in the weight's state dtype (fp32 for bf16/fp16), held in the optimizer state as
      ``state[weight]["input_keys"]`` (``n × in_features``, n ≤ ``key_samples``) until the
      update that uses them consumes them, so a mid-period checkpoint (``state_dict`` /
      ``load_state_dict``, ``deepcopy``) resumes on the same trajectory. Parameters with no
      captured keys — biases, other module types, an update with no forward — use
      ``"gradient"``.

    Input keys, lifecycle of the hooks:

    * :meth:`attach` registers one forward hook per hooked ``nn.Linear``; attaching the same
      module again is a no-op for the layers already hooked by this optimizer. Passes without
      grad (``torch.no_grad()``, evaluation) record nothing. :meth:`detach` removes the hooks
      and drops the keys not yet used.
    * The hooks hold the optimizer and the weight only weakly: a model does not keep an
      optimizer alive, and an optimizer dropped without :meth:`detach` removes its hooks when
      it is collected (a hook whose optimizer is gone does nothing).
    * A hook records only for the exact weight tensor it was registered for. A ``deepcopy`` or
      a pickle of an attached model carries *inert* hooks (they forget their optimizer and
      weight, so the copy never feeds the original optimizer); pickling an attached model
      works. To train a copy, attach it: that first drops the inert hooks it carries.
    * Distributed data parallel: a rank sees only its own inputs. Pass the
      ``DistributedDataParallel`` wrapper to :meth:`attach` (or ``process_group=``): at each
      update the keys of every rank are all-gathered, concatenated in rank order and evenly
      subsampled to ``key_samples``, so every replica erases along the same keys.
      :meth:`attach` refuses a bare module when ``torch.distributed`` runs with more than one
      rank.

    Tensors use the matrix view: 2-D as is, ≥3-D as ``(shape[0], prod(rest))``, 1-D as one row,
    which is the closed form ``b_t = μb − β⟨b, ĝ⟩ĝ + (1 − τ)g`` (R2b).

    Args:
        params: iterable of parameters, named parameters or group dicts.
        lr (float, default 1e-3): γ ≥ 0.
        momentum (float, default 0.9): μ in [0, 1).
        erase (float, default 0.1): β in [0, μ]; the eigenvalues of ``μI − βK`` stay in
            [μ − β, μ], so the memory never grows faster than plain momentum (P2). A large
            erase (β near μ) hurts. The default was chosen by ``benchmarks/delta.py`` and
            re-derived on the benchmarks' char-GPT task (issue 17): β = 0, 0.03, 0.1, 0.3 tie
            there (within 0.01 bits/char at the best lr; ``benchmarks/results/defaults_lm.json``),
            and μ = 0.8 or 0.95 lose to 0.9; see README, Measured: DeltaMomentum.
        keys (str, default "gradient"): "gradient" or "input".
        key_samples (int, default 256): most input rows kept per step (≥ 1).
        dampening, nesterov, weight_decay, decoupled_weight_decay, maximize: as
            :class:`AssociativeMomentum`.
        foreach (bool or None): torch's meaning. fused: the Triton kernel (CUDA tensors only;
            the erase terms by matmul around it), picked by default where it applies.
        state_dtype, param_rounding, skip_nonfinite, update_period, accumulate, update_offset,
        min_period, max_period, period_significance:
            the group options every optimizer shares (defaults torch.float32, "nearest",
            False, 1, "sum", 0, 1, 64, 1.0; ``update_period="auto"``: the group updates when
            its accumulated gradient is significant); see :class:`MemoryOptimizer` and
            :mod:`deepmomentum.compressed`.

    Non-finite gradients: the erase couples a matrix's entries, so one NaN or inf entry spreads
    over its whole row space and the memory never recovers; a group with
    ``skip_nonfinite=True`` skips such calls (parameters and state untouched, counted in the
    group's ``nonfinite_skips``).

    Defaults as :class:`AssociativeMomentum` (``torch.optim.SGD``'s, but momentum 0.9).

    Reductions (tested as properties): ``erase=0`` equals :class:`AssociativeMomentum`, hence
    ``torch.optim.SGD`` (R2a); 1-D closed form (R2b); the norm bound (P2).

    Example:
        >>> import torch, deepmomentum as dm
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),
        ...                             torch.nn.Linear(8, 1))
        >>> opt = dm.DeltaMomentum(model.parameters(), lr=0.05, keys="input")
        >>> _ = opt.attach(model)  # returns the optimizer
        >>> model(torch.randn(16, 4)).pow(2).mean().backward()
        >>> opt.step(); opt.zero_grad()
        >>> opt.detach()

    References: Behrouz et al., Nested Learning (NeurIPS 2025), Eq 35–37, 48–49; Widrow & Hoff
    (the delta rule); Schlag et al., Linear Transformers Are Secretly Fast Weight Programmers.
    """

    supports_complex = False

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        momentum: float = 0.9,
        erase: float = 0.1,
        keys: str = "gradient",
        key_samples: int = 256,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        decoupled_weight_decay: bool = False,
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
        self._init_hook_state()
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        _validate_momentum(group)
        check_number("erase", group["erase"], 0.0, group["momentum"])
        check_choice("keys", group["keys"], KEY_SOURCES)
        check_int("key_samples", group["key_samples"], 1)

    # --- input keys --------------------------------------------------------------------------

    def attach(self, model: nn.Module, process_group: Any = None) -> "DeltaMomentum":
        """Capture the inputs of ``model``'s ``nn.Linear`` layers as keys for the weights of
        groups with ``keys="input"``; returns self, and :meth:`detach` removes the hooks.

        Idempotent: layers this optimizer already hooks are left as they are. Inert hooks that
        a copied or unpickled model carries (see the class docstring) are dropped here.

        Under data parallelism each rank captures its own inputs; the keys are all-gathered at
        every update so the replicas stay identical. ``model`` may be the
        ``torch.nn.parallel.DistributedDataParallel`` wrapper (keys are gathered over its
        process group and the hooks go on ``model.module``), a model sharded by FSDP2's
        ``fully_shard`` (over the ranks its parameters are sharded on), or pass ``process_group=``
        explicitly (it takes precedence). With ``torch.distributed`` initialized over more than
        one rank and neither given, this raises ``ValueError``: rank-local keys would make the
        replicas drift apart. Every rank must then call ``step()`` (a collective).
        """
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            if process_group is None:
                process_group = model.process_group
            model = model.module
        if process_group is None:  # FSDP2: over the ranks that shard the parameters
            process_group = _sharding_group(model)
        if process_group is None and _distributed_world_size() > 1:
            raise ValueError(
                "DeltaMomentum.attach: torch.distributed is running with "
                f"{_distributed_world_size()} ranks, and keys captured on one rank would make "
                "the replicas drift apart. Pass the DistributedDataParallel wrapper "
                "(opt.attach(ddp_model)) or the process group to gather the keys over "
                "(opt.attach(model, process_group=group)).")
        if process_group is not None:
            if self._key_process_group is not None and \
                    self._key_process_group is not process_group:
                raise ValueError("DeltaMomentum.attach: keys are already gathered over another "
                                 "process group; detach() first")
            self._key_process_group = process_group
        if self._hooks_finalizer is None:  # a dropped optimizer takes its hooks with it
            self._hooks_finalizer = weakref.finalize(self, _remove_hooks, self._hooks)
            self._hooks_finalizer.atexit = False
        wanted = {id(p): (p, g["key_samples"]) for g in self.param_groups
                  if g["keys"] == "input" for p in g["params"]}
        for module in model.modules():
            if not isinstance(module, nn.Linear) or id(module.weight) not in wanted:
                continue
            weight, samples = wanted[id(module.weight)]
            _drop_inert_hooks(module)
            if any(isinstance(h, _InputKeyHook) and h.feeds(self, weight)
                   for h in module._forward_hooks.values()):
                continue  # already hooked by this optimizer
            self._hooks.append(module.register_forward_hook(
                _InputKeyHook(self, weight, samples)))
        return self

    def detach(self) -> None:
        """Remove the hooks added by :meth:`attach` and drop the keys not yet used."""
        _remove_hooks(self._hooks)
        self._key_process_group = None
        for state in self.state.values():
            state.pop("input_keys", None)

    def _init_hook_state(self) -> None:
        self._hooks: list[Any] = []  # RemovableHandles of attach()'s hooks
        self._hooks_finalizer: Optional[weakref.finalize] = None
        self._key_process_group: Any = None  # where attach() gathers keys (DDP)

    def _capture(self, weight: Tensor, inputs: Tensor, samples: int) -> None:
        """Add the unit rows of a forward's input to ``weight``'s pending keys, keeping at most
        ``samples`` rows, evenly spaced over everything held and new (deterministic)."""
        x = inputs.detach().reshape(-1, weight.shape[1])
        rows = dmf.unit_rows(_evenly_spaced(x, samples).to(dmf.state_dtype(weight.dtype)))
        state = self.state[weight]
        held = state.get("input_keys")
        if held is not None:
            rows = _evenly_spaced(torch.cat([held, rows.to(held)]), samples)
        state["input_keys"] = rows

    def _gather_input_keys(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """Replace the pending keys of ``params`` by those of every rank of the process group
        of :meth:`attach`, concatenated in rank order and evenly subsampled to
        ``key_samples``: the same keys on every rank.

        A collective: every rank issues the same calls in the same order, whether or not its
        layers saw a forward — one all-gather of the row counts of every 2-D parameter of the
        update, then, per key dtype, one all-gather of the rows that survive the subsampling
        (each rank knows which of its rows they are from the counts), padded to the largest
        such count (parameters with no rows on any rank take no part)."""
        group_of_ranks = self._key_process_group
        if group_of_ranks is None:
            return
        dist = torch.distributed
        world = dist.get_world_size(group_of_ranks)
        matrices = [p for p in params if p.ndim == 2]
        if world == 1 or not matrices:
            return
        held = [self.state[p].get("input_keys") if p in self.state else None for p in matrices]
        counts = torch.tensor([0 if k is None else k.shape[0] for k in held],
                              dtype=torch.int64, device=matrices[0].device)
        everyone = torch.empty(world * len(matrices), dtype=torch.int64, device=counts.device)
        _all_gather_single(everyone, counts, group_of_ranks)
        per_rank = everyone.view(world, len(matrices)).tolist()  # one host read per update
        rank = dist.get_rank(group_of_ranks)
        # Which rows of each rank the subsampling of their concatenation keeps: only those
        # travel, and their concatenation in rank order is the subsampled one.
        kept = [[None] * len(matrices) for _ in range(world)]  # local row indices per rank
        for j in range(len(matrices)):
            counts = [row[j] for row in per_rank]
            index = _evenly_spaced_index(sum(counts), group["key_samples"])
            start = 0
            for r, n in enumerate(counts):
                kept[r][j] = torch.arange(n) if index is None else \
                    index[(index >= start) & (index < start + n)] - start
                start += n
        buckets: dict[torch.dtype, list[tuple[int, int]]] = {}  # dtype → (index, max count)
        for j, p in enumerate(matrices):
            most = max(len(kept[r][j]) for r in range(world))
            if most:
                buckets.setdefault(dmf.state_dtype(p.dtype), []).append((j, most))
        for dtype, entries in buckets.items():
            device = matrices[entries[0][0]].device
            padded = []
            for j, most in entries:
                rows = torch.zeros(most, matrices[j].shape[1], dtype=dtype, device=device)
                if held[j] is not None:
                    mine = kept[rank][j].to(held[j].device)
                    rows[: len(mine)] = held[j].index_select(0, mine)
                padded.append(rows.flatten())
            mine = torch.cat(padded)
            gathered = torch.empty(world * mine.numel(), dtype=dtype, device=device)
            _all_gather_single(gathered, mine, group_of_ranks)
            gathered = gathered.view(world, -1)
            offset = 0
            for j, most in entries:
                p, size = matrices[j], most * matrices[j].shape[1]
                rows = torch.cat([gathered[r, offset:offset + size].view(most, -1)[:len(kept[r][j])]
                                  for r in range(world)])
                offset += size
                self.state[p]["input_keys"] = rows.to(p.device)

    def _state_shapes(self, group, param):
        shapes = super()._state_shapes(group, param)
        shapes["momentum_buffer"] = tuple(param.shape)
        if group["keys"] == "input" and param.ndim == 2:
            shapes["input_keys"] = (-1, param.shape[1])
        return shapes

    def __getstate__(self):
        state = dict(super().__getstate__())
        for name in ("_hooks", "_hooks_finalizer", "_key_process_group"):
            state.pop(name, None)  # hooks belong to a live model; keys stay in "state"
        return state

    def __setstate__(self, state):
        # Also called by load_state_dict with only "state" and "param_groups": keep the hooks.
        state = dict(state)
        state.pop("_captured", None)  # pickles from before keys lived in the state
        super().__setstate__(state)
        if "_hooks" not in self.__dict__:
            self._init_hook_state()

    # --- step --------------------------------------------------------------------------------

    supported_impls = ("foreach", "triton")  # erase terms by matmul, the rest in one kernel
    LAZY_STATE = ("momentum_buffer",)

    def _rule(self, group):
        return dmf.delta_momentum, ("momentum_buffer",)

    def _has_matrix_stages(self, group):
        return group["erase"] != 0

    def _rule_inputs(self, group, params):
        """The input keys captured for each parameter, consumed by this update."""
        keys = [None] * len(params)
        if group["keys"] == "input":
            self._gather_input_keys(group, params)  # a no-op unless attached under DDP
            for i, p in enumerate(params):
                if p in self.state:
                    keys[i] = self.state[p].pop("input_keys", None)
        return [keys]


def _evenly_spaced_index(rows: int, samples: int) -> Optional[Tensor]:
    """The indices of at most ``samples`` evenly spaced of ``rows`` rows, or None for all."""
    if rows <= samples:
        return None
    return torch.linspace(0, rows - 1, samples).round().long()


def _evenly_spaced(x: Tensor, samples: int) -> Tensor:
    """At most ``samples`` rows of ``x``, evenly spaced (deterministic, so runs repeat); ``x``
    itself when it has no more rows than that."""
    index = _evenly_spaced_index(x.shape[0], samples)
    return x if index is None else x.index_select(0, index.to(x.device))


class _InputKeyHook:
    """The forward hook :meth:`DeltaMomentum.attach` puts on an ``nn.Linear``: it records the
    layer's input rows as keys for one weight of one optimizer.

    It holds both only through weak references, and records only while the module's weight is
    that very tensor. Pickled or deep-copied (with its model), it keeps only ``samples`` and
    comes back inert: a copy of a model never feeds the original optimizer.
    """

    def __init__(self, optimizer: "DeltaMomentum", weight: Tensor, samples: int):
        self._optimizer: Optional[weakref.ref] = weakref.ref(optimizer)
        self._weight: Optional[weakref.ref] = weakref.ref(weight)
        self.samples = samples

    def _target(self) -> Optional[tuple["DeltaMomentum", Tensor]]:
        if self._optimizer is None or self._weight is None:
            return None
        optimizer, weight = self._optimizer(), self._weight()
        return None if optimizer is None or weight is None else (optimizer, weight)

    def feeds(self, optimizer: "DeltaMomentum", weight: Tensor) -> bool:
        target = self._target()
        return target is not None and target[0] is optimizer and target[1] is weight

    def inert(self) -> bool:
        return self._target() is None

    def __call__(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        if not torch.is_grad_enabled():
            return  # evaluation passes leave no keys
        target = self._target()
        weight = getattr(module, "weight", None)
        if target is None or weight is not target[1] and not _unsharded_view(weight, target[1]):
            return  # optimizer gone, or a module that is not the one hooked (a copy)
        target[0]._capture(target[1], inputs[0], self.samples)

    def __getstate__(self) -> dict[str, Any]:
        return {"samples": self.samples}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._optimizer = self._weight = None
        self.samples = state["samples"]


def _unsharded_view(weight: Optional[Tensor], hooked: Tensor) -> bool:
    """Whether ``weight`` is FSDP2's unsharded form of the DTensor parameter ``hooked`` (during
    a forward, ``fully_shard`` puts the whole tensor in the module's place)."""
    from .distributed import is_dtensor

    return weight is not None and is_dtensor(hooked) and not is_dtensor(weight) and \
        tuple(weight.shape) == tuple(hooked.shape)


def _remove_hooks(handles: list) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


def _drop_inert_hooks(module: nn.Module) -> None:
    """Remove the inert input-key hooks (optimizer gone, or carried by a copy) of ``module``."""
    for hook_id, hook in list(module._forward_hooks.items()):
        if isinstance(hook, _InputKeyHook) and hook.inert():
            del module._forward_hooks[hook_id]
            module._forward_hooks_with_kwargs.pop(hook_id, None)
            module._forward_hooks_always_called.pop(hook_id, None)


def _sharding_group(model: nn.Module) -> Any:
    """The process group a ``fully_shard``-ed model's parameters are sharded over (the shard
    dim of their device mesh), or None for a model without DTensor parameters."""
    from .distributed import is_dtensor

    for p in model.parameters():
        if is_dtensor(p):
            mesh = p.device_mesh
            dims = [d for d, pl in enumerate(p.placements) if pl.is_shard()]
            return mesh.get_group(dims[0] if dims else mesh.ndim - 1)
    return None


def _distributed_world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
