"""Optimizers by name, tasks, and the fair-comparison runner behind ``python -m benchmarks``.

Every optimizer is run at every lr of its grid (grids have the same length for all) over the
seeds; each task reports, at the optimizer's best lr, the final loss (mean ± std), steps and
seconds to the task's target, and its own extras (the continual-learning accuracy matrix).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import deepmomentum as dm

# --- optimizers ------------------------------------------------------------------------------


class _Pair:
    """Two optimizers stepped as one (torch's Muon for matrices + AdamW for the rest)."""

    def __init__(self, *optimizers):
        self.optimizers = [o for o in optimizers if o is not None]

    def step(self):
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none=True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)


def _torch_muon(model, lr):
    groups = dm.muon_param_groups(model)
    matrices = [p for g in groups if g["use_muon"] for _, p in g["params"]]
    others = [p for g in groups if not g["use_muon"] for _, p in g["params"]]
    return _Pair(torch.optim.Muon(matrices, lr=lr) if matrices else None,
                 torch.optim.AdamW(others, lr=3e-3, weight_decay=0.0) if others else None)


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    build: Callable[[nn.Module, float], Any]  # (model, lr) -> optimizer
    lrs: tuple[float, ...]


def _params(model):
    return [p for p in model.parameters() if p.requires_grad]


#: The AdamW part of dm.Muon/M3 as deepmomentum 0.1.0 defaulted it (the defaults are
#: torch.optim.AdamW's now): pinned so the published results stay what they measured.
_ADAMW_0_1 = dict(adamw_betas=(0.9, 0.95), adamw_eps=1e-10, adamw_weight_decay=0.0)


#: The fair protocol's grids (issue 17): five log-spaced lrs (×3 and ×3.3 steps) for every
#: optimizer, extended past an edge by :func:`run_task` until the best lr is interior.
_MOMENTUM_GRID = (0.003, 0.01, 0.03, 0.1, 0.3)
_ADAM_GRID = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
#: How many lrs :func:`run_task` may add beyond a grid's edge (each one grid step further).
MAX_EXTENSIONS = 3

OPTIMIZERS = {spec.name: spec for spec in (
    OptimizerSpec("sgd", lambda m, lr: torch.optim.SGD(_params(m), lr=lr, momentum=0.9),
                  _MOMENTUM_GRID),
    OptimizerSpec("adamw", lambda m, lr: torch.optim.AdamW(_params(m), lr=lr, weight_decay=0.0),
                  _ADAM_GRID),
    OptimizerSpec("muon", _torch_muon, _MOMENTUM_GRID),
    OptimizerSpec("associative", lambda m, lr: dm.AssociativeMomentum(_params(m), lr=lr),
                  _MOMENTUM_GRID),
    OptimizerSpec("delta", lambda m, lr: dm.DeltaMomentum(_params(m), lr=lr),
                  _MOMENTUM_GRID),
    # weight_decay=0 as the adamw baseline (and deepmomentum 0.1.0's default)
    OptimizerSpec("preconditioned", lambda m, lr: dm.PreconditionedMomentum(
        _params(m), lr=lr, weight_decay=0.0), _ADAM_GRID),
    OptimizerSpec("dmgd", lambda m, lr: dm.DMGD(_params(m), lr=lr), _MOMENTUM_GRID),
    OptimizerSpec("dm-muon", lambda m, lr: dm.Muon(
        dm.muon_param_groups(m, adamw_options={"lr": 3e-3}), lr=lr, **_ADAMW_0_1),
                  _MOMENTUM_GRID),
    OptimizerSpec("m3", lambda m, lr: dm.M3(
        dm.muon_param_groups(m, adamw_options={"lr": 3e-3}), lr=lr, **_ADAMW_0_1),
                  _MOMENTUM_GRID),
    # Algorithm 1 to the letter, with deepmomentum 0.1's defaults (not in the default set:
    # it blows up at every lr; its γ is ~γ/|G| per entry, hence the grid far below Muon's)
    OptimizerSpec("m3-literal", lambda m, lr: dm.M3(
        dm.muon_param_groups(m, adamw_options={"lr": 3e-3}), lr=lr, form="literal",
        decays=(0.95, 0.999, 0.9), alpha=1.0, chunk=16, weight_decay=0.0, **_ADAMW_0_1),
                  (1e-5, 3e-5, 1e-4, 3e-4, 1e-3)),
)}


