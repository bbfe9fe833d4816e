"""Helpers for property-testing optimizers: hypothesis strategies and trajectory comparison.

Typical use, in a user's own test::

    from hypothesis import given
    from deepmomentum.testing import assert_same_trajectory, parameter_shapes

    @given(shapes=parameter_shapes())
    def test_my_rule_is_sgd(shapes):
        assert_same_trajectory(
            lambda ps: MyOptimizer(ps, lr=0.1, momentum=0.9),
            lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
            shapes=shapes, steps=50, dtype=torch.float64, rtol=1e-12,
        )

Requirements: the strategies (``parameter_shapes``, ``float_dtypes``, ``learning_rates``,
``sgd_hyperparameters``, ``adam_hyperparameters``) need `hypothesis <https://hypothesis.works>`_,
which is not a dependency of ``deepmomentum`` itself: ``pip install hypothesis`` (or
``pip install "deepmomentum[test]"``). It is imported lazily, so this module imports without it,
and ``assert_same_trajectory``, ``run_trajectory`` and ``noisy_quadratic_grads`` work without it;
a strategy asked for without it raises an ``ImportError`` that says so.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = [
    "TrajectoryMismatch",
    "assert_same_trajectory",
    "run_trajectory",
    "noisy_quadratic_grads",
    "parameter_shapes",
    "float_dtypes",
    "learning_rates",
    "sgd_hyperparameters",
    "adam_hyperparameters",
]

Shape = tuple[int, ...]
Made = Union[torch.optim.Optimizer, tuple]  # an optimizer, or (optimizer, lr_scheduler)
GradFn = Callable[[int, Sequence[Tensor]], Sequence[Tensor]]


class TrajectoryMismatch(AssertionError):
    """Two optimizers' trajectories differ; ``step`` and ``tensor`` say where first."""

    def __init__(self, message: str, step: int, tensor: int):
        super().__init__(message)
        self.step = step
        self.tensor = tensor


