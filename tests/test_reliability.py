"""No silent corruption (issue 14): odd-but-legal layouts, mismatched checkpoints, extreme
gradient scales and non-finite gradients, for every optimizer in the registry."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import deepmomentum as dm
from deepmomentum import functional as dmf
from deepmomentum.functional import state_dtype

from registry import REGISTRY, cases

CASES = [(info, variant) for info in REGISTRY for variant in info.variants]


def _ns_in(dtype, info, variant):
    """Newton–Schulz in the parameters' precision, so that layouts (not bf16) set the error."""
    if "ns_dtype" in info.cls._signature_defaults():
        return {**variant, "ns_dtype": dtype}
    return variant


def _grads(shape, steps, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(steps)]


# --- layouts ---------------------------------------------------------------------------------

PARAM_LAYOUTS = ("contiguous", "transposed", "strided", "channels_last")
GRAD_LAYOUTS = ("contiguous", "transposed", "channels_last")


def _shape(layout, batch_dims):
    if layout == "channels_last":
        return (2, 3, 2, 2) if not batch_dims else (2, 3, 2, 2)
    return (4, 6) if not batch_dims else (2, 4, 6)


def _laid_out(values: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(tensor with ``values`` in ``layout``, the base it views or None)."""
    if layout == "contiguous":
        return values.clone(), None
    if layout == "transposed":
        return values.mT.contiguous().mT, None
    if layout == "channels_last":
        return values.contiguous(memory_format=torch.channels_last), None
    base = torch.full((*values.shape[:-1], 2 * values.shape[-1]), 7.0, dtype=values.dtype)
    view = base[..., ::2]
    view.copy_(values)
    return view, base


@settings(max_examples=60)
@given(case=st.sampled_from(CASES), param_layout=st.sampled_from(PARAM_LAYOUTS),
       grad_layout=st.sampled_from(GRAD_LAYOUTS),
       implementation=st.sampled_from(({}, {"foreach": True}, {"fused": None})),
       dtype=st.sampled_from((torch.float32, torch.float64)), steps=st.integers(1, 5),
       seed=st.integers(0, 2**16))
def test_any_layout_gives_the_single_tensor_reference_result(case, param_layout, grad_layout,
                                                             implementation, dtype, steps, seed):
    info, variant = case
    variant = _ns_in(dtype, info, variant)
    batch_dims = variant.get("batch_dims", 0)
    shape = _shape(param_layout, batch_dims)
    if grad_layout == "channels_last" and len(shape) != 4:
        grad_layout = "transposed"
    if grad_layout == "transposed" and len(shape) == 4:
        grad_layout = "channels_last"
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    data, base = _laid_out(values, param_layout)
    base_before = None if base is None else base.clone()
    param = torch.nn.Parameter(data)  # shares data's storage (and so base's)
    reference = torch.nn.Parameter(values.clone())
    # The reference: the same implementation on contiguous tensors (the implementations are
    # tested equal to the single-tensor reference in test_contract; here layouts alone vary).
    ours = info.make([param], **variant, **implementation)
    ref = info.make([reference], **variant, **implementation)
    rtol, atol = (1e-5, 1e-6) if dtype == torch.float32 else (1e-10, 1e-12)
    for step, grad in enumerate(_grads(shape, steps, dtype, seed + 1)):
        param.grad = _laid_out(grad, grad_layout)[0]
        reference.grad = grad.clone()
        ours.step()
        ref.step()
        torch.testing.assert_close(param.detach(), reference.detach(), rtol=rtol, atol=atol,
                                   msg=lambda m: f"step {step + 1}: {m}")
    if base is not None:  # nothing outside the view was written
        assert torch.equal(base[..., 1::2], base_before[..., 1::2])


def test_the_issue_repro_transposed_parameter_with_a_contiguous_gradient():
    p = torch.nn.Parameter(torch.zeros(4, 3).t())
    opt = dm.AssociativeMomentum([p], lr=1.0, momentum=0.0)
    p.grad = torch.arange(12.0).view(3, 4)
    opt.step()
    assert torch.equal(p.detach(), -p.grad)


# --- checkpoints: shape, class, dtype ----------------------------------------------------------


def _named(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [("layer.weight", torch.nn.Parameter(torch.randn(shape, generator=g).to(dtype)))]


def _trained(make, named, steps=3, seed=0):
    opt = make(named)
    g = torch.Generator().manual_seed(seed + 100)
    for _ in range(steps):
        for _, p in named:
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
        opt.step()
    return opt


def _other_shapes(shape):
    bigger = (*shape[:-1], shape[-1] + 2)
    same_count = tuple(reversed(shape))
    return [bigger] + ([same_count] if same_count != tuple(shape) else [])


@pytest.mark.parametrize("info,variant", cases())
def test_loading_the_state_of_other_parameter_shapes_raises_naming_the_parameter(info, variant):
    shape = info.shapes(variant)[0]
    if len(shape) < 2:
        shape = (4, 3)
    saved = _trained(lambda ps: info.make(ps, **variant), _named(shape)).state_dict()
    for other in _other_shapes(shape):
        named = _named(other)
        opt = _trained(lambda ps: info.make(ps, **variant), named, steps=1)
        if not any(saved["state"].values()):  # no memory (momentum 0): nothing can mismatch
            opt.load_state_dict(saved)
            continue
        before = copy.deepcopy(opt.state_dict())
        with pytest.raises(ValueError, match=r"'layer\.weight'.*shape"):
            opt.load_state_dict(saved)
        after = opt.state_dict()  # refused before anything changed
        assert after["param_groups"] == before["param_groups"]
        for key, value in before["state"][0].items():
            assert torch.equal(after["state"][0][key], value), key


def _sources():
    yield "torch.optim.SGD", lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)
    yield "torch.optim.Adam", lambda ps: torch.optim.Adam(ps, lr=0.1)
    yield "torch.optim.AdamW", lambda ps: torch.optim.AdamW(ps, lr=0.1)
    for info in REGISTRY:
        yield info.name, lambda ps, info=info: info.make(ps)


#: Every (target, source) pair of different classes.
CLASS_PAIRS = [pytest.param(target, source, id=f"{source_name}->{target.name}")
               for target in REGISTRY for source_name, source in _sources()
               if source_name != target.name]


@pytest.mark.parametrize("target,source", CLASS_PAIRS)
def test_state_of_another_optimizer_class_is_refused(target, source):
    saved = _trained(source, _named((4, 3))).state_dict()
    opt = _trained(lambda ps: target.make(ps), _named((4, 3)), steps=1)
    with pytest.raises(ValueError, match="not saved by|never keeps") as error:
        opt.load_state_dict(saved)
    assert "lacks" in str(error.value) or "foreign" in str(error.value) or \
        "never keeps" in str(error.value)


@pytest.mark.parametrize("info,variant", cases())
@pytest.mark.parametrize("saved_dtype,dtype", [(torch.float64, torch.float32),
                                               (torch.float32, torch.float64),
                                               (torch.float32, torch.bfloat16)])
def test_loaded_state_takes_the_parameters_state_dtype(info, variant, saved_dtype, dtype):
    shape = info.shapes(variant)[0]
    saved_opt = _trained(lambda ps: info.make(ps, **variant), _named(shape, saved_dtype))
    named = _named(shape, dtype)
    opt = info.make(named, **variant)
    opt.load_state_dict(saved_opt.state_dict())
    param = named[0][1]
    for key, value in opt.state[param].items():
        if isinstance(value, torch.Tensor):
            want = torch.float32 if key == "step" else state_dtype(dtype)
            assert value.dtype == want, (key, value.dtype)
            assert value.data_ptr() != saved_opt.state[saved_opt.param_groups[0]["params"][0]][
                key].data_ptr()  # a tensor of its own, not the saved one
    param.grad = torch.randn(param.shape).to(dtype)
    opt.step()  # torch's loader would leave fp64 state here and this step would raise
    assert torch.isfinite(param.float()).all()


def test_step_counts_saved_as_numbers_load():
    named = _named((4, 3))
    saved = _trained(lambda ps: dm.PreconditionedMomentum(ps), named).state_dict()
    saved["state"][0]["step"] = 3
    opt = dm.PreconditionedMomentum(_named((4, 3)))
    opt.load_state_dict(saved)
    assert opt.state[opt.param_groups[0]["params"][0]]["step"].dtype == torch.float32


@pytest.mark.parametrize("info,variant", cases())
def test_step_counts_saved_as_numbers_resume_the_same_trajectory(info, variant):
    # Older torch versions and other libraries write ``step`` as a Python number: it loads, and
    # the next steps are the uninterrupted run's (torch's Adam converts such steps too).
    shape = info.shapes(variant)[0]
    make = lambda ps: info.make(ps, **variant)  # noqa: E731
    ref = _trained(make, named := _named(shape), steps=3)
    saved = copy.deepcopy(ref.state_dict())
    for entry in saved["state"].values():
        if "step" in entry:
            entry["step"] = int(entry["step"].item())  # an int, as torch < 1.12 saved it
    resumed_named = [(n, torch.nn.Parameter(p.detach().clone())) for n, p in named]
    resumed = make(resumed_named)
    resumed.load_state_dict(saved)
    g = torch.Generator().manual_seed(7)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g) for _, p in named]
        for (_, a), (_, b), grad in zip(named, resumed_named, grads):
            a.grad, b.grad = grad.clone(), grad.clone()
        ref.step()
        resumed.step()
    for (_, a), (_, b) in zip(named, resumed_named):
        assert torch.equal(a, b)


def test_a_lone_tensor_raises_torchs_type_error():
    # torch's words first (code and tests match them), the hint after.
    expected = ("params argument given to the optimizer should be an iterable of Tensors or "
                "dicts, but got torch.FloatTensor")
    with pytest.raises(TypeError) as torch_error:
        torch.optim.SGD(torch.randn(3, requires_grad=True))
    assert str(torch_error.value) == expected
    for info in REGISTRY:
        with pytest.raises(TypeError) as ours:
            info.make(torch.randn(3, 3, requires_grad=True))
        assert str(ours.value).startswith(expected + ";"), (info.name, str(ours.value))


@pytest.mark.parametrize("make", [
    lambda ps: dm.AssociativeMomentum(ps, lr=0.1, momentum=0.0),
    lambda ps: dm.DeltaMomentum(ps, lr=0.1, momentum=0.0, erase=0.0),
], ids=["AssociativeMomentum", "DeltaMomentum"])
def test_a_rule_without_memory_keeps_no_state_entry_as_torch_sgd(make):
    named = _named((4, 3))
    opt = _trained(make, named)
    reference = _trained(lambda ps: torch.optim.SGD([p for _, p in ps], lr=0.1), _named((4, 3)))
    assert reference.state_dict()["state"] == {}
    assert opt.state_dict()["state"] == {} and len(opt.state) == 0
    fresh = make(_named((4, 3)))
    fresh.load_state_dict(opt.state_dict())  # and it loads
    assert torch.equal(named[0][1], _trained(make, _named((4, 3)))
                       .param_groups[0]["params"][0])


def test_multi_frequency_refuses_an_accumulator_of_another_shape():
    named = _named((4, 3))
    wrapped = dm.MultiFrequency(torch.optim.SGD(named, lr=0.1), update_period=3)
    named[0][1].grad = torch.ones(4, 3)
    wrapped.step()
    saved = wrapped.state_dict()
    other = _named((3, 4))
    target = dm.MultiFrequency(torch.optim.SGD(other, lr=0.1), update_period=3)
    with pytest.raises(ValueError, match=r"grad_accumulator.*shape"):
        target.load_state_dict(saved)


# --- gradient scales -------------------------------------------------------------------------

SCALES = (1e-30, 1e-20, 1e-10, 1.0, 1e2, 1e10, 1e13, 1e20, 1e30)


def _torch_twin(info, variant):
    """The torch optimizer whose state's range ours must match (None: none is comparable)."""
    if info.name in ("AssociativeMomentum", "DeltaMomentum") or (
            info.name == "DeepMomentum" and variant.get("hidden") == 0):
        return lambda ps: torch.optim.SGD(ps, lr=info.lr, momentum=variant.get("momentum", 0.9),
                                          dampening=variant.get("dampening", 0.0))
    if info.name == "Muon" and variant.get("use_muon", True):
        return lambda ps: torch.optim.SGD(ps, lr=info.lr, momentum=0.95, dampening=0.95)
    if info.name == "PreconditionedMomentum":
        return lambda ps: torch.optim.AdamW(ps, lr=info.lr, betas=variant.get("betas",
                                                                           (0.9, 0.999)))
    if variant.get("use_muon") is False:
        return lambda ps: torch.optim.AdamW(ps, lr=info.lr, betas=variant.get("adamw_betas",
                                                                           (0.9, 0.95)))
    if info.name == "M3":
        # M3's V is a (decayed) sum of squared gradients with write strength β₂ = 1: the
        # range of torch's Adagrad, whose state is Σ G².
        return lambda ps: torch.optim.Adagrad(ps, lr=info.lr)
    return None


def _dmgd_max_scale(variant) -> float:
    """DMGD's MLP memory: the inner gradient for A grows like |G|², so fp32 state overflows
    past ~1e19 even with a bounded activation; with the "l2" objective or an unbounded one
    the inner step itself diverges once |G|·memory_lr is large (measured, README)."""
    bounded = variant.get("activation", "tanh") == "tanh" and \
        variant.get("objective", "dot") == "dot"
    scale_free = variant.get("values") == "preconditioned"
    return 1e13 if bounded or scale_free else 1e2


def _finite_run(make, shapes, scale, steps=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g).requires_grad_() for s in shapes]
    opt = make(params)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g) * scale
        opt.step()
    tensors = params + [v for s in opt.state.values() for v in s.values()
                        if isinstance(v, torch.Tensor)]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


