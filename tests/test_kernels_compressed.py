"""The Triton kernels on compressed state (``deepmomentum.kernels.compressed``) against the torch
codec (``deepmomentum.compressed``) and the functional rules (TRITON_INTERPRET=1 on the CPU, set
in conftest.py).

What is bit for bit and why:

* the random bits, bf16 rounding, 8-bit quantization (codes and scales) and dequantization
  equal the codec exactly;
* a fused step equals ``decompress → rule (functional, single-tensor) → compress`` exactly —
  parameters, bf16 patterns, 8-bit codes and scales — once the reference's square root is
  correctly rounded (fixture ``ieee_sqrt``): torch's CPU ``sqrt`` (MKL vector math) is not (one
  fp32 result in six is off by an ulp), the kernels' ``sqrt_rn`` is. With torch's own sqrt the
  step is compared at the tolerances of tests/test_kernels.py (parameters) and, for the state,
  within one code step with ≥ 99% of the codes identical (an ulp in the input can flip a
  stochastic rounding).

Sizes are small and ragged (rows shorter than, equal to and longer than a 256-entry block);
8-bit programs are slow in the interpreter, so 8-bit cases run fewer combinations and steps.
"""

from __future__ import annotations

import math

import pytest
import torch

import deepmomentum.functional as dmf
from deepmomentum import compressed as C

K = pytest.importorskip("deepmomentum.kernels.compressed", reason="needs triton")
if not K._interpreting():
    pytest.skip("the CPU references need the kernels on CPU tensors (TRITON_INTERPRET=1, set "
                "by conftest.py without CUDA); on a GPU run benchmarks/compressed_gpu.py",
                allow_module_level=True)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BF16_SHAPES = [(3, 300), (5, 256), (2, 7), (11,), ()]
Q8_SHAPES = [(17, 300)]
SHAPES = {"bf16": BF16_SHAPES, "8bit": Q8_SHAPES}


# --- helpers ----------------------------------------------------------------------------------


@pytest.fixture
def ieee_sqrt(monkeypatch):
    """torch's fp32 ``Tensor.sqrt``/``sqrt_`` correctly rounded (through fp64, exact for fp32
    inputs), as the kernels' ``tl.sqrt_rn`` and torch's CUDA sqrt are."""
    real = torch.Tensor.sqrt

    def sqrt(self):
        return real(self.double()).float() if self.dtype == torch.float32 else real(self)

    monkeypatch.setattr(torch.Tensor, "sqrt", sqrt)
    monkeypatch.setattr(torch.Tensor, "sqrt_", lambda self: self.copy_(sqrt(self)))


def _pattern(t):
    """The bit pattern of ``t`` as integers (NaN-safe, −0 ≠ +0)."""
    if t.dtype in (torch.int8, torch.uint8, torch.int32):
        return t
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _equal_bits(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape, what
    same = _pattern(a) == _pattern(b)
    assert bool(same.all()), f"{what}: {int((~same).sum())} of {same.numel()} differ"


def _close(a, b, dtype):
    # as tests/test_kernels.py: fp32 to 1e-6 relative; 16-bit within a few roundings
    tol = {torch.float32: (1e-6, 1e-6), torch.bfloat16: (2**-5, 2**-5),
           torch.float16: (2**-8, 2**-8)}[dtype]
    torch.testing.assert_close(a.float(), b.float(), rtol=tol[0], atol=tol[1])


def _state_close(stored, scale, ref_stored, ref_scale, what):
    """Within one code step, ≥ 99% of the codes identical."""
    same = (_pattern(stored) == _pattern(ref_stored)).float().mean().item()
    assert same >= 0.99, f"{what}: only {same:.4f} of the codes identical"
    if scale is None:  # bf16: neighbours at most
        torch.testing.assert_close(stored.float(), ref_stored.float(), rtol=2**-7, atol=0)
    else:
        torch.testing.assert_close(scale, ref_scale, rtol=1e-5, atol=0)
        assert (stored.int() - ref_stored.int()).abs().max() <= 1, what


def _randn(shapes, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype) for s in shapes]


