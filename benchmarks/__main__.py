"""``python -m benchmarks``: compare optimizers on toy, continual and language-model tasks.

    python -m benchmarks run --quick                      # the main job: every task, ~3 min
    python -m benchmarks run --task lm --optim adamw,muon,dmgd --seeds 3
    python -m benchmarks run --task digits --optim torch.optim.RMSprop --lrs 1e-3,3e-3,1e-2
    python -m benchmarks plot benchmarks/results/cpu-quick
    python -m benchmarks headline benchmarks/results/cpu-full   # the README's table

``run`` prints a Markdown table (each optimizer at its best lr: mean ± std over seeds of the
task's metric, steps and seconds to the task's target) and writes ``results.json`` (records
stamped with the environment) to ``--out``, by default a new folder
``benchmarks/results/run-YYYYmmdd-HHMMSS-{quick,full}/``. ``plot`` turns that JSON into PNGs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

from . import core

DEFAULT_TASKS = "rosenbrock,quadratic,psi,digits,lm,throughput"
DEFAULT_OPTIMIZERS = "sgd,adamw,muon,associative,delta,preconditioned,dmgd,dm-muon,m3"
RESULTS_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def default_out(quick: bool) -> str:
    """A new folder per run: ``RESULTS_ROOT/run-YYYYmmdd-HHMMSS-{quick,full}``."""
    return os.path.join(RESULTS_ROOT, time.strftime("run-%Y%m%d-%H%M%S") +
                        ("-quick" if quick else "-full"))


def _shown(path: str) -> str:
    """``path`` relative to the working directory when it lies under it."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def _clean(value):
    """JSON without NaN/Infinity: non-finite numbers become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _fmt(pair, spec="{:.3g}"):
    if not pair or pair[0] is None:
        return "—"
    mean, std = pair
    return spec.format(mean) + (f" ± {spec.format(std)}" if std else "")


class _Progress:
    """``[k/total] task · optimizer · lr · seed`` of the run starting now, on stderr: one line
    rewritten in place on a terminal, a line per run otherwise (logs)."""

    def __init__(self, total, stream=None):
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.done, self.total, self.width, self.t0 = 0, total, 0, time.perf_counter()

    def __call__(self, task, optimizer, lr, seed):
        self.done += 1
        count = (f"[{self.done:>{len(str(self.total))}}/{self.total}]" if self.done <= self.total
                 else f"[{self.done}, beyond the {self.total} planned: a grid extension]")
        line = (f"{count} {task} · {optimizer} · "
                f"lr {lr:g} · seed {seed}  ({time.perf_counter() - self.t0:.0f} s)")
        if self.tty:
            print(f"\r{line:<{self.width}}", end="", file=self.stream, flush=True)
            self.width = len(line)
        else:
            print(line, file=self.stream, flush=True)

    def close(self):
        if self.tty and self.done:
            print(file=self.stream)


def run(args) -> dict:
    tasks = [core.task(t).name for t in args.task.split(",") if t]
    lrs = core.parse_lrs(args.lrs) if args.lrs else None
    specs = [core.optimizer_spec(name, lrs) for name in args.optim.split(",") if name]
    if args.seeds is None:
        args.seeds = 1 if args.quick else 3
    if args.seeds < 1:
        raise ValueError(f"Invalid --seeds {args.seeds}: must be ≥ 1")
    if args.corpus != "shakespeare":
        core._CORPUS["shakespeare"] = core.corpus(args.corpus)
    out = args.out or default_out(args.quick)
    print(f"{len(tasks)} task(s) × {len(specs)} optimizer(s); results will be written to "
          f"{_shown(os.path.join(out, 'results.json'))}", file=sys.stderr)
    total = sum(len(core.task_lrs(t, s)) * args.seeds for s in specs for t in tasks)
    progress = _Progress(total)
    records = []
    try:
        for name in tasks:
            for spec in specs:
                records.append(core.run_task(name, spec, args.seeds, args.quick, progress))
    finally:
        progress.close()
    result = {"environment": core.environment(), "quick": args.quick, "seeds": args.seeds,
              "tasks": {t: core.TASKS[t].description for t in tasks}, "records": records}
    print_table(result)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "results.json")
    with open(path, "w") as f:
        json.dump(_clean(result), f, indent=1)
    print(f"\nwrote {_shown(path)}; plot with: python -m benchmarks plot {_shown(out)}")
    return result


def print_table(result):
    env = result["environment"]
    print(f"\n{env['device']}; torch {env['torch']}; {result['seeds']} seed(s); "
          f"{'quick' if result['quick'] else 'full'} sizes\n")
    print("| task | optimizer | best lr | metric (mean ± std) | vs the task's best | "
          "steps to target | seconds to target |")
    print("|---|---|---:|---:|---|---:|---:|")
    standing = _standing(result["records"])
    for r in result["records"]:
        best = r["best"]
        metric = "diverged" if best["diverged"] else \
            f"{r['metric']}: {_fmt((best['final_mean'], best['final_std']))}"
        lr = f"{best['lr']:g}" if r.get("tunes_lr", True) else "—"  # step time: no lr to tune
        if r.get("tunes_lr", True) and r.get("interior") is False:
            lr += " (grid edge)"
        print(f"| {r['task']} | {r['optimizer']} | {lr} | {metric} | {standing[id(r)]} | "
              f"{_fmt(best['steps_to_target'], '{:.0f}')} | "
              f"{_fmt(best['seconds_to_target'])} |")


def _standing(records) -> dict[int, str]:
    """Per record: "best" for its task's best mean, "tie" within 2 std of it (the larger of
    the two seeds' std), else empty; nothing for a diverged record or without a std."""
    out = {id(r): "" for r in records}
    by_task: dict[str, list] = {}
    for r in records:
        if not r["best"]["diverged"]:
            by_task.setdefault(r["task"], []).append(r)
    for rs in by_task.values():
        sign = -1 if rs[0].get("maximize") else 1
        top = min(rs, key=lambda r: sign * r["best"]["final_mean"])
        out[id(top)] = "best"
        for r in rs:
            stds = [r["best"]["final_std"], top["best"]["final_std"]]
            if r is top or any(s is None for s in stds):
                continue
            if abs(r["best"]["final_mean"] - top["best"]["final_mean"]) <= 2 * max(stds):
                out[id(r)] = "tie"
    return out