def noisy_quadratic_grads(seed: int = 0, noise: float = 0.5) -> GradFn:
    """A gradient stream that depends on the parameters, so that any difference between two
    optimizers feeds back into later steps: ``∇ = h ⊙ W + noise``, with a fixed random
    curvature ``h ∈ [0.1, 2]`` per tensor and fresh Gaussian noise each step (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    curvatures: dict[int, Tensor] = {}

    def grads(step: int, params: Sequence[Tensor]) -> list[Tensor]:
        out = []
        for i, p in enumerate(params):
            real = torch.view_as_real(p) if p.is_complex() else p
            if i not in curvatures:
                curvatures[i] = 0.1 + 1.9 * torch.rand(real.shape, generator=generator,
                                                       dtype=torch.float64)
            g = curvatures[i] * real.detach().double()
            g = g + noise * torch.randn(real.shape, generator=generator, dtype=torch.float64)
            g = g.to(real.dtype)
            out.append(torch.view_as_complex(g) if p.is_complex() else g)
        return out

    return grads


def _make_params(shapes: Sequence[Shape], dtype: torch.dtype, seed: int,
                 device: Union[str, torch.device]) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(shape, generator=generator, dtype=torch.float64)
        .to(dtype=dtype, device=device)
        .requires_grad_()
        for shape in shapes
    ]


def run_trajectory(make: Callable[[list[Tensor]], Made], params: Sequence[Tensor], steps: int,
                   grad_fn: Optional[GradFn] = None, seed: int = 0) -> list[list[Tensor]]:
    """Run ``make(params)`` for ``steps`` steps; return a snapshot of the parameters after each
    step. The parameters given are cloned first and never modified."""
    params = [p.detach().clone().requires_grad_() for p in params]
    made = make(params)
    optimizer, scheduler = made if isinstance(made, tuple) else (made, None)
    grad_fn = grad_fn or noisy_quadratic_grads(seed)
    history = []
    for step in range(steps):
        for p, g in zip(params, grad_fn(step, params)):
            p.grad = g.to(device=p.device, dtype=p.dtype) if g is not None else None
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        history.append([p.detach().clone() for p in params])
    return history


def assert_same_trajectory(
    make_a: Callable[[list[Tensor]], Made],
    make_b: Callable[[list[Tensor]], Made],
    *,
    shapes: Sequence[Shape] = ((4, 3), (5,)),
    params: Optional[Sequence[Tensor]] = None,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
    steps: int = 10,
    rtol: float = 1e-6,
    atol: float = 0.0,
    grad_fn_factory: Optional[Callable[[], GradFn]] = None,
    seed: int = 0,
) -> list[Tensor]:
    """Run two optimizers on identical parameters and gradient streams and compare them.

    ``make_a``/``make_b`` take the list of parameters and return an optimizer, or a pair
    ``(optimizer, lr_scheduler)`` whose scheduler is stepped after every optimizer step.
    Parameters are ``params`` (cloned) or random tensors of ``shapes`` in ``dtype``. The gradient
    stream comes from ``grad_fn_factory()`` (called once per run so both runs see the same
    stream; default: :func:`noisy_quadratic_grads`, which depends on the parameters).

    After every step each parameter must satisfy ``|a − b| ≤ atol + rtol·|b|`` elementwise
    (relative to ``b``'s trajectory, the reference); otherwise :class:`TrajectoryMismatch`
    names the first step and tensor that differ and by how much. Returns ``a``'s final params.
    """
    if params is None:
        params = _make_params(shapes, dtype, seed, device)
    factory = grad_fn_factory or (lambda: noisy_quadratic_grads(seed))
    traj_a = run_trajectory(make_a, params, steps, factory())
    traj_b = run_trajectory(make_b, params, steps, factory())
    for step, (snap_a, snap_b) in enumerate(zip(traj_a, traj_b), start=1):
        for index, (a, b) in enumerate(zip(snap_a, snap_b)):
            if a.shape != b.shape or a.dtype != b.dtype:
                raise TrajectoryMismatch(
                    f"step {step}, tensor {index}: shape/dtype {tuple(a.shape)}/{a.dtype} vs "
                    f"{tuple(b.shape)}/{b.dtype}", step, index)
            if a.is_complex():
                a64, b64 = torch.view_as_real(a.cdouble()), torch.view_as_real(b.cdouble())
            else:
                a64, b64 = a.double(), b.double()
            err = (a64 - b64).abs()
            allowed = atol + rtol * b64.abs()
            bad = ~(err <= allowed)  # NaN counts as a mismatch
            if bad.any():
                where = tuple(int(i) for i in bad.nonzero()[0])
                rel = (err / b64.abs().clamp_min(1e-300)).max().item()
                raise TrajectoryMismatch(
                    f"trajectories differ first at step {step}, tensor {index} "
                    f"(shape {tuple(a.shape)}, {a.dtype}), element {where}: "
                    f"a={a64[where].item()!r}, b={b64[where].item()!r}; "
                    f"max abs err {err.max().item():.3e}, max rel err {rel:.3e} "
                    f"(rtol={rtol}, atol={atol})", step, index)
    return traj_a[-1] if traj_a else [p.detach().clone() for p in params]


# --- hypothesis strategies -------------------------------------------------------------------


def _st():
    """hypothesis.strategies, imported only when a strategy is asked for."""
    try:
        from hypothesis import strategies
    except ImportError as error:
        raise ImportError(
            "deepmomentum.testing's strategies need hypothesis, which deepmomentum does not "
            "install: pip install hypothesis (or pip install \"deepmomentum[test]\")") from error

    return strategies


def parameter_shapes(min_tensors: int = 1, max_tensors: int = 4, max_dims: int = 4,
                     max_side: int = 9, allow_scalar: bool = True):
    """Lists of parameter shapes: scalars (0-d), vectors, matrices (tall, wide, square) and
    conv-like ≥3-d tensors, each side in [1, max_side]."""
    st = _st()
    shape = st.lists(st.integers(1, max_side), min_size=0 if allow_scalar else 1,
                     max_size=max_dims).map(tuple)
    return st.lists(shape, min_size=min_tensors, max_size=max_tensors)


def float_dtypes(low_precision: bool = False, float64: bool = True):
    """Floating dtypes to draw parameters in."""
    st = _st()
    dtypes = [torch.float32] + ([torch.float64] if float64 else [])
    if low_precision:
        dtypes += [torch.bfloat16, torch.float16]
    return st.sampled_from(dtypes)


def learning_rates(low: float = 1e-4, high: float = 0.5):
    """Learning rates on a log scale in [low, high]."""
    st = _st()
    return st.floats(math.log(low), math.log(high)).map(math.exp)


def sgd_hyperparameters():
    """Keyword arguments shared by ``torch.optim.SGD`` and :class:`AssociativeMomentum`.

    The edge cases are drawn on purpose, not left to chance: momentum ``μ = 0`` (no buffer;
    torch then ignores dampening) on about a third of the draws, and dampening ``τ`` exactly 0
    or 1 on about half of the draws without Nesterov, also together with ``μ = 0``.
    ``nesterov=True`` (about a third of the draws) comes only where torch accepts it:
    ``μ > 0`` and ``τ = 0``.
    """
    st = _st()
    shared = {
        "lr": learning_rates(),
        "weight_decay": st.one_of(st.just(0.0), st.floats(0.0, 0.1)),
        "maximize": st.booleans(),
    }
    plain = st.fixed_dictionaries({
        **shared,
        "momentum": st.one_of(st.just(0.0), st.floats(0.0, 0.99)),
        "dampening": st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0)),
        "nesterov": st.just(False),
    })
    nesterov = st.fixed_dictionaries({
        **shared,
        "momentum": st.one_of(st.sampled_from([0.5, 0.9, 0.99]), st.floats(0.05, 0.99)),
        "dampening": st.just(0.0),
        "nesterov": st.just(True),
    })
    # Two plain draws to one Nesterov draw: μ = 0 and τ = 1 occur only in the plain ones.
    return st.sampled_from([False, False, True]).flatmap(lambda n: nesterov if n else plain)


def adam_hyperparameters():
    """Keyword arguments shared by ``torch.optim.Adam(W)`` and :class:`PreconditionedMomentum`."""
    st = _st()
    return st.fixed_dictionaries({
        "lr": learning_rates(1e-4, 0.1),
        "betas": st.tuples(st.floats(0.0, 0.99), st.floats(0.5, 0.9999)),
        "eps": st.sampled_from([1e-8, 1e-6, 1e-3]),
        "weight_decay": st.one_of(st.just(0.0), st.floats(0.0, 0.1)),
        "maximize": st.booleans(),
    })