def _stored(shapes, form, signed, seed):
    """Compressed memories to start from (random, not zero: the read path is exercised)."""
    works = _randn(shapes, seed)
    if not signed:
        works = [w.square() for w in works]
    return [list(C.compress(w, form, signed, seed + i, 0)) for i, w in enumerate(works)]


def _split(stored):
    codes = [c.clone() for c, _ in stored]
    scales = None if stored[0][1] is None else [s.clone() for _, s in stored]
    return codes, scales


def _seeds(step, salt, n):
    return [C.seed_of(step, 0, i, salt) for i in range(n)]


def _offsets(shapes):
    # shards' offsets: the tensors' first elements at various places of a larger whole,
    # one past 2³¹ (the bits use the index's low 32 bits)
    return [(i * 1_000_003 + (1 << 31) * (i == 1)) for i in range(len(shapes))]


def _round_params(params, works, comps, param_rounding, pseeds, cseeds, offsets):
    """The optimizer's rounding of fp32 working copies into 16-bit parameters
    (``MemoryOptimizer._update_compressed``)."""
    for i, (p, w) in enumerate(zip(params, works)):
        if p.dtype == torch.float32:
            p.copy_(w)
        elif param_rounding == "stochastic":
            p.copy_(C.round_bf16(w, C.uniform_bits(w.numel(), pseeds[i], offsets[i])))
        else:  # kahan
            rounded = w.to(p.dtype)
            error = w.sub_(rounded)
            comps[i].copy_(C.round_bf16(error, C.uniform_bits(
                error.numel(), cseeds[i], offsets[i])) if p.dtype == torch.bfloat16
                else error.to(p.dtype))
            p.copy_(rounded)


def _working(params, comps, param_rounding):
    if param_rounding == "nearest":
        return list(params)
    return [p if p.dtype == torch.float32 else
            p.float() + (comps[i].float() if param_rounding == "kahan" else 0)
            for i, p in enumerate(params)]


# --- the codec --------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 0x9E3779B9, 0xFFFFFFFF])
@pytest.mark.parametrize("offset", [0, 5, (1 << 31) - 100, (1 << 32) - 100, 3 << 32])
def test_bits_equal_uniform_bits(seed, offset):
    _equal_bits(K.uniform_bits(2500, seed, offset), C.uniform_bits(2500, seed, offset),
                f"bits (seed {seed:#x}, offset {offset})")


def _hard_values(shape, signed, seed):
    """Random values with the cases a codec gets wrong first: a zero row, a constant row,
    values exactly on code points, tiny (subnormal) and huge magnitudes."""
    x = _randn([shape], seed)[0]
    x[0] = 0.0
    x[1] = -3.5
    codes = torch.arange(x.shape[1]) % 128
    x[2] = (codes / 127.0) ** 2 * torch.where(codes % 2 == 0, 1.0, -1.0)
    x[3] *= 1e-39
    x[4] *= 1e30
    return x if signed else x.abs()


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("stochastic", [True, False])
def test_quantize_equals_the_codec_bit_for_bit(ieee_sqrt, signed, stochastic):
    shapes = [(17, 300), (6, 256), (5, 7), (9, 1)]
    works = [_hard_values(s, signed, i) for i, s in enumerate(shapes)]
    seeds = [11, 0xFFFFFFFF, 3, 2**31] if stochastic else None
    offsets = _offsets(shapes)
    for i, ((codes, scale), w) in enumerate(zip(K.compress(works, "8bit", signed, seeds,
                                                           offsets), works)):
        ref = C.compress(w, "8bit", signed, None if seeds is None else seeds[i], offsets[i])
        _equal_bits(codes, ref[0], f"codes[{i}]")
        _equal_bits(scale, ref[1], f"scales[{i}]")
        _equal_bits(K.decompress([codes], [scale])[0], C.decompress(*ref), f"values[{i}]")


