"""DMGD against AssociativeMomentum and AdamW on a toy, Permuted-Digits and a char-LM.

    python -m benchmarks.dmgd [--seeds 3] [--out benchmarks/results/dmgd_cpu.json]

Every optimizer is run at every lr of one shared log grid, over ``--seeds`` seeds, and reported
at its best lr (mean ± std):

* toy — NL's ψ(r, θ) (see benchmarks/delta.py): steps to ψ < 0.05 (≤ 3,000);
* Permuted-Digits — scikit-learn's ``load_digits``, 5 tasks (the first unpermuted, then fixed
  random pixel permutations), an MLP 64→128→10 trained 3 epochs per task (batch 32) in
  sequence; accuracy matrix R (R[i, j]: accuracy on task j after training task i), ACC (mean of
  the last row) and BWT (mean of R[T−1, j] − R[j, j], j < T−1; Lopez-Paz & Ranzato 2017);
  best lr by ACC;
* char-LM — the char MLP of examples/replace_adam.py on Python stdlib source, 800 steps;
  validation loss in nats/char; best lr by it.

Also: optimizer-state size relative to AdamW for each model and for GPT-2 small, and steps/s.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

import deepmomentum as dm

from . import core
from .delta import run_toy

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import replace_adam  # noqa: E402

LRS = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
OPTIMIZERS = {
    "AdamW": lambda ps, lr: torch.optim.AdamW(ps, lr=lr, weight_decay=0.0),
    "AssociativeMomentum": lambda ps, lr: dm.AssociativeMomentum(ps, lr=lr, momentum=0.9),
    "DMGD dot η=0.003": lambda ps, lr: dm.DMGD(ps, lr=lr, memory_lr=0.003),
    "DMGD dot η=0.01 (default)": lambda ps, lr: dm.DMGD(ps, lr=lr),
    "DMGD dot η=0.03": lambda ps, lr: dm.DMGD(ps, lr=lr, memory_lr=0.03),
    "DMGD l2 η=0.1": lambda ps, lr: dm.DMGD(ps, lr=lr, memory_lr=0.1, objective="l2"),
}


def state_numel(opt) -> int:
    return sum(v.numel() for s in opt.state.values() for v in s.values()
               if torch.is_tensor(v) and v.ndim > 0)


# --- Permuted-Digits ---------------------------------------------------------------------------


def digits_tasks(tasks=5, seed=0):
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=g)
    split = int(0.8 * len(x))
    train, test = order[:split], order[split:]
    perms = [torch.arange(64)] + [torch.randperm(64, generator=g) for _ in range(tasks - 1)]
    return [((x[train][:, p], y[train]), (x[test][:, p], y[test])) for p in perms]


def train_sequentially(model, opt, tasks, seed, epochs=3, batch=32, losses=None):
    """Train on each task in turn; return the accuracy matrix R (R[i][j]: accuracy on task j
    after training task i), ACC, BWT and the number of steps — or None if the loss became
    non-finite. ``losses``: a list that receives every step's training loss."""
    g = torch.Generator().manual_seed(seed)
    T = len(tasks)
    R = [[0.0] * T for _ in range(T)]
    steps = 0
    for i, ((xs, ys), _) in enumerate(tasks):
        for _ in range(epochs):
            order = torch.randperm(len(xs), generator=g)
            for k in range(0, len(xs), batch):
                idx = order[k:k + batch]
                loss = F.cross_entropy(model(xs[idx]), ys[idx])
                if losses is not None:
                    losses.append(loss.item())
                if not torch.isfinite(loss):
                    return None
                opt.zero_grad()
                loss.backward()
                opt.step()
                steps += 1
        with torch.no_grad():
            for j, (_, (xt, yt)) in enumerate(tasks):
                R[i][j] = (model(xt).argmax(1) == yt).float().mean().item()
    return {"R": R, "ACC": sum(R[-1]) / T,
            "BWT": sum(R[-1][j] - R[j][j] for j in range(T - 1)) / (T - 1), "steps": steps}