def optimizer_spec(name: str, lrs: Optional[tuple[float, ...]] = None) -> OptimizerSpec:
    """A registered name, or any optimizer class by import path ("torch.optim.RMSprop")."""
    if name in OPTIMIZERS:
        spec = OPTIMIZERS[name]
    elif "." in name:
        module, _, attr = name.replace(":", ".").rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"Unknown optimizer {name!r}: cannot import it ({error})") from None
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
            raise ValueError(f"Unknown optimizer {name!r}: not a torch.optim.Optimizer")
        spec = OptimizerSpec(name, lambda m, lr: cls(_params(m), lr=lr), (1e-3, 3e-3, 1e-2))
    else:
        raise ValueError(f"Unknown optimizer {name!r}; choose from {sorted(OPTIMIZERS)} or give "
                         "an import path such as torch.optim.RMSprop")
    if lrs is not None:
        if not lrs or any(not (isinstance(lr, float) and math.isfinite(lr) and lr > 0)
                          for lr in lrs):
            raise ValueError(f"Invalid lr grid {lrs!r}: lrs must be positive finite numbers")
        spec = OptimizerSpec(spec.name, spec.build, tuple(lrs))
    return spec


def parse_lrs(text: str) -> tuple[float, ...]:
    try:
        lrs = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"Invalid lr grid {text!r}: give comma-separated positive numbers") \
            from None
    return optimizer_spec("sgd", lrs).lrs  # validates


# --- tasks -----------------------------------------------------------------------------------


class Point(nn.Module):
    """A bare parameter vector as a 'model' (toy problems)."""

    def __init__(self, start):
        super().__init__()
        self.x = nn.Parameter(torch.tensor(start, dtype=torch.float64))


#: A run whose training loss exceeds this multiple of its first loss (or becomes non-finite)
#: has diverged: it is ``diverged`` in the records, never a task's best lr, and drawn as such.
#: Measured over every optimizer × grid lr of the four training tasks (quick sizes, seed 0):
#: the runs that did not blow up peak at ≤ 3.7× their first loss (Rosenbrock, DMGD at 1e-3,
#: which reaches its target), the ones that did at ≥ 4e4× (M3 on Permuted-Digits at every lr of
#: its grid: ≥ 3.9e4× with a finite loss, which a non-finite test alone never saw).
DIVERGENCE_FACTOR = 10.0


def diverged(losses: list[float]) -> bool:
    """Whether a loss curve diverged: a non-finite loss, or one above
    :data:`DIVERGENCE_FACTOR` × the first."""
    if not losses:
        return False
    if not all(math.isfinite(v) for v in losses):
        return True
    return max(losses) > DIVERGENCE_FACTOR * abs(losses[0])


@dataclass
class Run:
    losses: list[float]
    seconds: float
    target: Optional[float]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def diverged(self) -> bool:
        """Its training loss diverged (:func:`diverged`) or its final metric is not finite."""
        final = self.extra.get("final_metric", self.losses[-1] if self.losses else math.inf)
        return diverged(self.losses) or not math.isfinite(final)

    def steps_to_target(self) -> Optional[int]:
        if self.target is None:
            return None
        return next((i + 1 for i, v in enumerate(self.losses) if v <= self.target), None)


