"""The torch.optim contract, checked for every optimizer in the registry and every setting."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import deepmomentum as dm
from deepmomentum.testing import assert_same_trajectory, noisy_quadratic_grads, run_trajectory

from registry import REGISTRY, cases, invalid_cases

def _params(info, variant, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype).requires_grad_()
            for s in info.shapes(variant)]


def _fill_grads(params, step, seed=1):
    g = torch.Generator().manual_seed(seed * 1000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


def _run(opt, params, steps, start=0):
    for step in range(start, start + steps):
        _fill_grads(params, step)
        opt.step()


# --- construction ----------------------------------------------------------------------------


@pytest.mark.parametrize("info,kwargs,name", invalid_cases())
def test_invalid_hyperparameters_raise_naming_the_argument(info, kwargs, name):
    with pytest.raises(ValueError, match=name):
        info.make(_params(info, kwargs), **kwargs)


@pytest.mark.parametrize("info,kwargs,name", invalid_cases())
def test_invalid_group_is_rejected_and_not_added(info, kwargs, name):
    opt = info.make(_params(info, {})[:1])
    with pytest.raises(ValueError, match=name):
        opt.add_param_group({"params": _params(info, {})[1:2], **kwargs})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("info,variant", cases())
def test_a_bare_tensor_is_not_accepted_as_params(info, variant):
    with pytest.raises(TypeError, match="iterable"):
        info.make(torch.zeros(3, requires_grad=True), **variant)


@pytest.mark.parametrize("info,variant", cases())
def test_lr_has_a_default(info, variant):
    opt = info.cls(_params(info, variant), **variant)  # torch-style code may pass no lr
    assert opt.param_groups[0]["lr"] > 0


@pytest.mark.parametrize("info,variant", cases())
def test_repr_names_the_class_and_settings(info, variant):
    # Every group key appears in any torch-style repr, whatever its value: check the values.
    # The settings are the variant's (not the defaults) plus an lr no class defaults to (an
    # AdamW group of Muon/M3 takes its lr from adamw_lr).
    lr_key = "adamw_lr" if variant.get("use_muon") is False else "lr"
    settings = {**variant, lr_key: 0.0123}
    defaults = info.cls._signature_defaults()
    assert settings[lr_key] != defaults[lr_key]
    text = repr(info.make(_params(info, variant), **settings))
    assert text.startswith(f"{info.cls.__name__} (\n"), text
    lines = text.splitlines()
    for key, value in settings.items():
        assert f"    {key}: {value}" in lines, (key, value, text)
    if not variant:  # the defaults themselves are shown too
        for key in ("momentum", "betas", "writes", "weight_decay"):
            if key in defaults:
                assert f"    {key}: {defaults[key]}" in lines, (key, text)


# --- stepping --------------------------------------------------------------------------------


@pytest.mark.parametrize("info,variant", cases())
def test_step_without_grads_changes_nothing(info, variant):
    params = _params(info, variant)
    before = [p.detach().clone() for p in params]
    opt = info.make(params, **variant)
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    assert len(opt.state) == 0


@pytest.mark.parametrize("info,variant", cases())
def test_params_without_grad_are_skipped(info, variant):
    params = _params(info, variant)
    opt = info.make(params, **variant)
    frozen = params[1].detach().clone()
    _fill_grads(params, 0)
    params[1].grad = None
    opt.step()
    assert torch.equal(params[1], frozen)
    assert params[1] not in opt.state
    assert not torch.equal(params[0], _params(info, variant)[0])


@pytest.mark.parametrize("info,variant", cases())
def test_grads_are_never_written(info, variant):
    params = _params(info, variant)
    opt = info.make(params, **variant)
    for step in range(3):
        _fill_grads(params, step)
        grads = [p.grad.clone() for p in params]
        opt.step()
        assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))


@pytest.mark.parametrize("info,variant", cases())
def test_closure_is_called_and_its_loss_returned(info, variant):
    params = _params(info, variant)
    opt = info.make(params, **variant)
    calls = []

    def closure():
        opt.zero_grad()
        loss = sum((p.float() ** 2).sum() for p in params)
        loss.backward()
        calls.append(1)
        return loss

    loss = opt.step(closure)
    assert calls == [1] and torch.is_tensor(loss) and loss.requires_grad


@pytest.mark.parametrize("info,variant", cases())
def test_step_hooks_run(info, variant):
    params = _params(info, variant)
    opt = info.make(params, **variant)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: seen.append("post"))
    _run(opt, params, 1)
    assert seen == ["pre", "post"]


@pytest.mark.parametrize("info,variant", cases())
def test_sparse_gradient_is_rejected_by_name(info, variant):
    model = torch.nn.ParameterDict({"weight": torch.nn.Parameter(
        torch.zeros(info.shapes(variant)[0]))})
    opt = info.make(model.named_parameters(), **variant)
    model.weight.grad = torch.ones_like(model.weight).to_sparse()
    with pytest.raises(dm.UnsupportedTensorError, match="sparse.*'weight'"):
        opt.step()
    with pytest.raises(RuntimeError):  # what torch's own optimizers raise
        opt.step()


@pytest.mark.parametrize("info,variant", cases())
def test_integer_parameter_is_rejected_by_name(info, variant):
    p = torch.zeros(info.shapes(variant)[0])
    opt = info.make([p], **variant)
    p.data = p.data.long()
    p.grad = torch.zeros_like(p)
    with pytest.raises(dm.UnsupportedTensorError, match=r"param_groups\[0\]\['params'\]\[0\]"):
        opt.step()


# --- implementations -------------------------------------------------------------------------


def _implementations(info, variant):
    impls = [{"foreach": False}, {"foreach": True}]
    probe = info.make(_params(info, variant), **variant)
    if probe._impl_unsupported(probe.param_groups[0], "fused") is None:
        impls.append({"fused": True})
    return impls


@pytest.mark.parametrize("info,variant", cases())
@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float64, 1e-12, 1e-14),
                                             (torch.float32, 1e-5, 1e-6),
                                             (torch.bfloat16, 1e-2, 1e-3)])
def test_implementations_agree_with_the_reference(info, variant, dtype, rtol, atol):
    impls = _implementations(info, variant)
    if info.matrix_only:
        # Batched and one-at-a-time matmuls round differently in bf16, and Newton–Schulz
        # amplifies that over steps; run NS in the parameters' precision to compare the paths.
        variant = {**variant, "ns_dtype": torch.float32 if dtype == torch.bfloat16 else dtype}
    for impl in impls[1:]:
        if impl.get("fused") and dtype == torch.bfloat16:
            continue  # bf16 parameters keep fp32 state: no fused kernel (see next test)
        assert_same_trajectory(
            lambda ps: info.make(ps, **variant, **impl),
            lambda ps: info.make(ps, **variant, foreach=False),
            shapes=info.shapes(variant), dtype=dtype, steps=20, rtol=rtol, atol=atol,
        )


@pytest.mark.parametrize("info,variant", cases())
def test_fused_on_bf16_parameters_raises_naming_the_tensor(info, variant):
    if {"fused": True} not in _implementations(info, variant):
        pytest.skip("this setting has no fused path; covered by the next test")
    params = _params(info, variant, torch.bfloat16)
    opt = info.make(params, **variant, fused=True)
    _fill_grads(params, 0)
    with pytest.raises(dm.UnsupportedTensorError, match=r"param_groups\[0\]\['params'\]\[0\]"):
        opt.step()


@pytest.mark.parametrize("info,variant", cases())
def test_fused_where_no_fused_path_exists_raises(info, variant):
    if {"fused": True} in _implementations(info, variant):
        pytest.skip("this setting has a fused path")
    # At construction, also where the rule's only fused path is the Triton one (CUDA) and the
    # tensors are on the CPU; and in add_param_group, leaving the optimizer as it was.
    with pytest.raises(ValueError, match="fused"):
        info.make(_params(info, variant), **variant, fused=True)
    opt = info.make(_params(info, variant), **variant)
    with pytest.raises(ValueError, match="fused"):
        opt.add_param_group({"params": _params(info, variant, seed=1), "fused": True})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("info,variant", cases())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters_keep_fp32_state(info, variant, dtype):
    params = _params(info, variant, dtype)
    opt = info.make(params, **variant)
    _run(opt, params, 3)
    for p in params:
        assert p.dtype == dtype and torch.isfinite(p.float()).all()
        for key, value in opt.state[p].items():
            if key != "step":
                assert value.dtype == torch.float32, key


@pytest.mark.parametrize("info,variant", cases())
def test_complex_parameters_follow_their_real_view(info, variant):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 2, 2, dtype=torch.complex64, generator=g)
    if not info.supports_complex:
        opt = info.make([z.clone().requires_grad_()], **variant)
        opt.param_groups[0]["params"][0].grad = torch.ones_like(z)
        with pytest.raises(dm.UnsupportedTensorError, match="complex"):
            opt.step()
        return

    class OnTheRealView:
        """The reference: the same optimizer on a real tensor that shares the complex
        parameter's storage (its view_as_real), fed the real view of each complex gradient."""

        def __init__(self, ps):
            self.ps = ps
            self.views = [torch.view_as_real(p.detach()).requires_grad_() for p in ps]
            self.opt = info.make(self.views, **variant, foreach=False)

        def step(self):
            for p, v in zip(self.ps, self.views):
                v.grad = torch.view_as_real(p.grad)
            self.opt.step()

    # Compared after every step, bit for bit, against an optimizer that never sees a complex
    # tensor (not against a copy of itself).
    assert_same_trajectory(
        lambda ps: info.make(ps, **variant, foreach=False), OnTheRealView,
        params=[z], steps=5, rtol=0.0,
    )


