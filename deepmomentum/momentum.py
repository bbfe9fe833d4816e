"""Momentum read as an associative memory of the gradient stream (SPEC §1–2)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from . import functional as F
from .optimizer import MemoryOptimizer, check_choice, check_flag, check_number

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
        _validate_momentum(group)

    def _fused_unsupported(self, group: dict[str, Any]) -> Optional[str]:
        return None  # torch's fused SGD kernel covers every setting of §1

    def _triton_unsupported(self, group: dict[str, Any]) -> Optional[str]:
        return None  # kernels.elementwise.sgd_step covers every setting of §1

    def _update_triton(self, group, params, grads):
        from .kernels import elementwise

        momentum = group["momentum"]
        for is_first, idx in self._first_step_split(params, momentum):
            elementwise.sgd_step(
                [params[i] for i in idx], [grads[i] for i in idx],
                [self.state[params[i]].get("momentum_buffer") for i in idx], lr=group["lr"],
                momentum=momentum, dampening=group["dampening"], nesterov=group["nesterov"],
                weight_decay=group["weight_decay"],
                decoupled_weight_decay=group["decoupled_weight_decay"],
                maximize=group["maximize"], first_step=is_first)

    def _update(self, group, params, grads, implementation):
        if implementation == "triton":
            self._update_triton(group, params, grads)
            return
        bufs = [self._real(self.state[p].get("momentum_buffer")) for p in params]
        F.associative_momentum(
            [self._real(p) for p in params],
            [self._real(g) for g in grads],
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
      space; ``b K`` is computed as ``(b Gᵀ) G / ‖G‖²`` or ``b (GᵀG) / ‖G‖²``, whichever side
      is smaller (``4·r·c·min(r, c)`` flops, ``min(r, c)²`` memory).
    * ``keys="input"``: the unit-normalized rows of each layer's input, ``K_t = X̂ᵀX̂ / n``
      (NL: keys are the layer inputs, values the local error). Call :meth:`attach` once with
      the model: forward hooks on its ``nn.Linear`` modules (subclasses included) keep at most
      ``key_samples`` rows a step (evenly spaced; micro-batches accumulate until ``step()``).
      Captured keys are detached copies, dropped at every ``step()``. Parameters with no
      captured keys — biases, other module types, a step with no forward — use ``"gradient"``.

    Tensors use the matrix view: 2-D as is, ≥3-D as ``(shape[0], prod(rest))``, 1-D as one row,
    which is the closed form ``b_t = μb − β⟨b, ĝ⟩ĝ + (1 − τ)g`` (R2b).

    Args:
        params: iterable of parameters, named parameters or group dicts.
        lr (float, default 1e-3): γ ≥ 0.
        momentum (float, default 0.9): μ in [0, 1).
        erase (float, default 0.1): β in [0, μ]; the eigenvalues of ``μI − βK`` stay in
            [μ − β, μ], so the memory never grows faster than plain momentum (P2). The default
            comes from ``benchmarks/delta.py`` (README): with μ = 0.9, β = 0.1 reached NL's ψ
            toy target in 114 ± 25 steps against 171 (β = 0.5), 2271 (β = 0.9) and 205 for
            plain momentum, and tied plain momentum on a teacher–student regression.
        keys (str, default "gradient"): "gradient" or "input".
        key_samples (int, default 256): most input rows kept per step (≥ 1).
        dampening, nesterov, weight_decay, decoupled_weight_decay, maximize: as
            :class:`AssociativeMomentum`.
        foreach (bool or None): the final update as one foreach call; fused: not available.

    Reductions (tested as properties): ``erase=0`` equals :class:`AssociativeMomentum`, hence
    ``torch.optim.SGD`` (R2a); 1-D closed form (R2b); the norm bound (P2).

    Example:
        >>> import torch, deepmomentum as dm
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),
        ...                             torch.nn.Linear(8, 1))
        >>> opt = dm.DeltaMomentum(model.parameters(), lr=0.05, keys="input")
        >>> opt.attach(model)
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
    ):
        defaults = dict(lr=lr, momentum=momentum, erase=erase, keys=keys,
                        key_samples=key_samples, dampening=dampening, nesterov=nesterov,
                        weight_decay=weight_decay, maximize=maximize, foreach=foreach,
                        fused=fused, decoupled_weight_decay=decoupled_weight_decay)
        self._captured: dict[Tensor, list[Tensor]] = {}
        self._hooks: list[Any] = []
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        _validate_momentum(group)
        check_number("erase", group["erase"], 0.0, group["momentum"])
        check_choice("keys", group["keys"], KEY_SOURCES)
        samples = group["key_samples"]
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"Invalid key_samples: {samples!r}; key_samples must be an "
                             "integer ≥ 1")

    # --- input keys --------------------------------------------------------------------------

    def attach(self, model: nn.Module) -> "DeltaMomentum":
        """Capture the inputs of ``model``'s ``nn.Linear`` layers as keys for the weights of
        groups with ``keys="input"``. Returns self; :meth:`detach` removes the hooks."""
        wanted = {id(p): g["key_samples"] for g in self.param_groups if g["keys"] == "input"
                  for p in g["params"]}
        for module in model.modules():
            if isinstance(module, nn.Linear) and id(module.weight) in wanted:
                hook = module.register_forward_hook(
                    self._make_hook(module.weight, wanted[id(module.weight)]))
                self._hooks.append(hook)
        return self

    def detach(self) -> None:
        """Remove the hooks added by :meth:`attach` and drop captured keys."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._captured.clear()

    def _make_hook(self, weight: Tensor, samples: int):
        def hook(module, inputs, output):
            if not torch.is_grad_enabled():
                return  # evaluation passes leave no keys
            x = inputs[0].detach().reshape(-1, weight.shape[1])
            rows = self._captured.setdefault(weight, [])
            rows.append(_unit_rows(_evenly_spaced(x, samples)))
            if sum(r.shape[0] for r in rows) > samples:
                self._captured[weight] = [_evenly_spaced(torch.cat(rows), samples)]

        return hook

    def __getstate__(self):
        state = super().__getstate__()
        state = dict(state)
        state["_captured"], state["_hooks"] = {}, []  # hooks belong to a live model
        return state

    def __setstate__(self, state):
        state.setdefault("_captured", {})
        state.setdefault("_hooks", [])
        super().__setstate__(state)

    # --- step --------------------------------------------------------------------------------

    def _triton_unsupported(self, group: dict[str, Any]) -> Optional[str]:
        return None  # erase terms by matmul, the rest in kernels.elementwise.memory_step

    def _update_triton(self, group, params, grads, keys):
        from .kernels import elementwise

        gs = F.effective_grads(params, grads, maximize=group["maximize"],
                               weight_decay=group["weight_decay"],
                               decoupled_weight_decay=group["decoupled_weight_decay"])
        for is_first, idx in self._first_step_split(params, group["momentum"]):
            erase_terms = None
            if not is_first and group["erase"] != 0:
                erase_terms = []
                for i in idx:
                    buf, g = self.state[params[i]]["momentum_buffer"], gs[i]
                    k = F.as_matrix(g) if keys[i] is None else keys[i].to(g.dtype)
                    d = k.pow(2).sum() if keys[i] is None else torch.tensor(
                        float(k.shape[0]), dtype=g.dtype, device=g.device)
                    erase_terms.append(F.erase_along_keys(F.as_matrix(buf), k, d)
                                       .view_as(buf))
            elementwise.memory_step(
                [params[i] for i in idx], [grads[i] for i in idx],
                [self.state[params[i]].get("momentum_buffer") for i in idx], erase_terms,
                lr=float(group["lr"]), momentum=group["momentum"],
                dampening=group["dampening"], nesterov=group["nesterov"],
                weight_decay=group["weight_decay"], erase=group["erase"],
                decoupled_weight_decay=group["decoupled_weight_decay"],
                maximize=group["maximize"], first_step=is_first)

    def _update(self, group, params, grads, implementation):
        captured = self._captured
        keys = [None] * len(params)
        if group["keys"] == "input":
            for i, p in enumerate(params):
                rows = captured.get(p)
                if rows:
                    keys[i] = torch.cat(rows) if len(rows) > 1 else rows[0]
        if implementation == "triton":
            self._update_triton(group, params, grads, keys)
            for p in params:
                captured.pop(p, None)
            return
        bufs = [self.state[p].get("momentum_buffer") for p in params]
        F.delta_momentum(
            params, grads, bufs, keys, lr=group["lr"],
            momentum=group["momentum"], erase=group["erase"], dampening=group["dampening"],
            nesterov=group["nesterov"], weight_decay=group["weight_decay"],
            decoupled_weight_decay=group["decoupled_weight_decay"],
            maximize=group["maximize"], foreach=implementation == "foreach")
        for p, b in zip(params, bufs):
            if b is not None:
                self.state[p]["momentum_buffer"] = b
            captured.pop(p, None)  # keys serve one step and are not kept alive


def _evenly_spaced(x: Tensor, samples: int) -> Tensor:
    """At most ``samples`` rows of ``x``, evenly spaced (deterministic, so runs repeat)."""
    if x.shape[0] <= samples:
        return x.clone()
    index = torch.linspace(0, x.shape[0] - 1, samples, device=x.device).round().long()
    return x.index_select(0, index)


def _unit_rows(x: Tensor) -> Tensor:
    x = x.float() if x.dtype in F.LOW_PRECISION_DTYPES else x
    return x / x.norm(dim=1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