def _toy(loss_fn, start, steps, target, noise=0.0):
    def run(spec, lr, seed, quick):
        g = torch.Generator().manual_seed(seed)
        model = Point(start)
        opt = spec.build(model, lr)
        losses, t0 = [], time.perf_counter()
        for _ in range(steps // (4 if quick else 1)):
            opt.zero_grad()
            loss = loss_fn(model.x)
            losses.append(loss.item())
            if not math.isfinite(losses[-1]):
                break
            loss.backward()
            if noise:
                model.x.grad.add_(noise * torch.randn(model.x.shape, generator=g,
                                                      dtype=torch.float64))
            opt.step()
        return Run(losses, time.perf_counter() - t0, target)

    return run


def _rosenbrock(x):
    return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2


_H = torch.linspace(0.1, 2.0, 32, dtype=torch.float64)


def _quadratic(x):
    return 0.5 * (_H * x**2).sum()


def _psi(x, k=10.0, a=1.0, omega=3.0):
    r, theta = x[0], x[1]
    return r**2 + k * (r - theta + a * torch.sin(omega * r)) ** 2


def _digits(spec, lr, seed, quick):
    from .dmgd import digits_tasks, train_sequentially

    tasks = digits_tasks(tasks=3 if quick else 5)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = spec.build(model, lr)
    t0 = time.perf_counter()
    losses: list[float] = []  # the training loss of every step, for divergence and curves
    out = train_sequentially(model, opt, tasks, seed, epochs=1 if quick else 3, losses=losses)
    if out is None:
        return Run(losses or [math.inf], time.perf_counter() - t0, None,
                   {"final_metric": math.inf})
    return Run(losses, time.perf_counter() - t0, None,
               {"R": out["R"], "ACC": out["ACC"], "BWT": out["BWT"],
                "final_metric": out["ACC"]})


class CharGPT(nn.Module):
    """A small causal transformer over characters (pre-norm, learned positions)."""

    def __init__(self, vocab, context=64, width=64, layers=2, heads=4):
        super().__init__()
        self.context = context
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(context, width)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0,
                                           batch_first=True, norm_first=True,
                                           activation="gelu")
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, idx):  # (B, T) -> (B, T, vocab)
        T = idx.shape[1]
        h = self.tok(idx) + self.pos(torch.arange(T, device=idx.device))  # (B, T, C)
        mask = nn.Transformer.generate_square_subsequent_mask(T, device=idx.device)
        return self.head(self.norm(self.blocks(h, mask=mask, is_causal=True)))


_CORPUS: dict[str, Any] = {}


def corpus(name="shakespeare"):
    if name not in _CORPUS:
        from .data import load_corpus, sha256

        used, data = load_corpus(name)
        text = data.decode("utf-8", errors="replace")
        chars = sorted(set(text))
        ids = torch.tensor([chars.index(c) for c in text[:2_000_000]], dtype=torch.long) \
            if len(chars) < 256 else None
        _CORPUS[name] = {"name": used, "sha256": sha256(data), "ids": ids,
                         "vocab": len(chars)}
    return _CORPUS[name]


#: The LM task's (steps, batch, context) with ``quick`` (True) and without.
LM_SIZES = {True: (150, 16, 64), False: (600, 32, 64)}


def lm_data(corpus_name="shakespeare"):
    """The LM task's corpus record, its ids and the train/validation split (90%)."""
    data = corpus(corpus_name)
    return data, data["ids"], int(0.9 * len(data["ids"]))


def lm_batches(ids, split, seed, batch, T):
    """The LM task's training windows, ``(batch, T + 1)`` each, from ``ids[:split]``: an endless
    stream drawn by its own generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    while True:
        start = torch.randint(split - T - 1, (batch,), generator=g)
        yield ids[start[:, None] + torch.arange(T + 1)]


def lm_validation_windows(ids, split, T, count=64):
    """The LM task's fixed validation windows from ``ids[split:]``."""
    gv = torch.Generator().manual_seed(1234)
    start = split + torch.randint(len(ids) - split - T - 1, (count,), generator=gv)
    return ids[start[:, None] + torch.arange(T + 1)]


def lm_loss(model, window):
    """Mean next-character cross-entropy of ``model`` on ``window`` (rows of T + 1 ids)."""
    window = window.to(next(model.parameters()).device)
    return F.cross_entropy(model(window[:, :-1]).flatten(0, 1), window[:, 1:].flatten())


def lm_train(model, opt, batches, steps, rows=slice(None), mean=None):
    """The LM task's training loop: ``steps`` steps, each on rows ``rows`` of ``next(batches)``
    (all of them in one process; under FSDP2 a rank's equal share, so that FSDP's averaged
    gradient is the whole batch's). Returns each step's loss — ``mean(loss)``, by default
    ``loss.item()`` (under FSDP2: its mean over the ranks) — up to the first non-finite one."""
    losses = []
    for _ in range(steps):
        loss = lm_loss(model, next(batches)[rows])
        losses.append(loss.item() if mean is None else mean(loss))
        if not math.isfinite(losses[-1]):
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses


