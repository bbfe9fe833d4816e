"""Compressed optimizer memories (bf16, 8-bit blockwise) and 16-bit parameters without an fp32
master copy (deepmomentum.compressed, issue 18).

The codec is tested on its own (rounding is to a neighbour, unbiased, deterministic, the same
on a shard as on the whole); the optimizers are tested against the definition: a compressed
step is the fp32 rule applied to the dequantized memories, then each memory compressed with its
documented seed — for every registry setting.
"""

from __future__ import annotations

import copy
import io
import math
import os

import pytest
import torch
from hypothesis import given, strategies as st

import deepmomentum as dm
from deepmomentum import compressed as dmc

from registry import cases

FORMS = (torch.bfloat16, "8bit")
#: Large enough for 8-bit (≥ 4096 entries, 2-D), ragged blocks (300 = 256 + 44), plus a
#: vector and a small matrix that stay fp32 under "8bit".
BIG = ((16, 300), (64, 72))
SMALL = ((5,), (4, 3))


def _shapes(info, variant):
    if not info.matrix_only or variant.get("use_muon") is False:
        return BIG + SMALL
    if variant.get("batch_dims"):
        return ((2, 32, 64), (2, 32, 64))
    return BIG + ((4, 3), (4, 3))


def _named(shapes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(f"p{i}", torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)))
            for i, s in enumerate(shapes)]


def _grads(named, g):
    return [torch.randn(p.shape, generator=g).to(p.dtype) for _, p in named]


def _step(opt, named, grads):
    for (_, p), grad in zip(named, grads):
        p.grad = grad.clone()
    opt.step()


def _fresh(named):
    return [(n, torch.nn.Parameter(p.detach().clone())) for n, p in named]


# --- the codec ---------------------------------------------------------------------------------


