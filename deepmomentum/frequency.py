"""Multi-frequency updates — the Continuum Memory System schedule (NL Eq 30–31; SPEC §7).

Every deepmomentum optimizer takes per-group ``update_period``/``accumulate``/``update_offset``
itself (see :class:`~deepmomentum.optimizer.MemoryOptimizer.step`). :class:`MultiFrequency`
gives the same schedule to any ``torch.optim.Optimizer``, and :func:`continuum_groups` builds
the groups of a CMS-style chain of levels.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable, Optional, Union

import torch
from torch import Tensor, nn

from .distributed import load_like
from .optimizer import AUTO_DEFAULTS, MemoryOptimizer, accumulate_gradients, check_schedule, \
    initializes_state, release_gradients, window_ends

__all__ = ["MultiFrequency", "WindowLog", "continuum_groups"]

Level = Union[tuple[Any, int], tuple[Any, int, dict]]


def continuum_groups(levels: Iterable[Level], accumulate: str = "sum", stagger: bool = False,
                     **options: Any) -> list[dict[str, Any]]:
    """Param groups for a chain of levels that learn at different frequencies.

    ``levels`` holds ``(module_or_params, period)`` or ``(module_or_params, period, options)``;
    e.g. ``continuum_groups([(fast, 1), (mid, 16), (slow, 256)], lr=1e-3)``. Each level becomes
    a group with ``update_period=period`` and ``accumulate``, plus the shared ``options`` and its
    own (its own win). With ``stagger=True`` level ℓ gets ``update_offset = ℓ mod period`` so
    that slow levels do not all update on the same call. Modules contribute their trainable
    parameters; named parameters are kept, so ``state_dict`` carries the names.
    """
    groups = []
    for index, level in enumerate(levels):
        if len(level) not in (2, 3):
            raise ValueError("each level must be (module_or_params, period) or "
                             "(module_or_params, period, options)")
        source, period = level[0], level[1]
        own = level[2] if len(level) == 3 else {}
        if isinstance(source, nn.Module):
            params = [(n, p) for n, p in source.named_parameters() if p.requires_grad]
        else:
            params = list(source)
        group = {"params": params, "update_period": period, "accumulate": accumulate,
                 **options, **own}
        if stagger and "update_offset" not in own:
            group["update_offset"] = index % period if isinstance(period, int) and period > 0 \
                else 0
        group.setdefault("update_offset", 0)
        check_schedule(group)
        groups.append(group)
    return groups


class _State(defaultdict):
    """MultiFrequency's own state (the accumulators), which counts as non-empty while the
    wrapped optimizer has state: ``torch.distributed.checkpoint.state_dict`` re-runs its
    state-initializing step on an optimizer whose ``state`` is empty, and with only period-1
    groups (no accumulators) it would step the wrapped optimizer again, on state DCP has just
    loaded in place."""

    def __init__(self, wrapped: torch.optim.Optimizer):
        super().__init__(dict)
        self.wrapped = wrapped

    def __bool__(self) -> bool:
        return dict.__len__(self) > 0 or bool(self.wrapped.state)


class MultiFrequency(torch.optim.Optimizer):
    """Give any ``torch.optim.Optimizer`` per-group update periods (SPEC §7).

    Wrap an optimizer whose groups may carry ``update_period`` (int ≥ 1, default 1),
    ``accumulate`` ("sum" or "mean") and ``update_offset`` (in [0, period)). On each
    :meth:`step` a group with period C adds its gradients to an accumulator; on the calls where
    ``(calls − offset) % C == 0`` the wrapped optimizer steps with the accumulated gradient in
    ``.grad`` (the mean divides by C); on the other calls it does not see the group's
    parameters at all, so neither they nor its state change. ``.grad`` is restored to the
    user's gradient after every step. Groups with period 1 pass straight through.

    The wrapper shares ``param_groups`` with the wrapped optimizer, so LR schedulers can take
    either; they see every call. ``state_dict`` holds the wrapped optimizer's state plus the
    accumulators and call counters, so a checkpoint taken mid-period resumes exactly.

    Example:
        >>> import torch, deepmomentum as dm
        >>> fast, slow = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
        >>> groups = dm.continuum_groups([(fast, 1), (slow, 8)])
        >>> opt = dm.MultiFrequency(torch.optim.AdamW(groups, lr=1e-3))
        >>> slow(fast(torch.randn(2, 4))).sum().backward()
        >>> opt.step(); opt.zero_grad()
    """

    #: Counters a scheduled group keeps (present from the start, for DCP's template).
    COUNTERS = ("period_calls", "window_calls", "window_sq_sum", "last_period", "auto_updates")

    def __init__(self, optimizer: torch.optim.Optimizer, update_period: Union[int, str] = 1,
                 accumulate: str = "sum", update_offset: int = 0, min_period: int = 1,
                 max_period: int = 64, period_significance: float = 1.0):
        if isinstance(optimizer, (MultiFrequency, MemoryOptimizer)):
            raise TypeError(f"{type(optimizer).__name__} schedules its own groups: set "
                            "update_period on its groups instead of wrapping it")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"MultiFrequency wraps a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        self.optimizer = optimizer
        schedule = {"update_period": update_period, "accumulate": accumulate,
                    "update_offset": update_offset, "min_period": min_period,
                    "max_period": max_period, "period_significance": period_significance}
        for group in optimizer.param_groups:
            for key, value in schedule.items():
                group.setdefault(key, value)
            for counter in self.COUNTERS:
                group.setdefault(counter, 0)
            check_schedule(group)
        self._sharing = True
        super().__init__(optimizer.param_groups, {})
        self._sharing = False
        # One list of group dicts for both, so schedulers and the wrapped optimizer agree.
        self.param_groups = optimizer.param_groups
        self.defaults = optimizer.defaults
        self.state = _State(optimizer)

    def __repr__(self) -> str:
        return f"MultiFrequency({self.optimizer!r})"

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_sharing", False):  # __init__ passing the wrapped optimizer's groups
            self.param_groups.append(param_group)
            return
        for key in ("update_period", "accumulate", "update_offset", *AUTO_DEFAULTS):
            param_group.setdefault(key, MemoryOptimizer.GROUP_DEFAULTS[key])
        for counter in self.COUNTERS:
            param_group.setdefault(counter, 0)
        check_schedule(param_group)
        self.optimizer.add_param_group(param_group)  # appends to the shared list

    @torch.no_grad()
    def step(self, closure=None):
        """Accumulate, and step the wrapped optimizer on the groups at a period boundary."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        user_grads: dict[Tensor, Optional[Tensor]] = {}
        released: list[Tensor] = []
        # DCP's state-initializing call (zero gradients, lr 0, no state) reaches every group.
        initializing = initializes_state(self)  # its state counts the wrapped one's
        for group in self.param_groups:
            if group["update_period"] == 1:
                continue
            if initializing:  # accumulators (zeros) exist; the wrapped optimizer steps too
                with_grads = [p for p in group["params"] if p.grad is not None]
                accumulate_gradients(self.state, with_grads, [p.grad for p in with_grads],
                                     torch.zeros_like)
                continue
            # The schedule of MemoryOptimizer.step (optimizer.py), on .grad of the wrapped one.
            with_grads = [p for p in group["params"] if p.grad is not None]
            accumulate_gradients(self.state, with_grads, [p.grad for p in with_grads],
                                 torch.zeros_like)
            ends = window_ends(group, [p.grad for p in with_grads], lambda: [
                self.state[p]["grad_accumulator"] for p in group["params"]
                if "grad_accumulator" in self.state.get(p, {})])
            for p in group["params"]:
                user_grads[p] = p.grad
                p.grad = None  # the wrapped optimizer skips parameters without grads
            if ends:
                for p, accumulated in zip(*release_gradients(group, self.state)):
                    p.grad = accumulated
                    released.append(p)
        try:
            self.optimizer.step()
        finally:
            for p, grad in user_grads.items():
                p.grad = grad
        # Fresh zeros after the step (the wrapped rule may keep the released sum as its first
        # momentum): an accumulator at every call, as DCP's template of a fresh one has.
        for p in released:
            self.state[p]["grad_accumulator"] = torch.zeros_like(p)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's ``state_dict`` with each parameter's accumulator added to its
        state as ``grad_accumulator`` (the call counters are in the shared groups): torch's
        layout, so ``torch.distributed.checkpoint.state_dict`` can save and reshard it."""
        inner = self.optimizer.state_dict()
        ids = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        state = {k: dict(v) for k, v in inner["state"].items()}
        for p, entries in self.state.items():
            if "grad_accumulator" in entries:
                state.setdefault(ids[id(p)], {})["grad_accumulator"] = entries["grad_accumulator"]
        return {"state": state, "param_groups": inner["param_groups"]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict` (or by versions ≤ 0.1, which nested the
        wrapped optimizer's under ``"optimizer"``); an accumulator whose shape is not its
        parameter's is refused (``ValueError``) before anything is loaded."""
        if "multi_frequency" in state_dict:  # the layout of versions ≤ 0.1
            own, inner = state_dict["multi_frequency"], state_dict["optimizer"]
            accumulators = {i: entries.get("grad_accumulator")
                            for i, entries in own["state"].items()}
            groups = own["param_groups"]
        else:
            inner = {"state": {}, "param_groups": state_dict["param_groups"]}
            accumulators = {}
            for i, entries in state_dict["state"].items():
                entries = dict(entries)
                accumulators[i] = entries.pop("grad_accumulator", None)
                if entries:
                    inner["state"][i] = entries
            groups = state_dict["param_groups"]
        saved_ids = [i for g in groups for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for index, (saved_id, p) in enumerate(zip(saved_ids, params)):
            accumulator = accumulators.get(saved_id)
            if accumulator is not None and tuple(accumulator.shape) != tuple(p.shape):
                raise ValueError(
                    f"state_dict entry 'grad_accumulator' of parameter {index} has shape "
                    f"{tuple(accumulator.shape)}; its parameter has shape {tuple(p.shape)}: the "
                    "checkpoint belongs to other parameters")
        self.optimizer.load_state_dict(inner)
        # The wrapped optimizer's loader replaced its group dicts: share the new ones.
        self.param_groups = self.optimizer.param_groups
        self.state = _State(self.optimizer)
        for saved_id, p in zip(saved_ids, params):
            accumulator = accumulators.get(saved_id)
            if accumulator is not None:
                accumulator = load_like(accumulator, p)  # FSDP2: sharded as its parameter
                self.state[p]["grad_accumulator"] = torch.empty_like(p).copy_(accumulator)


class WindowLog:
    """The windows ``update_period="auto"`` groups chose, as they end.

    ``log = WindowLog(optimizer)``, then ``log.record(call)`` after each ``optimizer.step()``:
    for every auto group whose window ended in that step, a row ``[call, level, length]`` is
    added to ``log.rows`` (``level``: the group's index among the optimizer's auto groups;
    ``length``: its window's calls, the group's ``last_period``). Works for any deepmomentum
    optimizer and for :class:`MultiFrequency` (their groups count ``auto_updates``)."""

    def __init__(self, optimizer: torch.optim.Optimizer, rows: Optional[list] = None):
        self.optimizer = optimizer
        self.rows = [] if rows is None else rows
        self._counts = self._updates()

    def _updates(self) -> list[int]:
        return [g.get("auto_updates", 0) for g in self.optimizer.param_groups
                if g.get("update_period") == "auto"]

    def record(self, call: int) -> list[list[int]]:
        """The rows of the windows that ended since the last call (also added to ``rows``)."""
        counts = self._updates()
        groups = [g for g in self.optimizer.param_groups if g.get("update_period") == "auto"]
        new = [[call, level, groups[level]["last_period"]]
               for level, (now, before) in enumerate(zip(counts, self._counts)) if now != before]
        self._counts = counts
        self.rows.extend(new)
        return new
