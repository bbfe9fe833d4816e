"""Evaluations of trained runs: test-time learning on a new stream, and associative recall.

    python -m examples.hope.evaluate ttt runs/tiny/hope-0          # writes RUN/ttt.json
    python -m examples.hope.evaluate recall --arch hope --seed 0 --out runs/tiny/recall-hope-0
    python -m examples.hope.evaluate table runs/tiny                # Markdown table + summary

**Test-time learning.** After training on Shakespeare, the model reads Python source (the
interpreter's standard library) one window of the training length at a time. Each window is
scored *before* the model learns from it (prequential bits per byte), then, with CMS updates
on, the CMS levels take a gradient step on it — level ℓ once per ``C^(ℓ)`` windows, with the
windows' mean gradient (the training schedule, counted in windows). Everything else stays
frozen; the in-context memories start afresh in each window in every condition. Reported:
the stream's bits per byte (all, first and last quarter) with updates off, with the CMS
schedule, and with every level at period 1; and Shakespeare's validation bits per byte before
and after the stream (forgetting). The baselines' single MLP counts as one level of period 1.

**Multi-query associative recall.** A fresh model of the same size learns MQAR: 8 key–value
pairs, a gap of filler tokens, then the 8 keys again in a new order, each to be followed by
its value. It trains at length 64 and is tested at 1×, 4× and 16× that length (the gap
grows); the metric is the accuracy of the predicted values.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import statistics
import time
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

import deepmomentum as dm
from examples.hope.model import ARCHITECTURES, HopeConfig, LanguageModel, build, \
    count_parameters
from examples.hope.train import SIZES, bits_per_byte, byte_tokens, environment, load, \
    make_optimizer, schedule, split, validation_windows

# --- test-time learning -----------------------------------------------------------------------


def stream_windows(length: int, count: int) -> torch.Tensor:
    """``count`` consecutive windows (with their next byte) of Python standard-library source."""
    from benchmarks.data import stdlib_text

    data = torch.frombuffer(bytearray(stdlib_text((length + 1) * count + 1)),
                            dtype=torch.uint8).long()
    starts = torch.arange(count) * length
    return data[starts[:, None] + torch.arange(length + 1)]


def test_time_learning(model: LanguageModel, stream: torch.Tensor, periods: Optional[tuple],
                       lr: float, log: Optional[dict[str, Any]] = None) -> list[float]:
    """Prequential bits per byte of each window; with ``periods``, CMS level ℓ learns every
    ``periods[ℓ]`` windows (``None``: no updates; ``"auto"``: when its accumulated gradient is
    significant, issue 19 — ``log["windows"]`` gets ``[window, level, length]`` as each of its
    windows ends)."""
    model.eval()  # no dropout anywhere; eval only marks that the outer loop is not training
    levels = model.cms_levels()
    optimizer = window_log = None
    if periods is not None:
        for p in model.parameters():
            p.requires_grad_(False)
        for level in levels:
            for p in level:
                p.requires_grad_(True)
        groups = dm.continuum_groups([(level, period) for level, period in zip(levels, periods)],
                                     accumulate="mean")
        optimizer = dm.PreconditionedMomentum(groups, lr=lr, weight_decay=0.0)
        if "auto" in periods and log is not None:
            window_log = dm.WindowLog(optimizer, log.setdefault("windows", []))
    scores = []
    for window in stream:
        window = window[None].to(next(model.parameters()).device)
        with torch.set_grad_enabled(optimizer is not None):
            loss = F.cross_entropy(model(window[:, :-1]).flatten(0, 1).float(),
                                   window[0, 1:])
        scores.append(loss.item() / math.log(2))
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if window_log is not None:  # [window, level, length] as each window ends
                window_log.record(len(scores))
    for p in model.parameters():
        p.requires_grad_(True)
    return scores


def ttt(run_dir: str, windows: int = 256, lr: float = 1e-3,
        fixed: Sequence[int] = ()) -> dict[str, Any]:
    """The test-time-learning stream of a run: conditions "off", "cms" (the model's periods),
    "every_step", "auto" (every level ``update_period="auto"``) and ``fixed-C`` (every level
    at period C, for each C of ``fixed``); written to the run's ``ttt.json``."""
    saved = json.load(open(os.path.join(run_dir, "metrics.json")))
    size = SIZES[saved["size"]]
    _, shakespeare = byte_tokens("shakespeare")
    val = validation_windows(split(shakespeare)[1], 64, size["seq_len"])
    stream = stream_windows(size["seq_len"], windows)
    result: dict[str, Any] = {"run": run_dir, "arch": saved["arch"], "seed": saved["seed"],
                              "windows": windows, "window": size["seq_len"], "lr": lr}
    base = load(run_dir)
    result["shakespeare_before"] = bits_per_byte(base, val)
    n_levels = len(base.cms_levels())
    conditions = {"off": None, "cms": tuple(base.config.cms_periods[:n_levels])
                  if base.config.arch == "hope" else (1,), "every_step": (1,) * n_levels,
                  "auto": ("auto",) * n_levels,
                  **{f"fixed-{c}": (c,) * n_levels for c in fixed}}
    for name, periods in conditions.items():
        same = next((key for key in result if key in conditions
                     and result[key]["periods"] == periods), None)
        if same is not None:  # a baseline's one level: "every step" is its CMS schedule
            result[name] = result[same]
            continue
        model = load(run_dir)
        log: dict[str, Any] = {}
        scores = test_time_learning(model, stream, periods, lr, log)
        quarter = len(scores) // 4
        result[name] = {"periods": periods, **log, "stream": statistics.mean(scores),
                        "first_quarter": statistics.mean(scores[:quarter]),
                        "last_quarter": statistics.mean(scores[-quarter:]),
                        "shakespeare_after": bits_per_byte(model, val), "curve": scores}
    with open(os.path.join(run_dir, "ttt.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


# --- associative recall -----------------------------------------------------------------------

KEYS, VALUES, FILLER = (0, 64), (64, 128), (128, 192)


def mqar(batch: int, length: int, pairs: int = 8, generator: Optional[torch.Generator] = None
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (batch, length + 1), mask (batch, length) of the positions that predict a
    recalled value). Layout: k₁ v₁ … k_n v_n, filler, then the keys in a new order, each
    followed by its value."""
    gap = length + 1 - 4 * pairs
    if gap < 0:
        raise ValueError(f"length {length} is too short for {pairs} pairs")
    keys = torch.argsort(torch.rand(batch, KEYS[1] - KEYS[0], generator=generator))[:, :pairs]
    values = torch.randint(*VALUES, (batch, pairs), generator=generator)
    order = torch.argsort(torch.rand(batch, pairs, generator=generator))
    filler = torch.randint(*FILLER, (batch, gap), generator=generator)
    context = torch.stack([keys, values], dim=-1).flatten(1)
    queries = torch.stack([keys.gather(1, order), values.gather(1, order)], dim=-1).flatten(1)
    tokens = torch.cat([context, filler, queries], dim=1)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[:, length + 1 - 2 * pairs::2] = True  # where the query keys are: they predict values
    return tokens, mask


def recall_accuracy(model: LanguageModel, length: int, batches: int = 4, batch: int = 32,
                    seed: int = 1234) -> float:
    g = torch.Generator().manual_seed(seed)
    correct = total = 0
    model.eval()
    with torch.no_grad():
        for _ in range(batches):
            tokens, mask = mqar(batch, length, generator=g)
            predicted = model(tokens[:, :-1]).argmax(-1)
            correct += (predicted == tokens[:, 1:])[mask].sum().item()
            total += mask.sum().item()
    model.train()
    return correct / total


def recall(arch: str, seed: int, out: str, size: str = "tiny", steps: int = 1500,
           length: int = 64, optim: str = "PreconditionedMomentum", lr: float = 3e-3
           ) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = build(HopeConfig(arch=arch, **SIZES[size]["model"]))
    optimizer = make_optimizer(model, optim, lr, 0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(50, steps))
    g = torch.Generator().manual_seed(seed)
    t0, losses = time.perf_counter(), []
    for _ in range(steps):
        tokens, mask = mqar(32, length, generator=g)
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits[mask], tokens[:, 1:][mask])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(round(loss.item(), 4))
    result = {"arch": arch, "seed": seed, "steps": steps, "train_length": length,
              "parameters": count_parameters(model), "seconds": time.perf_counter() - t0,
              "loss": losses, "environment": environment(),
              "accuracy": {f"{m}x": recall_accuracy(model, m * length) for m in (1, 4, 16)}}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "recall.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


# --- the table --------------------------------------------------------------------------------

def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def _partial(metrics: dict[str, Any]) -> dict[str, Any]:
    """A run without a final validation: its seed, how far it got, its last validation."""
    steps_done = metrics.get("steps_done", len(metrics.get("train_loss", [])))
    val = metrics.get("val") or [{}]
    return {"seed": metrics.get("seed"), "steps_done": steps_done, "steps": metrics.get("steps"),
            "last_val_bits_per_byte": val[-1].get("bits_per_byte"),
            "last_val_step": val[-1].get("step")}


def table(root: str) -> str:
    """Markdown tables over ``root/<arch>-<seed>/`` runs and ``root/recall-<arch>-<seed>/``.

    A run cut short (no ``final_val_bits_per_byte``) is left out of the mean and marked
    "partial" with the step it reached; ``summary.json`` lists it under ``partial``."""
    lines = ["| model | params | val bits/byte | Python stream, off | CMS on | every level "
             "each window | Shakespeare after (CMS on) | MQAR 1× | 4× | 16× |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    summary: dict[str, Any] = {}
    for arch in ARCHITECTURES:
        runs = sorted(glob.glob(os.path.join(root, f"{arch}-*", "metrics.json")))
        if not runs:
            continue
        metrics = [json.load(open(r)) for r in runs]
        ttts = [json.load(open(os.path.join(os.path.dirname(r), "ttt.json"))) for r in runs
                if os.path.exists(os.path.join(os.path.dirname(r), "ttt.json"))]
        recalls = [json.load(open(r)) for r in
                   sorted(glob.glob(os.path.join(root, f"recall-{arch}-*", "recall.json")))]
        done = [m for m in metrics if m.get("final_val_bits_per_byte") is not None]
        partial = [_partial(m) for m in metrics if m.get("final_val_bits_per_byte") is None]
        val = [m["final_val_bits_per_byte"] for m in done]
        cell = _mean_std(val) if val else "—"
        if partial:  # cut short (--stop-after, or interrupted): not in the mean, marked
            cell += " (partial: " + ", ".join(
                f"seed {p['seed']} at step {p['steps_done']}/{p['steps']}" for p in partial) + ")"
        row = [arch, f"{metrics[0]['parameters']:,}", cell]
        entry: dict[str, Any] = {"val_bits_per_byte": val, "seeds": [m["seed"] for m in done],
                                 "partial": partial}
        for key in ("off", "cms", "every_step"):
            row.append(_mean_std([t[key]["stream"] for t in ttts]) if ttts else "—")
            entry[f"stream_{key}"] = [t[key]["stream"] for t in ttts]
        if ttts:
            before = [t["shakespeare_before"] for t in ttts]
            after = [t["cms"]["shakespeare_after"] for t in ttts]
            row.append(f"{_mean_std(after)} (was {_mean_std(before)})")
            entry["shakespeare_before"], entry["shakespeare_after_cms"] = before, after
        else:
            row.append("—")
        for m in ("1x", "4x", "16x"):
            row.append(_mean_std([r["accuracy"][m] for r in recalls]) if recalls else "—")
            entry[f"mqar_{m}"] = [r["accuracy"][m] for r in recalls]
        summary[arch] = entry
        lines.append("| " + " | ".join(row) + " |")
    with open(os.path.join(root, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return "\n".join(lines)


DEFAULTS = HopeConfig().to_dict()


# train.py's options beyond the optimizer's name and lr a variant may change, with their
# values in runs that predate them
TRAINING_OPTIONS = {"cms_lr_power": 0.0, "weight_decay": 0.01, "decay_all": False,
                    "optim_options": None, "auto_periods": None}


def ablation(root: str, reference: str = "hope") -> str:
    """A markdown table over ``root/<variant>-<seed>/`` runs: each variant's final val
    bits/byte (mean ± std over its seeds), parameters, seconds, and its difference from the
    ``reference`` variant's mean. A difference within two standard deviations of the
    reference's seeds — or with a single-seed reference, within 0.01 — is called a tie.
    Writes ``root/ablation.json``."""
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(glob.glob(os.path.join(root, "*-*", "metrics.json"))):
        variant = os.path.basename(os.path.dirname(path)).rsplit("-", 1)[0]
        metrics = json.load(open(path))
        if metrics.get("final_val_bits_per_byte") is not None:
            by_variant.setdefault(variant, []).append(metrics)
    if reference not in by_variant:
        raise ValueError(f"no finished {reference!r} runs under {root}")
    ref = [m["final_val_bits_per_byte"] for m in by_variant[reference]]
    noise = 2 * statistics.stdev(ref) if len(ref) > 1 else 0.01
    lines = [f"| variant | seeds | params | val bits/byte | Δ vs {reference} | s/run | options |",
             "|---|---:|---:|---:|---:|---:|---|"]
    summary = {}
    for variant, runs in sorted(by_variant.items(),
                                key=lambda kv: statistics.mean(
                                    m["final_val_bits_per_byte"] for m in kv[1])):
        val = [m["final_val_bits_per_byte"] for m in runs]
        delta = statistics.mean(val) - statistics.mean(ref)
        verdict = "—" if variant == reference else (
            f"{delta:+.3f} (tie)" if abs(delta) <= noise else f"{delta:+.3f}")
        first = runs[0]
        base = by_variant[reference][0]["config"]
        options = {k: v for k, v in first["config"].items()  # what the variant changes
                   if k not in ("arch", "mlp_hidden") and v != base.get(k, DEFAULTS.get(k))
                   and not (v in ((), []) and k not in base)}
        reference_run = by_variant[reference][0]
        options.update({k: first.get(k) for k in TRAINING_OPTIONS  # and how it trains
                        if first.get(k, TRAINING_OPTIONS[k])
                        != reference_run.get(k, TRAINING_OPTIONS[k])})
        label = ", ".join([first["arch"], f"{first['optim']} lr {first['lr']:g}"]
                          + [f"{k}={tuple(v) if isinstance(v, list) else v}"
                             for k, v in options.items()])
        lines.append(f"| {variant} | {len(runs)} | {first['parameters']:,} | {_mean_std(val)} | "
                     f"{verdict} | {statistics.mean(m['seconds'] for m in runs):.0f} | "
                     f"{label} |")
        summary[variant] = {"val_bits_per_byte": val, "seeds": [m["seed"] for m in runs],
                            "parameters": first["parameters"], "arch": first["arch"],
                            "optim": first["optim"], "lr": first["lr"], "config": first["config"],
                            "seconds": [m["seconds"] for m in runs], "delta": delta}
    with open(os.path.join(root, "ablation.json"), "w") as f:
        json.dump({"reference": reference, "tie_within": noise, "variants": summary}, f,
                  indent=1)
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ttt")
    p.add_argument("run")
    p.add_argument("--windows", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--fixed", type=int, nargs="*", default=[], metavar="C",
                   help="also every level at period C, for each C (issue 19's comparison)")
    p = sub.add_parser("recall")
    p.add_argument("--arch", choices=ARCHITECTURES, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--out", required=True)
    p = sub.add_parser("table")
    p.add_argument("root")
    p = sub.add_parser("ablation")
    p.add_argument("root")
    p.add_argument("--reference", default="hope")
    args = parser.parse_args(argv)
    if args.command == "ttt":
        r = ttt(args.run, args.windows, args.lr, args.fixed)
        print(json.dumps({k: (v if not isinstance(v, dict) else
                              {a: b for a, b in v.items() if a != "curve"})
                          for k, v in r.items()}))
    elif args.command == "recall":
        r = recall(args.arch, args.seed, args.out, steps=args.steps)
        print(json.dumps({k: r[k] for k in ("arch", "seed", "seconds", "accuracy")}))
    elif args.command == "ablation":
        print(ablation(args.root, args.reference))
    else:
        print(table(args.root))


if __name__ == "__main__":
    main()