def test_quantize_with_torchs_own_sqrt():
    # torch's CPU sqrt is off by an ulp here and there: a code moves only where √a·127 sits
    # on an integer to the last bit, and then the stochastic choice almost always agrees
    x = torch.randn(40, 300, generator=torch.Generator().manual_seed(5))
    for signed, w in ((True, x), (False, x.square())):
        (codes, scale), = K.compress([w], "8bit", signed, [77])
        ref_codes, ref_scale = C.compress(w, "8bit", signed, 77)
        _equal_bits(scale, ref_scale, "scales")
        _state_close(codes, scale, ref_codes, ref_scale, "codes")


def test_bf16_rounding_equals_round_bf16():
    x = torch.randn(3, 1000, generator=torch.Generator().manual_seed(7))
    x[0, :8] = torch.tensor([0.0, -0.0, math.inf, -math.inf, 3.3895e38, -3.3895e38, 1e-40,
                             -1e-44])
    x[1] *= 1e-3
    x[2] *= 1e6
    offsets = [0, 123, (1 << 32) - 5]
    works = list(x.unbind(0))
    for i, ((stored, scale), w) in enumerate(zip(K.compress(works, "bf16", True,
                                                            [1, 2, 0xFFFFFFFF], offsets),
                                                 works)):
        assert scale is None
        _equal_bits(stored, C.compress(w, "bf16", True, [1, 2, 0xFFFFFFFF][i],
                                       offsets[i])[0], f"stochastic[{i}]")
        _equal_bits(K.decompress([stored])[0], C.decompress(stored, None), f"values[{i}]")
    (nearest, _), = K.compress([x], "bf16", True, None)
    _equal_bits(nearest, x.to(torch.bfloat16), "nearest")


# --- fused Adam -------------------------------------------------------------------------------

ADAM_OPTIONS = [
    dict(precondition="readout", preconditioner="adam", weight_decay=0.01),
    dict(precondition="value", preconditioner="adam", weight_decay=0.1,
         decoupled_weight_decay=False, maximize=True),
    dict(precondition="readout", preconditioner="none", weight_decay=0.0, beta1=0.3),
]
# 8-bit: every option with fp32 parameters, every dtype with the first option
Q8_CASES = [(o, torch.float32) for o in ADAM_OPTIONS] + \
    [(ADAM_OPTIONS[0], d) for d in DTYPES[1:]]


