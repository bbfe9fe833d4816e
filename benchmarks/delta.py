"""DeltaMomentum against AssociativeMomentum: steps to a target loss, and CPU step time.

    python -m benchmarks.delta [--seeds 3] [--out benchmarks/results/delta_cpu.json]

Tasks (each optimizer at its best lr of the same log grid, mean over seeds):

* NL's toy ψ(r, θ) = r² + k(r − θ + a·sin(ωr))² with k = 10, a = 1, ω = 3 from (−3.5, 2),
  gradients with N(0, 0.1²) noise; target ψ < 0.05; at most 3,000 steps.
* Teacher–student regression: a 16→64→1 tanh MLP learns a random 16→32→1 tanh teacher from
  batches of 32 (fresh inputs each step); target: mean squared error < 0.01 (mean of the last
  20 steps); at most 3,000 steps.

Step time: one ``step()`` over 8.4M fp32 parameters in 64 matrices of 1024 × 128 (2 threads).
"""

from __future__ import annotations

import argparse

import torch
import torch.utils.benchmark as tb

import deepmomentum as dm

from . import core

LR_GRID = {"toy": [1e-3, 3e-3, 1e-2, 3e-2, 1e-1], "regression": [3e-3, 1e-2, 3e-2, 1e-1, 3e-1]}
MOMENTUM = 0.9
OPTIMIZERS = {
    "AssociativeMomentum": lambda ps, lr: dm.AssociativeMomentum(ps, lr=lr, momentum=MOMENTUM),
    **{f"DeltaMomentum(erase={e})": (lambda e: lambda ps, lr: dm.DeltaMomentum(
        ps, lr=lr, momentum=MOMENTUM, erase=e))(e) for e in (0.1, 0.3, 0.5, 0.9)},
    "DeltaMomentum(erase=0.5, keys=input)": lambda ps, lr: dm.DeltaMomentum(
        ps, lr=lr, momentum=MOMENTUM, erase=0.5, keys="input"),
}
PSI = dict(k=10.0, a=1.0, omega=3.0)


def psi(x):
    r, theta = x[0], x[1]
    return r**2 + PSI["k"] * (r - theta + PSI["a"] * torch.sin(PSI["omega"] * r)) ** 2


def run_toy(make, lr, seed, max_steps=3000, target=0.05):
    g = torch.Generator().manual_seed(seed)
    x = torch.tensor([-3.5, 2.0], dtype=torch.float64, requires_grad=True)
    opt = make([x], lr)
    for step in range(1, max_steps + 1):
        opt.zero_grad()
        loss = psi(x)
        if not torch.isfinite(loss):
            return None
        if loss.item() < target:
            return step
        loss.backward()
        x.grad.add_(0.1 * torch.randn(2, generator=g, dtype=torch.float64))
        opt.step()
    return None


def run_regression(make, lr, seed, max_steps=3000, target=0.01):
    g = torch.Generator().manual_seed(1000 + seed)
    teacher = [torch.randn(16, 32, generator=g) / 4, torch.randn(32, 1, generator=g) / 4]
    torch.manual_seed(seed)
    student = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    opt = make(student.parameters(), lr)
    if isinstance(opt, dm.DeltaMomentum):
        opt.attach(student)
    recent = []
    for step in range(1, max_steps + 1):
        x = torch.randn(32, 16, generator=g)
        y = torch.tanh(x @ teacher[0]) @ teacher[1]
        loss = torch.nn.functional.mse_loss(student(x), y)
        if not torch.isfinite(loss):
            return None
        recent = (recent + [loss.item()])[-20:]
        if len(recent) == 20 and sum(recent) / 20 < target:
            return step
        opt.zero_grad()
        loss.backward()
        opt.step()
    return None


def steps_table(task, run, seeds):
    rows = {}
    for name, make in OPTIMIZERS.items():
        # fewest mean steps over the seeds, among the lrs where every seed reached the target
        best = core.grid(lambda lr, seed: run(make, lr, seed), LR_GRID[task], seeds)
        if best is not None:
            best = {"lr": best["lr"], "steps_mean": best["mean"], "steps_std": best["std"],
                    "steps": best["runs"]}
        rows[name] = best
        shown = "not reached at any lr" if best is None else (
            f"{best['steps_mean']:.0f} ± {best['steps_std']:.0f} steps at lr {best['lr']:g}")
        print(f"| {task} | {name} | {shown} |", flush=True)
    return rows


def step_times():
    g = torch.Generator().manual_seed(0)

    def make_params():
        ps = [torch.randn(1024, 128, generator=g).requires_grad_() for _ in range(64)]
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)
        return ps

    out = {}
    cases = {
        "AssociativeMomentum (default: torch fused)": lambda ps: dm.AssociativeMomentum(ps),
        "AssociativeMomentum (single-tensor)": lambda ps: dm.AssociativeMomentum(
            ps, foreach=False),
        "DeltaMomentum (gradient keys)": lambda ps: dm.DeltaMomentum(ps),
    }
    for name, make in cases.items():
        opt = make(make_params())
        opt.step()
        opt.step()
        timer = tb.Timer("opt.step()", globals={"opt": opt}, num_threads=torch.get_num_threads())
        out[name] = timer.adaptive_autorange(min_run_time=1.0).median
    base = out["AssociativeMomentum (default: torch fused)"]
    for name, seconds in out.items():
        print(f"| {name} | {seconds * 1e3:.2f} | {seconds / base:.2f} |")
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"ψ toy: {PSI}; momentum {MOMENTUM}; {args.seeds} seeds; lr grids {LR_GRID}\n")
    print("| task | optimizer | steps to target (best lr) |\n|---|---|---|")
    results = {"toy": steps_table("toy", run_toy, args.seeds),
               "regression": steps_table("regression", run_regression, args.seeds)}
    print("\n| step (8.4M params, 64 × 1024×128) | ms | × AssociativeMomentum |\n|---|---:|---:|")
    results["step_seconds"] = step_times()
    if args.out:
        results["env"] = {**core.environment(device="cpu"), "psi": PSI, "seeds": args.seeds}
        core.write_json(args.out, results)


if __name__ == "__main__":
    main()
