"""Step time of deepmomentum.Muon against torch.optim.Muon on transformer-like parameter sets.

    python -m benchmarks.muon_step                      # CPU: gpt2-small, 16x1024^2
    python -m benchmarks.muon_step --device cuda        # GPU: gpt2-small, 16x4096^2

torch.optim.Muon orthogonalizes one matrix at a time; ours stacks same-shape matrices into one
batched Newton–Schulz call. Both run NS5 in bf16 with Keller's coefficients. Timing: median of
``--repeats`` steps after a warm-up (CPU: perf_counter; CUDA: triton.testing.do_bench). Prints
milliseconds, the ratio torch/ours, and the NS throughput in TFLOP/s (4r²c + 2r³ per step).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import deepmomentum as dm
from benchmarks import core


def gpt2_like(width, layers=12):
    """The hidden matrices of a GPT-2-style model: qkv, attention out, MLP in, MLP out."""
    return [(3 * width, width), (width, width), (4 * width, width), (width, 4 * width)] * layers


PARAMETER_SETS = {
    "gpt2-small (48 matrices)": gpt2_like(768),
    "gpt2-mini, width 128 (48 matrices)": gpt2_like(128),
    "16 x 1024^2": [(1024, 1024)] * 16,
    "16 x 4096^2": [(4096, 4096)] * 16,
}
DEFAULT_SETS = {"cpu": ["gpt2-small (48 matrices)", "16 x 1024^2",
                        "gpt2-mini, width 128 (48 matrices)"],
                "cuda": ["gpt2-small (48 matrices)", "16 x 4096^2"]}


def ns_flops(shapes, steps=5):
    total = 0
    for rows, cols in shapes:
        r, c = min(rows, cols), max(rows, cols)
        total += steps * (4 * r * r * c + 2 * r**3)
    return total


def time_step(make, shapes, device, repeats):
    g = torch.Generator(device=device).manual_seed(0)
    params = [torch.randn(s, device=device, generator=g).requires_grad_() for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, device=device, generator=g)
    opt = make(params)
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(opt.step, warmup=25, rep=max(100, 20 * repeats)) / 1e3
    opt.step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sets", nargs="*", default=None, choices=list(PARAMETER_SETS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    env = core.environment(device=args.device)
    print(f"{env['device']}; torch {env['torch']}\n")
    print("| parameter set | torch.optim.Muon ms | deepmomentum.Muon ms | speed-up | our NS TFLOP/s |")
    print("|---|---:|---:|---:|---:|")
    for set_name in args.sets or DEFAULT_SETS[args.device]:
        shapes = PARAMETER_SETS[set_name]
        kwargs = dict(lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.1)
        theirs = time_step(lambda ps: torch.optim.Muon(ps, **kwargs), shapes, args.device,
                           args.repeats)
        ours = time_step(lambda ps: dm.Muon(ps, **kwargs), shapes, args.device, args.repeats)
        print(f"| {set_name} | {theirs * 1e3:.1f} | {ours * 1e3:.1f} | {theirs / ours:.2f}x | "
              f"{ns_flops(shapes) / ours / 1e12:.3f} |", flush=True)


if __name__ == "__main__":
    main()