def _run_adam(form, dtype, options, steps, exact, param_rounding="nearest"):
    shapes = SHAPES[form]
    n = len(shapes)
    adam = options.get("preconditioner", "adam") == "adam"
    p1 = _randn(shapes, 0, dtype)
    p2 = [p.clone() for p in p1]
    comps1 = [torch.zeros_like(p) for p in p1]
    comps2 = [c.clone() for c in comps1]
    ref_m, ref_v = _stored(shapes, form, True, 10), _stored(shapes, form, False, 20)
    (m, ms), (v, vs) = _split(ref_m), _split(ref_v)
    offsets = _offsets(shapes)
    for step in range(1, steps + 1):
        grads = _randn(shapes, 100 + step, dtype)
        ts = [step + i for i in range(n)]  # tensors at different t
        kw = dict(lr=0.01, beta1=0.9, beta2=0.99, eps=1e-8)
        kw.update(options)
        seeds_m, seeds_v = _seeds(step, "exp_avg", n), _seeds(step, "exp_avg_sq", n)
        pseeds, cseeds = _seeds(step, "param", n), _seeds(step, "compensation", n)
        K.adam_step(p1, grads, m, v if adam else None, ms, vs if adam else None, ts, **kw,
                    form=form, seeds_m=seeds_m, seeds_v=seeds_v if adam else None,
                    offsets=offsets, param_rounding=param_rounding, param_seeds=pseeds,
                    compensations=comps1, compensation_seeds=cseeds)
        # the reference: decompress → the functional rule → compress
        wm = [C.decompress(c, s) for c, s in ref_m]
        wv = [C.decompress(c, s) for c, s in ref_v] if adam else [None] * n
        works = _working(p2, comps2, param_rounding)
        dmf.preconditioned_momentum(works, grads, wm, wv, [torch.tensor(float(t)) for t in ts],
                                    foreach=False, **kw)
        if param_rounding != "nearest":
            _round_params(p2, works, comps2, param_rounding, pseeds, cseeds, offsets)
        ref_m = [list(C.compress(w, form, True, seeds_m[i], offsets[i]))
                 for i, w in enumerate(wm)]
        if adam:
            ref_v = [list(C.compress(w, form, False, seeds_v[i], offsets[i]))
                     for i, w in enumerate(wv)]
        memories = [("exp_avgs", m, ms, ref_m)] + ([("exp_avg_sqs", v, vs, ref_v)] if adam
                                                   else [])
        for i in range(n):
            if exact:
                _equal_bits(p1[i], p2[i], f"step {step}: params[{i}]")
                if param_rounding == "kahan":
                    _equal_bits(comps1[i], comps2[i], f"step {step}: compensations[{i}]")
            else:
                _close(p1[i], p2[i], dtype)
            for name, codes, scales, ref in memories:
                scale = None if scales is None else scales[i]
                if exact:
                    _equal_bits(codes[i], ref[i][0], f"step {step}: {name}[{i}]")
                    if scale is not None:
                        _equal_bits(scale, ref[i][1], f"step {step}: {name} scales[{i}]")
                else:
                    _state_close(codes[i], scale, ref[i][0], ref[i][1],
                                 f"step {step}: {name}[{i}]")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", ADAM_OPTIONS)
def test_adam_bf16_state_equals_the_reference_bit_for_bit(ieee_sqrt, dtype, options):
    _run_adam("bf16", dtype, options, steps=3, exact=True)


@pytest.mark.parametrize("options,dtype", Q8_CASES)
def test_adam_8bit_state_equals_the_reference_bit_for_bit(ieee_sqrt, options, dtype):
    _run_adam("8bit", dtype, options, steps=2, exact=True)


@pytest.mark.parametrize("form,dtype", [("bf16", torch.float32), ("bf16", torch.bfloat16),
                                        ("8bit", torch.float32)])
def test_adam_with_torchs_own_sqrt_is_within_tolerance(form, dtype):
    _run_adam(form, dtype, ADAM_OPTIONS[0], steps=2, exact=False)


@pytest.mark.parametrize("param_rounding,dtype", [("stochastic", torch.bfloat16),
                                                  ("kahan", torch.bfloat16),
                                                  ("kahan", torch.float16)])
def test_adam_param_rounding_equals_the_optimizers(ieee_sqrt, param_rounding, dtype):
    _run_adam("bf16", dtype, ADAM_OPTIONS[0], steps=3, exact=True,
              param_rounding=param_rounding)


# --- fused SGD momentum -----------------------------------------------------------------------

SGD_OPTIONS = [
    dict(momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.01),
    dict(momentum=0.5, dampening=0.3, nesterov=False, weight_decay=0.1,
         decoupled_weight_decay=True, maximize=True),
    dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0),
]
SGD_Q8_CASES = [(o, torch.float32) for o in SGD_OPTIONS[:2]] + \
    [(SGD_OPTIONS[0], d) for d in DTYPES[1:]]


