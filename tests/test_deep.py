"""DeepMomentum (DMGD): SPEC §4 reductions R4a, R4b, P4, the inner gradients, and learning."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st

import deepmomentum as dm
import deepmomentum.functional as dmf
from deepmomentum.testing import (
    assert_same_trajectory,
    float_dtypes,
    learning_rates,
    parameter_shapes,
    run_trajectory,
    sgd_hyperparameters,
)

TOL = {torch.float64: dict(rtol=1e-12, atol=1e-14), torch.float32: dict(rtol=1e-6, atol=1e-7)}
# Distinct shapes: each matrix is orthogonalized on its own, as in the loops compared against
# (same-shape matrices are batched, which rounds differently in bf16: tests/test_muon.py).
matrix_shapes = st.lists(st.tuples(st.integers(1, 10), st.integers(1, 10)), min_size=1,
                         max_size=3, unique=True)


@given(shapes=parameter_shapes(), dtype=float_dtypes(), kwargs=sgd_hyperparameters(),
       no_memory=st.sampled_from([{"hidden": 0}, {"memory_lr": 0.0}]), foreach=st.booleans(),
       objective=st.sampled_from(dmf.DMGD_OBJECTIVES))
def test_R4a_without_a_keyed_memory_equals_torch_sgd(shapes, dtype, kwargs, no_memory, foreach,
                                                     objective):
    assert_same_trajectory(
        lambda ps: dm.DMGD(ps, **kwargs, **no_memory, objective=objective, foreach=foreach),
        lambda ps: torch.optim.SGD(ps, **kwargs, foreach=False),
        shapes=shapes, dtype=dtype, steps=50, **TOL[dtype])


@given(shapes=matrix_shapes, lr=learning_rates(1e-3, 0.1), momentum=st.floats(0.0, 0.99),
       weight_decay=st.floats(0.0, 0.2), adjust=st.sampled_from([None, "match_rms_adamw",
                                                                 "spectral"]))
def test_R4b_newton_schulz_output_is_the_muon_loop(shapes, lr, momentum, weight_decay, adjust):
    from deepmomentum.newton_schulz import adjusted_lr_scale

    def by_hand(ps):
        bufs = [None] * len(ps)

        class Loop:
            def step(self):
                for i, p in enumerate(ps):
                    g = p.grad
                    bufs[i] = g.clone() if bufs[i] is None else momentum * bufs[i] + g
                    if momentum == 0:
                        bufs[i] = g.clone()
                    s = adjusted_lr_scale(adjust, *p.shape)
                    with torch.no_grad():
                        p.mul_(1 - lr * weight_decay).sub_(lr * s * dm.newton_schulz(bufs[i]))

        return Loop()

    assert_same_trajectory(
        lambda ps: dm.DMGD(ps, lr=lr, momentum=momentum, hidden=0, output="newton_schulz",
                           weight_decay=weight_decay, decoupled_weight_decay=True,
                           adjust_lr_fn=adjust),
        by_hand, shapes=shapes, steps=10, rtol=1e-6, atol=1e-7)


@given(shapes=matrix_shapes, lr=learning_rates(1e-3, 0.1), weight_decay=st.floats(0.0, 0.2),
       nesterov=st.booleans())
def test_R4b_without_momentum_equals_torch_muon(shapes, lr, weight_decay, nesterov):
    assert_same_trajectory(
        lambda ps: dm.DMGD(ps, lr=lr, momentum=0.0, hidden=0, output="newton_schulz",
                           weight_decay=weight_decay, decoupled_weight_decay=True),
        lambda ps: torch.optim.Muon(ps, lr=lr, momentum=0.0, nesterov=nesterov,
                                    weight_decay=weight_decay),
        shapes=shapes, steps=10, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("activation", dmf.DMGD_ACTIVATIONS)
def test_P4_a_zero_gradient_reads_zero_from_the_keyed_memory(activation):
    g = torch.Generator().manual_seed(0)
    keys = dmf.unit_rows(torch.zeros(2, 4, 6, dtype=torch.float64))
    A = torch.randn(2, 6, 5, generator=g, dtype=torch.float64)
    B = torch.randn(2, 5, 6, generator=g, dtype=torch.float64)
    read = dmf.activate(activation, keys @ A)[0] @ B
    assert torch.equal(read, torch.zeros_like(read))

    # Through the optimizer: after a zero gradient the step is the decayed buffer alone.
    p = torch.zeros(4, 6, dtype=torch.float64, requires_grad=True)
    opt = dm.DMGD([p], lr=0.1, momentum=0.9, hidden=5, memory_lr=0.5, activation=activation)
    p.grad = torch.randn(4, 6, generator=g, dtype=torch.float64)
    opt.step()
    b1, before = opt.state[p]["momentum_buffer"].clone(), p.detach().clone()
    p.grad = torch.zeros(4, 6, dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(p.detach(), before - 0.1 * 0.9 * b1)


@given(batch=st.integers(1, 3), rows=st.integers(1, 7), cols=st.integers(1, 7),
       hidden=st.integers(1, 6), objective=st.sampled_from(dmf.DMGD_OBJECTIVES),
       activation=st.sampled_from(dmf.DMGD_ACTIVATIONS), seed=st.integers(0, 1000))
def test_closed_form_inner_gradients_equal_autograd(batch, rows, cols, hidden, objective,
                                                    activation, seed):
    g = torch.Generator().manual_seed(seed)
    keys = dmf.unit_rows(torch.randn(batch, rows, cols, generator=g, dtype=torch.float64))
    values = torch.randn(batch, rows, cols, generator=g, dtype=torch.float64)
    A = torch.randn(batch, cols, hidden, generator=g, dtype=torch.float64).requires_grad_()
    B = torch.randn(batch, hidden, cols, generator=g, dtype=torch.float64).requires_grad_()
    act = {"tanh": torch.tanh, "relu": torch.relu, "silu": torch.nn.functional.silu,
           "gelu": torch.nn.functional.gelu}[activation]
    read = act(keys @ A) @ B
    if objective == "dot":
        loss = -(read * values).sum() / rows
    else:
        loss = 0.5 * ((read - values) ** 2).sum() / rows
    grad_A, grad_B = torch.autograd.grad(loss, (A, B))
    ours_A, ours_B = dmf.deep_memory_gradients(keys, values, A.detach(), B.detach(),
                                             objective=objective, activation=activation)
    torch.testing.assert_close(ours_A, grad_A, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours_B, grad_B, rtol=1e-10, atol=1e-12)


def _recurring_stream(steps, seed=0):
    """Three fixed gradient matrices in turn: the same keys recur with the same values."""
    g = torch.Generator().manual_seed(seed)
    patterns = [torch.randn(6, 8, generator=g, dtype=torch.float64) for _ in range(3)]
    return patterns, [patterns[t % 3] for t in range(steps)]


def _keyed_read(state, grad, activation="tanh"):
    keys = dmf.unit_rows(grad)
    return dmf.activate(activation, keys @ state["memory_A"])[0] @ state["memory_B"]


def test_l2_memory_converges_to_the_values_of_recurring_keys():
    patterns, stream = _recurring_stream(3000)
    p = torch.zeros(6, 8, dtype=torch.float64, requires_grad=True)
    opt = dm.DMGD([p], lr=0.0, momentum=0.999, hidden=32, memory_lr=0.3, objective="l2")
    errors = []
    for grad in stream:
        p.grad = grad
        opt.step()
        if len(errors) < 3:
            errors.append(max((_keyed_read(opt.state[p], q) - q).norm() / q.norm()
                              for q in patterns).item())
    final = max((_keyed_read(opt.state[p], q) - q).norm() / q.norm() for q in patterns).item()
    assert errors[0] > 0.9  # B starts at 0: the memory first reads nothing
    assert final < 0.1, final  # ... and ends up recalling each key's value


def test_dot_memory_aligns_with_the_values_of_recurring_keys():
    patterns, stream = _recurring_stream(300)
    p = torch.zeros(6, 8, dtype=torch.float64, requires_grad=True)
    opt = dm.DMGD([p], lr=0.0, momentum=0.9, hidden=32, memory_lr=0.01, objective="dot")
    for grad in stream:
        p.grad = grad
        opt.step()
    for q in patterns:
        read = _keyed_read(opt.state[p], q)
        cosine = torch.nn.functional.cosine_similarity(read.flatten(), q.flatten(), dim=0)
        assert cosine > 0.5, cosine  # random directions in 48 dims have |cos| ≈ 0.1


def test_the_keyed_memory_changes_the_trajectory():
    # Not secretly momentum: with a keyed memory the path differs from AssociativeMomentum.
    with pytest.raises(AssertionError):
        assert_same_trajectory(lambda ps: dm.DMGD(ps, lr=0.1, memory_lr=0.1),
                               lambda ps: dm.AssociativeMomentum(ps, lr=0.1),
                               dtype=torch.float64, steps=5, rtol=1e-6)


def test_batched_inner_step_equals_the_reference_on_many_same_shape_tensors():
    params = [torch.randn(5, 4, dtype=torch.float64) for _ in range(4)] + [
        torch.randn(3, 7, dtype=torch.float64)]
    a = run_trajectory(lambda ps: dm.DMGD(ps, lr=0.05, memory_lr=0.1, objective="l2",
                                          values="preconditioned"), params, 10)
    b = run_trajectory(lambda ps: dm.DMGD(ps, lr=0.05, memory_lr=0.1, objective="l2",
                                          values="preconditioned", foreach=False), params, 10)
    for x, y in zip(a[-1], b[-1]):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)


def test_state_survives_a_round_trip_in_its_own_dtype():
    p = torch.randn(6, 4).bfloat16().requires_grad_()
    opt = dm.DMGD([p], lr=0.01, hidden=4)
    p.grad = torch.randn(6, 4).bfloat16()
    opt.step()
    fresh = dm.DMGD([p], lr=0.01, hidden=4)
    fresh.load_state_dict(opt.state_dict())
    for key in ("memory_A", "memory_B", "momentum_buffer"):
        assert fresh.state[p][key].dtype == torch.float32
        assert torch.equal(fresh.state[p][key], opt.state[p][key])


def test_decaying_the_key_projection_by_momentum_empties_the_memory():
    # Why key_decay defaults to 1: SPEC §4's literal rule (key_decay=None) decays A by μ too,
    # and on this stream the feature map shrinks until the keyed memory reads almost nothing.
    patterns, stream = _recurring_stream(300)
    reads = {}
    for key_decay in (None, 1.0):
        p = torch.zeros(6, 8, dtype=torch.float64, requires_grad=True)
        opt = dm.DMGD([p], lr=0.0, momentum=0.9, hidden=32, memory_lr=0.01, key_decay=key_decay)
        for grad in stream:
            p.grad = grad
            opt.step()
        reads[key_decay] = max(_keyed_read(opt.state[p], q).norm() / q.norm() for q in patterns)
    assert reads[None] < 1e-6 < reads[1.0]
