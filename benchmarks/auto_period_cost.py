"""What ``update_period="auto"`` costs per ``step()`` (issue 19): its criterion against a fixed
period with the same update times, interleaved in one process.

    python -m benchmarks.auto_period_cost [--device cpu|cuda] [--params 8.4e6] [--period 4]
                                          [--rounds 7] [--out benchmarks/results/auto_period_cost_cpu.json]

Both optimizers see the same gradients, which alternate ``g, −g``: their window sums never grow
against their noise, so no auto window ends before ``max_period`` (set to the fixed period) and
both update at the same calls. The difference is then the criterion alone: two squared norms
per call (the gradient's and the accumulator's) and one host read (a device sync on CUDA).
Prints, per optimizer, the mean time per ``step()`` call of each (the median over rounds) and
the median (min–max) over rounds of auto / fixed; each round runs both, alternating which goes
first, so load changes on the machine hit both alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import torch

import deepmomentum as dm

from . import core

CASES = {
    "AdamW (PreconditionedMomentum)": (dm.PreconditionedMomentum, dict(lr=1e-3)),
    "SGD-momentum (AssociativeMomentum)": (dm.AssociativeMomentum, dict(lr=1e-2)),
    "Muon": (dm.Muon, dict(lr=1e-3)),
}
SIDE = 512  # the parameters are (512, 512) matrices, so every optimizer takes them


def round_time(opt, params, signs, calls, sync) -> float:
    """Seconds per ``step()``, mean over ``calls`` calls, the gradients set outside the timing."""
    total = 0.0
    for call in range(calls):
        for p, g in zip(params, signs[call % 2]):
            p.grad.copy_(g)
        sync()
        start = time.perf_counter()
        opt.step()
        sync()
        total += time.perf_counter() - start
    return total / calls


def measure(device: str, n_params: float, period: int, rounds: int, windows: int
            ) -> dict[str, Any]:
    count = max(1, round(n_params / SIDE ** 2))
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(SIDE, SIDE, generator=g).to(device) for _ in range(count)]
    signs = (grads, [-t for t in grads])
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    calls = period * windows
    results = {}
    for name, (cls, kwargs) in CASES.items():
        arms = {}
        for arm, schedule in (("fixed", dict(update_period=period)),
                              ("auto", dict(update_period="auto", max_period=period))):
            params = [torch.zeros(SIDE, SIDE, device=device, requires_grad=True)
                      for _ in range(count)]
            for p in params:
                p.grad = torch.zeros_like(p)
            arms[arm] = (cls(params, **kwargs, **schedule), params)
        times: dict[str, list[float]] = {"fixed": [], "auto": []}
        for r in range(rounds + 1):  # round 0 warms up (state allocation, kernel caches)
            order = ("fixed", "auto") if r % 2 else ("auto", "fixed")
            for arm in order:
                opt, params = arms[arm]
                t = round_time(opt, params, signs, calls, sync)
                if r:
                    times[arm].append(t)
        auto_group = arms["auto"][0].param_groups[0]
        if auto_group["auto_updates"] != (rounds + 1) * windows:
            raise RuntimeError("an auto window ended early: the two arms would not update alike")
        ratios = [a / f for a, f in zip(times["auto"], times["fixed"])]
        results[name] = {"fixed_s": times["fixed"], "auto_s": times["auto"],
                         "median_fixed_s": statistics.median(times["fixed"]),
                         "median_auto_s": statistics.median(times["auto"]),
                         "ratio_median": statistics.median(ratios),
                         "ratio_min": min(ratios), "ratio_max": max(ratios)}
    return {"device": device, "params": count * SIDE ** 2, "tensors": count,
            "period": period, "rounds": rounds, "calls_per_round": calls, "cases": results}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--params", type=float, default=8.4e6)
    parser.add_argument("--period", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--windows", type=int, default=4, help="windows per arm per round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.device == "cuda":
        refused = core.cuda_unavailable("benchmarks/auto_period_cost.py")
        if refused is not None:
            return refused
    torch.set_num_threads(args.threads)
    result = measure(args.device, args.params, args.period, args.rounds, args.windows)
    result["env"] = core.environment(device=args.device)
    print(f"{result['params'] / 1e6:.1f}M parameters in {result['tensors']} tensors, period "
          f"{args.period}, {args.rounds} rounds; {result['env']['device']}\n")
    print("| optimizer | fixed ms/call | auto ms/call | auto / fixed (min–max) |\n"
          "|---|---:|---:|---:|")
    for name, r in result["cases"].items():
        print(f"| {name} | {1e3 * r['median_fixed_s']:.2f} | {1e3 * r['median_auto_s']:.2f} | "
              f"{r['ratio_median']:.3f} ({r['ratio_min']:.3f}–{r['ratio_max']:.3f}) |")
    core.write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
