"""GPU: Triton Newton–Schulz against torch's bf16 matmul iteration, and Muon steps.

    python -m benchmarks.ns_gpu [--out ns_gpu.json]

In one run on one card: a correctness check (bf16 NS5 of both backends against the float64
iteration), then NS5 time for 1024², 4096², 4096×16384, 8192² and a batch of 64 × 768×3072
(torch's batched matmul vs our kernels), the crossover side length below which torch is faster
(square batches of 16), and a full ``deepmomentum.Muon`` step against ``torch.optim.Muon`` on a
GPT-2-small-like set and on 16 × 4096². Reports ms, ratios and TFLOP/s (4r²c + 2r³ per step).
Targets (issue): ≥ 1.3× on 4096² NS5, ≥ 2× on the batch of small matrices, ≥ 3× on the Muon
step for the GPT-2-small-like set. The JSON (``--out``) is stamped with
``benchmarks.core.environment()``.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

import deepmomentum as dm
from benchmarks import core
from benchmarks.muon_step import gpt2_like


def bench(fn):
    import triton.testing  # here, so that the module imports (and --help runs) without triton

    return triton.testing.do_bench(fn, warmup=25, rep=100) / 1e3


def flops(shape, steps=5):
    *batch, r, c = shape
    r, c = min(r, c), max(r, c)
    n = 1
    for b in batch:
        n *= b
    return n * steps * (4 * r * r * c + 2 * r**3)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    refused = core.cuda_unavailable("benchmarks/ns_gpu.py")
    if refused is not None:
        return refused
    card = torch.cuda.get_device_name()
    out = {"card": card, "ns": {}, "muon": {}, "env": core.environment(device="cuda")}
    x = torch.randn(4, 512, 1536, device="cuda")
    exact = dm.newton_schulz(x.double(), dtype=torch.float64)
    for backend in ("torch", "triton"):
        y = dm.newton_schulz(x, backend=backend)
        out[f"bf16_rel_err_{backend}"] = ((y.double() - exact).norm() / exact.norm()).item()
    print(f"{card}; bf16 NS5 error vs float64: torch {out['bf16_rel_err_torch']:.3e}, "
          f"triton {out['bf16_rel_err_triton']:.3e}\n")
    print("| NS5 shape | torch ms | triton ms | speed-up | triton TFLOP/s |\n|---|---:|---:|---:|---:|")
    for shape in [(1024, 1024), (4096, 4096), (4096, 16384), (8192, 8192), (64, 768, 3072)]:
        x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        t_torch = bench(lambda: dm.newton_schulz(x, backend="torch"))
        t_ours = bench(lambda: dm.newton_schulz(x, backend="triton"))
        out["ns"][str(shape)] = {"torch": t_torch, "triton": t_ours}
        print(f"| {shape} | {t_torch * 1e3:.2f} | {t_ours * 1e3:.2f} | {t_torch / t_ours:.2f}x | "
              f"{flops(shape) / t_ours / 1e12:.0f} |", flush=True)
    crossover = None
    for side in (64, 128, 256, 512, 1024):
        x = torch.randn(16, side, side, device="cuda", dtype=torch.bfloat16)
        if bench(lambda: dm.newton_schulz(x, backend="triton")) < \
                bench(lambda: dm.newton_schulz(x, backend="torch")):
            crossover = side
            break
    out["crossover_side"] = crossover
    print(f"\nTriton faster from side {crossover} (TRITON_MIN_SIDE is "
          f"{dm.newton_schulz.__globals__['TRITON_MIN_SIDE']})\n")
    print("| Muon step | torch.optim.Muon ms | deepmomentum.Muon ms | speed-up |\n|---|---:|---:|---:|")
    for name, shapes in (("gpt2-small", gpt2_like(768)), ("16 x 4096^2", [(4096, 4096)] * 16)):
        times = {}
        for label, make in (("torch", lambda ps: torch.optim.Muon(ps, lr=0.02)),
                            ("ours", lambda ps: dm.Muon(ps, lr=0.02))):
            ps = [torch.randn(s, device="cuda").requires_grad_() for s in shapes]
            for p in ps:
                p.grad = torch.randn_like(p)
            opt = make(ps)
            opt.step()
            times[label] = bench(opt.step)
            del opt, ps
        out["muon"][name] = times
        print(f"| {name} | {times['torch'] * 1e3:.1f} | {times['ours'] * 1e3:.1f} | "
              f"{times['torch'] / times['ours']:.2f}x |", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