def _lm(spec, lr, seed, quick, corpus_name="shakespeare"):
    data, ids, split = lm_data(corpus_name)
    torch.manual_seed(seed)
    model = CharGPT(data["vocab"])
    opt = spec.build(model, lr)
    steps, batch, T = LM_SIZES[quick]
    t0 = time.perf_counter()
    losses = lm_train(model, opt, lm_batches(ids, split, seed, batch, T), steps)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        val = lm_loss(model, lm_validation_windows(ids, split, T))
    val_bpc = val.item() / math.log(2)
    return Run(losses, seconds, None, {"val_bits_per_char": val_bpc, "final_metric": val_bpc,
                                       "corpus": data["name"], "corpus_sha256": data["sha256"]})


def _throughput(spec, lr, seed, quick):
    """Step time on 8.4M (quick: 1M) fp32 parameters in 64 matrices."""
    rows = 128 if quick else 1024
    model = nn.ParameterList([nn.Parameter(torch.randn(rows, 128, generator=torch.Generator()
                                                       .manual_seed(i))) for i in range(64)])
    opt = spec.build(model, lr)
    for p in model:
        p.grad = torch.randn_like(p)
    opt.step()
    times = []
    for _ in range(3 if quick else 10):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1e3
    return Run([ms], sum(times), None, {"ms_per_step": ms, "final_metric": ms,
                                        "params": 64 * rows * 128})


@dataclass(frozen=True)
class Task:
    name: str
    run: Callable
    description: str
    metric: str = "final loss"
    lr_scale: float = 1.0  # every optimizer's grid is multiplied by it (same for all)
    maximize: bool = False  # the best lr has the largest metric (ACC), else the smallest
    tunes_lr: bool = True  # False: one run per seed at the middle of the grid (step time)


TASKS = {t.name: t for t in (
    Task("rosenbrock", _toy(_rosenbrock, [-1.5, 2.0], 2000, 1e-2),
         "Rosenbrock from (−1.5, 2); target 1e-2", lr_scale=0.1),
    Task("quadratic", _toy(_quadratic, [3.0] * 32, 1000, 1e-2, noise=0.1),
         "noisy quadratic, 32 dims, curvatures 0.1–2, gradient noise 0.1; target 1e-2"),
    Task("psi", _toy(_psi, [-3.5, 2.0], 3000, 0.05, noise=0.1),
         "NL's ψ(r,θ) = r² + 10(r − θ + sin 3r)² from (−3.5, 2); target 0.05", lr_scale=0.1),
    Task("digits", _digits, "Permuted-Digits continual learning (ACC, BWT, matrix R)",
         "ACC", maximize=True),
    Task("lm", _lm, "char-level GPT (2 layers, width 64, context 64) on Shakespeare",
         "val bits/char"),
    Task("throughput", _throughput, "optimizer step time on 64 fp32 matrices", "ms/step",
         tunes_lr=False),
)}


def task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}; choose from {sorted(TASKS)}")
    return TASKS[name]