# --- checkpoints -----------------------------------------------------------------------------


@pytest.mark.parametrize("info,variant", cases())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mid_run_checkpoint_resumes_bit_identically(info, variant, dtype):
    params = _params(info, variant, dtype)
    opt = info.make(params, **variant)
    _run(opt, params, 5)

    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # state holds only tensors and containers

    resumed_params = [p.clone().requires_grad_() for p in saved["params"]]
    resumed = info.make(resumed_params, **variant)
    resumed.load_state_dict(saved["opt"])
    for p, q in zip(params, resumed_params):
        for key, value in opt.state[p].items():
            assert resumed.state[q][key].dtype == value.dtype, key
            assert torch.equal(resumed.state[q][key], value), key

    _run(opt, params, 5, start=5)
    _run(resumed, resumed_params, 5, start=5)
    for p, q in zip(params, resumed_params):
        assert torch.equal(p, q)


@pytest.mark.parametrize("info,variant", cases())
def test_deepcopy_continues_identically(info, variant):
    params = _params(info, variant)
    opt = info.make(params, **variant)
    _run(opt, params, 3)
    twin = copy.deepcopy({"params": params, "opt": opt})
    _run(opt, params, 3, start=3)
    _run(twin["opt"], twin["params"], 3, start=3)
    assert all(torch.equal(a, b) for a, b in zip(params, twin["params"]))


