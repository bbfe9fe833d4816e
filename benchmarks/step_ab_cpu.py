"""Interleaved A/B step time of two source trees of deepmomentum in one process, on the CPU.

    git worktree add /tmp/before 39d4756
    python -m benchmarks.step_ab_cpu --before /tmp/before [--after .] [--rounds 3]

Both packages are imported side by side (as ``dm_before`` and ``dm_after``); each case builds
the same optimizer on the same parameters in both and alternates their ``step()`` calls, so
load changes on the machine hit both alike. Prints, per case, the median step time of each and
the median (min–max) over rounds of their ratio. This is how a refactor shows it kept the step
time: ``benchmarks/step_time_cpu.py`` compares against torch within one tree, and its ratios
move by ±15–20% between runs on a shared 2-core machine, which this design cancels.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time

import torch

FLAT, MATRICES = ((131072,), 64), ((256, 256), 16)  # 8.4M parameters; 16 matrices of 256²
CASES = [
    ("SGD-momentum (nesterov, wd), default", FLAT, "AssociativeMomentum",
     dict(lr=1e-3, momentum=0.9, nesterov=True, weight_decay=1e-4)),
    ("SGD-momentum (nesterov, wd), single-tensor", FLAT, "AssociativeMomentum",
     dict(lr=1e-3, momentum=0.9, nesterov=True, weight_decay=1e-4, foreach=False)),
    ("SGD-momentum (nesterov, wd), foreach", FLAT, "AssociativeMomentum",
     dict(lr=1e-3, momentum=0.9, nesterov=True, weight_decay=1e-4, foreach=True)),
    ("AdamW, default", FLAT, "PreconditionedMomentum", dict(lr=1e-3)),
    ("AdamW, single-tensor", FLAT, "PreconditionedMomentum", dict(lr=1e-3, foreach=False)),
    ("AdamW, foreach", FLAT, "PreconditionedMomentum", dict(lr=1e-3, foreach=True)),
    ("value-preconditioned, default", FLAT, "PreconditionedMomentum",
     dict(lr=1e-3, precondition="value")),
    ("value-preconditioned, foreach", FLAT, "PreconditionedMomentum",
     dict(lr=1e-3, precondition="value", foreach=True)),
    ("DeltaMomentum, default", MATRICES, "DeltaMomentum", dict(lr=1e-3)),
    ("DMGD, default", MATRICES, "DeepMomentum", dict(lr=1e-3)),
    ("Muon, default", MATRICES, "Muon", dict(lr=1e-3)),
    ("M3, default", MATRICES, "M3", dict(lr=1e-3)),
]


def load(name: str, root: str):
    """Import the package under ``root``/deepmomentum as module ``name``."""
    package = f"{root}/deepmomentum"
    spec = importlib.util.spec_from_file_location(name, f"{package}/__init__.py",
                                                  submodule_search_locations=[package])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def params(shape, count, seed=0):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.randn(shape, generator=g).requires_grad_() for _ in range(count)]
    for p in ps:
        p.grad = torch.randn(shape, generator=g)
    return ps


def round_times(packages, shape, count, cls, kwargs, steps):
    opts = []
    for package in packages:
        opt = getattr(package, cls)(params(shape, count), **kwargs)
        for _ in range(3):  # state created, caches warm
            opt.step()
        opts.append(opt)
    times = [[] for _ in opts]
    for _ in range(steps):
        for k, opt in enumerate(opts):
            start = time.perf_counter()
            opt.step()
            times[k].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="root of the baseline source tree")
    parser.add_argument("--after", default=".", help="root of the tree to compare (default .)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    packages = (load("dm_before", args.before), load("dm_after", args.after))
    print(f"torch {torch.__version__}, {args.threads} threads; {args.rounds} rounds\n")
    print("| rule, implementation | before ms | after ms | after / before (min–max) |")
    print("|---|---:|---:|---:|")
    for name, (shape, count), cls, kwargs in CASES:
        steps = 30 if shape == FLAT[0] else 15
        rounds = [round_times(packages, shape, count, cls, kwargs, steps)
                  for _ in range(args.rounds)]
        ratios = [after / before for before, after in rounds]
        before = statistics.median(r[0] for r in rounds)
        after = statistics.median(r[1] for r in rounds)
        print(f"| {name} | {before * 1e3:.2f} | {after * 1e3:.2f} | "
              f"{statistics.median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f}) |",
              flush=True)


if __name__ == "__main__":
    main()