@pytest.mark.parametrize("info,variant", cases())
def test_gradient_scales_give_finite_state_wherever_torch_does(info, variant):
    shapes = info.shapes(variant)
    twin = _torch_twin(info, variant)
    for scale in SCALES:
        if twin is not None:
            expected = _finite_run(twin, shapes, scale)
        else:
            expected = scale <= _dmgd_max_scale(variant)
        if expected:
            assert _finite_run(lambda ps: info.make(ps, **variant), shapes, scale), scale


@pytest.mark.parametrize("scale", [1e-30, 1e-12, 1e12, 1e30])
def test_delta_momentum_is_homogeneous_in_the_gradient_scale(scale):
    # b_t(c·G) = c·b_t(G): the keys are normalized before any product, so neither overflow
    # (1e12–1e13 turned the buffer into −inf before) nor underflow changes the erase.
    runs = []
    for s in (1.0, scale):
        p = torch.nn.Parameter(torch.zeros(5, 7))
        opt = dm.DeltaMomentum([p], lr=1e-3, erase=0.5)
        for grad in _grads((5, 7), 4, torch.float32, seed=3):
            p.grad = grad * s
            opt.step()
        runs.append(opt.state[p]["momentum_buffer"])
    torch.testing.assert_close(runs[1] / scale, runs[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e20, 1e30])