def headline_rows(quick: bool) -> dict[str, tuple[str, str]]:
    """The headline's rows: task → (label, what a cell shows). Toy tasks show the steps to
    their target (the fewer the better); the others their metric."""
    steps = core.LM_SIZES[quick][0]
    return {
        "rosenbrock": ("Rosenbrock (steps to 1e-2)", "steps"),
        "quadratic": ("noisy quadratic (steps to 1e-2)", "steps"),
        "psi": ("ψ toy (steps to 0.05)", "steps"),
        "digits": (f"Permuted-Digits, {3 if quick else 5} tasks (ACC)", "metric"),
        "lm": (f"char-GPT on Shakespeare, {steps} steps (val bits/char)", "metric"),
        "throughput": (f"step time, {'1M' if quick else '8.4M'} params in 64 matrices (ms)",
                       "metric"),
    }


def headline(result) -> str:
    """The task × optimizer table of a results.json, each cell at the optimizer's best lr:
    mean (± std over the seeds, where there are several), **bold** for the row's best and
    *italic* within 2 std of it (a tie: the larger of the two std); ``diverged`` where the
    best lr diverged (every lr did), ``—`` where the target was not reached."""
    records = result["records"]
    optimizers = list(dict.fromkeys(r["optimizer"] for r in records))
    rows = []
    for task in dict.fromkeys(r["task"] for r in records):
        label, shows = headline_rows(result["quick"]).get(task, (task, "metric"))
        cells = {}  # optimizer → (mean, std) or a word
        for r in records:
            if r["task"] != task:
                continue
            best = r["best"]
            if best["diverged"]:
                cells[r["optimizer"]] = "diverged"
            elif shows == "steps":
                cells[r["optimizer"]] = tuple(best["steps_to_target"]) \
                    if best["steps_to_target"] else "—"
            else:
                cells[r["optimizer"]] = (best["final_mean"], best["final_std"] or 0.0)
        numbers = {k: v for k, v in cells.items() if isinstance(v, tuple)}
        larger = shows == "metric" and any(r["task"] == task and r.get("maximize")
                                           for r in records)
        top = (max if larger else min)(numbers, key=lambda k: numbers[k][0]) \
            if numbers else None
        out = []
        for name in optimizers:
            value = cells.get(name, "")
            if not isinstance(value, tuple):
                out.append(value)
                continue
            mean, std = value
            spec = "{:.0f}" if shows == "steps" else "{:.3g}"
            text = spec.format(mean) + (f" ± {std:.2g}" if std and shows == "metric" else "")
            if name == top:
                text = f"**{text}**"
            elif abs(mean - numbers[top][0]) <= 2 * max(std, numbers[top][1]):
                text = f"*{text}*"
            out.append(text)
        rows.append(f"| {label} | " + " | ".join(out) + " |")
    head = "| task (metric) | " + " | ".join(optimizers) + " |"
    rule = "|---|" + "---:|" * len(optimizers)
    return "\n".join([head, rule, *rows])


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split(
        "\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run tasks × optimizers × lr grid × seeds")
    r.add_argument("--task", default=DEFAULT_TASKS, help=f"comma-separated ({DEFAULT_TASKS})")
    r.add_argument("--optim", default=DEFAULT_OPTIMIZERS,
                   help="comma-separated names, or import paths of torch.optim classes")
    r.add_argument("--lrs", default=None, help="one lr grid for all (default: per optimizer)")
    r.add_argument("--seeds", type=int, default=None, help="default 3; 1 with --quick")
    r.add_argument("--quick", action="store_true", help="small sizes (the main job)")
    r.add_argument("--corpus", default="shakespeare", choices=["shakespeare", "stdlib"])
    r.add_argument("--out", default=None, help="directory for results.json (default: a new "
                   "benchmarks/results/run-YYYYmmdd-HHMMSS-{quick,full}/)")
    p = sub.add_parser("plot", help="PNG plots from a results.json directory")
    p.add_argument("directory")
    h = sub.add_parser("headline", help="the task × optimizer Markdown table of a results.json "
                       "directory (the README's headline)")
    h.add_argument("directory")
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            run(args)
        elif args.command == "headline":
            with open(os.path.join(args.directory, "results.json")) as f:
                print(headline(json.load(f)))
        else:
            from .plot import plot

            for path in plot(args.directory):
                print(f"wrote {path}")
    except ValueError as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