def run_digits(make, lr, seed, tasks, epochs=3, batch=32):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                torch.nn.Linear(128, 10))
    opt = make(model.parameters(), lr)
    start = time.perf_counter()
    out = train_sequentially(model, opt, tasks, seed, epochs, batch)
    if out is None:
        return None
    return {**out, "steps_per_s": out["steps"] / (time.perf_counter() - start),
            "state_numel": state_numel(opt),
            "params": sum(p.numel() for p in model.parameters())}


# --- char-LM -----------------------------------------------------------------------------------


def run_char(make, lr, seed, data, steps=800):
    train, val, vocab = data
    _, val_loss, rate = replace_adam.train(lambda ps: make(ps, lr), train, val, vocab, steps,
                                           seed=seed)
    return None if not math.isfinite(val_loss) else {"val_loss": val_loss, "steps_per_s": rate}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = range(args.seeds)
    results = {"lrs": LRS, "toy": {}, "digits": {}, "char": {}}

    print(f"lr grid {LRS}; {args.seeds} seeds\n")
    print("| optimizer | ψ toy steps (lr) | Permuted-Digits ACC (lr) | BWT | char-LM val "
          "(lr) | state / AdamW (digits MLP) | steps/s (char) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    tasks = digits_tasks()
    text = replace_adam.load_text()
    chars = sorted(set(text))
    encoded = torch.tensor([chars.index(c) for c in text])
    split = int(0.9 * len(encoded))
    char_data = (encoded[:split], encoded[split:], len(chars))
    adamw_state = None
    for name, make in OPTIMIZERS.items():
        row = {}
        # toy: fewest mean steps
        row["toy"] = core.grid(lambda lr, s: run_toy(make, lr, s), LRS, seeds)
        # digits: best mean ACC
        best = core.grid(lambda lr, s: run_digits(make, lr, s, tasks), LRS, seeds,
                         metric=lambda r: r["ACC"], maximize=True)
        if best is not None:
            runs = best["runs"]
            bwt = core.summarize([r["BWT"] for r in runs])
            best = {"lr": best["lr"], "ACC": best["mean"], "ACC_std": best["std"],
                    "BWT": bwt[0], "BWT_std": bwt[1], "R_seed0": runs[0]["R"],
                    "state_numel": runs[0]["state_numel"], "params": runs[0]["params"],
                    "steps_per_s": core.summarize([r["steps_per_s"] for r in runs])[0]}
        row["digits"] = best
        # char-LM: best mean validation loss
        best = core.grid(lambda lr, s: run_char(make, lr, s, char_data), LRS, seeds,
                         metric=lambda r: r["val_loss"])
        if best is not None:
            best = {"lr": best["lr"], "val": best["mean"], "val_std": best["std"],
                    "steps_per_s": core.summarize([r["steps_per_s"] for r in best["runs"]])[0]}
        row["char"] = best
        results[name] = row
        if name == "AdamW" and row["digits"]:
            adamw_state = row["digits"]["state_numel"]

        def show(entry, fmt):
            return core.DIVERGED if entry is None else fmt(entry)

        toy = show(row["toy"], lambda e: f"{e['mean']:.0f} ± {e['std']:.0f} ({e['lr']:g})")
        acc = show(row["digits"], lambda e: f"{e['ACC']:.3f} ± {e['ACC_std']:.3f} ({e['lr']:g})")
        bwt = show(row["digits"], lambda e: f"{e['BWT']:+.3f} ± {e['BWT_std']:.3f}")
        char = show(row["char"], lambda e: f"{e['val']:.3f} ± {e['val_std']:.3f} ({e['lr']:g})")
        ratio = "n/a" if not (row["digits"] and adamw_state) else \
            f"{row['digits']['state_numel'] / adamw_state:.2f}"
        rate = "n/a" if not row["char"] else f"{row['char']['steps_per_s']:.0f}"
        print(f"| {name} | {toy} | {acc} | {bwt} | {char} | {ratio} | {rate} |", flush=True)

    if args.out:
        results["env"] = core.environment(device="cpu")
        core.write_json(args.out, results)


if __name__ == "__main__":
    main()
