"""Training speed of the HOPE example's three models, interleaved in one process.

    python -m benchmarks.hope_speed [--size small] [--repeats 30] [--threads 2] [--compile]
                                    [--device cpu|cuda] [--compare-kernels] [--out FILE]

Each repeat times one training step (forward, backward, ``torch.optim.AdamW`` step) of every
model in turn — ``transformer`` (Transformer++), ``titans``, ``hope`` at the size's
configuration and equal parameter count (``examples.hope.model.build``) — on the same batch of
random bytes, so all three see the same machine state; the table is tokens per second from the
median step time, and the ratio to Transformer++ measured in the same run. The first
``--warmup`` steps of each model are not counted. ``--compile`` also times each model under
``torch.compile``. ``--compare-kernels`` adds ``titans[torch]`` and ``hope[torch]``: the
memory models with ``kernel="torch"``, against the default (on CUDA, the Triton chunk kernels of
``deepmomentum.kernels.memory_scan``).

Each model's training step is also counted in matrix-product FLOPs (``torch.utils.flop_counter``:
products, attention; not elementwise work), once, on the CPU with ``kernel="torch"`` (the same
arithmetic as the kernels): ``flop_ceiling`` = Transformer++'s FLOPs / the model's, the
tokens/s ratio the model would reach if its products ran as fast as Transformer++'s, and
``gflop_per_s`` the rate each achieved.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from examples.hope.model import HopeConfig, build, count_parameters
from examples.hope.train import SIZES

from . import core

ARCHS = ("transformer", "titans", "hope")
TORCH_KERNEL = ("titans[torch]", "hope[torch]")  # --compare-kernels: kernel="torch"


def _stepper(name: str, size: dict, compile_: bool, device: str):
    torch.manual_seed(0)
    arch, _, kernel = name.partition("[")
    options = {"kernel": kernel.rstrip("]")} if kernel else {}
    model = build(HopeConfig(arch=arch, **size["model"], **options)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    forward = torch.compile(model) if compile_ else model

    def step(batch: torch.Tensor) -> None:
        logits = forward(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return model, step


def step_flops(arch: str, size: dict) -> int:
    """Matrix-product FLOPs of one training step (forward and backward) of model ``arch``."""
    torch.manual_seed(0)
    model = build(HopeConfig(arch=arch, **size["model"], kernel="torch"))
    batch = torch.randint(0, 256, (size["batch"], size["seq_len"] + 1),
                          generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        logits = model(batch[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).backward()
    return counter.get_total_flops()


def measure(size_name: str, repeats: int, warmup: int, compile_: bool,
            device: str = "cpu", compare_kernels: bool = False) -> dict:
    size = SIZES[size_name]
    names = ARCHS + TORCH_KERNEL if compare_kernels else ARCHS
    batch = torch.randint(0, 256, (size["batch"], size["seq_len"] + 1),
                          generator=torch.Generator().manual_seed(0)).to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    models = {}
    for arch in names:
        model, step = _stepper(arch, size, compile_, device)
        models[arch] = (count_parameters(model), step)
    times = {arch: [] for arch in names}
    for r in range(warmup + repeats):
        for arch in names:
            sync()
            start = time.perf_counter()
            models[arch][1](batch)
            sync()
            if r >= warmup:
                times[arch].append(time.perf_counter() - start)
    tokens = size["batch"] * size["seq_len"]
    base = statistics.median(times["transformer"])
    per_arch = {arch: step_flops(arch, size) for arch in ARCHS}  # kernel="torch": same FLOPs
    flops = {name: per_arch[name.partition("[")[0]] for name in names}
    rows = {}
    for arch in names:
        median = statistics.median(times[arch])
        rows[arch] = {"parameters": models[arch][0], "median_step_s": median,
                      "tokens_per_s": tokens / median, "ratio_to_transformer": base / median,
                      "flops_per_step": flops[arch],
                      "flop_ceiling": flops["transformer"] / flops[arch],
                      "gflop_per_s": flops[arch] / median / 1e9, "step_s": times[arch]}
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=sorted(SIZES))
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compare-kernels", action="store_true",
                        help="also time titans and hope with kernel='torch'")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"size": args.size, "threads": args.threads, "repeats": args.repeats,
              "compare_kernels": args.compare_kernels,
              "device": args.device, "environment": core.environment(args.device)}
    for mode in (["eager", "compiled"] if args.compile else ["eager"]):
        rows = measure(args.size, args.repeats, args.warmup, mode == "compiled", args.device,
                       args.compare_kernels)
        result[mode] = rows
        print(f"\n{args.size}, {mode}, {args.device}, {args.threads} threads, median of "
              f"{args.repeats} interleaved steps (AdamW)\n")
        print("| model | params | step (ms) | tokens/s | × Transformer++ | GFLOP/step | "
              "FLOP ceiling (×) | GFLOP/s |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for arch, row in rows.items():
            print(f"| {arch} | {row['parameters']:,} | {1e3 * row['median_step_s']:.1f} | "
                  f"{row['tokens_per_s']:,.0f} | {row['ratio_to_transformer']:.2f} | "
                  f"{row['flops_per_step'] / 1e9:.3g} | {row['flop_ceiling']:.2f} | "
                  f"{row['gflop_per_s']:.3g} |")
    core.write_json(args.out, result)


if __name__ == "__main__":
    main()