def test_keys_are_invariant_to_the_gradient_scale(scale):
    g = torch.randn(6, 9, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(dmf.gradient_keys(g * scale), dmf.gradient_keys(g))
    torch.testing.assert_close(dmf.unit_rows(g * scale), dmf.unit_rows(g))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("scale", [1e-2, 1e10, 1e20, 1e30])
def test_newton_schulz_input_is_invariant_to_the_gradient_scale(scale, dtype):
    # A huge matrix is orthogonalized (its norm used to overflow to inf and zero it). Tiny
    # ones are not: eps guards the normalization, as in torch.optim.Muon.
    x = torch.randn(8, 12, generator=torch.Generator().manual_seed(5))
    out = dm.newton_schulz(x * scale, dtype=dtype)
    torch.testing.assert_close(out, dm.newton_schulz(x, dtype=dtype), rtol=2e-2, atol=2e-2)
    assert out.float().norm() > 1


# --- non-finite gradients --------------------------------------------------------------------


@pytest.mark.parametrize("info,variant", cases())
def test_skip_nonfinite_leaves_parameters_and_state_untouched(info, variant):
    shapes = info.shapes(variant)

    def run(poison: bool):
        g = torch.Generator().manual_seed(0)
        params = [torch.randn(s, generator=g).requires_grad_() for s in shapes]
        opt = info.make([{"params": params, "skip_nonfinite": True}], **variant)
        for step in range(5):
            grads = [torch.randn(p.shape, generator=g) for p in params]
            if poison and step == 2:
                before = (copy.deepcopy([p.detach() for p in params]),
                          copy.deepcopy(opt.state_dict()["state"]))
                bad = [x.clone() for x in grads]
                bad[0].view(-1)[0] = float("nan")
                if len(bad) > 1:
                    bad[-1].view(-1)[-1] = float("inf")
                for p, x in zip(params, bad):
                    p.grad = x
                opt.step()
                for p, b in zip(params, before[0]):
                    assert torch.equal(p.detach(), b)
                state = opt.state_dict()["state"]
                assert state.keys() == before[1].keys()
                for i in state:
                    for key, value in state[i].items():
                        assert torch.equal(value, before[1][i][key]), key
                assert opt.param_groups[0]["nonfinite_skips"] == 1
            for p, x in zip(params, grads):
                p.grad = x
            opt.step()
        return [p.detach() for p in params], opt

    clean, _ = run(False)
    poisoned, opt = run(True)
    for a, b in zip(clean, poisoned):  # the skipped call is as if it never happened
        assert torch.equal(a, b)
    restored = info.make([p.clone().requires_grad_() for p in poisoned], **variant)
    restored.load_state_dict(opt.state_dict())
    assert restored.param_groups[0]["nonfinite_skips"] == 1


def test_without_skip_nonfinite_a_nan_spreads_as_in_torch():
    # The default keeps torch's behaviour: elementwise rules keep a NaN in its entry.
    p = torch.nn.Parameter(torch.zeros(3, 4))
    q = torch.nn.Parameter(torch.zeros(3, 4))
    ours = dm.AssociativeMomentum([p], lr=0.1)
    theirs = torch.optim.SGD([q], lr=0.1, momentum=0.9)
    grad = torch.ones(3, 4)
    grad[1, 2] = float("nan")
    p.grad, q.grad = grad, grad.clone()
    ours.step()
    theirs.step()
    assert torch.equal(torch.isnan(p), torch.isnan(q)) and int(torch.isnan(p).sum()) == 1