def _run_sgd(form, dtype, options, steps, exact, param_rounding="nearest", shapes=None):
    shapes = shapes or SHAPES[form]
    n = len(shapes)
    p1 = _randn(shapes, 0, dtype)
    p2 = [p.clone() for p in p1]
    comps1 = [torch.zeros_like(p) for p in p1]
    comps2 = [c.clone() for c in comps1]
    # stored buffers hold garbage before the first step: it is only written
    b, bs = _split(_stored(shapes, form, True, 30))
    ref = None
    offsets = _offsets(shapes)
    has_momentum = options["momentum"] != 0
    for step in range(steps):
        grads = _randn(shapes, 200 + step, dtype)
        seeds = _seeds(step, "momentum_buffer", n)
        pseeds, cseeds = _seeds(step, "param", n), _seeds(step, "compensation", n)
        K.sgd_step(p1, grads, b, bs, lr=0.05, first_step=step == 0, **options, form=form,
                   seeds=seeds, offsets=offsets, param_rounding=param_rounding,
                   param_seeds=pseeds, compensations=comps1, compensation_seeds=cseeds)
        works = _working(p2, comps2, param_rounding)
        wb = [None] * n if ref is None else [C.decompress(c, s) for c, s in ref]
        dmf.associative_momentum(works, grads, wb, lr=0.05, foreach=False, **options)
        if param_rounding != "nearest":
            _round_params(p2, works, comps2, param_rounding, pseeds, cseeds, offsets)
        if has_momentum:
            ref = [list(C.compress(w, form, True, seeds[i], offsets[i]))
                   for i, w in enumerate(wb)]
        for i in range(n):
            if exact:
                _equal_bits(p1[i], p2[i], f"step {step}: params[{i}]")
            else:
                _close(p1[i], p2[i], dtype)
            if not has_momentum:
                continue
            scale = None if bs is None else bs[i]
            if exact:
                _equal_bits(b[i], ref[i][0], f"step {step}: momentum_buffers[{i}]")
                if scale is not None:
                    _equal_bits(scale, ref[i][1], f"step {step}: scales[{i}]")
            else:
                _state_close(b[i], scale, ref[i][0], ref[i][1], f"step {step}: buffers[{i}]")
    return p1, b, bs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", SGD_OPTIONS)
def test_sgd_bf16_state_equals_the_reference_bit_for_bit(dtype, options):
    _run_sgd("bf16", dtype, options, steps=3, exact=True)


@pytest.mark.parametrize("options,dtype", SGD_Q8_CASES)
def test_sgd_8bit_state_equals_the_reference_bit_for_bit(options, dtype):
    _run_sgd("8bit", dtype, options, steps=2, exact=True)


@pytest.mark.parametrize("param_rounding", ["stochastic", "kahan"])
def test_sgd_param_rounding_equals_the_optimizers(param_rounding):
    _run_sgd("bf16", torch.bfloat16, SGD_OPTIONS[0], steps=3, exact=True,
             param_rounding=param_rounding)


# --- Muon's momentum (ema_step) ---------------------------------------------------------------

#: μ: Muon's default, both sides of lerp's 0.5 switch for both weights (1 − μ written, μ read),
#: exactly on it, 0 (b = g, U = g) and next to 1 (a write weight of ~1e-7)
EMA_MOMENTA = [0.95, 0.3, 0.5, 0.5000001, 0.0, 0.9999999]
EMA_Q8_SHAPES = [(17, 300), (6, 256), (5, 7)]


