"""Compressed optimizer state (issue 18): bytes, quality and step time of each form.

    python -m benchmarks.compressed [--part bytes,quality,time] [--seeds 3]
                                    [--out benchmarks/results/compressed_cpu.json]

* **bytes** — state bytes per parameter of each optimizer × ``state_dtype`` for GPT-2 small's
  parameter shapes (124.4M parameters, tied head), measured from the live state: one tensor of
  each distinct shape (as an ``nn.Module`` of GPT-2's layout, so Muon-type optimizers split it
  with ``muon_param_groups`` as they would the model), one step, every state tensor's bytes
  counted, weighted by how often the shape occurs. Also bf16 parameters with
  ``param_rounding="kahan"``: their 2-byte compensation is counted with the state.
* **quality** — the benchmark char-GPT (``benchmarks.core``: 600 steps, batch 32, context 64),
  each optimizer at its best lr of ``benchmarks/results/cpu-full`` and ``--seeds`` seeds:
  fp32, bf16 and 8-bit state with fp32 parameters; bf16 parameters (forward and backward in
  bf16) rounded to nearest (fp32 state), with Kahan compensation and with stochastic rounding
  (bf16 state: pure bf16, no fp32 copy of anything); and, for AdamW-type, compressed state
  rounded to nearest instead of stochastically (what stochastic rounding buys). Validation
  bits/char of the trained weights, evaluated in fp32.
* **time** — CPU step time of each form as a ratio to the fp32-state step in the same run:
  the matrices of one GPT-2-small block (7.1M parameters), median of interleaved steps.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch
from torch import nn

import deepmomentum as dm
from deepmomentum import compressed as dmc

from . import core

#: (name, build(params_or_model, lr, **form) → optimizer, best char-GPT lr in cpu-full).
_ADAMW_0_1 = core._ADAMW_0_1


def _muon_groups(model):
    return dm.muon_param_groups(model, adamw_options={"lr": 3e-3})


OPTIMIZERS = {
    "preconditioned": (lambda m, lr, **kw: dm.PreconditionedMomentum(
        core._params(m), lr=lr, weight_decay=0.0, **kw), 0.01),
    "dm-muon": (lambda m, lr, **kw: dm.Muon(_muon_groups(m), lr=lr, **_ADAMW_0_1, **kw), 0.03),
    "m3": (lambda m, lr, **kw: dm.M3(_muon_groups(m), lr=lr, **_ADAMW_0_1, **kw), 0.03),
    "dmgd": (lambda m, lr, **kw: dm.DMGD(core._params(m), lr=lr, **kw), 0.9),
    "associative": (lambda m, lr, **kw: dm.AssociativeMomentum(core._params(m), lr=lr, **kw),
                    0.3),
}

#: name → (parameter dtype, optimizer options).
FORMS = {
    "fp32": (torch.float32, {}),
    "bf16 state": (torch.float32, {"state_dtype": torch.bfloat16}),
    "8-bit state": (torch.float32, {"state_dtype": "8bit"}),
    "bf16 params, nearest": (torch.bfloat16, {}),
    "bf16 params + state, kahan": (torch.bfloat16, {"param_rounding": "kahan",
                                                    "state_dtype": torch.bfloat16}),
    "bf16 params + state, stochastic": (torch.bfloat16, {"param_rounding": "stochastic",
                                                         "state_dtype": torch.bfloat16}),
}
#: Forms rounded to nearest instead of stochastically (compressed.\_ROUNDING), AdamW-type only.
NEAREST_FORMS = ("bf16 state", "8-bit state")


# --- bytes ---------------------------------------------------------------------------------


class _GPT2Shapes(nn.Module):
    """One tensor of each distinct shape of GPT-2 small (as in its checkpoint's layout: Conv1D
    weights are (in, out)), with how often each occurs."""

    COUNTS = {"wte.weight": 1, "wpe.weight": 1, "ln.weight": 25, "ln.bias": 25,
              "attn.c_attn.weight": 12, "attn.c_attn.bias": 12, "attn.c_proj.weight": 12,
              "attn.c_proj.bias": 12, "mlp.c_fc.weight": 12, "mlp.c_fc.bias": 12,
              "mlp.c_proj.weight": 12, "mlp.c_proj.bias": 12}

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.wte = nn.Embedding(50257, 768, dtype=dtype)
        self.wpe = nn.Embedding(1024, 768, dtype=dtype)
        self.ln = nn.LayerNorm(768, dtype=dtype)
        self.attn = nn.Module()
        self.attn.c_attn = _conv1d(768, 2304, dtype)
        self.attn.c_proj = _conv1d(768, 768, dtype)
        self.mlp = nn.Module()
        self.mlp.c_fc = _conv1d(768, 3072, dtype)
        self.mlp.c_proj = _conv1d(3072, 768, dtype)


def _conv1d(fan_in, fan_out, dtype):
    layer = nn.Module()
    layer.weight = nn.Parameter(torch.randn(fan_in, fan_out, dtype=dtype) * 0.02)
    layer.bias = nn.Parameter(torch.zeros(fan_out, dtype=dtype))
    return layer


def state_bytes(name: str, form: str) -> dict:
    """Bytes of optimizer state per parameter of GPT-2 small, measured from the live state."""
    dtype, options = FORMS[form]
    build, lr = OPTIMIZERS[name]
    torch.manual_seed(0)
    model = _GPT2Shapes(dtype)
    opt = build(model, lr, **options)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    named = dict(model.named_parameters())
    total_bytes = total_params = 0
    for pname, count in _GPT2Shapes.COUNTS.items():
        p = named[pname]
        held = sum(v.numel() * v.element_size() for k, v in opt.state.get(p, {}).items()
                   if k != "step" and isinstance(v, torch.Tensor))
        total_bytes += count * held
        total_params += count * p.numel()
    return {"optimizer": name, "form": form, "params": total_params,
            "bytes_per_param": total_bytes / total_params}


def bytes_table(names=("preconditioned", "dm-muon", "m3", "dmgd", "associative")) -> list:
    rows = []
    for name in names:
        for form in ("fp32", "bf16 state", "8-bit state", "bf16 params + state, kahan"):
            row = state_bytes(name, form)
            rows.append(row)
            print(f"  {name:15s} {form:28s} {row['bytes_per_param']:.3f} B/param", flush=True)
        fp32 = next(r for r in rows if r["optimizer"] == name and r["form"] == "fp32")
        for r in rows:
            if r["optimizer"] == name:
                r["ratio_to_fp32"] = r["bytes_per_param"] / fp32["bytes_per_param"]
    return rows


# --- quality -------------------------------------------------------------------------------


def lm_run(name: str, form: str, seed: int, nearest: bool = False) -> dict:
    """One char-GPT training run: validation bits/char of the trained weights (in fp32)."""
    dtype, options = FORMS[form]
    build, lr = OPTIMIZERS[name]
    data, ids, split = core.lm_data()
    torch.manual_seed(seed)
    model = core.CharGPT(data["vocab"]).to(dtype)
    opt = build(model, lr, **options)
    steps, batch, T = core.LM_SIZES[False]
    before = dmc._ROUNDING
    dmc._ROUNDING = "nearest" if nearest else "stochastic"
    try:
        t0 = time.perf_counter()
        losses = core.lm_train(model, opt, core.lm_batches(ids, split, seed, batch, T), steps)
        seconds = time.perf_counter() - t0
    finally:
        dmc._ROUNDING = before
    with torch.no_grad():
        val = core.lm_loss(model.float(), core.lm_validation_windows(ids, split, T)).item()
    finite = math.isfinite(val) and not core.diverged(losses)
    return {"optimizer": name, "form": form + (" (nearest)" if nearest else ""), "seed": seed,
            "lr": lr, "val_bits_per_char": val / math.log(2) if finite else None,
            "diverged": not finite, "seconds": seconds}


def quality_runs(seeds: int, names=("preconditioned", "dm-muon", "dmgd"),
                 shard: tuple[int, int] = (0, 1)) -> list:
    jobs = [(n, f, s, False) for n in names for f in FORMS for s in range(seeds)]
    jobs += [("preconditioned", f, s, True) for f in NEAREST_FORMS for s in range(seeds)]
    runs = []
    for i, job in enumerate(jobs):
        if i % shard[1] != shard[0]:
            continue
        run = lm_run(*job)
        runs.append(run)
        print(f"  {run['optimizer']:15s} {run['form']:36s} seed {run['seed']}: "
              f"{run['val_bits_per_char']} ({run['seconds']:.0f} s)", flush=True)
    return runs


def quality_table(runs: list) -> list:
    """Mean ± std per (optimizer, form), and the difference to the optimizer's fp32 mean."""
    rows = {}
    for r in runs:
        rows.setdefault((r["optimizer"], r["form"]), []).append(r)
    out = []
    for (name, form), rs in rows.items():
        vals = [r["val_bits_per_char"] for r in rs if r["val_bits_per_char"] is not None]
        out.append({"optimizer": name, "form": form, "seeds": len(rs),
                    "diverged": sum(r["diverged"] for r in rs),
                    "mean": statistics.fmean(vals) if vals else None,
                    "std": statistics.pstdev(vals) if len(vals) > 1 else 0.0})
    for row in out:
        base = next(r for r in out if r["optimizer"] == row["optimizer"] and r["form"] == "fp32")
        row["minus_fp32"] = None if row["mean"] is None or base["mean"] is None else \
            row["mean"] - base["mean"]
    return out


