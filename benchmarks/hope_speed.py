"""Training speed of the HOPE example's three models, interleaved in one process.

    python -m benchmarks.hope_speed [--size small] [--repeats 30] [--threads 2] [--compile]
                                    [--device cpu|cuda] [--compare-kernels] [--before DIR]
                                    [--out FILE]

Each repeat times one training step (forward, backward, ``torch.optim.AdamW`` step) of every
model in turn — ``transformer`` (Transformer++), ``titans``, ``hope`` at the size's
configuration and equal parameter count (``examples.hope.model.build``) — on the same batch of
random bytes, so all three see the same machine state; the table is tokens per second from the
median step time, and the ratio to Transformer++ measured in the same run. The first
``--warmup`` steps of each model are not counted (nor the first, which compiles).
``--compile`` adds ``transformer+compiled``, ``titans+compiled``, ``hope+compiled``: each
model with its blocks' sequence mixers compiled (``LanguageModel.compile_mixers``, what
``train.py --compile`` does), interleaved with the eager ones in the same loop; their rows
also give ``ratio_to_compiled_transformer``. ``--before DIR`` adds ``titans@before`` and
``hope@before``: the memory models of another source tree's ``examples/hope/model.py``
(``git worktree add DIR REV``), interleaved too — how a change to the model shows its speed-up
against the same machine state. ``--compare-kernels`` adds ``titans[torch]`` and
``hope[torch]``: the memory models with ``kernel="torch"``, against the default (on CUDA, the
Triton chunk kernels of ``deepmomentum.kernels.memory_scan``).

Each model's training step is also counted in matrix-product FLOPs (``torch.utils.flop_counter``:
products, attention; not elementwise work), once, on the CPU with ``kernel="torch"`` (the same
arithmetic as the kernels): ``flop_ceiling`` = Transformer++'s FLOPs / the model's, the
tokens/s ratio the model would reach if its products ran as fast as Transformer++'s, and
``gflop_per_s`` the rate each achieved.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from examples.hope.model import HopeConfig, build, count_parameters
from examples.hope.train import SIZES

from . import core

ARCHS = ("transformer", "titans", "hope")
TORCH_KERNEL = ("titans[torch]", "hope[torch]")  # --compare-kernels: kernel="torch"
COMPILED = "+compiled"  # --compile: the model with its mixers compiled
BEFORE = "@before"  # --before DIR: the model of another source tree


def _model_module(tree: str):
    """``examples/hope/model.py`` of the source tree ``tree``, imported under its own name."""
    spec = importlib.util.spec_from_file_location(
        "hope_model_before", os.path.join(tree, "examples", "hope", "model.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


def _parse(name: str) -> tuple[str, str, bool, bool]:
    """A row's name ``arch[kernel]@before+compiled`` (each part but arch optional) as
    ``(arch, kernel or "", compiled, before)``."""
    name, compiled, _ = name.partition(COMPILED)
    name, before, _ = name.partition(BEFORE)
    arch, _, kernel = name.partition("[")
    return arch, kernel.rstrip("]"), bool(compiled), bool(before)


def _stepper(name: str, size: dict, device: str, before=None):
    torch.manual_seed(0)
    arch, kernel, compiled, old = _parse(name)
    options = {"kernel": kernel} if kernel else {}
    make, config = (before.build, before.HopeConfig) if old else (build, HopeConfig)
    model = make(config(arch=arch, **size["model"], **options)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if compiled:
        model.compile_mixers()

    def step(batch: torch.Tensor) -> None:
        logits = model(batch[:, :-1])
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
            device: str = "cpu", compare_kernels: bool = False,
            before: Optional[str] = None) -> dict:
    """Rows by model name: the eager models, with ``compile_`` the compiled ones
    (``+compiled``), with ``before`` (a source tree) its memory models (``@before``), all
    interleaved. Each model's first step (compilation) is not in the median; it is
    ``first_step_s``."""
    size = SIZES[size_name]
    names = ARCHS + TORCH_KERNEL if compare_kernels else ARCHS
    if compile_:
        names = names + tuple(arch + COMPILED for arch in ARCHS)
    if before:
        names = names + tuple(arch + BEFORE for arch in ARCHS[1:])
        before = _model_module(before)
    batch = torch.randint(0, 256, (size["batch"], size["seq_len"] + 1),
                          generator=torch.Generator().manual_seed(0)).to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    models, first = {}, {}
    for name in names:
        model, step = _stepper(name, size, device, before)
        sync()
        start = time.perf_counter()
        step(batch)  # a compiled model compiles here
        sync()
        first[name] = time.perf_counter() - start
        models[name] = (count_parameters(model), step)
    times = {name: [] for name in names}
    for r in range(warmup + repeats):
        for name in names:
            sync()
            start = time.perf_counter()
            models[name][1](batch)
            sync()
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    tokens = size["batch"] * size["seq_len"]
    base = statistics.median(times["transformer"])
    per_arch = {arch: step_flops(arch, size) for arch in ARCHS}  # kernel="torch": same FLOPs
    flops = {name: per_arch[_parse(name)[0]] for name in names}
    rows = {}
    for name in names:
        median = statistics.median(times[name])
        rows[name] = {"parameters": models[name][0], "median_step_s": median,
                      "tokens_per_s": tokens / median, "ratio_to_transformer": base / median,
                      "flops_per_step": flops[name],
                      "flop_ceiling": flops["transformer"] / flops[name],
                      "gflop_per_s": flops[name] / median / 1e9, "step_s": times[name],
                      "first_step_s": first[name]}
        if name.endswith(COMPILED):
            rows[name]["ratio_to_compiled_transformer"] = (
                statistics.median(times["transformer" + COMPILED]) / median)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=sorted(SIZES))
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true",
                        help="also time each model with its mixers compiled (minutes to compile)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compare-kernels", action="store_true",
                        help="also time titans and hope with kernel='torch'")
    parser.add_argument("--before", default=None, metavar="DIR",
                        help="also time the memory models of another source tree's "
                             "examples/hope/model.py (git worktree add DIR REV)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"size": args.size, "threads": args.threads, "repeats": args.repeats,
              "compare_kernels": args.compare_kernels,
              "device": args.device, "environment": core.environment(args.device)}
    rows = measure(args.size, args.repeats, args.warmup, args.compile, args.device,
                   args.compare_kernels, args.before)
    if args.before:
        result["before"] = {"tree": args.before, "git_sha": core.git_sha(args.before)}
    result["eager"] = {n: r for n, r in rows.items() if not n.endswith(COMPILED)}
    if args.compile:
        result["compiled"] = {n: r for n, r in rows.items() if n.endswith(COMPILED)}
    print(f"\n{args.size}, {args.device}, {args.threads} threads, median of {args.repeats} "
          "interleaved steps (AdamW); × Transformer++: against the eager one\n")
    print("| model | params | step (ms) | tokens/s | × Transformer++ | GFLOP/step | "
          "FLOP ceiling (×) | GFLOP/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, row in rows.items():
        print(f"| {name} | {row['parameters']:,} | {1e3 * row['median_step_s']:.1f} | "
              f"{row['tokens_per_s']:,.0f} | {row['ratio_to_transformer']:.2f} | "
              f"{row['flops_per_step'] / 1e9:.3g} | {row['flop_ceiling']:.2f} | "
              f"{row['gflop_per_s']:.3g} |")
    core.write_json(args.out, result)


if __name__ == "__main__":
    main()
