"""GPU: HOPE's in-context chunk kernels (``deepmomentum.kernels.memory_scan``) — correctness on
the card, then time against their torch twins and the whole models' training step.

    python -m benchmarks.memory_scan_gpu [--size gpu] [--repeats 20] [--skip-model] [--compile]
                                         [--out FILE]

Correctness (exit status 1 on any mismatch): ``chunk_read`` and ``chunk_end`` against
``functional.memory_chunk_read``/``memory_chunk_end`` on the card, fp32 (the kernels multiply in
IEEE fp32, torch's default for fp32 matmuls: rtol 1e-4) and bf16 inputs, with and without
momentum, a batch-shared start state, at the sizes of train.py's ``tiny``, ``small`` and ``gpu``
configurations; then a HOPE model of the ``tiny`` config with ``kernel="triton"`` against
``kernel="torch"``: logits and every gradient.

Timing (``triton.testing.do_bench``, median; random data): each kernel against its twin at the
``--size`` configuration's shapes (its batch, heads, chunk, head dim and memory width; HOPE's
five memories for ``chunk_end``); then ``benchmarks.hope_speed.measure`` with
``--compare-kernels``: Transformer++, Titans and HOPE training steps interleaved, the memory models
with the kernels and with ``kernel="torch"``, as tokens/s and ratios to Transformer++ measured in
the same run; ``--compile`` adds the models with their mixers compiled (``hope_speed
--compile``; never run on a GPU yet: where compiling fails, the error is recorded in
``compile_error`` and the eager models are timed alone). Writes JSON to ``--out`` or
``$OUT/memory_scan_gpu.json`` (stamped with ``benchmarks.core.environment()``). Without CUDA it says so and exits (status 0).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from . import core


def _shapes(size: dict) -> dict:
    model = size["model"]
    e = model["d_model"] // model["n_heads"]
    return dict(batch=size["batch"], H=model["n_heads"], C=model["chunk_size"], i=e,
                o=2 * e)  # HopeConfig.memory_expansion = 2


def _inputs(batch, H, C, i, o, dtype, momentum=True, m=None, seed=0):
    import deepmomentum.functional as dmf

    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device="cuda")  # noqa: E731
    eta, theta, alpha = (torch.rand(batch, H, C, generator=g, device="cuda") * s
                         for s in (0.95, 0.2, 0.1))
    c = dmf.scan_coefficients(eta, theta, alpha)
    if m is None:  # chunk_read's: (z, W0, S0, x, delta, a, b, G)
        t = (r(batch, H, C, i), r(1, H, i, o), r(batch, H, i, o) if momentum else None,
             r(batch, H, C, i), r(batch, H, C, o), c.param_from_start, c.param_from_momentum,
             c.param_from_grads)
    else:  # chunk_end's: (W0, S0, x, uW, uS, a, b, mu)
        t = (r(m, batch, H, i, o), r(m, batch, H, i, o) if momentum else None,
             r(m, batch, H, C, i), r(m, batch, H, C, o), r(m, batch, H, C, o),
             c.param_from_start[..., -1], c.param_from_momentum[..., -1],
             c.momentum_from_start[..., -1])
    return tuple(None if x is None else x.to(dtype) for x in t)


def check(failures: list, rows: list) -> None:
    import deepmomentum.functional as dmf
    from deepmomentum.kernels import memory_scan
    from examples.hope.train import SIZES

    tolerance = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
    for name in ("tiny", "small", "gpu"):
        shapes = _shapes(SIZES[name])
        for dtype in (torch.float32, torch.bfloat16):
            for momentum in (True, False):
                for kind, m in (("chunk_read", None), ("chunk_end", 5)):
                    inputs = _inputs(**shapes, dtype=dtype, momentum=momentum, m=m)
                    wide = tuple(None if x is None else x.float() for x in inputs)
                    twin = getattr(dmf, f"memory_{kind}")(*wide)
                    got = getattr(memory_scan, kind)(*inputs)
                    pairs = zip(got, twin) if m else [(got, twin)]
                    error = max(((a.float() - b).abs().max() / b.abs().max().clamp_min(1e-12))
                                .item() for a, b in pairs)
                    ok = error <= tolerance[dtype]
                    rows.append(dict(check=kind, size=name, dtype=str(dtype),
                                     momentum=momentum, max_rel_error=error, ok=ok))
                    if not ok:
                        failures.append(rows[-1])
    from examples.hope.model import HopeConfig, build

    config = dict(SIZES["tiny"]["model"])
    results = []
    for kernel in ("torch", "triton"):
        torch.manual_seed(0)
        model = build(HopeConfig(**config, kernel=kernel)).cuda()
        tokens = torch.randint(0, 256, (8, 128), generator=torch.Generator().manual_seed(0))
        logits = model(tokens.cuda())
        logits.float().square().mean().backward()
        results.append((logits, {n: p.grad for n, p in model.named_parameters()}))
    worst = (results[1][0] - results[0][0]).abs().max().item()
    for name, grad in results[0][1].items():
        scale = grad.abs().max().clamp_min(1e-12)
        worst = max(worst, ((results[1][1][name] - grad).abs().max() / scale).item())
    rows.append(dict(check="hope model kernel vs torch", max_rel_error=worst, ok=worst < 1e-3))
    if worst >= 1e-3:
        failures.append(rows[-1])


def time_kernels(size: dict) -> list:
    import triton.testing

    import deepmomentum.functional as dmf
    from deepmomentum.kernels import memory_scan

    shapes = _shapes(size)
    rows = []
    for kind, m in (("chunk_read", None), ("chunk_end", 5)):
        inputs = _inputs(**shapes, dtype=torch.float32, m=m)
        kernel = triton.testing.do_bench(lambda: getattr(memory_scan, kind)(*inputs))
        twin = triton.testing.do_bench(lambda: getattr(dmf, f"memory_{kind}")(*inputs))
        rows.append(dict(kernel=kind, shapes=shapes, memories=m, kernel_ms=kernel,
                         torch_ms=twin, speedup=twin / kernel))
        print(f"{kind:10s} {shapes} kernel {kernel:.3f} ms, torch {twin:.3f} ms "
              f"({twin / kernel:.2f}×)")
    return rows


def main(argv=None):
    from examples.hope.train import SIZES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="gpu", choices=sorted(SIZES))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--skip-model", action="store_true",
                        help="time the kernels only, not the models' training steps")
    parser.add_argument("--compile", action="store_true",
                        help="also time the models with their mixers compiled")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    refused = core.cuda_unavailable("benchmarks/memory_scan_gpu.py")
    if refused is not None:
        return refused
    result = {"environment": core.environment("cuda"), "size": args.size}
    failures, rows = [], []
    check(failures, rows)
    result["checks"] = rows
    print(f"correctness: {len(rows)} checks, {len(failures)} failures")
    for failure in failures:
        print("  FAIL", failure)
    result["kernels"] = time_kernels(SIZES[args.size])
    if not args.skip_model:
        from . import hope_speed

        try:
            steps = hope_speed.measure(args.size, args.repeats, 3, args.compile, "cuda", True)
        except Exception as error:  # noqa: BLE001 — a compile failure must not lose the run
            if not args.compile:
                raise
            result["compile_error"] = repr(error)
            print(f"compiled models failed ({error!r}); timing the eager ones alone")
            steps = hope_speed.measure(args.size, args.repeats, 3, False, "cuda", True)
        result["models"] = {k: {n: v for n, v in row.items() if n != "step_s"}
                            for k, row in steps.items()}
        for name, row in steps.items():
            print(f"{name:14s} {row['tokens_per_s']:12,.0f} tokens/s "
                  f"{row['ratio_to_transformer']:.2f}× Transformer++")
    out = args.out or (os.path.join(os.environ["OUT"], "memory_scan_gpu.json")
                       if os.environ.get("OUT") else None)
    core.write_json(out, result)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