# --- step time -----------------------------------------------------------------------------


def step_times(names=("preconditioned", "dm-muon", "m3", "dmgd", "associative"),
               forms=("fp32", "bf16 state", "8-bit state", "bf16 params + state, kahan"),
               repeats: int = 9) -> list:
    """Median step time of each form, interleaved, and its ratio to fp32 state."""
    rows = []
    for name in names:
        build, lr = OPTIMIZERS[name]
        setups = {}
        for form in forms:
            dtype, options = FORMS[form]
            torch.manual_seed(0)
            model = nn.Module()
            model.attn = _conv1d(768, 2304, dtype)
            model.proj = _conv1d(768, 768, dtype)
            model.fc = _conv1d(768, 3072, dtype)
            model.out = _conv1d(3072, 768, dtype)
            opt = build(model, lr * 1e-3, **options)
            for p in model.parameters():
                p.grad = torch.randn_like(p)
            opt.step()  # state exists: time steady-state steps
            setups[form] = (opt, [])
        for _ in range(repeats):
            for form, (opt, times) in setups.items():
                t0 = time.perf_counter()
                opt.step()
                times.append(time.perf_counter() - t0)
        base = statistics.median(setups["fp32"][1])
        for form, (_, times) in setups.items():
            ms = statistics.median(times) * 1e3
            rows.append({"optimizer": name, "form": form, "median_ms": ms,
                         "ratio_to_fp32": ms / (base * 1e3)})
            print(f"  {name:15s} {form:28s} {ms:8.1f} ms  ×{ms / (base * 1e3):.2f}", flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", default="bytes,quality,time")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--shard", default="0/1", help="run jobs i with i %% n == k (k/n)")
    parser.add_argument("--out", default=os.path.join(core.RESULTS_DIR if hasattr(
        core, "RESULTS_DIR") else os.path.join(os.path.dirname(__file__), "results"),
        "compressed_cpu.json"))
    args = parser.parse_args(argv)
    parts = args.part.split(",")
    k, n = (int(x) for x in args.shard.split("/"))
    record = {"environment": core.environment(), "threads": torch.get_num_threads()}
    if "bytes" in parts:
        print("state bytes per parameter, GPT-2 small shapes:")
        record["bytes"] = bytes_table()
    if "time" in parts:
        print("CPU step time, one GPT-2-small block's matrices:")
        record["time"] = step_times()
    if "quality" in parts:
        print(f"char-GPT, {args.seeds} seeds:")
        record["runs"] = quality_runs(args.seeds, shard=(k, n))
        record["quality"] = quality_table(record["runs"])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
