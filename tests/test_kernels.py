"""Triton elementwise kernels against their torch twins (TRITON_INTERPRET=1 on the CPU, set in
conftest.py), and the optimizers' Triton path against their references."""

from __future__ import annotations

import pytest
import torch

import deepmomentum as dm
from deepmomentum import kernels
from deepmomentum.testing import run_trajectory

from registry import cases

# The kernels need triton (the `triton` extra, part of `test`); without it the module skips.
K = pytest.importorskip("deepmomentum.kernels.elementwise", reason="needs triton")

# Ragged sizes: smaller than a block, a scalar, one past a block boundary, several blocks.
SHAPES = [(5,), (), (3, 7), (K.BLOCK + 1,), (2, K.BLOCK + 3)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
STATE_RTOL = {torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-4}


def _close(a, b, dtype):
    # fp32 to 1e-6 relative; 16-bit parameters within a few roundings of their dtype (one per
    # step at most: the interpreter's conversion may round differently from torch's
    # round-to-nearest-even, and the parameter is read back each step).
    tol = {torch.float32: (1e-6, 1e-6), torch.bfloat16: (2**-5, 2**-5),
           torch.float16: (2**-8, 2**-8)}[dtype]
    torch.testing.assert_close(a.float(), b.float(), rtol=tol[0], atol=tol[1])


def _tensors(dtype, seed, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype) for s in shapes]


