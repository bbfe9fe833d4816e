"""GPU: the fused Triton steps on compressed state (``deepmomentum.kernels.compressed``) —
correctness on the card, then time and bytes against the uncompressed kernels and torch.

    python -m benchmarks.compressed_gpu [--params 6.4e7] [--tensors 16] [--out FILE]
                                        [--skip-timing] [--sweep-warps]

Correctness (fails loudly, exit status 1, on any mismatch):

* the kernels' random bits, bf16 rounding and 8-bit codes/scales against the torch codec on
  the card — bit for bit (torch's CUDA ``sqrt``/division are correctly rounded, as the kernels'
  ``sqrt_rn``/``div_rn``), and against the CPU codec with a correctly rounded sqrt;
* each fused step (Adam: readout/AdamW, value + coupled decay + maximize, no preconditioner;
  SGD: nesterov + coupled decay, dampening + decoupled decay + maximize; bf16 and 8-bit state;
  fp32 and bf16 parameters; ragged shapes; offsets) one step at a time from the same inputs
  against ``decompress → functional rule → compress`` run (a) on the CPU with a correctly
  rounded sqrt: expected bit for bit — parameters, bf16 patterns, codes, scales (the fraction
  equal is printed; anything below 1 is reported as a failure), and (b) on the card with
  torch's CUDA ops: at tolerance (torch's CUDA ``x / scalar`` multiplies by a reciprocal and its
  ``addcdiv`` is a fused multiply-add, so parameters differ in last bits), state within one
  code step and ≥ 99% of the codes identical;
* Muon's momentum (``ema_step``: nesterov on/off, maximize, μ on both sides of lerp's 0.5
  switch and 0; bf16 and 8-bit buffers; fp32 and bf16 gradients) against ``decompress →
  ema_write → nesterov_readout(ema=True) → compress``: on the CPU (correctly rounded sqrt)
  bit for bit — buffers, scales and the fp32 update U —, on the card at tolerance as above.

Timing (``triton.testing.do_bench``, median of the reps after warm-up; random data, ``--params``
fp32 parameters in ``--tensors`` tensors of (4096, ·), far larger than L2), one card, one run:

* Adam(W): torch's fused AdamW (fp32 state), ``elementwise.adam_step`` (fp32 state), the fused
  compressed step (bf16 and 8-bit state), and today's compressed path —
  ``compressed.decompress → elementwise.adam_step → compressed.compress`` — for both forms;
* SGD-momentum: ``torch._fused_sgd_``, ``elementwise.sgd_step``, fused compressed (bf16, 8-bit),
  today's path;
* Muon's momentum (the memory pass before Newton–Schulz): ``elementwise.ema_momentum`` (fp32
  buffers), ``ema_step`` (bf16, 8-bit), and the codec path — ``compressed.decompress →
  elementwise.ema_momentum → compressed.compress``.

Prints ms, the bytes per parameter the step must move (reads + writes of parameter, gradient,
memories and block scales), effective GB/s and ratios against ``elementwise`` fp32 and torch's
fused step; writes JSON to ``--out`` or, if ``$OUT`` is set, ``$OUT/compressed_gpu.json``
(stamped with ``benchmarks.core.environment()``). Without CUDA it says so and exits (status 0).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

if __package__ in (None, ""):  # run as a file: the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import core  # noqa: E402

ADAM_OPTIONS = {
    "adamw": dict(precondition="readout", preconditioner="adam", weight_decay=0.01),
    "value-coupled-maximize": dict(precondition="value", preconditioner="adam",
                                   weight_decay=0.1, decoupled_weight_decay=False,
                                   maximize=True),
    "no-preconditioner": dict(precondition="readout", preconditioner="none",
                              weight_decay=0.0),
}
SGD_OPTIONS = {
    "nesterov-coupled": dict(momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.01),
    "dampening-decoupled-maximize": dict(momentum=0.5, dampening=0.3, nesterov=False,
                                         weight_decay=0.1, decoupled_weight_decay=True,
                                         maximize=True),
}
MUON_OPTIONS = {
    "nesterov-0.95": dict(momentum=0.95, nesterov=True),
    "plain-0.3-maximize": dict(momentum=0.3, nesterov=False, maximize=True),
    "nesterov-0": dict(momentum=0.0, nesterov=True),
}
CHECK_SHAPES = {"bf16": [(1000, 1031), (257, 256), (3, 7), (4099,)],
                "8bit": [(1000, 1031), (257, 256), (33, 7)]}


# --- helpers ----------------------------------------------------------------------------------


class _IEEESqrt:
    """Within the block, torch's fp32 ``Tensor.sqrt``/``sqrt_`` on the CPU are correctly
    rounded (through fp64; torch's CPU sqrt goes through MKL's vector math, which is not)."""

    def __enter__(self):
        self.real = torch.Tensor.sqrt
        real = self.real

        def sqrt(x):
            if x.dtype == torch.float32 and not x.is_cuda:
                return real(x.double()).float()
            return real(x)

        self.saved = (torch.Tensor.sqrt, torch.Tensor.sqrt_)
        torch.Tensor.sqrt = sqrt
        torch.Tensor.sqrt_ = lambda x: x.copy_(sqrt(x))
        return self

    def __exit__(self, *exc):
        torch.Tensor.sqrt, torch.Tensor.sqrt_ = self.saved


def _pattern(t):
    if t.dtype in (torch.int8, torch.uint8, torch.int32):
        return t
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _same(a, b) -> float:
    """Fraction of entries with identical bit patterns."""
    return (_pattern(a.cpu()) == _pattern(b.cpu())).float().mean().item()


class Checks:
    def __init__(self):
        self.failures, self.rows = [], []

    def exact(self, what, a, b):
        frac = _same(a, b)
        self.rows.append({"check": what, "identical": frac})
        if frac < 1.0:
            self.failures.append(f"{what}: {frac:.6f} identical (expected bit for bit)")
        return frac

    def close(self, what, a, b, rtol, atol):
        err = ((a.float() - b.float()).abs() - atol - rtol * b.float().abs()).max().item()
        ok = err <= 0
        self.rows.append({"check": what, "within_tolerance": ok, "identical": _same(a, b)})
        if not ok:
            self.failures.append(f"{what}: beyond rtol {rtol}, atol {atol}")

    def state(self, what, codes, scale, ref_codes, ref_scale):
        frac = _same(codes, ref_codes)
        ok = frac >= 0.99
        if scale is None:
            ok &= bool(torch.allclose(codes.float(), ref_codes.float(), rtol=2**-7, atol=0))
        else:
            ok &= bool(torch.allclose(scale, ref_scale, rtol=1e-5, atol=0))
            ok &= (codes.int() - ref_codes.int()).abs().max().item() <= 1
        self.rows.append({"check": what, "identical": frac, "within_one_code": ok})
        if not ok:
            self.failures.append(f"{what}: {frac:.6f} identical / beyond one code step")


def _randn(shape, gen, device, dtype=torch.float32):
    return torch.randn(shape, generator=gen, device="cpu").to(device=device, dtype=dtype)


def _hard(shape, gen, signed):
    x = _randn(shape, gen, "cpu")
    if x.dim() >= 2 and x.shape[0] >= 5:
        x[0] = 0.0
        x[1] = -3.5
        codes = torch.arange(x.shape[1]) % 128
        x[2] = (codes / 127.0) ** 2 * torch.where(codes % 2 == 0, 1.0, -1.0)
        x[3] *= 1e-39  # subnormal
        x[4] *= 1e30
    return x if signed else x.abs()


# --- correctness ------------------------------------------------------------------------------


def check_codec(checks):
    from deepmomentum import compressed as C
    from deepmomentum.kernels import compressed as K

    for seed, offset in ((0, 0), (0x9E3779B9, (1 << 31) - 1000), (0xFFFFFFFF, 3 << 32)):
        checks.exact(f"bits seed={seed:#x} offset={offset}",
                     K.uniform_bits(1 << 20, seed, offset, "cuda"),
                     C.uniform_bits(1 << 20, seed, offset, "cuda"))
    gen = torch.Generator().manual_seed(0)
    for signed in (True, False):
        for shape in ((1024, 4100), (300, 256), (9, 1)):
            x = _hard(shape, gen, signed)
            for seed in (None, 12345):
                (codes, scale), = K.compress([x.cuda()], "8bit", signed,
                                             None if seed is None else [seed], [17])
                ref_codes, ref_scale = C.compress(x.cuda(), "8bit", signed, seed, 17)
                what = f"8-bit {'int8' if signed else 'uint8'} {shape} seed={seed}"
                checks.exact(what + " codes vs CUDA codec", codes, ref_codes)
                checks.exact(what + " scales vs CUDA codec", scale, ref_scale)
                with _IEEESqrt():
                    cpu_codes, cpu_scale = C.compress(x, "8bit", signed, seed, 17)
                checks.exact(what + " codes vs CPU codec", codes, cpu_codes)
                checks.exact(what + " scales vs CPU codec", scale, cpu_scale)
                checks.exact(what + " dequantized", K.decompress([codes], [scale])[0],
                             C.decompress(ref_codes, ref_scale))
    x = _randn((777, 1001), gen, "cpu") * torch.logspace(-40, 38, 1001)
    for seed in (None, 99):
        (stored, _), = K.compress([x.cuda()], "bf16", True, None if seed is None else [seed],
                                  [5])
        checks.exact(f"bf16 seed={seed} vs CUDA codec", stored,
                     C.compress(x.cuda(), "bf16", True, seed, 5)[0])
        checks.exact(f"bf16 seed={seed} vs CPU codec", stored,
                     C.compress(x, "bf16", True, seed, 5)[0])


def _initial_states(shapes, form, signed, gen):
    from deepmomentum import compressed as C

    out = []
    for i, s in enumerate(shapes):
        w = _randn(s, gen, "cpu")
        out.append(C.compress(w if signed else w.square(), form, signed, 1000 + i, 0))
    return [c.cuda() for c, _ in out], (None if out[0][1] is None else
                                       [s.cuda() for _, s in out])


def _reference_adam(device, params, grads, m, ms, v, vs, ts, kw, form, seeds_m, seeds_v,
                    offsets):
    """decompress → preconditioned_momentum (single-tensor) → compress on ``device``."""
    import deepmomentum.functional as dmf
    from deepmomentum import compressed as C

    on = lambda xs: None if xs is None else [x.to(device, copy=True) for x in xs]  # noqa
    params, grads, m, ms, v, vs = map(on, (params, grads, m, ms, v, vs))
    n = len(params)
    adam = kw.get("preconditioner", "adam") == "adam"
    wm = [C.decompress(m[i], None if ms is None else ms[i]) for i in range(n)]
    wv = [C.decompress(v[i], None if vs is None else vs[i]) for i in range(n)] if adam \
        else [None] * n
    dmf.preconditioned_momentum(params, grads, wm, wv, [torch.tensor(float(t)) for t in ts],
                                foreach=False, **kw)
    new_m = [C.compress(w, form, True, seeds_m[i], offsets[i]) for i, w in enumerate(wm)]
    new_v = [C.compress(w, form, False, seeds_v[i], offsets[i]) for i, w in enumerate(wv)] \
        if adam else None
    return params, new_m, new_v


def check_adam(checks, steps=3):
    from deepmomentum import compressed as C
    from deepmomentum.kernels import compressed as K

    gen = torch.Generator().manual_seed(1)
    for form, shapes in CHECK_SHAPES.items():
        n = len(shapes)
        offsets = [0, 1_000_003, (1 << 31) - 77, 5][:n]
        for pdtype in (torch.float32, torch.bfloat16):
            for name, options in ADAM_OPTIONS.items():
                adam = options["preconditioner"] == "adam"
                params = [_randn(s, gen, "cuda", pdtype) for s in shapes]
                m, ms = _initial_states(shapes, form, True, gen)
                v, vs = _initial_states(shapes, form, False, gen)
                for step in range(1, steps + 1):
                    grads = [_randn(s, gen, "cuda", pdtype) for s in shapes]
                    ts = [step + i for i in range(n)]
                    kw = dict(lr=0.01, beta1=0.9, beta2=0.99, eps=1e-8, **options)
                    seeds_m = [C.seed_of(step, 0, i, "exp_avg") for i in range(n)]
                    seeds_v = [C.seed_of(step, 0, i, "exp_avg_sq") for i in range(n)]
                    clone = lambda xs: None if xs is None else [x.clone() for x in xs]  # noqa
                    p0, m0, ms0, v0, vs0 = map(clone, (params, m, ms, v, vs))
                    K.adam_step(params, grads, m, v if adam else None, ms,
                                vs if adam else None, ts, form=form, seeds_m=seeds_m,
                                seeds_v=seeds_v if adam else None, offsets=offsets, **kw)
                    torch.cuda.synchronize()
                    with _IEEESqrt():
                        cpu = _reference_adam("cpu", p0, grads, m0, ms0, v0, vs0, ts, kw, form,
                                              seeds_m, seeds_v, offsets)
                    gpu = _reference_adam("cuda", p0, grads, m0, ms0, v0, vs0, ts, kw, form,
                                          seeds_m, seeds_v, offsets)
                    tag = f"adam {name} {form} {str(pdtype)[6:]} step {step}"
                    memories = [("exp_avg", m, ms, 1)] + ([("exp_avg_sq", v, vs, 2)]
                                                          if adam else [])
                    for i in range(n):
                        checks.exact(f"{tag} params[{i}] vs CPU", params[i], cpu[0][i])
                        tol = (1e-5, 1e-6) if pdtype == torch.float32 else (2**-6, 2**-6)
                        checks.close(f"{tag} params[{i}] vs CUDA", params[i], gpu[0][i], *tol)
                        for key, codes, scales, k in memories:
                            scale = None if scales is None else scales[i]
                            checks.exact(f"{tag} {key}[{i}] vs CPU", codes[i], cpu[k][i][0])
                            if scale is not None:
                                checks.exact(f"{tag} {key} scale[{i}] vs CPU", scale,
                                             cpu[k][i][1])
                            checks.state(f"{tag} {key}[{i}] vs CUDA", codes[i], scale,
                                         gpu[k][i][0], gpu[k][i][1])


def check_sgd(checks, steps=3):
    import deepmomentum.functional as dmf
    from deepmomentum import compressed as C
    from deepmomentum.kernels import compressed as K

    gen = torch.Generator().manual_seed(2)
    for form, shapes in CHECK_SHAPES.items():
        n = len(shapes)
        offsets = [0, 1_000_003, (1 << 31) - 77, 5][:n]
        for pdtype in (torch.float32, torch.bfloat16):
            for name, options in SGD_OPTIONS.items():
                params = [_randn(s, gen, "cuda", pdtype) for s in shapes]
                b, bs = _initial_states(shapes, form, True, gen)
                for step in range(steps):
                    grads = [_randn(s, gen, "cuda", pdtype) for s in shapes]
                    seeds = [C.seed_of(step, 0, i, "momentum_buffer") for i in range(n)]
                    p0, b0 = [p.clone() for p in params], [x.clone() for x in b]
                    bs0 = None if bs is None else [x.clone() for x in bs]
                    K.sgd_step(params, grads, b, bs, lr=0.05, first_step=step == 0, form=form,
                               seeds=seeds, offsets=offsets, **options)
                    torch.cuda.synchronize()
                    tag = f"sgd {name} {form} {str(pdtype)[6:]} step {step}"
                    for device in ("cpu", "cuda"):
                        ps = [p.to(device, copy=True) for p in p0]
                        wb = [None] * n if step == 0 else [
                            C.decompress(b0[i].to(device),
                                         None if bs0 is None else bs0[i].to(device))
                            for i in range(n)]
                        dmf.associative_momentum(ps, [g.to(device) for g in grads], wb,
                                                 lr=0.05, foreach=False, **options)
                        ref = [C.compress(w, form, True, seeds[i], offsets[i])
                               for i, w in enumerate(wb)]
                        for i in range(n):
                            scale = None if bs is None else bs[i]
                            if device == "cpu":
                                checks.exact(f"{tag} params[{i}] vs CPU", params[i], ps[i])
                                checks.exact(f"{tag} buffer[{i}] vs CPU", b[i], ref[i][0])
                                if scale is not None:
                                    checks.exact(f"{tag} scale[{i}] vs CPU", scale, ref[i][1])
                            else:
                                tol = (1e-5, 1e-6) if pdtype == torch.float32 else \
                                    (2**-6, 2**-6)
                                checks.close(f"{tag} params[{i}] vs CUDA", params[i], ps[i],
                                             *tol)
                                checks.state(f"{tag} buffer[{i}] vs CUDA", b[i], scale,
                                             ref[i][0], ref[i][1])


def _reference_ema(device, grads, b, bs, kw, form, seeds, offsets):
    """decompress → ema_write → nesterov_readout(ema=True) (single-tensor) → compress on
    ``device``: (the updates U, the stored buffers)."""
    import deepmomentum.functional as dmf
    from deepmomentum import compressed as C

    n = len(grads)
    gs = dmf.effective_gradients([g.to(device) for g in grads], [g.to(device) for g in grads],
                                 maximize=kw.get("maximize", False))
    wb = [C.decompress(b[i].to(device), None if bs is None else bs[i].to(device))
          for i in range(n)]
    us = dmf.ema_write(wb, gs, beta=kw["momentum"])
    if kw["nesterov"]:
        us = dmf.nesterov_readout(gs, us, momentum=kw["momentum"], ema=True)
    return [u.clone() for u in us], [C.compress(w, form, True, seeds[i], offsets[i])
                                     for i, w in enumerate(wb)]


def check_muon(checks, steps=3):
    from deepmomentum import compressed as C
    from deepmomentum.kernels import compressed as K

    gen = torch.Generator().manual_seed(3)
    for form, shapes in CHECK_SHAPES.items():
        n = len(shapes)
        offsets = [0, 1_000_003, (1 << 31) - 77, 5][:n]
        for gdtype in (torch.float32, torch.bfloat16):
            for name, options in MUON_OPTIONS.items():
                b, bs = _initial_states(shapes, form, True, gen)
                for step in range(steps):
                    grads = [_randn(s, gen, "cuda", gdtype) for s in shapes]
                    seeds = [C.seed_of(step, 0, i, "momentum_buffer") for i in range(n)]
                    b0 = [x.clone() for x in b]
                    bs0 = None if bs is None else [x.clone() for x in bs]
                    us = K.ema_step(b, grads, bs, **options, form=form, seeds=seeds,
                                    offsets=offsets)
                    torch.cuda.synchronize()
                    tag = f"muon ema {name} {form} grads {str(gdtype)[6:]} step {step}"
                    with _IEEESqrt():
                        cpu = _reference_ema("cpu", grads, b0, bs0, options, form, seeds,
                                             offsets)
                    gpu = _reference_ema("cuda", grads, b0, bs0, options, form, seeds,
                                         offsets)
                    for i in range(n):
                        scale = None if bs is None else bs[i]
                        checks.exact(f"{tag} update[{i}] vs CPU", us[i], cpu[0][i])
                        checks.exact(f"{tag} buffer[{i}] vs CPU", b[i], cpu[1][i][0])
                        if scale is not None:
                            checks.exact(f"{tag} scale[{i}] vs CPU", scale, cpu[1][i][1])
                        checks.close(f"{tag} update[{i}] vs CUDA", us[i], gpu[0][i], 1e-5,
                                     1e-6)
                        checks.state(f"{tag} buffer[{i}] vs CUDA", b[i], scale,
                                     gpu[1][i][0], gpu[1][i][1])


# --- timing -----------------------------------------------------------------------------------


def bench(fn):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=50, rep=300, quantiles=[0.5])  # ms, median


def bytes_per_param(p_bytes, g_bytes, memory_bytes, memories, scales=False):
    """Read p, g and the memories; write p and the memories; + read and write of the fp32
    block scales (one per 256 entries) for 8-bit state."""
    per_memory = 2 * memory_bytes + (2 * 4 / 256 if scales else 0)
    return 2 * p_bytes + g_bytes + memories * per_memory


def time_steps(total, tensors, sweep_warps):
    from deepmomentum import compressed as C
    from deepmomentum.kernels import compressed as K
    from deepmomentum.kernels import elementwise as E

    cols = max(1, int(total) // tensors // 4096)
    shapes = [(4096, cols)] * tensors
    numel = sum(math.prod(s) for s in shapes)
    params = [torch.randn(s, device="cuda") for s in shapes]
    grads = [torch.randn(s, device="cuda") for s in shapes]
    fp32_m = [torch.randn(s, device="cuda") * 0.1 for s in shapes]
    fp32_v = [torch.rand(s, device="cuda") * 0.01 for s in shapes]
    stored = {}
    for form in ("bf16", "8bit"):
        m = [C.compress(x, form, True, i) for i, x in enumerate(fp32_m)]
        v = [C.compress(x, form, False, i) for i, x in enumerate(fp32_v)]
        stored[form] = ([c for c, _ in m], None if m[0][1] is None else [s for _, s in m],
                        [c for c, _ in v], None if v[0][1] is None else [s for _, s in v])
    ts = [10.0] * tensors
    step_tensors = [torch.tensor(10.0, device="cuda") for _ in shapes]
    seeds = list(range(tensors))
    hyper = dict(lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
    results = {"numel": numel, "tensors": tensors, "shape": list(shapes[0]), "adam": {},
               "sgd": {}, "muon momentum": {}}

    def fused_compressed_adam(form):
        m, ms, v, vs = stored[form]
        return lambda: K.adam_step(params, grads, m, v, ms, vs, ts, **hyper, form=form,
                                   seeds_m=seeds, seeds_v=seeds)

    def today_adam(form):
        m, ms, v, vs = stored[form]

        def step():
            wm = [C.decompress(c, None if ms is None else ms[i]) for i, c in enumerate(m)]
            wv = [C.decompress(c, None if vs is None else vs[i]) for i, c in enumerate(v)]
            E.adam_step(params, grads, wm, wv, ts, **hyper)
            for i, (w, c) in enumerate(zip(wm, m)):
                codes, scale = C.compress(w, form, True, seeds[i])
                c.copy_(codes)
                if scale is not None:
                    ms[i].copy_(scale)
            for i, (w, c) in enumerate(zip(wv, v)):
                codes, scale = C.compress(w, form, False, seeds[i])
                c.copy_(codes)
                if scale is not None:
                    vs[i].copy_(scale)
        return step

    adam = {
        "torch fused AdamW (fp32 state)": (
            lambda: torch._fused_adamw_(params, grads, fp32_m, fp32_v, [], step_tensors,
                                        amsgrad=False, maximize=False, **{
                                            k: hyper[k] for k in ("lr", "beta1", "beta2",
                                                                  "eps", "weight_decay")}),
            bytes_per_param(4, 4, 4, 2)),
        "elementwise.adam_step (fp32 state)": (
            lambda: E.adam_step(params, grads, fp32_m, fp32_v, ts, **hyper),
            bytes_per_param(4, 4, 4, 2)),
        "fused compressed, bf16 state": (fused_compressed_adam("bf16"),
                                         bytes_per_param(4, 4, 2, 2)),
        "fused compressed, 8-bit state": (fused_compressed_adam("8bit"),
                                          bytes_per_param(4, 4, 1, 2, scales=True)),
        "today: decompress → elementwise → compress, bf16": (today_adam("bf16"),
                                                              bytes_per_param(4, 4, 2, 2)),
        "today: decompress → elementwise → compress, 8-bit": (
            today_adam("8bit"), bytes_per_param(4, 4, 1, 2, scales=True)),
    }

    b32 = [torch.randn(s, device="cuda") * 0.1 for s in shapes]
    sgd_hyper = dict(lr=1e-3, momentum=0.9, dampening=0.0, nesterov=True, weight_decay=1e-4)
    sgd_stored = {form: stored[form][:2] for form in ("bf16", "8bit")}

    def fused_compressed_sgd(form):
        b, bs = sgd_stored[form]
        return lambda: K.sgd_step(params, grads, b, bs, **sgd_hyper, form=form, seeds=seeds)

    def today_sgd(form):
        b, bs = sgd_stored[form]

        def step():
            wb = [C.decompress(c, None if bs is None else bs[i]) for i, c in enumerate(b)]
            E.sgd_step(params, grads, wb, **sgd_hyper)
            for i, (w, c) in enumerate(zip(wb, b)):
                codes, scale = C.compress(w, form, True, seeds[i])
                c.copy_(codes)
                if scale is not None:
                    bs[i].copy_(scale)
        return step

    sgd = {
        "torch fused SGD (fp32 state)": (
            lambda: torch._fused_sgd_(params, grads, b32, weight_decay=1e-4, momentum=0.9,
                                      lr=1e-3, dampening=0.0, nesterov=True, maximize=False,
                                      is_first_step=False),
            bytes_per_param(4, 4, 4, 1)),
        "elementwise.sgd_step (fp32 state)": (
            lambda: E.sgd_step(params, grads, b32, **sgd_hyper), bytes_per_param(4, 4, 4, 1)),
        "fused compressed, bf16 state": (fused_compressed_sgd("bf16"),
                                         bytes_per_param(4, 4, 2, 1)),
        "fused compressed, 8-bit state": (fused_compressed_sgd("8bit"),
                                          bytes_per_param(4, 4, 1, 1, scales=True)),
        "today: decompress → elementwise → compress, bf16": (today_sgd("bf16"),
                                                              bytes_per_param(4, 4, 2, 1)),
        "today: decompress → elementwise → compress, 8-bit": (
            today_sgd("8bit"), bytes_per_param(4, 4, 1, 1, scales=True)),
    }

    muon_hyper = dict(momentum=0.95, nesterov=True)

    def fused_compressed_ema(form):
        b, bs = sgd_stored[form]
        return lambda: K.ema_step(b, grads, bs, **muon_hyper, form=form, seeds=seeds)

    def today_ema(form):
        b, bs = sgd_stored[form]

        def step():
            wb = [C.decompress(c, None if bs is None else bs[i]) for i, c in enumerate(b)]
            E.ema_momentum(wb, grads, **muon_hyper)
            for i, (w, c) in enumerate(zip(wb, b)):
                codes, scale = C.compress(w, form, True, seeds[i])
                c.copy_(codes)
                if scale is not None:
                    bs[i].copy_(scale)
        return step

    def ema_bytes(memory_bytes, scales=False):
        """Read g and the buffer, write the buffer and the fp32 update U."""
        return 4 + 4 + 2 * memory_bytes + (2 * 4 / 256 if scales else 0)

    muon = {
        "elementwise.ema_momentum (fp32 state)": (
            lambda: E.ema_momentum(b32, grads, **muon_hyper), ema_bytes(4)),
        "fused compressed, bf16 state": (fused_compressed_ema("bf16"), ema_bytes(2)),
        "fused compressed, 8-bit state": (fused_compressed_ema("8bit"),
                                          ema_bytes(1, scales=True)),
        "today: decompress → elementwise → compress, bf16": (today_ema("bf16"),
                                                              ema_bytes(2)),
        "today: decompress → elementwise → compress, 8-bit": (today_ema("8bit"),
                                                               ema_bytes(1, scales=True)),
    }

    for rule, table, base, theirs in (("adam", adam, "elementwise.adam_step (fp32 state)",
                                       "torch fused AdamW (fp32 state)"),
                                      ("sgd", sgd, "elementwise.sgd_step (fp32 state)",
                                       "torch fused SGD (fp32 state)"),
                                      ("muon momentum", muon,
                                       "elementwise.ema_momentum (fp32 state)",
                                       "elementwise.ema_momentum (fp32 state)")):
        rows = {}
        for name, (fn, per_param) in table.items():
            fn()
            torch.cuda.synchronize()
            ms = bench(fn)
            rows[name] = {"ms": ms, "bytes_per_param": per_param,
                          "GBps": per_param * numel / (ms * 1e-3) / 1e9}
        print(f"\n{rule}: {numel / 1e6:.1f}M fp32 parameters in {tensors} tensors of "
              f"{shapes[0]}")
        print("| implementation | ms | bytes/param | GB/s | × elementwise fp32 | "
              "× torch fused |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, row in rows.items():
            row["speedup_vs_elementwise"] = rows[base]["ms"] / row["ms"]
            row["speedup_vs_torch_fused"] = rows[theirs]["ms"] / row["ms"]
            print(f"| {name} | {row['ms']:.3f} | {row['bytes_per_param']:.2f} | "
                  f"{row['GBps']:.0f} | {row['speedup_vs_elementwise']:.2f} | "
                  f"{row['speedup_vs_torch_fused']:.2f} |")
        results[rule] = rows

    if sweep_warps:
        saved = dict(K.NUM_WARPS)
        sweep = {}
        for form, choices in (("8bit", (1, 2, 4, 8)), ("bf16", (2, 4, 8))):
            for warps in choices:
                K.NUM_WARPS[form] = warps
                for rule, make in (("adam", fused_compressed_adam),
                                   ("sgd", fused_compressed_sgd),
                                   ("muon momentum", fused_compressed_ema)):
                    fn = make(form)
                    fn()
                    sweep[f"{rule} {form} num_warps={warps}"] = bench(fn)
            K.NUM_WARPS.update(saved)
        print("\nnum_warps sweep (ms): " + ", ".join(f"{k}: {v:.3f}" for k, v in sweep.items()))
        results["num_warps_sweep_ms"] = sweep
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=6.4e7,
                        help="fp32 parameters timed (default 64M)")
    parser.add_argument("--tensors", type=int, default=16)
    parser.add_argument("--out", default=None,
                        help="JSON file (default $OUT/compressed_gpu.json when $OUT is set)")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--sweep-warps", action="store_true",
                        help="also time the fused kernels at several num_warps")
    args = parser.parse_args(argv)
    refused = core.cuda_unavailable("benchmarks/compressed_gpu.py")
    if refused is not None:
        return refused
    card = torch.cuda.get_device_name()
    print(f"{card}")
    checks = Checks()
    check_codec(checks)
    check_adam(checks)
    check_sgd(checks)
    check_muon(checks)
    exact = [r for r in checks.rows if "vs CPU" in r["check"] or "codec" in r["check"]
             or r["check"].startswith("bits")]
    worst = min((r["identical"] for r in exact), default=1.0)
    print(f"correctness: {len(checks.rows)} checks, {len(checks.failures)} failures; "
          f"bit-for-bit checks: {len(exact)}, worst identical fraction {worst:.6f}")
    for failure in checks.failures[:40]:
        print("  FAIL", failure)
    results = {"card": card, "checks": checks.rows, "failures": checks.failures,
               "env": core.environment(device="cuda")}
    if not args.skip_timing:
        results["timing"] = time_steps(args.params, args.tensors, args.sweep_warps)
    out = args.out or (os.path.join(os.environ["OUT"], "compressed_gpu.json")
                       if os.environ.get("OUT") else None)
    if out:
        core.write_json(out, results)
        print(f"wrote {out}")
    return 1 if checks.failures else 0


if __name__ == "__main__":
    sys.exit(main())