@given(st.integers(1, 3000), st.integers(0, 2**32 - 1), st.integers(0, 10**6))
def test_random_bits_of_a_shard_are_the_whole_tensors_there(numel, seed, offset):
    whole = dmc.uniform_bits(offset + numel, seed)
    part = dmc.uniform_bits(numel, seed, offset)
    assert torch.equal(part, whole[offset:])
    # The torch int32 arithmetic is lowbias32 over uint32, bit for bit (Python's integers).
    for i in (0, numel // 2, numel - 1):
        assert int(part[i]) & 0xFFFFFFFF == dmc._mix_int((offset + i) ^ seed)


def test_random_bits_are_uniform():
    bits = dmc.uniform_bits(1 << 16, seed=12345)
    low = (bits & 0xFFFF).double() / 65536
    assert abs(low.mean().item() - 0.5) < 0.01
    assert abs(low.var().item() - 1 / 12) < 0.005
    # Neighbouring elements and neighbouring seeds are unrelated.
    other = dmc.uniform_bits(1 << 16, seed=12346)
    assert (bits == other).float().mean() < 1e-3
    assert abs(torch.corrcoef(torch.stack([low[:-1], low[1:]]))[0, 1].item()) < 0.02


@given(st.lists(st.floats(-2.0**100, 2.0**100, allow_subnormal=False, width=32), min_size=1,
                max_size=64), st.integers(0, 2**32 - 1))
def test_bf16_rounding_takes_a_neighbour(values, seed):
    x = torch.tensor(values, dtype=torch.float32)
    r = dmc.round_bf16(x, dmc.uniform_bits(x.numel(), seed)).float()
    down = (x.view(torch.int32) & -65536).view(torch.float32)  # truncated toward zero
    up = (down.to(torch.bfloat16).view(torch.int16) + 1).view(torch.bfloat16).float()
    exact = down == x
    assert torch.equal(r[exact], x[exact])
    assert bool(((r == down) | (r == up))[~exact].all())
    assert torch.equal(dmc.round_bf16(x, None), x.to(torch.bfloat16))


def test_bf16_rounding_is_unbiased():
    x = torch.full((1 << 16,), 1.0 + 2**-10)  # a quarter of a bf16 ulp above 1
    r = dmc.round_bf16(x, dmc.uniform_bits(x.numel(), 3)).float()
    assert set(r.unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert abs(r.mean().item() - x[0].item()) < 2**-7 * 0.01
    assert dmc.round_bf16(x, None).float().unique().tolist() == [1.0]  # nearest: never up


@given(st.integers(1, 5), st.integers(1, 700), st.booleans(), st.integers(0, 2**32 - 1),
       st.sampled_from([1e-6, 1.0, 1e6]))
def test_8bit_codes_round_to_a_neighbouring_code_value(rows, cols, signed, seed, magnitude):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * magnitude
    x = x if signed else x.square()
    x[0, 0] = 0.0
    for bits in (None, dmc.uniform_bits(x.numel(), seed)):
        codes, scale = dmc.quantize(x, signed, bits)
        assert codes.dtype == (torch.int8 if signed else torch.uint8)
        assert codes.shape == x.shape and scale.shape == dmc.scale_shape(x.shape)
        y = dmc.dequantize(codes, scale)
        assert y[0, 0] == 0
        assert bool((torch.sign(y) * torch.sign(x) >= 0).all())
        # Within one code step of the true value, in value.
        top, power = (127, 2) if signed else (255, 4)
        blocks = torch.nn.functional.pad(scale.repeat_interleave(dmc.BLOCK, 1), (0, 0))
        s = blocks[:, :cols]
        level = (x.abs() / torch.where(s > 0, s, 1)).pow(1 / power) * top
        step = (((level.floor() + 1) / top).pow(power) - (level.floor() / top).pow(power)) * s
        assert bool(((y - x).abs() <= step * (1 + 1e-5) + 1e-30).all())
        # Each block's largest entry is exact: the scale is its magnitude.
        assert torch.equal(y.abs().amax(1), x.abs().amax(1))


@pytest.mark.parametrize("signed", [True, False])
def test_8bit_stochastic_rounding_is_unbiased_in_value(signed):
    x = torch.linspace(-1, 1, 256).repeat(4096, 1)
    x = x if signed else x.abs()
    x[:, 0] = 1.0  # every block's maximum (its scale) is 1
    codes, scale = dmc.quantize(x, signed, dmc.uniform_bits(x.numel(), 9))
    y = dmc.dequantize(codes, scale)
    # 4096 draws per value: the mean is within 5 standard errors of one code step.
    nearest = dmc.dequantize(*dmc.quantize(x[:1], signed, None))
    assert (y.mean(0) - x[0]).abs().max() < 5 * (1 / 127) / math.sqrt(4096) + 1e-6
    assert (nearest[0] - x[0]).abs().max() > (y.mean(0) - x[0]).abs().max()


# --- the optimizers: definition, checkpoints, conversion -------------------------------------


def _decompressed(opt):
    """opt's state dict with every compressed memory read back into fp32 and the groups'
    state_dtype set to fp32: what an fp32 optimizer would hold."""
    saved = copy.deepcopy(opt.state_dict())
    for entry in saved["state"].values():
        for key in [k for k in entry if f"{k}_scale" in entry]:
            entry[key] = dmc.dequantize(entry[key], entry.pop(f"{key}_scale"))
        for key, value in entry.items():
            if key != "step" and key != "compensation" and value.dtype == torch.bfloat16:
                entry[key] = value.float()
    for group in saved["param_groups"]:
        group["state_dtype"] = torch.float32
    return saved


def _recompressed(opt, reference):
    """reference's (fp32) state compressed as opt stores it, with opt's seeds."""
    out = {}
    index = {id(p): (gi, pi) for gi, g in enumerate(opt.param_groups)
             for pi, p in enumerate(g["params"])}
    for p_ref, p in zip([p for g in reference.param_groups for p in g["params"]],
                        [p for g in opt.param_groups for p in g["params"]]):
        gi, pi = index[id(p)]
        group = opt.param_groups[gi]
        entry = {}
        for key, value in reference.state.get(p_ref, {}).items():
            form = opt._form(group, key, p) if key in opt._memories(group) else "full"
            if form == "full":
                entry[key] = value
                continue
            seed = dmc.seed_of(group["rounding_calls"], gi, pi, key)
            codes, scale = dmc.compress(value, form, key not in opt.NONNEGATIVE_STATE, seed)
            entry[key] = codes
            if scale is not None:
                entry[f"{key}_scale"] = scale
        out[pi] = entry
    return out


@pytest.mark.parametrize("state_dtype", FORMS)
@pytest.mark.parametrize("info,variant", cases())
def test_a_compressed_step_is_the_fp32_rule_on_the_dequantized_memories(info, variant,
                                                                        state_dtype):
    # The definition, step by step: read each memory into fp32, take the fp32 rule's step,
    # write each memory back compressed with its seed. Parameters match bit for bit.
    named = _named(_shapes(info, variant))
    opt = info.make(named, state_dtype=state_dtype, **variant)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        grads = _grads(named, g)
        ref_named = _fresh(named)
        reference = info.make(ref_named, **variant)
        if opt.state:
            reference.load_state_dict(_decompressed(opt))
        _step(opt, named, grads)
        _step(reference, ref_named, grads)
        for (_, a), (_, b) in zip(named, ref_named):
            assert torch.equal(a, b)
        expected = _recompressed(opt, reference)
        for pi, p in enumerate(opt.param_groups[0]["params"]):
            got = opt.state.get(p, {})
            assert set(got) == set(expected[pi])
            for key, value in expected[pi].items():
                assert got[key].dtype == value.dtype, key
                assert torch.equal(got[key], value), key


@pytest.mark.parametrize("state_dtype", FORMS)
@pytest.mark.parametrize("info,variant", cases())
def test_compressed_state_resumes_the_same_trajectory_bit_for_bit(info, variant, state_dtype):
    # Saved mid-run and mid-period (4 calls of a period of 3: the accumulator and the rule's
    # memories are both written before and after), through torch.load(weights_only=True).
    for period in (3,):
        named = _named(_shapes(info, variant))
        make = lambda ps: info.make(ps, state_dtype=state_dtype, update_period=period,  # noqa
                                    **variant)
        opt = make(named)
        g = torch.Generator().manual_seed(2)
        for _ in range(4):
            _step(opt, named, _grads(named, g))
        buffer = io.BytesIO()
        torch.save(opt.state_dict(), buffer)
        buffer.seek(0)
        resumed_named = _fresh(named)
        resumed = make(resumed_named)
        resumed.load_state_dict(torch.load(buffer, weights_only=True))
        for _ in range(4):
            grads = _grads(named, g)
            _step(opt, named, grads)
            _step(resumed, resumed_named, grads)
        for (_, a), (_, b) in zip(named, resumed_named):
            assert torch.equal(a, b)
        for p, q in zip(opt.param_groups[0]["params"], resumed.param_groups[0]["params"]):
            assert opt.state[p].keys() == resumed.state[q].keys()
            for key in opt.state[p]:
                assert opt.state[p][key].dtype == resumed.state[q][key].dtype
                assert torch.equal(opt.state[p][key], resumed.state[q][key]), key


def _adam(named, **kwargs):
    return dm.PreconditionedMomentum(named, lr=1e-3, **kwargs)


def test_state_bytes_are_half_for_bf16_and_under_a_third_for_8bit():
    named = _named(((768, 3072),))
    sizes = {}
    for state_dtype in (torch.float32,) + FORMS:
        opt = _adam(named, state_dtype=state_dtype)
        _step(opt, named, _grads(named, torch.Generator().manual_seed(0)))
        sizes[state_dtype] = sum(v.numel() * v.element_size() for s in opt.state.values()
                                 for k, v in s.items() if k != "step")
    assert sizes[torch.bfloat16] == sizes[torch.float32] // 2
    assert sizes["8bit"] <= 0.3 * sizes[torch.float32]


@pytest.mark.parametrize("target", FORMS)
def test_load_state_dict_converts_an_fp32_checkpoint_on_request(target):
    named = _named(BIG + SMALL)
    opt = _adam(named)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        _step(opt, named, _grads(named, g))
    saved = opt.state_dict()
    converted = _adam(_fresh(named))
    converted.load_state_dict(saved, state_dtype=target)
    assert converted.param_groups[0]["state_dtype"] is dmc.canonical_state_dtype(target)
    for p, q in zip(opt.param_groups[0]["params"], converted.param_groups[0]["params"]):
        group = converted.param_groups[0]
        for key in ("exp_avg", "exp_avg_sq"):
            form = converted._form(group, key, q)
            if form == "full":
                assert torch.equal(converted.state[q][key], opt.state[p][key])
                continue
            codes, scale = dmc.compress(opt.state[p][key], form, key == "exp_avg", None)
            assert torch.equal(converted.state[q][key], codes)
            assert scale is None or torch.equal(converted.state[q][f"{key}_scale"], scale)
    # And back: the fp32 state is the dequantized one.
    back = _adam(_fresh(named))
    back.load_state_dict(converted.state_dict(), state_dtype=torch.float32)
    for p, q in zip(converted.param_groups[0]["params"], back.param_groups[0]["params"]):
        for key in ("exp_avg", "exp_avg_sq"):
            assert back.state[q][key].dtype == torch.float32
            assert torch.equal(back.state[q][key],
                               converted._read_memory(converted.param_groups[0], key, p,
                                                      converted.state[p]).float())
    # An old checkpoint (no state_dtype in its groups) loads as fp32 whatever the optimizer.
    old = copy.deepcopy(saved)
    del old["param_groups"][0]["state_dtype"]
    loaded = _adam(_fresh(named), state_dtype=target)
    loaded.load_state_dict(old)
    assert loaded.param_groups[0]["state_dtype"] is torch.float32


def test_inconsistent_compressed_checkpoints_are_refused_naming_the_entry():
    named = _named(BIG)
    opt = _adam(named, state_dtype="8bit")
    _step(opt, named, _grads(named, torch.Generator().manual_seed(4)))
    saved = opt.state_dict()
    wrong_dtype = copy.deepcopy(saved)
    wrong_dtype["state"][0]["exp_avg"] = wrong_dtype["state"][0]["exp_avg"].float()
    no_scale = copy.deepcopy(saved)
    del no_scale["state"][0]["exp_avg_sq_scale"]
    wrong_scale = copy.deepcopy(saved)
    wrong_scale["state"][0]["exp_avg_scale"] = torch.ones(16, 3)
    for bad, name in ((wrong_dtype, "'exp_avg'"), (no_scale, "'exp_avg_sq'"),
                      (wrong_scale, "'exp_avg_scale'")):
        target = _adam(_fresh(named), state_dtype="8bit")
        before = copy.deepcopy(target.state_dict())
        with pytest.raises(ValueError, match=name):
            target.load_state_dict(bad)
        assert target.state_dict() == before


def test_compressed_state_of_complex_parameters_is_refused_naming_the_parameter():
    named = [("z", torch.nn.Parameter(torch.randn(4, 3, dtype=torch.complex64)))]
    opt = _adam(named, state_dtype=torch.bfloat16)
    named[0][1].grad = torch.randn(4, 3, dtype=torch.complex64)
    with pytest.raises(ValueError, match="'z'.*complex|complex.*'z'"):
        opt.step()


def test_chunked_compressed_updates_equal_one_update(monkeypatch):
    # The fp32 working copies exist one chunk at a time; the result does not depend on it.
    named = _named(BIG + SMALL)
    opts = []
    for chunk in (1 << 24, 100):
        monkeypatch.setattr(dm.MemoryOptimizer, "COMPRESSED_CHUNK", chunk)
        params = _fresh(named)
        opt = _adam(params, state_dtype="8bit")
        g = torch.Generator().manual_seed(5)
        for _ in range(3):
            _step(opt, params, _grads(params, g))
        opts.append((opt, params))
    (a, pa), (b, pb) = opts
    for (_, x), (_, y) in zip(pa, pb):
        assert torch.equal(x, y)


def test_stochastic_rounding_keeps_a_slow_second_moment_moving(monkeypatch):
    # β₂ = 0.999 moves v by 0.1% of its gap per step: from v ≈ 1 on that is under half a bf16
    # ulp (2⁻⁸), so rounded to nearest v stops near 1, while fp32 reaches 4(1 − 0.999⁶⁰⁰) = 1.80.
    # Rounded stochastically it follows fp32.
    def second_moment(state_dtype, rounding="stochastic"):
        monkeypatch.setattr(dmc, "_ROUNDING", rounding)
        w = torch.nn.Parameter(torch.zeros((64, 64) if state_dtype == "8bit" else (16, 16)))
        opt = dm.PreconditionedMomentum([w], lr=0.0, betas=(0.9, 0.999),
                                        state_dtype=state_dtype)
        for _ in range(600):
            w.grad = torch.full_like(w, 2.0)
            opt.step()
        return opt._read_memory(opt.param_groups[0], "exp_avg_sq", w, opt.state[w]).mean()

    exact = second_moment(torch.float32).item()
    assert abs(exact - 4 * (1 - 0.999**600)) < 1e-3
    assert abs(second_moment(torch.bfloat16).item() - exact) < 0.01 * exact
    assert abs(second_moment("8bit").item() - exact) < 0.01 * exact
    stalled = second_moment(torch.bfloat16, "nearest").item()
    assert abs(stalled - exact) > 0.3 * exact


# --- 16-bit parameters without an fp32 master copy ----------------------------------------------


def _sgd_bf16(rounding, steps=500, lr=1e-4):
    w = torch.nn.Parameter(torch.ones(64, 64, dtype=torch.bfloat16))
    opt = dm.AssociativeMomentum([w], lr=lr, momentum=0.0, param_rounding=rounding)
    for _ in range(steps):
        w.grad = torch.full_like(w, -1.0)
        opt.step()
    return w, opt


def test_kahan_and_stochastic_parameters_keep_updates_below_an_ulp():
    # 500 steps of 1e-4 (an ulp of 1.0 in bf16 is 2⁻⁷ ≈ 0.0078): to nearest the parameter
    # never moves; with compensation or stochastic rounding it reaches 1.05.
    exact = 1.0 + 500 * 1e-4
    nearest, _ = _sgd_bf16("nearest")
    assert nearest.float().unique().tolist() == [1.0]
    kahan, opt = _sgd_bf16("kahan")
    compensation = opt.state[kahan]["compensation"]
    assert compensation.dtype == torch.bfloat16
    # Each step's compensation loses at most half its own bf16 ulp (≤ 2⁻¹⁰ of the
    # parameter's ulp), at random: far under one parameter ulp after 500 steps.
    assert (kahan.float() + compensation.float() - exact).abs().max() < 2**-7 / 8
    assert (kahan.float() - exact).abs().max() <= 2**-7
    stochastic, opt = _sgd_bf16("stochastic")
    assert "compensation" not in opt.state.get(stochastic, {})
    assert abs(stochastic.float().mean().item() - exact) < 2e-3
    # Each call draws new bits (its seed counts the calls): every element, not only the mean,
    # ends near 1.05 — up-roundings per element ~ Binomial(500, 0.0128), 6.4 ± 2.5 ulps. Bits
    # repeated from call to call would send each element always up (to ~4.9) or never.
    assert opt.param_groups[0]["rounding_calls"] == 500
    assert (stochastic.float() - exact).abs().max() < 12 * 2**-7


@pytest.mark.parametrize("info,variant", cases())
def test_kahan_parameters_resume_bit_for_bit(info, variant):
    named = _named(_shapes(info, variant)[:2], dtype=torch.bfloat16)
    make = lambda ps: info.make(ps, param_rounding="kahan", state_dtype=torch.bfloat16,  # noqa
                                **variant)
    opt = make(named)
    g = torch.Generator().manual_seed(6)
    for _ in range(3):
        _step(opt, named, _grads(named, g))
    resumed_named = _fresh(named)
    resumed = make(resumed_named)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    for _ in range(3):
        grads = _grads(named, g)
        _step(opt, named, grads)
        _step(resumed, resumed_named, grads)
    for (_, a), (_, b) in zip(named, resumed_named):
        assert torch.equal(a, b)


def test_stochastic_parameter_rounding_refuses_fp16_naming_it():
    named = [("half", torch.nn.Parameter(torch.ones(3, dtype=torch.float16)))]
    with pytest.raises(ValueError, match="'half'.*float16|param_rounding"):
        dm.AssociativeMomentum(named, lr=0.1, param_rounding="stochastic")


# --- the Triton kernels on compressed memories (under the interpreter) ---------------------------


def _triton_cases():
    picked = []
    for param in cases():
        info, variant = param.values
        if info.name in ("AssociativeMomentum", "PreconditionedMomentum") or (
                info.name in ("Muon", "M3") and variant.get("use_muon") is False):
            picked.append(param)
    return picked


@pytest.mark.parametrize("state_dtype", FORMS)
@pytest.mark.parametrize("info,variant", _triton_cases())
def test_the_fused_compressed_kernels_equal_the_torch_path(info, variant, state_dtype,
                                                           monkeypatch):
    # The optimizer's Triton path (deepmomentum.kernels.compressed: dequantize, update and
    # requantize in one pass) against its torch path: the kernels run under TRITON_INTERPRET
    # on CPU tensors once the dispatcher is told they may. torch's CPU sqrt is not correctly
    # rounded (MKL), the kernel's is: a stochastic rounding may rarely fall the other way.
    import deepmomentum.kernels as kernels
    from deepmomentum.kernels import compressed as fused

    if not kernels.triton_available() or not torch.cuda.is_available() and \
            os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs Triton (on CUDA, or its interpreter)")
    shapes = ((17, 300), (5,)) if state_dtype == "8bit" else ((3, 40), (5,))
    named = _named(shapes)
    calls = []
    original = fused.adam_step, fused.sgd_step
    monkeypatch.setattr(fused, "adam_step", lambda *a, **k: (calls.append(1),
                                                             original[0](*a, **k))[1])
    monkeypatch.setattr(fused, "sgd_step", lambda *a, **k: (calls.append(1),
                                                            original[1](*a, **k))[1])
    runs = []
    for triton in (False, True):
        params = _fresh(named)
        opt = info.make(params, state_dtype=state_dtype, **variant)
        if triton:
            monkeypatch.setattr(kernels, "usable", lambda ps: bool(ps))
        g = torch.Generator().manual_seed(8)
        for _ in range(3):
            _step(opt, params, _grads(params, g))
        monkeypatch.undo() if triton else None
        runs.append((opt, params))
    momentum = variant.get("momentum", 0.9) if info.name == "AssociativeMomentum" else 1
    assert calls or momentum == 0  # the fused compressed kernels ran
    (a, pa), (b, pb) = runs
    for (_, x), (_, y) in zip(pa, pb):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6)
    for p, q in zip(a.param_groups[0]["params"], b.param_groups[0]["params"]):
        assert a.state.get(p, {}).keys() == b.state.get(q, {}).keys()
        for key, value in a.state.get(p, {}).items():
            other = b.state[q][key]
            assert other.dtype == value.dtype
            if key.endswith("_scale") or key == "step":
                torch.testing.assert_close(other, value, rtol=1e-5, atol=0)
            elif value.dtype in (torch.int8, torch.uint8):
                assert (other.int() - value.int()).abs().max() <= 1
                assert (other == value).float().mean() >= 0.99
            else:
                torch.testing.assert_close(other.float(), value.float(), rtol=2**-7, atol=1e-6)


def _muon_cases():
    return [p for p in cases() if p.values[0].name == "Muon" and
            p.values[1].get("use_muon") is not False]


def _ieee_sqrt(monkeypatch):
    """torch's fp32 ``Tensor.sqrt``/``sqrt_`` correctly rounded (through fp64), as the kernels'
    (tests/test_kernels_compressed.py: the torch codec's 8-bit codes then equal the kernels')."""
    real = torch.Tensor.sqrt

    def sqrt(self):
        return real(self.double()).float() if self.dtype == torch.float32 else real(self)

    monkeypatch.setattr(torch.Tensor, "sqrt", sqrt)
    monkeypatch.setattr(torch.Tensor, "sqrt_", lambda self: self.copy_(sqrt(self)))


@pytest.mark.parametrize("state_dtype", FORMS)
@pytest.mark.parametrize("info,variant", _muon_cases())
def test_the_fused_compressed_muon_momentum_equals_the_codec_and_torch_paths(
        info, variant, state_dtype, monkeypatch):
    # Muon's Triton path on compressed momentum (kernels.compressed.ema_step: read, lerp and
    # requantize in one pass, then the rule's NS and apply kernel) against the codec path
    # (decompress → functional._triton_muon → compress) — equal bit for bit, parameters and
    # state — and against the torch path: the same state bit for bit (torch's lerp op for op,
    # the same seeds; sqrt made IEEE for the torch codec's 8-bit codes), parameters within
    # float32 tolerance (the apply kernel's arithmetic is not torch's). Under "8bit" the small
    # matrix stays fp32 and takes the codec path beside the fused one.
    import deepmomentum.kernels as kernels
    from deepmomentum.kernels import compressed as fused
    from deepmomentum.optimizer import MemoryOptimizer

    if not kernels.triton_available() or not torch.cuda.is_available() and \
            os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs Triton (on CUDA, or its interpreter)")
    if variant.get("batch_dims"):
        shapes = ((2, 32, 64), (2, 4, 3)) if state_dtype == "8bit" else ((2, 8, 20), (2, 4, 3))
    else:
        shapes = ((17, 300), (4, 3)) if state_dtype == "8bit" else ((3, 40), (4, 3))
    named = _named(shapes)
    _ieee_sqrt(monkeypatch)
    calls = []
    original = fused.ema_step
    runs = {}
    for path in ("torch", "codec", "fused"):
        params = _fresh(named)
        opt = info.make(params, state_dtype=state_dtype, **variant)
        with monkeypatch.context() as patch:
            if path != "torch":
                patch.setattr(kernels, "usable", lambda ps: bool(ps))
            if path == "codec":  # no fused Muon: every tensor to the codec path
                patch.setattr(MemoryOptimizer, "_fused_muon",
                              lambda self, group, keys, ps, *a: list(range(len(ps))))
            patch.setattr(fused, "ema_step", lambda *a, **k: (calls.append(path),
                                                              original(*a, **k))[1])
            g = torch.Generator().manual_seed(8)
            for _ in range(3):
                _step(opt, params, _grads(params, g))
        runs[path] = (opt, params)
    assert calls == ["fused"] * 3  # one ema_step per step (one compressed form), fused only
    (a, pa), (b, pb), (c, pc) = runs["torch"], runs["codec"], runs["fused"]
    for (_, x), (_, y), (_, z) in zip(pa, pb, pc):
        assert torch.equal(z, y)
        torch.testing.assert_close(z, x, rtol=1e-5, atol=1e-6)
    for p, q, r in zip(*(o.param_groups[0]["params"] for o in (a, b, c))):
        assert c.state[r].keys() == b.state[q].keys() == a.state[p].keys()
        for key, value in c.state[r].items():
            for other in (a.state[p][key], b.state[q][key]):
                assert other.dtype == value.dtype and torch.equal(other, value), key


def _other_rules():
    names = {p.values[0].name for p in _triton_cases()}
    return [p for p in cases() if p not in _triton_cases() and p not in _muon_cases() and (
        p.values[0].name not in names or p.values[1].get("use_muon") is not False)]


@pytest.mark.parametrize("info,variant", _other_rules())
def test_the_compressed_codec_kernels_serve_every_other_rule(info, variant, monkeypatch):
    # Rules without a fused compressed step (Delta, DMGD, M3) read and write their
    # compressed memories with one multi-tensor kernel per entry on the Triton path
    # (kernels.compressed.decompress/compress), equal to the torch codec; the rules' own
    # Triton kernels differ from their torch paths within float32 tolerance.
    import deepmomentum.kernels as kernels
    from deepmomentum.kernels import compressed as fused

    if not kernels.triton_available() or not torch.cuda.is_available() and \
            os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs Triton (on CUDA, or its interpreter)")
    shapes = ((2, 8, 20), (2, 8, 20)) if variant.get("batch_dims") else ((8, 40), (8, 40))
    named = _named(shapes)
    used = []
    original = fused.compress
    runs = []
    for triton in (False, True):
        params = _fresh(named)
        opt = info.make(params, state_dtype=torch.bfloat16, **variant)
        if triton:
            monkeypatch.setattr(kernels, "usable", lambda ps: bool(ps))
            monkeypatch.setattr(fused, "compress", lambda *a, **k: (used.append(1),
                                                                    original(*a, **k))[1])
        g = torch.Generator().manual_seed(9)
        for _ in range(2):
            _step(opt, params, _grads(params, g))
        monkeypatch.undo() if triton else None
        runs.append((opt, params))
    assert used or not runs[0][0].state  # the kernels ran wherever there is a memory
    (a, pa), (b, pb) = runs
    for (_, x), (_, y) in zip(pa, pb):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5)
    for p, q in zip(a.param_groups[0]["params"], b.param_groups[0]["params"]):
        assert a.state.get(p, {}).keys() == b.state.get(q, {}).keys()
        for key, value in a.state.get(p, {}).items():
            other = b.state[q][key]
            assert other.dtype == value.dtype
            torch.testing.assert_close(other.float(), value.float(), rtol=2**-7, atol=1e-5)
            if value.dtype == torch.bfloat16:  # the same roundings, bar a rare flip
                assert (other == value).float().mean() >= 0.97, key
