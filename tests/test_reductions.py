"""SPEC.md reductions R1, R3a, R3b as hypothesis properties against torch.optim and closed forms.

Each draw picks parameter shapes, a dtype, hyperparameters, a split into two param groups (the
second with its own lr) and sometimes an LR scheduler, then runs 50 steps of a gradient stream
that depends on the parameters (so any difference feeds back) and compares after every step.
Every implementation is checked: the single-tensor reference and foreach against torch's
for-loop and foreach paths, fused against torch's fused kernel.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st

import deepmomentum as dm
from deepmomentum.testing import (
    adam_hyperparameters,
    assert_same_trajectory,
    noisy_quadratic_grads,
    parameter_shapes,
    run_trajectory,
    sgd_hyperparameters,
)

STEPS = 50
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-14), torch.float32: dict(rtol=1e-6, atol=1e-7)}
# (ours, torch's): the same implementation on both sides, so the arithmetic is the same.
IMPLEMENTATIONS = [
    ({"foreach": False}, {"foreach": False}),
    ({"foreach": True}, {"foreach": True}),
    ({"fused": True}, {"fused": True}),
]

dtypes = st.sampled_from([torch.float64, torch.float32])
schedulers = st.sampled_from([None, "step", "exponential", "cosine"])
group_lr_scales = st.sampled_from([1.0, 0.3, 3.0])


def _scheduler(opt, kind):
    if kind == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
    if kind == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.97)
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)
    return None


def _factory(cls, kwargs, impl, scale, scheduler):
    """Params split into two groups (the second with lr × scale), plus an optional scheduler."""

    def make(params):
        groups = [{"params": params[::2]}]
        if params[1::2]:
            groups.append({"params": params[1::2], "lr": kwargs["lr"] * scale})
        opt = cls(groups, **kwargs, **impl)
        sched = _scheduler(opt, scheduler)
        return (opt, sched) if sched is not None else opt

    return make


@given(shapes=parameter_shapes(max_tensors=4), dtype=dtypes, kwargs=sgd_hyperparameters(),
       scale=group_lr_scales, scheduler=schedulers, decay=st.booleans())
@pytest.mark.parametrize("ours,theirs", IMPLEMENTATIONS, ids=["single", "foreach", "fused"])
def test_R1_associative_momentum_equals_torch_sgd(ours, theirs, shapes, dtype, kwargs, scale,
                                                 scheduler, decay):
    if not decay:
        kwargs["weight_decay"] = 0.0
    assert_same_trajectory(
        _factory(dm.AssociativeMomentum, kwargs, ours, scale, scheduler),
        _factory(torch.optim.SGD, kwargs, theirs, scale, scheduler),
        shapes=shapes, dtype=dtype, steps=STEPS, **TOL[dtype],
    )


@given(shapes=parameter_shapes(max_tensors=4), dtype=dtypes, kwargs=adam_hyperparameters(),
       scale=group_lr_scales, scheduler=schedulers)
@pytest.mark.parametrize("ours,theirs", IMPLEMENTATIONS, ids=["single", "foreach", "fused"])
def test_R3a_readout_preconditioning_equals_torch_adamw(ours, theirs, shapes, dtype, kwargs,
                                                        scale, scheduler):
    assert_same_trajectory(
        _factory(dm.PreconditionedMomentum, kwargs, ours, scale, scheduler),
        _factory(torch.optim.AdamW, kwargs, theirs, scale, scheduler),
        shapes=shapes, dtype=dtype, steps=STEPS, **TOL[dtype],
    )


@given(shapes=parameter_shapes(max_tensors=4), dtype=dtypes, kwargs=adam_hyperparameters(),
       scale=group_lr_scales, scheduler=schedulers, coupled_decay=st.booleans())
@pytest.mark.parametrize("ours,theirs", IMPLEMENTATIONS, ids=["single", "foreach", "fused"])
def test_R3a_without_decoupled_decay_equals_torch_adam(ours, theirs, shapes, dtype, kwargs,
                                                       scale, scheduler, coupled_decay):
    # λ = 0 is Adam; coupled decay (λW added to the gradient) is Adam's weight_decay.
    if not coupled_decay:
        kwargs["weight_decay"] = 0.0
    assert_same_trajectory(
        _factory(dm.PreconditionedMomentum, {**kwargs, "decoupled_weight_decay": False}, ours,
                 scale, scheduler),
        _factory(torch.optim.Adam, kwargs, theirs, scale, scheduler),
        shapes=shapes, dtype=dtype, steps=STEPS, **TOL[dtype],
    )


@given(shapes=parameter_shapes(max_tensors=3), beta1=st.floats(0.0, 0.99),
       precondition=st.sampled_from(["readout", "value"]), foreach=st.booleans(),
       seed=st.integers(0, 2**16))
def test_R3b_no_preconditioner_gives_the_bias_corrected_gradient_ema(shapes, beta1, precondition,
                                                                    foreach, seed):
    # With lr = 1 and W_0 = 0, W_t = −Σ_{k≤t} U_k where
    # U_k = Σ_{s≤k} β^{k−s}(1−β) G_s / (1 − β^k): computed here from the gradients directly.
    grads_seen: list[list[torch.Tensor]] = []
    stream = noisy_quadratic_grads(seed)

    def recording(step, params):
        grads = stream(step, params)
        grads_seen.append([g.clone() for g in grads])
        return grads

    params = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    trajectory = run_trajectory(
        lambda ps: dm.PreconditionedMomentum(ps, lr=1.0, betas=(beta1, 0.999),
                                             preconditioner="none", precondition=precondition,
                                             weight_decay=0.0, foreach=foreach),
        params, 20, grad_fn=recording)
    for i in range(len(shapes)):
        w = torch.zeros(shapes[i], dtype=torch.float64)
        for k in range(1, 21):
            ema = sum(beta1 ** (k - s) * (1 - beta1) * grads_seen[s - 1][i] for s in range(1, k + 1))
            w = w - ema / (1 - beta1**k)
            torch.testing.assert_close(trajectory[k - 1][i], w, rtol=1e-10, atol=1e-12)


def test_R3b_differs_from_sgd_with_dampening_on_the_first_step():
    # SPEC §3 note: torch SGD starts its buffer at b_1 = G_1, the EMA at (1 − β)G_1 / (1 − β).
    # They agree on step 1 only because of the bias correction; from step 2 they differ.
    a = run_trajectory(lambda ps: dm.PreconditionedMomentum(ps, lr=0.1, betas=(0.9, 0.999),
                                                            preconditioner="none",
                                                            weight_decay=0.0),
                       [torch.ones(3, dtype=torch.float64)], 2)
    b = run_trajectory(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.9),
                       [torch.ones(3, dtype=torch.float64)], 2)
    torch.testing.assert_close(a[0][0], b[0][0])
    assert not torch.allclose(a[1][0], b[1][0])
