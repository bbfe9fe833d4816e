"""GPU: our Triton fused steps against torch's fused CUDA optimizers, and the copy bandwidth.

    python -m benchmarks.fused_step_gpu [--params 5.12e8] [--tensors 64] [--out FILE]

First checks correctness on the card (the Triton path of AssociativeMomentum,
PreconditionedMomentum, Muon, DeltaMomentum, DMGD and M3 against their single-tensor
references, fp32 and bf16 parameters, a few steps), then times with ``triton.testing.do_bench`` (median,
after warm-up, random data larger than L2) in one run on one card:

* the device's copy bandwidth (``dst.copy_(src)``, 2 × bytes per element moved);
* SGD-momentum (nesterov, weight decay): ``torch.optim.SGD(fused=True)`` vs
  ``deepmomentum.AssociativeMomentum`` (Triton) — 20 bytes per fp32 parameter;
* AdamW: ``torch.optim.AdamW(fused=True)`` vs ``deepmomentum.PreconditionedMomentum``
  (Triton) — 28 bytes per fp32 parameter.

Prints effective TB/s (bytes that must move / time), ratios against torch and against the copy
bandwidth, and writes JSON with ``--out`` (stamped with ``benchmarks.core.environment()``).
Targets (issue): ≥ 1.05× torch's fused step and ≥ 90% of the copy bandwidth.
"""

from __future__ import annotations

import argparse
import sys

import torch

import deepmomentum as dm
from benchmarks import core


def check_correctness():
    torch.manual_seed(0)
    worst = 0.0
    for dtype in (torch.float32, torch.bfloat16):
        for make in (lambda ps, **k: dm.AssociativeMomentum(ps, lr=0.01, nesterov=True,
                                                             weight_decay=0.01, **k),
                     lambda ps, **k: dm.PreconditionedMomentum(ps, lr=0.01, weight_decay=0.01,
                                                               **k),
                     lambda ps, **k: dm.Muon(ps, lr=0.02, **k),
                     lambda ps, **k: dm.DeltaMomentum(ps, lr=0.01, erase=0.3, **k),
                     lambda ps, **k: dm.DMGD(ps, lr=0.01, **k),
                     lambda ps, **k: dm.M3(ps, lr=1e-3, chunk=2, **k)):
            base = [torch.randn(s, device="cuda").to(dtype) for s in [(257, 129), (64, 64),
                                                                        (1000, 3)]]
            a = [p.clone().requires_grad_() for p in base]
            b = [p.clone().requires_grad_() for p in base]
            fused, ref = make(a, fused=True), make(b, foreach=False)
            assert fused._implementation(fused.param_groups[0], a) == "triton"
            for step in range(5):
                for p, q in zip(a, b):
                    g = torch.randn(p.shape, device="cuda").to(dtype)
                    p.grad, q.grad = g, g.clone()
                fused.step()
                ref.step()
            for p, q in zip(a, b):
                rel = ((p.float() - q.float()).norm() / q.float().norm()).item()
                worst = max(worst, rel)
                limit = 1e-5 if dtype == torch.float32 else 2e-2
                assert rel < limit, (type(fused).__name__, dtype, rel)
    return worst


def bench(fn):
    import triton.testing  # here, so that the module imports (and --help runs) without triton

    return triton.testing.do_bench(fn, warmup=25, rep=200) / 1e3  # seconds


def make_params(total, tensors):
    size = int(total) // tensors
    params = [torch.randn(size, device="cuda").requires_grad_() for _ in range(tensors)]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=5.12e8)
    parser.add_argument("--tensors", type=int, default=64)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    refused = core.cuda_unavailable("benchmarks/fused_step_gpu.py")
    if refused is not None:
        return refused
    card = torch.cuda.get_device_name()
    worst = check_correctness()
    print(f"{card}; correctness: Triton vs reference, worst relative error {worst:.2e}")

    src = torch.randn(int(args.params), device="cuda")
    dst = torch.empty_like(src)
    copy_tbs = 2 * src.numel() * 4 / bench(lambda: dst.copy_(src)) / 1e12
    del src, dst
    print(f"copy bandwidth: {copy_tbs:.2f} TB/s\n")
    print("| rule | implementation | ms | effective TB/s | × torch fused | % of copy |")
    print("|---|---|---:|---:|---:|---:|")
    results = {"card": card, "copy_TBps": copy_tbs, "params": args.params,
               "tensors": args.tensors, "max_rel_err": worst, "rules": {},
               "env": core.environment(device="cuda")}
    rules = {
        "SGD-momentum": (20, lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9,
                                                        nesterov=True, weight_decay=1e-4,
                                                        fused=True),
                         lambda ps: dm.AssociativeMomentum(ps, lr=1e-3, momentum=0.9,
                                                           nesterov=True, weight_decay=1e-4,
                                                           fused=True)),
        "AdamW": (28, lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, fused=True),
                  lambda ps: dm.PreconditionedMomentum(ps, lr=1e-3, weight_decay=0.01,
                                                       fused=True)),
    }
    for rule, (bytes_per_param, theirs, ours) in rules.items():
        row = {}
        for name, make in (("torch fused", theirs), ("deepmomentum Triton", ours)):
            params = make_params(args.params, args.tensors)
            opt = make(params)
            opt.step()
            seconds = bench(opt.step)
            row[name] = seconds
            del opt, params
            torch.cuda.empty_cache()
        for name, seconds in row.items():
            tbs = bytes_per_param * args.params / seconds / 1e12
            print(f"| {rule} | {name} | {seconds * 1e3:.2f} | {tbs:.2f} | "
                  f"{row['torch fused'] / seconds:.3f} | {100 * tbs / copy_tbs:.1f}% |")
        results["rules"][rule] = row
    core.write_json(args.out, results)


if __name__ == "__main__":
    sys.exit(main())