def task_lrs(task_name: str, spec: OptimizerSpec) -> list[float]:
    """The lrs ``spec`` runs at on the task: its grid × the task's scale, or only the middle of
    the grid where the task has no lr to tune (step time)."""
    t = task(task_name)
    lrs = [lr * t.lr_scale for lr in spec.lrs]
    return lrs if t.tunes_lr else [lrs[len(lrs) // 2]]


# --- the runner ------------------------------------------------------------------------------


def git_sha(tree: Optional[str] = None) -> str:
    """The commit checked out in the git tree ``tree`` (the current directory's by default);
    "" where there is none."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, cwd=tree).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def environment(device: Optional[str] = None) -> dict[str, Any]:
    """The stamp every benchmark's JSON carries: git sha, torch/triton/deepmomentum versions,
    device, dtype, python, date. ``device`` ("cpu" or "cuda") names the device the benchmark ran
    on; by default the GPU where one is available, else the CPU and its thread count."""
    sha = git_sha()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    on_gpu = torch.cuda.is_available() if device is None else device == "cuda"
    device = torch.cuda.get_device_name() if on_gpu else \
        f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    return {"git_sha": sha, "torch": torch.__version__, "triton": triton_version,
            "deepmomentum": dm.__version__, "device": device, "dtype": "float32",
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M")}


def write_json(path: Optional[str], result: Any) -> None:
    """A benchmark's result as indented JSON at ``path`` (its folder made); nothing where
    ``path`` is empty."""
    if not path:
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def cuda_unavailable(script: str) -> Optional[int]:
    """``None`` where a GPU script can run its compiled kernels; otherwise it says why and gives
    the exit code: 0 without a CUDA device (nothing to run, not a failure), 1 with
    ``TRITON_INTERPRET`` set (the interpreter would be timed)."""
    if not torch.cuda.is_available():
        print(f"{script} needs a CUDA GPU; none is available, nothing run.")
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("TRITON_INTERPRET is set: unset it to run the compiled kernels on the GPU.")
        return 1
    return None


def _stats(values):
    """Mean and population std of the values that are not None; (None, None) where none is
    left or one is not finite (a diverged seed's metric: no number to average)."""
    values = [v for v in values if v is not None]
    if not values or not all(math.isfinite(v) for v in values):
        return None, None
    return statistics.fmean(values), (statistics.pstdev(values) if len(values) > 1 else 0.0)


#: What :func:`summarize` reports for a setting where a seed diverged.
DIVERGED = "diverged"


def summarize(values):
    """Mean ± std over the seeds of one setting: ``(mean, std)`` (population std; 0 for one
    seed), or :data:`DIVERGED` when a run diverged — gave None (diverged, or never reached its
    target) or a non-finite value — which is reported as such, never averaged in."""
    values = list(values)
    if any(v is None or not math.isfinite(v) for v in values):
        return DIVERGED
    return _stats(values)


def grid(run, lrs, seeds, metric=None, maximize=False):
    """The lr × seed sweep of the single-purpose scripts (delta, dmgd, cms) and its best lr.

    ``run(lr, seed)`` is called for every lr (outer) and seed (``seeds``: a count or the seeds)
    and returns the run's result, or None where it diverged or missed its target;
    ``metric(result)`` is the number compared (default: the result itself). Each lr is
    summarized over its seeds (:func:`summarize`); lrs with a diverged seed are out, and of the
    others the smallest mean wins (the largest with ``maximize``; on a tie the first lr).
    Returns ``{"lr", "mean", "std", "runs"}`` (``runs``: the seeds' results at that lr), or
    None where every lr diverged."""
    seeds = range(seeds) if isinstance(seeds, int) else list(seeds)
    best = None
    for lr in lrs:
        runs = [run(lr, seed) for seed in seeds]
        summary = summarize(None if r is None else (r if metric is None else metric(r))
                            for r in runs)
        if summary == DIVERGED or summary[0] is None:  # a diverged seed, or no seeds
            continue
        mean, std = summary
        if best is None or (mean > best["mean"] if maximize else mean < best["mean"]):
            best = {"lr": lr, "mean": mean, "std": std, "runs": runs}
    return best


def _mean_matrix(values):
    """Elementwise mean of equally shaped lists of lists (the seeds' accuracy matrices R)."""
    if not values or any(len(v) != len(values[0]) or
                         any(len(row) != len(r0) for row, r0 in zip(v, values[0]))
                         for v in values):
        return None
    return [[statistics.fmean(v[i][j] for v in values) for j in range(len(values[0][i]))]
            for i in range(len(values[0]))]


def _best_index(t: Task, by_lr: list[dict]) -> Optional[int]:
    """The index of the best lr among those where no seed diverged (None: all diverged)."""
    alive = [i for i, r in enumerate(by_lr) if not r["diverged"]]
    if not alive:
        return None
    return min(alive, key=lambda i: -by_lr[i]["final_mean"] if t.maximize
               else by_lr[i]["final_mean"])


def run_task(task_name, spec, seeds, quick, progress=None):
    """Every lr × seed; returns the record of the best lr (by the task's final metric).

    The fair protocol: where the best lr is the grid's smallest or largest (or every lr
    diverged: then below the smallest), one more lr a grid step beyond that edge is run, up
    to :data:`MAX_EXTENSIONS` times, so that the best is interior; the record lists the lrs
    added (``extended``) and whether the best is interior (``interior``).

    ``progress(task, optimizer, lr, seed)`` is called before each run."""
    t = task(task_name)
    by_lr: list[dict] = []
    lrs = task_lrs(task_name, spec)
    extended: list[float] = []
    pending = list(lrs)
    while pending:
        lr = pending.pop(0)
        by_lr.append(_run_lr(t, task_name, spec, lr, seeds, quick, progress))
        if pending or not t.tunes_lr or len(by_lr) < 2 or len(extended) >= MAX_EXTENSIONS:
            continue
        order = sorted(range(len(by_lr)), key=lambda i: by_lr[i]["lr"])
        best = _best_index(t, by_lr)
        low, high = by_lr[order[0]]["lr"], by_lr[order[-1]]["lr"]
        if best is None or best == order[0]:
            step = by_lr[order[1]]["lr"] / low
            pending.append(low / step)
        elif best == order[-1]:
            step = high / by_lr[order[-2]]["lr"]
            pending.append(high * step)
        if pending:
            extended.append(pending[0])
    by_lr.sort(key=lambda r: r["lr"])
    best_index = _best_index(t, by_lr)
    # diverged lrs rank last; then the smallest metric (the largest where t.maximize)
    best = by_lr[best_index] if best_index is not None else by_lr[0]
    interior = best_index is not None and 0 < best_index < len(by_lr) - 1
    return {"task": task_name, "optimizer": spec.name, "metric": t.metric, "seeds": seeds,
            "maximize": t.maximize, "tunes_lr": t.tunes_lr,
            "lrs": [r["lr"] for r in by_lr], "grid": lrs, "extended": extended,
            "interior": interior, "best": best, "by_lr": [
                {k: v for k, v in r.items() if k not in ("curve", "curve_steps", "extra")}
                for r in by_lr]}


def _run_lr(t, task_name, spec, lr, seeds, quick, progress) -> dict:
    """Every seed of one lr: its record (mean ± std of the final metric, divergence, …)."""
    runs = []
    for seed in range(seeds):
        if progress:
            progress(task_name, spec.name, lr, seed)
        runs.append(t.run(spec, lr, seed, quick))
    finals = [r.extra.get("final_metric", r.losses[-1] if r.losses else math.inf)
              for r in runs]
    gone = [seed for seed, r in enumerate(runs) if r.diverged]
    mean, std = _stats(finals) if not gone else (math.inf, None)
    steps = [r.steps_to_target() for r in runs]
    reached = all(s is not None for s in steps)
    # seconds to target: the run's time per step × the steps it took
    seconds = [r.seconds * s / len(r.losses) for r, s in zip(runs, steps)] if reached \
        else None
    stride = max(1, len(runs[0].losses) // 200)
    extra_mean = {k: _stats([r.extra[k] for r in runs])[0] for k in runs[0].extra
                  if isinstance(runs[0].extra[k], (int, float))}
    if isinstance(runs[0].extra.get("R"), list):  # the accuracy matrix, mean over seeds
        extra_mean["R"] = _mean_matrix([r.extra.get("R") for r in runs])
    return {
        "lr": lr, "final_mean": mean, "final_std": std, "diverged": bool(gone),
        "diverged_seeds": gone,
        "steps_to_target": _stats(steps) if reached else None,
        "seconds_to_target": _stats(seconds) if seconds else None,
        # seed 0's losses every ``stride`` steps, and their step numbers (losses[i] is
        # counted as step i + 1, as in steps_to_target)
        "curve": runs[0].losses[::stride],
        "curve_steps": list(range(1, len(runs[0].losses) + 1, stride)),
        "extra": {k: v for k, v in runs[0].extra.items() if k != "final_metric"},
        "extra_mean": extra_mean,
    }

