"""Continuum-memory schedule on Permuted-Digits: a fast and a slow level vs one period.

    python -m benchmarks.cms [--seeds 3] [--out benchmarks/results/cms_cpu.json]

Model: 64 → 128 (fast level) → 128 (slow level) → 10 (fast head), ReLU. The slow level's group
has ``update_period`` 16 (or 64; gradients summed, mean with ``--accumulate mean``), the rest
period 1; the baseline is the same model with every group at period 1. Each optimizer runs on
the same lr grid; 5 tasks × 3 epochs (batch 32) as in benchmarks/dmgd.py; ACC and BWT at the
best lr by ACC, mean ± std over seeds.
"""

from __future__ import annotations

import argparse

import torch

import deepmomentum as dm

from . import core
from .dmgd import digits_tasks, train_sequentially

LRS = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
OPTIMIZERS = {
    "AdamW (MultiFrequency)": lambda groups, lr: dm.MultiFrequency(
        torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)),
    "AssociativeMomentum": lambda groups, lr: dm.AssociativeMomentum(groups, lr=lr),
}


def run(make, lr, seed, tasks, slow_period, accumulate, epochs=3, batch=32):
    torch.manual_seed(seed)
    fast_in, slow, head = torch.nn.Linear(64, 128), torch.nn.Linear(128, 128), \
        torch.nn.Linear(128, 10)
    model = torch.nn.Sequential(fast_in, torch.nn.ReLU(), slow, torch.nn.ReLU(), head)
    groups = dm.continuum_groups([(fast_in, 1), (slow, slow_period), (head, 1)],
                                 accumulate=accumulate)
    opt = make(groups, lr)
    return train_sequentially(model, opt, tasks, seed, epochs, batch)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--accumulate", default="sum", choices=["sum", "mean"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tasks = digits_tasks()
    results = {}
    print(f"lr grid {LRS}; {args.seeds} seeds; slow level accumulates by {args.accumulate}\n")
    print("| optimizer | slow-level period | ACC (best lr) | BWT |\n|---|---:|---:|---:|")
    for name, make in OPTIMIZERS.items():
        for period in (1, 16, 64):
            # best mean ACC over the seeds, among the lrs where no seed diverged
            best = core.grid(lambda lr, s: run(make, lr, s, tasks, period, args.accumulate),
                             LRS, args.seeds, metric=lambda r: r["ACC"], maximize=True)
            if best is None:
                results[f"{name} / period {period}"] = None
                print(f"| {name} | {period} | {core.DIVERGED} | {core.DIVERGED} |", flush=True)
                continue
            runs = best["runs"]
            bwt, bwt_sd = core.summarize([r["BWT"] for r in runs])
            best = {"lr": best["lr"], "ACC": best["mean"], "ACC_std": best["std"], "BWT": bwt,
                    "BWT_std": bwt_sd, "R_seed0": runs[0]["R"]}
            results[f"{name} / period {period}"] = best
            print(f"| {name} | {period} | {best['ACC']:.3f} ± {best['ACC_std']:.3f} "
                  f"({best['lr']:g}) | {best['BWT']:+.3f} ± {best['BWT_std']:.3f} |", flush=True)
    if args.out:
        results["env"] = {**core.environment(device="cpu"), "accumulate": args.accumulate}
        core.write_json(args.out, results)


if __name__ == "__main__":
    main()