@pytest.mark.parametrize("info,variant", cases())
def test_setstate_fills_flags_added_later(info, variant):
    params = _params(info, variant)
    opt = info.make(params, **variant)
    _run(opt, params, 2)
    state = opt.__getstate__()
    for group in state["param_groups"]:  # as pickled by an older version
        for key in ("maximize", "foreach", "fused"):
            group.pop(key)
    restored = info.cls.__new__(info.cls)
    restored.__setstate__(pickle.loads(pickle.dumps(state)))
    for key in ("maximize", "foreach", "fused"):
        assert restored.param_groups[0][key] == info.cls._signature_defaults()[key]
    restored.step()  # usable


# --- learning rates and groups ---------------------------------------------------------------


@pytest.mark.parametrize("info,variant", cases())
def test_tensor_lr_equals_float_lr(info, variant):
    assert_same_trajectory(
        lambda ps: info.make(ps, **{**variant, "lr": torch.tensor(info.lr)}),
        lambda ps: info.make(ps, **{**variant, "lr": torch.tensor(info.lr).item()}),
        shapes=info.shapes(variant), steps=10, rtol=0.0,
    )


@pytest.mark.parametrize("info,variant", cases())
def test_lr_scheduler_equals_setting_lr_by_hand(info, variant):
    def scheduled(ps):
        opt = info.make(ps, **variant)
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)

    class ByHand:
        def __init__(self, ps):
            self.opt, self.calls = info.make(ps, **variant), 0
            self.base = self.opt.param_groups[0]["lr"]

        def step(self):
            self.opt.step()
            self.calls += 1
            self.opt.param_groups[0]["lr"] = self.base * 0.5 ** (self.calls // 3)

    assert_same_trajectory(scheduled, ByHand, shapes=info.shapes(variant), steps=10, rtol=0.0)


@pytest.mark.parametrize("info,variant", cases())
def test_groups_with_their_own_lr_and_decay_act_independently(info, variant):
    def grouped(ps):
        return info.make([{"params": ps[:2]},
                          {"params": ps[2:], "lr": info.lr * 3, "weight_decay": 0.02}],
                         **variant, foreach=False)

    def separate(ps):
        a = info.make([{"params": ps[:2]}], **variant, foreach=False)
        b = info.make([{"params": ps[2:], "lr": info.lr * 3, "weight_decay": 0.02}],
                      **variant, foreach=False)

        class Both:
            def step(self):
                a.step()
                b.step()

        return Both()

    assert_same_trajectory(grouped, separate, shapes=info.shapes(variant), steps=10, rtol=0.0)


@pytest.mark.parametrize("info,variant", cases())
def test_named_parameters_are_kept_and_used_in_errors(info, variant):
    model = torch.nn.ParameterDict({"first": torch.nn.Parameter(torch.randn(2, 3, 2)),
                                    "second": torch.nn.Parameter(torch.randn(2, 3, 2))})
    opt = info.make(model.named_parameters(), **variant)
    assert opt.state_dict()["param_groups"][0]["param_names"] == ["first", "second"]
    model.second.grad = torch.zeros(2, 3, 2).to_sparse()
    with pytest.raises(dm.UnsupportedTensorError, match="'second'"):
        opt.step()


@pytest.mark.parametrize("info,variant", cases(minimizing=True))
def test_maximize_ascends_the_negated_objective(info, variant):
    descend = run_trajectory(lambda ps: info.make(ps, **variant), _params(info, variant), 5)
    negated = noisy_quadratic_grads(0)
    ascend = run_trajectory(lambda ps: info.make(ps, **variant, maximize=True), _params(info, variant), 5,
                            grad_fn=lambda step, ps: [-g for g in negated(step, ps)])
    for a, b in zip(descend[-1], ascend[-1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# --- it optimizes ----------------------------------------------------------------------------


def _rosenbrock(xy):
    x, y = xy.flatten()
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


@pytest.mark.parametrize("info,variant", cases(minimizing=True))
def test_goes_downhill_on_rosenbrock(info, variant):
    # A 1 × 2 matrix, so matrix optimizers take it too (their step is then a unit direction).
    xy = torch.tensor([[-1.5, 2.0]], dtype=torch.float64)
    xy = xy.reshape((1,) * variant.get("batch_dims", 0) + (1, 2)).requires_grad_()
    opt = info.make([{"params": [xy], "lr": info.toy_lr(variant)[0]}], **variant)
    start = _rosenbrock(xy).item()
    for _ in range(300):
        opt.zero_grad()
        _rosenbrock(xy).backward()
        opt.step()
    end = _rosenbrock(xy).item()
    assert end < 0.75 * start, (start, end)


@pytest.mark.parametrize("info,variant", cases(minimizing=True))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_goes_downhill_on_a_noisy_quadratic(info, variant, dtype):
    g = torch.Generator().manual_seed(0)
    h = 0.1 + torch.rand(8, 8, generator=g)
    x = (3 * torch.randn(8, 8, generator=g)).to(dtype)
    x = x.reshape((1,) * variant.get("batch_dims", 0) + (8, 8)).requires_grad_()
    opt = info.make([{"params": [x], "lr": info.toy_lr(variant)[1]}], **variant)

    def loss():
        return 0.5 * (h * x.float().reshape(8, 8) ** 2).sum()

    start = loss().item()
    for _ in range(200):
        opt.zero_grad()
        noise = torch.randn(8, 8, generator=g)
        (loss() + 0.1 * (noise * x.float().reshape(8, 8)).sum()).backward()
        opt.step()
    assert loss().item() < 0.25 * start


# --- torch.compile ---------------------------------------------------------------------------


@pytest.mark.parametrize("info,variant", cases())
def test_compiled_foreach_step_equals_eager(info, variant):
    torch._dynamo.reset()

    def compiled(ps):
        opt = info.make(ps, **variant, foreach=True)
        opt.step = torch.compile(opt.step, backend="aot_eager")
        return opt

    assert_same_trajectory(compiled, lambda ps: info.make(ps, **variant, foreach=True),
                           shapes=info.shapes(variant), steps=4, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("info,variant", cases())
def test_compiled_default_step_equals_eager(info, variant):
    # No foreach/fused flag: the automatic choice (torch's fused CPU kernel in eager mode,
    # which cannot be traced) must give way to a path that compiles, with the same result.
    torch._dynamo.reset()

    def compiled(ps):
        opt = info.make(ps, **variant)
        opt.step = torch.compile(opt.step, backend="aot_eager")
        return opt

    assert_same_trajectory(compiled, lambda ps: info.make(ps, **variant),
                           shapes=info.shapes(variant), steps=4, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("info", [i for i in REGISTRY if i.name in
                                  ("AssociativeMomentum", "PreconditionedMomentum")],
                         ids=lambda info: info.name)
def test_inductor_compiled_default_step_equals_eager(info):
    # The real compiler on the default path where eager picks torch's fused CPU kernel.
    torch._dynamo.reset()

    def compiled(ps):
        opt = info.make(ps)
        opt.step = torch.compile(opt.step)
        return opt

    assert_same_trajectory(compiled, lambda ps: info.make(ps), shapes=info.shapes({}),
                           steps=4, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("info", REGISTRY, ids=lambda info: info.name)
def test_inductor_compiled_foreach_step_equals_eager(info):
    # The real compiler (C++ codegen on the CPU) for one setting per optimizer: ~30 s each.
    torch._dynamo.reset()

    # Inductor may keep bf16 intermediates in fp32; compare Newton–Schulz in fp32.
    kwargs = {"ns_dtype": torch.float32} if info.matrix_only else {}

    def compiled(ps):
        opt = info.make(ps, foreach=True, **kwargs)
        opt.step = torch.compile(opt.step)
        return opt

    assert_same_trajectory(compiled, lambda ps: info.make(ps, foreach=True, **kwargs),
                           shapes=info.shapes({}), steps=4, rtol=1e-5, atol=1e-6)