def _run_ema(form, momentum, nesterov, steps, maximize=False, gdtype=torch.float32,
             start="random", stochastic=True):
    shapes = BF16_SHAPES if form == "bf16" else EMA_Q8_SHAPES
    n = len(shapes)
    if start == "zeros":  # Muon's first step: the optimizer writes zero buffers first
        ref = [list(C.compress(torch.zeros(s), form, True, None, 0)) for s in shapes]
    else:
        ref = _stored(shapes, form, True, 40)
    b, bs = _split(ref)
    offsets = _offsets(shapes)
    for step in range(steps):
        grads = _randn(shapes, 300 + step, gdtype)
        seeds = _seeds(step, "momentum_buffer", n) if stochastic else None
        us = K.ema_step(b, grads, bs, momentum=momentum, nesterov=nesterov, maximize=maximize,
                        form=form, seeds=seeds, offsets=offsets)
        # the reference: decompress → functional.muon's stages (single-tensor) → compress
        wb = [C.decompress(c, s) for c, s in ref]
        gs = dmf.effective_gradients(grads, grads, maximize=maximize)
        ref_u = dmf.ema_write(wb, gs, beta=momentum)
        if nesterov:
            ref_u = dmf.nesterov_readout(gs, ref_u, momentum=momentum, ema=True)
        ref = [list(C.compress(w, form, True, None if seeds is None else seeds[i], offsets[i]))
               for i, w in enumerate(wb)]
        for i in range(n):
            assert us[i].dtype == torch.float32 and us[i].shape == shapes[i]
            _equal_bits(us[i], ref_u[i], f"step {step}: updates[{i}]")
            _equal_bits(b[i], ref[i][0], f"step {step}: momentum_buffers[{i}]")
            if bs is not None:
                _equal_bits(bs[i], ref[i][1], f"step {step}: scales[{i}]")


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("momentum", EMA_MOMENTA)
def test_ema_bf16_state_equals_the_reference_bit_for_bit(momentum, nesterov):
    _run_ema("bf16", momentum, nesterov, steps=3, maximize=momentum == 0.3)


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("momentum", [0.95, 0.3, 0.0])
def test_ema_8bit_state_equals_the_reference_bit_for_bit(ieee_sqrt, momentum, nesterov):
    _run_ema("8bit", momentum, nesterov, steps=2, maximize=momentum == 0.3)


@pytest.mark.parametrize("form", ["bf16", "8bit"])
def test_ema_first_steps_from_zero_buffers_equal_the_reference(ieee_sqrt, form):
    _run_ema(form, 0.95, True, steps=2, start="zeros")


@pytest.mark.parametrize("gdtype", [torch.bfloat16, torch.float16])
def test_ema_16bit_gradients_and_nearest_rounding_equal_the_reference(ieee_sqrt, gdtype):
    _run_ema("bf16", 0.9, True, steps=2, gdtype=gdtype, stochastic=False)
    _run_ema("8bit", 0.9, False, steps=1, gdtype=gdtype, stochastic=False)


@pytest.mark.parametrize("changes,message", [
    (dict(momentum_buffers=[torch.zeros(4, 300, dtype=torch.uint8)]),
     r"momentum_buffers\[0\] has dtype torch.uint8, expected torch.int8"),
    (dict(scales=None), r"scales is None"),
    (dict(grads=[torch.randn(4, 300, dtype=torch.float64)]), r"grads\[0\] has dtype"),
    (dict(seeds=[1, 2]), r"seeds has 2 entries"),
    (dict(form="4bit"), r"form must be one of"),
])
def test_ema_refusals_name_the_tensor(changes, message):
    b, s = C.compress(torch.randn(4, 300), "8bit", True, 1)
    args = dict(momentum_buffers=[b], grads=[torch.randn(4, 300)], scales=[s], momentum=0.9,
                nesterov=True, form="8bit", seeds=[1])
    args.update(changes)
    with pytest.raises(ValueError, match=message):
        K.ema_step(**args)


def test_row_shards_step_as_the_whole_tensor():
    # blocks never cross a row and the bits are the global index's: two row shards (the
    # second at its offset) step as the whole tensor does (FSDP2's layout)
    whole = [torch.randn(6, 300, generator=torch.Generator().manual_seed(1))]
    shards = [whole[0][:2].clone(), whole[0][2:].clone()]
    buffers = _split([list(C.compress(torch.randn(6, 300), "8bit", True, 3))])
    parts = [[buffers[0][0][:2].clone(), buffers[0][0][2:].clone()],
             [buffers[1][0][:2].clone(), buffers[1][0][2:].clone()]]
    options = dict(lr=0.1, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0,
                   form="8bit")
    grads = torch.randn(6, 300, generator=torch.Generator().manual_seed(2))
    K.sgd_step(whole, [grads], *buffers, seeds=[99], offsets=[0], **options)
    K.sgd_step(shards, [grads[:2], grads[2:]], *parts, seeds=[99, 99], offsets=[0, 600],
               **options)
    _equal_bits(torch.cat(shards), whole[0], "params")
    _equal_bits(torch.cat(parts[0]), buffers[0][0], "codes")
    _equal_bits(torch.cat(parts[1]), buffers[1][0], "scales")


