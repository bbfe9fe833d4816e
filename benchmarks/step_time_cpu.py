"""CPU step time of each optimizer implementation against torch's, on the same parameters.

    python -m benchmarks.step_time_cpu [--params 8.4e6] [--tensors 64] [--threads 2]

Times ``optimizer.step()`` alone (gradients fixed, state warmed up) with
``torch.utils.benchmark`` (median of adaptive runs) and prints each time with its ratio to
torch's fused step of the same rule measured in the same run.
"""

from __future__ import annotations

import argparse
import platform

import torch
import torch.utils.benchmark as tb

import deepmomentum as dm


def make_params(total: float, tensors: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    size = int(total) // tensors
    params = [torch.randn(size, generator=g).requires_grad_() for _ in range(tensors)]
    for p in params:
        p.grad = torch.randn(size, generator=g)
    return params


def time_step(make, total, tensors):
    params = make_params(total, tensors)
    opt = make(params)
    for _ in range(3):
        opt.step()
    timer = tb.Timer("opt.step()", globals={"opt": opt}, num_threads=torch.get_num_threads())
    return timer.adaptive_autorange(min_run_time=1.0).median


CASES = {
    "SGD-momentum (nesterov, wd)": (
        dict(lr=1e-3, momentum=0.9, nesterov=True, weight_decay=1e-4),
        torch.optim.SGD, dm.AssociativeMomentum, {}),
    "AdamW": (
        dict(lr=1e-3, weight_decay=0.01), torch.optim.AdamW, dm.PreconditionedMomentum, {}),
    "value-preconditioned (no torch twin)": (
        dict(lr=1e-3, weight_decay=0.01), torch.optim.AdamW, dm.PreconditionedMomentum,
        {"precondition": "value"}),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=8.4e6)
    parser.add_argument("--tensors", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{platform.processor() or platform.machine()}, {args.threads} threads, torch "
          f"{torch.__version__}, {args.params / 1e6:.1f}M fp32 params in {args.tensors} tensors\n")
    print("| rule | implementation | ms/step | × torch fused |")
    print("|---|---|---:|---:|")
    for rule, (kw, torch_cls, our_cls, extra) in CASES.items():
        base = time_step(lambda ps: torch_cls(ps, **kw, fused=True), args.params, args.tensors)
        rows = [("torch fused", base)] if not extra else []
        if not extra:
            rows.append(("torch foreach", time_step(lambda ps: torch_cls(ps, **kw, foreach=True),
                                                    args.params, args.tensors)))
            rows.append(("torch for-loop", time_step(
                lambda ps: torch_cls(ps, **kw, foreach=False), args.params, args.tensors)))
        impls = {"ours default": {}, "ours foreach": {"foreach": True},
                 "ours single-tensor": {"foreach": False}}
        for name, impl in impls.items():
            rows.append((name, time_step(lambda ps: our_cls(ps, **kw, **extra, **impl),
                                         args.params, args.tensors)))
        for name, seconds in rows:
            print(f"| {rule} | {name} | {seconds * 1e3:.2f} | {seconds / base:.2f} |", flush=True)


if __name__ == "__main__":
    main()
