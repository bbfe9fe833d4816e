"""Each Triton elementwise kernel against the composition of the functional stages it fuses
(``deepmomentum.functional``; TRITON_INTERPRET=1 on the CPU, set in conftest.py), and the
optimizers' Triton path against their references.

A kernel test runs the kernel on one copy of the tensors and the stages (``foreach=False``,
the single-tensor reference) on a clone, over several steps, for fp32/bf16/fp16 parameters
(state fp32) and ragged shapes; the stages run on the same 16-bit parameters, through their
fp32 working copies.
"""

from __future__ import annotations

import pytest
import torch

import deepmomentum as dm
import deepmomentum.functional as dmf
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


def _all_close(xs, ys, dtype):
    assert len(xs) == len(ys)
    for a, b in zip(xs, ys):
        _close(a, b, dtype)


def _states_close(xs, ys, dtype):
    # fp32 state, fed by the (rounded) 16-bit parameters through coupled decay
    assert len(xs) == len(ys)
    for a, b in zip(xs, ys):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=STATE_RTOL[dtype], atol=STATE_RTOL[dtype])


def _tensors(dtype, seed, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype) for s in shapes]


def _states(seed, shapes=SHAPES):
    """Positive fp32 state (a valid second moment too)."""
    return [t.abs() for t in _tensors(torch.float32, seed, shapes)]


def _clones(xs):
    return [x.clone() for x in xs]


def _empty_buffers(params):
    return [torch.empty_like(p, dtype=torch.float32) for p in params]


