"""CPU step time of each optimizer implementation against torch's, on the same parameters.

    python -m benchmarks.step_time_cpu [--params 8.4e6] [--tensors 64] [--threads 2]
                                       [--matrix 256] [--matrices 16] [--only elementwise|matrix]

Times ``optimizer.step()`` alone (gradients fixed, state warmed up) with
``torch.utils.benchmark`` (median of adaptive runs) and prints each time with its ratio to a
torch baseline measured in the same run: torch's fused step of the same rule for the
elementwise rules (SGD-momentum, AdamW and the value-preconditioned variant, on ``--params``
fp32 parameters in ``--tensors`` flat tensors); for the matrix rules (DeltaMomentum, DMGD,
Muon, M3 on ``--matrices`` square fp32 matrices of side ``--matrix``) torch's fused
SGD-momentum on the same matrices (Delta, DMGD) or ``torch.optim.Muon`` (Muon, M3).
"""

from __future__ import annotations

import argparse
import platform

import torch
import torch.utils.benchmark as tb

import deepmomentum as dm


def make_params(total: float, tensors: int, seed: int = 0, shape=None):
    g = torch.Generator().manual_seed(seed)
    shape = shape or (int(total) // tensors,)
    params = [torch.randn(shape, generator=g).requires_grad_() for _ in range(tensors)]
    for p in params:
        p.grad = torch.randn(shape, generator=g)
    return params


def time_step(make, total, tensors, shape=None):
    params = make_params(total, tensors, shape=shape)
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

SGD_BASE = (torch.optim.SGD, dict(lr=1e-3, momentum=0.9))
MATRIX_CASES = {
    "DeltaMomentum (gradient keys)": (SGD_BASE, dm.DeltaMomentum, dict(lr=1e-3)),
    "DMGD (hidden 16)": (SGD_BASE, dm.DeepMomentum, dict(lr=1e-3)),
    "Muon": ((torch.optim.Muon, dict(lr=1e-3)), dm.Muon, dict(lr=1e-3)),
    "M3": ((torch.optim.Muon, dict(lr=1e-3)), dm.M3, dict(lr=1e-3)),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=8.4e6)
    parser.add_argument("--tensors", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--matrix", type=int, default=256)
    parser.add_argument("--matrices", type=int, default=16)
    parser.add_argument("--only", choices=("elementwise", "matrix"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{platform.processor() or platform.machine()}, {args.threads} threads, torch "
          f"{torch.__version__}, {args.params / 1e6:.1f}M fp32 params in {args.tensors} tensors\n")
    print("| rule | implementation | ms/step | × torch baseline |")
    print("|---|---|---:|---:|")
    for rule, (kw, torch_cls, our_cls, extra) in (CASES if args.only != "matrix" else {}).items():
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
    shape = (args.matrix, args.matrix)
    for rule, ((torch_cls, torch_kw), our_cls, kw) in (
            MATRIX_CASES if args.only != "elementwise" else {}).items():
        fused = {"fused": True} if torch_cls is torch.optim.SGD else {}
        base = time_step(lambda ps: torch_cls(ps, **torch_kw, **fused), 0, args.matrices, shape)
        name = f"torch {torch_cls.__name__}{' fused' if fused else ''}"
        rows = [(name, base)]
        for impl_name, impl in {"ours default": {}, "ours foreach": {"foreach": True},
                                "ours single-tensor": {"foreach": False}}.items():
            rows.append((impl_name, time_step(lambda ps: our_cls(ps, **kw, **impl), 0,
                                              args.matrices, shape)))
        for impl_name, seconds in rows:
            print(f"| {rule} ({args.matrices}×{args.matrix}²) | {impl_name} | "
                  f"{seconds * 1e3:.2f} | {seconds / base:.2f} |", flush=True)


if __name__ == "__main__":
    main()