def _twin_pair(dtype, seed=0, state=1):
    params = _tensors(dtype, seed)
    states = [[torch.randn(s, generator=torch.Generator().manual_seed(seed + 10 + k)).abs()
               for s in SHAPES] for k in range(state)]
    return (params, states), ([p.clone() for p in params], [[t.clone() for t in s] for s in states])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", [
    dict(momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.01),
    dict(momentum=0.5, dampening=0.3, nesterov=False, weight_decay=0.1,
         decoupled_weight_decay=True, maximize=True),
    dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0),
])
def test_sgd_kernel_equals_its_twin_over_steps(dtype, options):
    (p1, (b1,)), (p2, (b2,)) = _twin_pair(dtype)
    for step in range(3):
        grads = _tensors(dtype, 100 + step)
        kwargs = dict(lr=0.05, first_step=step == 0, **options)
        K.sgd_step(p1, grads, b1, **kwargs)
        K.sgd_step_torch(p2, grads, b2, **kwargs)
        for a, b in zip(p1, p2):
            _close(a, b, dtype)
        for a, b in zip(b1, b2):  # fp32 state, fed by the (rounded) parameters via decay
            torch.testing.assert_close(a, b, rtol=STATE_RTOL[dtype], atol=STATE_RTOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", [
    dict(precondition="readout", preconditioner="adam", weight_decay=0.01),
    dict(precondition="value", preconditioner="adam", weight_decay=0.1,
         decoupled_weight_decay=False, maximize=True),
    dict(precondition="readout", preconditioner="none", weight_decay=0.0),
])
def test_adam_kernel_equals_its_twin_over_steps(dtype, options):
    (p1, (m1, v1)), (p2, (m2, v2)) = _twin_pair(dtype, state=2)
    for step in range(1, 4):
        grads = _tensors(dtype, 200 + step)
        kwargs = dict(lr=0.01, beta1=0.9, beta2=0.99, eps=1e-8, **options)
        steps = [step + i for i in range(len(SHAPES))]  # tensors at different t
        K.adam_step(p1, grads, m1, v1, steps, **kwargs)
        K.adam_step_torch(p2, grads, m2, v2, steps, **kwargs)
        for a, b in zip(p1, p2):
            _close(a, b, dtype)
        for a, b in zip(m1 + v1, m2 + v2):
            torch.testing.assert_close(a, b, rtol=STATE_RTOL[dtype], atol=STATE_RTOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_accumulate_ema_and_apply_kernels_equal_their_twins(dtype):
    acc1 = [torch.zeros(s) for s in SHAPES]
    acc2 = [a.clone() for a in acc1]
    for step in range(3):
        grads = _tensors(dtype, 300 + step)
        K.accumulate(acc1, grads)
        K.accumulate_torch(acc2, grads)
    for a, b in zip(acc1, acc2):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)

    for nesterov in (True, False):
        b1 = _tensors(torch.float32, 400)
        b2 = [b.clone() for b in b1]
        grads = _tensors(dtype, 401)
        u1 = K.ema_momentum(b1, grads, momentum=0.9, nesterov=nesterov, maximize=True)
        u2 = K.ema_momentum_torch(b2, grads, momentum=0.9, nesterov=nesterov, maximize=True)
        for x, y in zip(u1 + b1, u2 + b2):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
        assert all(u.data_ptr() != b.data_ptr() for u, b in zip(u1, b1))  # never aliased

    p1 = _tensors(dtype, 500)
    p2 = [p.clone() for p in p1]
    updates = _tensors(torch.float32, 501)
    scales = [1.0, 0.5, 2.0, 1.5, 0.2]
    K.apply_update(p1, updates, scales, lr=0.1, weight_decay=0.1)
    K.apply_update_torch(p2, updates, scales, lr=0.1, weight_decay=0.1)
    for a, b in zip(p1, p2):
        _close(a, b, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", [
    dict(momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.01, erase=0.3),
    dict(momentum=0.5, dampening=0.2, nesterov=False, weight_decay=0.1, erase=0.5,
         decoupled_weight_decay=True, maximize=True, sign=True),
    dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0),
])
def test_memory_kernel_equals_its_twin_over_steps(dtype, options):
    (p1, (b1,)), (p2, (b2,)) = _twin_pair(dtype)
    for step in range(3):
        grads = _tensors(dtype, 700 + step)
        extra = _tensors(torch.float32, 800 + step)
        reads = _tensors(torch.float32, 900 + step)
        kwargs = dict(lr=0.05, first_step=step == 0, **options)
        K.memory_step(p1, grads, b1, extra, reads, **kwargs)
        K.memory_step_torch(p2, grads, b2, extra, reads, **kwargs)
        for a, b in zip(p1, p2):
            _close(a, b, dtype)
        for a, b in zip(b1, b2):
            torch.testing.assert_close(a, b, rtol=STATE_RTOL[dtype], atol=STATE_RTOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_m3_kernels_equal_their_twins(dtype):
    states1 = [[torch.rand(s) for s in SHAPES] for _ in range(3)]
    states2 = [[t.clone() for t in st] for st in states1]
    for step in range(3):
        grads = _tensors(dtype, 1000 + step)
        kw = dict(betas=(1.0, 0.5, 2.0), decays=(0.9, 0.99, 0.5), maximize=step == 1)
        K.m3_write(grads, *states1, **kw)
        K.m3_write_torch(grads, *states2, **kw)
    for a, b in zip(sum(states1, []), sum(states2, [])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    p1 = _tensors(dtype, 1100)
    p2 = [p.clone() for p in p1]
    o1, o2 = _tensors(torch.float32, 1101), _tensors(torch.float32, 1102)
    kw = dict(lr=0.01, alpha=0.5, eps=1e-8, weight_decay=0.1)
    K.m3_apply(p1, o1, o2, states1[1], **kw)
    K.m3_apply_torch(p2, o1, o2, states2[1], **kw)
    for a, b in zip(p1, p2):
        _close(a, b, dtype)


def test_many_tensors_of_mixed_sizes_in_one_launch(monkeypatch):
    launches = []
    real = K._launch

    def counting(kernel, indices, *args, **kwargs):
        launches.append(len(indices))
        return real(kernel, indices, *args, **kwargs)

    monkeypatch.setattr(K, "_launch", counting)
    shapes = [(n,) for n in range(1, 40)]
    params, grads = _tensors(torch.float32, 0, shapes), _tensors(torch.float32, 1, shapes)
    bufs = [torch.zeros(s) for s in shapes]
    twin = [p.clone() for p in params]
    K.sgd_step(params, grads, bufs, lr=0.1, momentum=0.9, dampening=0.0, nesterov=False,
               weight_decay=0.0, first_step=True)
    K.sgd_step_torch(twin, grads, [b.clone() for b in bufs], lr=0.1, momentum=0.9,
                     dampening=0.0, nesterov=False, weight_decay=0.0, first_step=True)
    assert launches == [39]
    for a, b in zip(params, twin):
        torch.testing.assert_close(a, b)


def test_grad_scale_and_found_inf_are_consumed():
    (p1, (b1,)), (p2, (b2,)) = _twin_pair(torch.float32)
    grads = _tensors(torch.float32, 600)
    scaled = [g * 8 for g in grads]
    kwargs = dict(lr=0.1, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0)
    K.sgd_step(p1, scaled, b1, grad_scale=torch.tensor(8.0), found_inf=torch.tensor(0.0), **kwargs)
    K.sgd_step_torch(p2, grads, b2, **kwargs)
    for a, b in zip(p1, p2):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    before = [p.clone() for p in p1]
    K.sgd_step(p1, scaled, b1, grad_scale=torch.tensor(8.0), found_inf=torch.tensor(1.0), **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(p1, before))


def test_non_contiguous_parameters_are_rejected_by_position():
    p = torch.randn(4, 6).T
    with pytest.raises(ValueError, match=r"params\[0\].*not contiguous"):
        K.sgd_step([p], [torch.randn(6, 4)], [torch.zeros(6, 4)], lr=0.1, momentum=0.9,
                   dampening=0.0, nesterov=False, weight_decay=0.0)


# --- the optimizers' Triton path, routed on CPU tensors through the interpreter -------------


@pytest.fixture
def triton_on_cpu(monkeypatch):
    monkeypatch.setattr(kernels, "usable", lambda params: bool(params))


@pytest.mark.parametrize("info,variant", cases())
@pytest.mark.parametrize("period", [1, 3])
def test_optimizer_triton_path_equals_the_reference(triton_on_cpu, info, variant, period):
    # The registry's settings on the Triton path (fp32; NS in fp32 so paths compare tightly).
    if info.matrix_only:
        variant = {**variant, "ns_dtype": torch.float32}
    params = [torch.randn(s, generator=torch.Generator().manual_seed(i))
              for i, s in enumerate(info.shapes(variant))]

    def make(impl):
        return lambda ps: info.make([{"params": ps, "update_period": period}], **variant,
                                    **impl)

    probe = make({})([p.clone().requires_grad_() for p in params])
    group = probe.param_groups[0]
    if not probe._has_triton_path(group):
        pytest.skip(probe._triton_unsupported(group))
    assert probe._implementation(group, group["params"]) == "triton"
    a = run_trajectory(make({}), params, 6)
    b = run_trajectory(make({"foreach": False}), params, 6)
    for x, y in zip(a[-1], b[-1]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_grad_scaler_steps_like_unscaled_gradients():
    def loss_of(ps):
        return sum((p**2).sum() for p in ps)

    def run(use_scaler):
        torch.manual_seed(0)
        ps = [torch.randn(3, 2, requires_grad=True)]
        opt = dm.PreconditionedMomentum(ps, lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        for _ in range(3):
            opt.zero_grad()
            if use_scaler:
                scaler.scale(loss_of(ps)).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss_of(ps).backward()
                opt.step()
        return ps[0].detach()

    torch.testing.assert_close(run(True), run(False), rtol=1e-6, atol=1e-7)


def test_found_inf_skips_the_step():
    p = torch.ones(3, requires_grad=True)
    opt = dm.AssociativeMomentum([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.grad_scale, opt.found_inf = torch.tensor(2.0), torch.tensor(1.0)
    opt.step()
    assert torch.equal(p, torch.ones(3)) and not opt.state
