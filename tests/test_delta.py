"""DeltaMomentum: SPEC §2 reductions R2a, R2b, the bound P2, and input keys."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from hypothesis import given, strategies as st

import deepmomentum as dm
import deepmomentum.functional as dmf
from deepmomentum.testing import (
    assert_same_trajectory,
    float_dtypes,
    parameter_shapes,
    sgd_hyperparameters,
)

TOL = {torch.float64: dict(rtol=1e-12, atol=1e-14), torch.float32: dict(rtol=1e-6, atol=1e-7)}


@given(shapes=parameter_shapes(), dtype=float_dtypes(), kwargs=sgd_hyperparameters(),
       foreach=st.booleans())
def test_R2a_no_erasing_equals_torch_sgd(shapes, dtype, kwargs, foreach):
    # sgd_hyperparameters draws μ = 0 (where SGD ignores dampening, and so must we) and
    # τ ∈ {0, 1} on purpose; see tests/test_testing.py.
    assert_same_trajectory(
        lambda ps: dm.DeltaMomentum(ps, **kwargs, erase=0.0, foreach=foreach),
        lambda ps: torch.optim.SGD(ps, **kwargs, foreach=False),
        shapes=shapes, dtype=dtype, steps=50, **TOL[dtype])


@given(n=st.integers(1, 12), momentum=st.floats(0.05, 0.99), fraction=st.floats(0.0, 1.0),
       dampening=st.floats(0.0, 1.0), seed=st.integers(0, 1000))
def test_R2b_vectors_follow_the_closed_form(n, momentum, fraction, dampening, seed):
    erase = fraction * momentum
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(n, generator=g, dtype=torch.float64) for _ in range(20)]
    p = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    opt = dm.DeltaMomentum([p], lr=0.1, momentum=momentum, erase=erase, dampening=dampening)
    b = None
    for grad in grads:
        if b is None:
            b = grad.clone()
        else:
            unit = grad / grad.norm()
            b = momentum * b - erase * torch.dot(b, unit) * unit + (1 - dampening) * grad
        p.grad = grad
        opt.step()
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], b, rtol=1e-12, atol=1e-13)


@given(shapes=parameter_shapes(max_dims=4), momentum=st.floats(0.0, 0.99),
       fraction=st.floats(0.0, 1.0), dampening=st.floats(0.0, 1.0),
       key_source=st.sampled_from(["gradient", "input"]), seed=st.integers(0, 1000))
def test_P2_memory_grows_no_faster_than_plain_momentum(shapes, momentum, fraction, dampening,
                                                       key_source, seed):
    erase = fraction * momentum
    g = torch.Generator().manual_seed(seed)
    params = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    bufs = [None] * len(params)
    for step in range(15):
        grads = [torch.randn(s, generator=g, dtype=torch.float64) * 3 ** (step % 3)
                 for s in shapes]
        keys = None
        if key_source == "input":
            keys = []
            for p in params:
                rows = torch.randn(int(torch.randint(1, 6, (1,), generator=g)),
                                   dmf.as_matrix(p).shape[1], generator=g, dtype=torch.float64)
                keys.append(rows / rows.norm(dim=1, keepdim=True))
        before = [None if b is None else b.norm().item() for b in bufs]
        dmf.delta_momentum(params, grads, bufs, keys, lr=0.01, momentum=momentum, erase=erase,
                         dampening=dampening, nesterov=False, weight_decay=0.0)
        for b, norm_before, grad in zip(bufs, before, grads):
            if norm_before is not None:
                bound = momentum * norm_before + (1 - dampening) * grad.norm().item()
                assert b.norm().item() <= bound * (1 + 1e-12) + 1e-12


@pytest.mark.parametrize("rows,cols,keys", [(3, 7, 5), (7, 3, 5), (4, 4, 2), (1, 6, 6)])
def test_erase_term_equals_the_explicit_key_gram(rows, cols, keys):
    g = torch.Generator().manual_seed(0)
    b = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    k = torch.randn(keys, cols, generator=g, dtype=torch.float64)
    torch.testing.assert_close(dmf.erase_along_keys(b, k), b @ (k.T @ k))
    assert torch.equal(dmf.erase_along_keys(b, torch.zeros_like(k)), torch.zeros_like(b))


@pytest.mark.parametrize("rows,cols", [(3, 7), (7, 3), (1, 6)])
def test_key_matrices_have_the_normalized_key_gram(rows, cols):
    g = torch.randn(rows, cols, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    k = dmf.gradient_keys(g)
    torch.testing.assert_close(k.T @ k, g.T @ g / g.pow(2).sum())
    x = dmf.unit_rows(g)
    k = dmf.input_keys_matrix(x, torch.float64)
    torch.testing.assert_close(k.T @ k, x.T @ x / rows)
    assert torch.equal(dmf.gradient_keys(torch.zeros(rows, cols)), torch.zeros(rows, cols))


def test_gradient_keys_erase_along_the_gradient_row_space():
    # A memory orthogonal to the gradient's row space is only decayed; one inside it is erased.
    grad = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]], dtype=torch.float64)
    p = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    opt = dm.DeltaMomentum([p], lr=0.1, momentum=0.9, erase=0.9)
    p.grad = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    opt.step()  # b_1 lies along the third column, orthogonal to the next gradient's rows
    p.grad = grad
    opt.step()
    expected = 0.9 * torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]], dtype=torch.float64) + grad
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], expected)


# --- input keys ------------------------------------------------------------------------------


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))


def test_input_keys_are_the_layer_inputs():
    model = _model()
    opt = dm.DeltaMomentum(model.parameters(), lr=0.1, erase=0.5, keys="input").attach(model)
    x = torch.randn(5, 4)
    with torch.no_grad():  # the second layer's input, recorded by hand (and not as keys)
        hidden = torch.tanh(model[0](x))
    model(x).sum().backward()
    unit = lambda t: t / t.norm(dim=1, keepdim=True)  # noqa: E731
    torch.testing.assert_close(opt.state[model[0].weight]["input_keys"], unit(x))
    torch.testing.assert_close(opt.state[model[2].weight]["input_keys"], unit(hidden))
    assert "input_keys" not in opt.state.get(model[0].bias, {})  # biases: gradient keys

    # The step uses exactly those keys: compare the buffer with the rule written out.
    opt.step()
    b1 = model[2].weight.grad.clone()
    opt.zero_grad()
    x2 = torch.randn(5, 4)
    hidden2 = torch.tanh(model[0](x2)).detach()
    model(x2).sum().backward()
    g2 = model[2].weight.grad
    keys = unit(hidden2)
    expected = 0.9 * b1 - 0.5 * b1 @ (keys.T @ keys) / 5 + g2
    opt.step()
    torch.testing.assert_close(opt.state[model[2].weight]["momentum_buffer"], expected)


def test_key_samples_keep_evenly_spaced_rows_and_micro_batches_accumulate():
    model = _model()
    opt = dm.DeltaMomentum(model.parameters(), keys="input", key_samples=3).attach(model)
    x = torch.randn(9, 4)
    model(x)
    kept = opt.state[model[0].weight]["input_keys"]
    assert kept.shape == (3, 4)
    torch.testing.assert_close(kept, x[[0, 4, 8]] / x[[0, 4, 8]].norm(dim=1, keepdim=True))
    model(torch.randn(2, 4))  # a second micro-batch before the step
    assert opt.state[model[0].weight]["input_keys"].shape[0] == 3


def _pending_keys(opt):
    return [p for p, s in opt.state.items() if "input_keys" in s]


def test_no_keys_are_captured_without_grad_or_after_detach():
    model = _model()
    opt = dm.DeltaMomentum(model.parameters(), keys="input").attach(model)
    with torch.no_grad():
        model(torch.randn(3, 4))
    assert not _pending_keys(opt)
    opt.detach()
    model(torch.randn(3, 4))
    assert not _pending_keys(opt)


def test_hooks_keep_no_activations_alive_and_keys_do_not_outlive_the_step():
    model = _model()
    opt = dm.DeltaMomentum(model.parameters(), keys="input").attach(model)
    for _ in range(3):
        x = torch.randn(64, 4)
        hidden_ref = []
        handle = model[1].register_forward_hook(lambda m, i, o: hidden_ref.append(weakref.ref(o)))
        model(x).sum().backward()
        handle.remove()
        refs = [weakref.ref(x)] + hidden_ref
        del x
        gc.collect()
        # The activation reaches the backward graph only; once the graph is freed, it dies.
        assert all(r() is None for r in refs)
        opt.step()
        opt.zero_grad()
        assert not _pending_keys(opt)


def test_input_keys_without_attach_fall_back_to_gradient_keys():
    assert_same_trajectory(lambda ps: dm.DeltaMomentum(ps, lr=0.1, keys="input"),
                           lambda ps: dm.DeltaMomentum(ps, lr=0.1, keys="gradient"),
                           dtype=torch.float64, steps=10, rtol=0.0)


def test_erasing_changes_the_trajectory():
    # The rule is not secretly plain momentum: with erase > 0 the paths differ.
    with pytest.raises(AssertionError):
        assert_same_trajectory(lambda ps: dm.DeltaMomentum(ps, lr=0.1, erase=0.5),
                               lambda ps: dm.AssociativeMomentum(ps, lr=0.1),
                               dtype=torch.float64, steps=5, rtol=1e-6)