# --- launches and refusals --------------------------------------------------------------------


def test_one_launch_per_group(monkeypatch):
    launches = []
    real = K._launch

    def counting(kernel, tensors, *args, **kwargs):
        launches.append(len(tensors))
        return real(kernel, tensors, *args, **kwargs)

    monkeypatch.setattr(K, "_launch", counting)
    shapes = [(n,) for n in range(1, 30)]
    params = _randn(shapes, 0)[:20] + _randn(shapes, 1, torch.bfloat16)[20:]
    grads = _randn(shapes, 2)
    m, _ = _split(_stored(shapes, "bf16", True, 3))
    v, _ = _split(_stored(shapes, "bf16", False, 4))
    n = len(shapes)
    K.adam_step(params, grads, m, v, None, None, [1] * n, lr=0.1, beta1=0.9, beta2=0.99,
                eps=1e-8, weight_decay=0.0, form="bf16", seeds_m=list(range(n)),
                seeds_v=list(range(n)))
    assert launches == [20, 9]


def _sgd_args(**changes):
    shape = (4, 300)
    b, s = C.compress(torch.randn(shape), "8bit", True, 1)
    args = dict(params=[torch.randn(shape)], grads=[torch.randn(shape)], momentum_buffers=[b],
                scales=[s], lr=0.1, momentum=0.9, dampening=0.0, nesterov=False,
                weight_decay=0.0, form="8bit", seeds=[1])
    args.update(changes)
    return args


@pytest.mark.parametrize("changes,message", [
    (dict(params=[torch.randn(300, 4).T]), r"params\[0\].*not contiguous"),
    (dict(momentum_buffers=[torch.zeros(300, 4, dtype=torch.int8).T]),
     r"momentum_buffers\[0\].*not contiguous"),
    (dict(momentum_buffers=[torch.zeros(4, 300, dtype=torch.uint8)]),
     r"momentum_buffers\[0\] has dtype torch.uint8, expected torch.int8"),
    (dict(scales=[torch.zeros(4, 1)]), r"scales\[0\] must be .* shape \(4, 2\)"),
    (dict(scales=None), r"scales is None"),
    (dict(form="4bit"), r"form must be one of"),
    (dict(params=[torch.randn(4, 300, dtype=torch.float64)]), r"params\[0\] has dtype"),
    (dict(seeds=[1, 2]), r"seeds has 2 entries"),
    (dict(param_rounding="kahan", params=[torch.randn(4, 300).bfloat16()]),
     r"compensations is None"),
    (dict(param_rounding="stochastic", param_seeds=[1],
          params=[torch.randn(4, 300).half()]), r"params\[0\].*'stochastic' takes bf16"),
])
def test_refusals_name_the_tensor(changes, message):
    with pytest.raises(ValueError, match=message):
        K.sgd_step(**_sgd_args(**changes))


def test_adam_refuses_wrong_second_moment_codes():
    p = torch.randn(4, 300)
    m, ms = C.compress(torch.randn(4, 300), "8bit", True, 1)
    with pytest.raises(ValueError, match=r"exp_avg_sqs\[0\] has dtype torch.int8, expected "
                                         r"torch.uint8"):
        K.adam_step([p], [torch.randn(4, 300)], [m], [m.clone()], [ms], [ms.clone()], [1],
                    lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, form="8bit",
                    seeds_m=[1], seeds_v=[2])
    with pytest.raises(ValueError, match=r"exp_avgs\[0\] is 0-dim"):
        K.adam_step([torch.tensor(1.0)], [torch.tensor(1.0)], [torch.tensor(0, dtype=torch.int8)],
                    [torch.tensor(0, dtype=torch.uint8)], [torch.zeros(1, 1)],
                    [torch.zeros(1, 1)], [1], lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8,
                    weight_decay=0.0, form="8bit", seeds_m=[1], seeds_v=[2])
