"""What the distributed tests train: a small model whose parameters cover FSDP2's layouts, the
optimizer settings, and the spawn helper (gloo on the CPU). Shared by test_distributed.py and
test_dcp.py; each worker returns plain tensors, which the tests compare in the parent."""

from __future__ import annotations

import datetime
import os
import tempfile
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

import deepmomentum as dm

STEPS = 10
BATCH = 8  # the global batch: every world size (1, 2, 4) splits it evenly


class Net(nn.Module):
    """Parameters whose Shard(0) is uneven (5 rows over 2 or 4 ranks), empty on some ranks
    (1 row), 1-D (biases) and 3-D (``conv``); wide (``a``, ``c``) and tall (``b``)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 5)
        self.conv = nn.Parameter(torch.randn(5, 3, 2) * 0.4)
        self.b = nn.Linear(6, 8)
        self.c = nn.Linear(8, 1)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = torch.einsum("bi,ijk->bjk", h, self.conv).flatten(1)
        return self.c(torch.tanh(self.b(torch.tanh(h))))


def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(BATCH, 6, generator=g), torch.randn(BATCH, 1, generator=g)


def muon_groups(model, **options):
    return dm.muon_param_groups(model, muon_options=options)


F32 = dict(ns_dtype=torch.float32)  # compared within float32 tolerance

#: name → (optimizer factory on a model, whether it needs attach()). Representative settings of
#: every optimizer: defaults, the options whose stages differ, update_period > 1.
SETTINGS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "AssociativeMomentum": lambda m: dm.AssociativeMomentum(m.parameters(), lr=0.05),
    "AssociativeMomentum-nesterov-period2": lambda m: dm.AssociativeMomentum(
        m.parameters(), lr=0.05, nesterov=True, weight_decay=0.01, update_period=2),
    "DeltaMomentum": lambda m: dm.DeltaMomentum(m.parameters(), lr=0.05, erase=0.5),
    "DeltaMomentum-input": lambda m: dm.DeltaMomentum(
        m.parameters(), lr=0.05, erase=0.5, keys="input", key_samples=64).attach(m),
    "PreconditionedMomentum": lambda m: dm.PreconditionedMomentum(m.parameters(), lr=0.01),
    "PreconditionedMomentum-value-period2": lambda m: dm.PreconditionedMomentum(
        m.parameters(), lr=0.01, precondition="value", update_period=2, accumulate="mean"),
    # update_period="auto": every rank must take the same decision, from squared norms summed
    # over the shards (a rank judging its own shard alone would update on other calls).
    "PreconditionedMomentum-auto": lambda m: dm.PreconditionedMomentum(
        m.parameters(), lr=0.01, update_period="auto", max_period=4, accumulate="mean"),
    "DMGD": lambda m: dm.DMGD(m.parameters(), lr=0.05, hidden=3, memory_lr=0.1),
    # hidden 5: a.weight's memory_B (5 × 6) has the parameter's shape, and stays replicated.
    "DMGD-hidden5": lambda m: dm.DMGD(m.parameters(), lr=0.05, hidden=5, memory_lr=0.1),
    "DMGD-preconditioned-ns": lambda m: dm.DMGD(
        m.parameters(), lr=0.02, hidden=3, memory_lr=0.1, values="preconditioned",
        output="newton_schulz", ns_dtype=torch.float32),
    "Muon": lambda m: dm.Muon(muon_groups(m), lr=0.02, **F32),
    "Muon-bf16-ns-period2": lambda m: dm.Muon(muon_groups(m, update_period=2), lr=0.02),
    # The normalized form: per-row state sharded with its parameter's rows, and the norm
    # match's squared norms summed over the shard group.
    "M3": lambda m: dm.M3(muon_groups(m), lr=0.02, chunk=3, **F32),
    # eps: the literal form divides by √V + ε; at the default a last-bit change of the
    # gradient (the reduce-scatter's order of summation) is amplified by 1/|g| and no
    # tolerance holds.
    "M3-literal": lambda m: dm.M3(muon_groups(m), lr=0.01, chunk=3, eps=1e-2, form="literal",
                                  **F32),
}


#: Settings trained on a bfloat16 model (fp32 state; bf16 gradients, so the reduce-scatter's
#: bf16 rounding differs from one process's and the tolerance is bf16's).
BF16 = {"AssociativeMomentum-bf16": lambda m: dm.AssociativeMomentum(m.parameters(), lr=0.05),
        "Muon-bf16": lambda m: dm.Muon(muon_groups(m), lr=0.02, **F32)}
SETTINGS.update(BF16)


def dtype_of(name: str) -> torch.dtype:
    return torch.bfloat16 if name in BF16 else torch.float32


def make(name: str, model: nn.Module) -> torch.optim.Optimizer:
    return SETTINGS[name](model)


def train(model: nn.Module, opt, steps: range, rank: int = 0, world: int = 1) -> None:
    """Steps on this rank's slice of the global batch (mean loss: FSDP's averaged gradient is
    the whole batch's)."""
    per = BATCH // world
    for step in steps:
        x, y = data(step)
        dtype = next(model.parameters()).dtype
        x, y = (t[rank * per:(rank + 1) * per].to(dtype) for t in (x, y))
        opt.zero_grad()
        (model(x) - y).pow(2).mean().backward()
        opt.step()


def whole(t: Any) -> Any:
    """A DTensor's whole tensor (a collective), anything else as it is."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        return t.full_tensor()
    return t.clone() if isinstance(t, torch.Tensor) else t


def snapshot(model: nn.Module, opt) -> dict[str, Any]:
    """Whole parameters and whole optimizer state by parameter name (every rank calls it)."""
    names = {id(p): n for n, p in model.named_parameters()}
    params = {n: whole(p.detach()) for n, p in model.named_parameters()}
    state = {}
    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in sorted(opt.state.get(p, {}).items()):
                state[f"{names[id(p)]}.{key}"] = whole(value)
    return {"params": params, "state": state}


def dcp_save(model: nn.Module, opt, path: str) -> None:
    """Save model and optimizer with torch.distributed.checkpoint (every rank calls it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)


def dcp_load(model: nn.Module, opt, path: str) -> None:
    """Load what :func:`dcp_save` wrote into a fresh model and optimizer, resharded to this
    world (every rank calls it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def spawn(worker: Callable, world: int, *args) -> list[Any]:
    """Run ``worker(rank, world, *args)`` in ``world`` gloo processes; their return values."""
    with tempfile.TemporaryDirectory() as out:
        torch.multiprocessing.spawn(_run, args=(world, out, worker, args), nprocs=world)
        return [torch.load(os.path.join(out, f"{r}.pt"), weights_only=False)
                for r in range(world)]


def _run(rank: int, world: int, out: str, worker: Callable, args: tuple) -> None:
    dist.init_process_group("gloo", init_method="file://" + os.path.join(out, "rendezvous"),
                            rank=rank, world_size=world, timeout=datetime.timedelta(seconds=90))
    try:
        torch.set_num_threads(1)
        result = worker(rank, world, *args)
        torch.save(result, os.path.join(out, f"{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while a peer's last transfer is in flight
    finally:
        dist.destroy_process_group()
    _exit_now()


def _exit_now() -> None:
    """End a spawned rank without interpreter finalization: gloo's worker threads can still
    hold tensors then, and freeing them takes the GIL of a dying interpreter — SIGABRT
    ("terminate called without an active exception"; seen once in CI at exit, after every
    result was written; pytorch/pytorch#179291 describes the mechanism)."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