def _memory_step_stages(params, grads, buffers, erased, reads, *, lr, momentum, dampening,
                        nesterov, weight_decay, erase=0.0, decoupled_weight_decay=False,
                        maximize=False, sign=False):
    """The stages ``memory_step`` fuses, composed as DeltaMomentum/DMGD do; ``buffers`` entries
    that are None start at ``b = g``."""
    works = dmf.working_copies(params)
    gs = dmf.effective_gradients(works, grads, maximize=maximize,
                                 weight_decay=0.0 if decoupled_weight_decay else weight_decay)
    if decoupled_weight_decay:
        dmf.decoupled_decay(works, lr=lr, weight_decay=weight_decay)
    memories = gs if momentum == 0 else dmf.momentum_write(
        buffers, gs, momentum=momentum, write=1 - dampening, erase=erase, erased=erased)
    if reads is not None:
        memories = [m + r for m, r in zip(memories, reads)]
    if nesterov:
        memories = dmf.nesterov_readout(gs, memories, momentum=momentum)
    if sign:
        memories = dmf.sign_readout(memories)
    dmf.apply_updates(params, works, memories, -lr)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", [
    dict(momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.01),
    dict(momentum=0.5, dampening=0.3, nesterov=False, weight_decay=0.1,
         decoupled_weight_decay=True, maximize=True),
    dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0),
])
def test_sgd_kernel_equals_associative_momentum_over_steps(dtype, options):
    p1 = _tensors(dtype, 0)
    p2 = _clones(p1)
    b1, b2 = _empty_buffers(p1), [None] * len(p1)  # the reference creates b₁ = g₁ itself
    for step in range(3):
        grads = _tensors(dtype, 100 + step)
        K.sgd_step(p1, grads, b1, lr=0.05, first_step=step == 0, **options)
        dmf.associative_momentum(p2, grads, b2, lr=0.05, foreach=False, **options)
        _all_close(p1, p2, dtype)
        if options["momentum"] != 0:
            _states_close(b1, b2, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", [
    dict(precondition="readout", preconditioner="adam", weight_decay=0.01),
    dict(precondition="value", preconditioner="adam", weight_decay=0.1,
         decoupled_weight_decay=False, maximize=True),
    dict(precondition="readout", preconditioner="none", weight_decay=0.0),
])
def test_adam_kernel_equals_preconditioned_momentum_over_steps(dtype, options):
    p1 = _tensors(dtype, 0)
    p2 = _clones(p1)
    m1, v1 = _states(10), _states(11)
    m2, v2 = _clones(m1), _clones(v1)
    for step in range(1, 4):
        grads = _tensors(dtype, 200 + step)
        steps = [step + i for i in range(len(SHAPES))]  # tensors at different t
        kwargs = dict(lr=0.01, beta1=0.9, beta2=0.99, eps=1e-8, **options)
        K.adam_step(p1, grads, m1, v1, steps, **kwargs)
        dmf.preconditioned_momentum(p2, grads, m2, v2, [torch.tensor(float(t)) for t in steps],
                                    foreach=False, **kwargs)
        _all_close(p1, p2, dtype)
        _states_close(m1 + v1, m2 + v2, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_accumulate_kernel_equals_the_accumulate_stage(dtype):
    acc1 = _states(300)
    acc2 = _clones(acc1)
    for step in range(3):
        grads = _tensors(dtype, 301 + step)
        K.accumulate(acc1, grads)
        dmf.accumulate(acc2, grads)
    _states_close(acc1, acc2, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nesterov", [True, False])
def test_ema_kernel_equals_ema_write_and_nesterov_readout(dtype, nesterov):
    b1 = _tensors(torch.float32, 400)
    b2 = _clones(b1)
    for step in range(3):
        grads = _tensors(dtype, 401 + step)
        u1 = K.ema_momentum(b1, grads, momentum=0.9, nesterov=nesterov, maximize=step != 1)
        gs = dmf.effective_gradients(grads, grads, maximize=step != 1)
        u2 = dmf.ema_write(b2, gs, beta=0.9)
        if nesterov:
            u2 = dmf.nesterov_readout(gs, u2, momentum=0.9, ema=True)
        _states_close(u1, u2, torch.float32)
        _states_close(b1, b2, torch.float32)
        # torch's lerp op for op (one fma from the nearer end): equal bit for bit
        for x, y in zip(u1 + b1, u2 + b2):
            assert torch.equal(x.view(torch.int32), y.view(torch.int32))
        # new tensors, never the buffers (Newton–Schulz must not alias the state)
        assert all(u.data_ptr() != b.data_ptr() for u, b in zip(u1, b1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_kernel_equals_decoupled_decay_and_apply_updates(dtype):
    p1 = _tensors(dtype, 500)
    p2 = _clones(p1)
    scales = [1.0, 0.5, 2.0, 1.5, 0.2]
    lr, weight_decay = 0.1, 0.1
    for step in range(3):
        updates = _tensors(torch.float32, 501 + step)
        K.apply_update(p1, updates, scales, lr=lr, weight_decay=weight_decay)
        works = dmf.working_copies(p2)
        dmf.decoupled_decay(works, lr=lr, weight_decay=weight_decay)
        dmf.apply_updates(p2, works, updates, [-lr * s for s in scales])
        _all_close(p1, p2, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", [
    dict(momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.01, erase=0.3),
    dict(momentum=0.5, dampening=0.2, nesterov=False, weight_decay=0.1, erase=0.5,
         decoupled_weight_decay=True, maximize=True, sign=True),
    dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0),
])
def test_memory_kernel_equals_its_stages_over_steps(dtype, options):
    p1 = _tensors(dtype, 0)
    p2 = _clones(p1)
    b1, b2 = _empty_buffers(p1), [None] * len(p1)
    for step in range(3):
        grads = _tensors(dtype, 700 + step)
        erased = _tensors(torch.float32, 800 + step)  # stand-ins for b K (fp32)
        reads = _tensors(torch.float32, 900 + step)  # stand-ins for DMGD's keyed read
        K.memory_step(p1, grads, b1, erased, reads, lr=0.05, first_step=step == 0, **options)
        _memory_step_stages(p2, grads, b2, erased, reads, lr=0.05, **options)
        _all_close(p1, p2, dtype)
        if options["momentum"] != 0:
            _states_close(b1, b2, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_m3_write_kernel_equals_its_memory_writes(dtype):
    states1 = [_states(1000 + k) for k in range(3)]  # M¹, V, ΣG
    states2 = [_clones(s) for s in states1]
    betas, decays = (1.0, 0.5, 2.0), (0.9, 0.99, 0.5)
    for step in range(3):
        grads = _tensors(dtype, 1010 + step)
        K.m3_write(grads, *states1, betas=betas, decays=decays, maximize=step == 1)
        fast, second, sums = states2
        gs = dmf.effective_gradients(grads, grads, maximize=step == 1)
        dmf.momentum_write(fast, gs, momentum=decays[0], write=betas[0])
        dmf.second_moment_write(second, gs, decay=decays[1], write=betas[1])
        dmf.accumulate(sums, gs)
        for a, b in zip(states1, states2):
            _states_close(a, b, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_m3_apply_kernel_equals_its_preconditioned_apply(dtype):
    p1 = _tensors(dtype, 1100)
    p2 = _clones(p1)
    second_moments = _states(1101)
    lr, alpha, eps, weight_decay = 0.01, 0.5, 1e-8, 0.1
    for step in range(3):
        o1, o2 = _tensors(torch.float32, 1110 + step), _tensors(torch.float32, 1120 + step)
        K.m3_apply(p1, o1, o2, second_moments, lr=lr, alpha=alpha, eps=eps,
                   weight_decay=weight_decay)
        works = dmf.working_copies(p2)
        dmf.decoupled_decay(works, lr=lr, weight_decay=weight_decay)
        dmf.apply_updates(p2, works, [a.add(b, alpha=alpha) for a, b in zip(o1, o2)], -lr,
                          denominators=dmf.preconditioner_denominators(second_moments, eps=eps))
        _all_close(p1, p2, dtype)


def test_many_tensors_of_mixed_sizes_in_one_launch(monkeypatch):
    launches = []
    real = K._launch

    def counting(kernel, indices, *args, **kwargs):
        launches.append(len(indices))
        return real(kernel, indices, *args, **kwargs)

    monkeypatch.setattr(K, "_launch", counting)
    shapes = [(n,) for n in range(1, 40)]
    params, grads = _tensors(torch.float32, 0, shapes), _tensors(torch.float32, 1, shapes)
    reference = _clones(params)
    options = dict(lr=0.1, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0)
    K.sgd_step(params, grads, _empty_buffers(params), first_step=True, **options)
    dmf.associative_momentum(reference, grads, [None] * len(shapes), foreach=False, **options)
    assert launches == [39]
    _all_close(params, reference, torch.float32)


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
        pytest.skip(probe._impl_unsupported(group, "triton"))
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
