"""The benchmarks' LM task on several processes: FSDP2 under torchrun.

    torchrun --nproc-per-node 2 -m benchmarks.lm_distributed --optim dm-muon --steps 150 \\
        --out runs/lm-2.json
    python -m benchmarks.lm_distributed --optim dm-muon --steps 150 --out runs/lm-1.json

It trains the task's model (``core.CharGPT``) on the task's data (``core.lm_data``,
``core.lm_batches``: the same global batches as ``python -m benchmarks run --task lm``) with
the task's loop (``core.lm_train``), at one lr (default: the middle of the optimizer's grid).
With ``WORLD_SIZE > 1`` (torchrun) it joins the process group (gloo on the CPU, nccl on CUDA,
GPU ``LOCAL_RANK`` per rank), makes each encoder layer and then the whole model a
``fully_shard`` unit and gives every rank its ``batch/N`` rows of each global batch (the loss
is the mean over them, so FSDP's averaged gradient is the whole batch's). In one process it is
the task's run exactly. Rank 0 writes ``--out``: the per-step training loss (the mean over the
ranks: the global batch's), the validation bits per char (every rank runs the validation
forward on all windows: an FSDP forward is collective), seconds and the environment.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Any, Optional

import torch

from . import core


def _mean_over_ranks(world: int):
    """``loss → float``: its mean over the ranks (an all-reduce), or ``loss.item()``."""
    if world == 1:
        return None

    def mean(loss: torch.Tensor) -> float:
        import torch.distributed as dist

        total = loss.detach().float().reshape(1).clone()
        dist.all_reduce(total)  # SUM: gloo has no AVG
        return total.item() / world

    return mean


def run(optim: str, lr: Optional[float] = None, steps: Optional[int] = None, seed: int = 0,
        quick: bool = False, corpus_name: str = "shakespeare", device: str = "cpu"
        ) -> dict[str, Any]:
    """One LM-task run on this process's rank (of torchrun's ``WORLD_SIZE``; the process group
    is joined here when there are several). Returns the record (every rank the same, but only
    rank 0's has the environment)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    spec = core.optimizer_spec(optim)
    lr = spec.lrs[len(spec.lrs) // 2] if lr is None else lr
    task_steps, batch, T = core.LM_SIZES[quick]
    steps = task_steps if steps is None else steps
    if batch % world:
        raise ValueError(f"the LM task's batch ({batch}) must split evenly over {world} ranks")
    rank, mesh = 0, None
    target = torch.device(device)
    if world > 1:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        if target.type == "cuda":
            target = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(target)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if target.type == "cuda" else "gloo")
        rank = dist.get_rank()
        mesh = init_device_mesh(target.type, (world,))

    data, ids, split = core.lm_data(corpus_name)
    torch.manual_seed(seed)  # every rank: the same initial model, then its shards of it
    model = core.CharGPT(data["vocab"]).to(target)
    if mesh is not None:
        from torch.distributed.fsdp import fully_shard

        for layer in model.blocks.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = spec.build(model, lr)
    per = batch // world
    t0 = time.perf_counter()
    losses = core.lm_train(model, opt, core.lm_batches(ids, split, seed, batch, T), steps,
                           rows=slice(rank * per, (rank + 1) * per),
                           mean=_mean_over_ranks(world))
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        val = core.lm_loss(model, core.lm_validation_windows(ids, split, T)).item()
    return {"task": "lm", "optimizer": spec.name, "lr": lr, "seed": seed, "steps": steps,
            "quick": quick, "batch": batch, "context": T, "world_size": world,
            "fsdp": mesh is not None, "losses": losses,
            "val_bits_per_char": val / math.log(2), "seconds": seconds,
            "corpus": data["name"], "corpus_sha256": data["sha256"],
            "environment": core.environment(target.type) if rank == 0 else None, "rank": rank}


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optim", required=True,
                        help=f"a benchmark optimizer ({', '.join(sorted(core.OPTIMIZERS))}) or "
                             "an import path")
    parser.add_argument("--lr", type=float, default=None,
                        help="default: the middle of the optimizer's grid")
    parser.add_argument("--steps", type=int, default=None, help="default: the task's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="the task's --quick size")
    parser.add_argument("--corpus", default="shakespeare", choices=("shakespeare", "stdlib"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", required=True, help="the JSON record (written by rank 0)")
    args = parser.parse_args(argv)
    try:
        core.optimizer_spec(args.optim)
    except ValueError as error:
        parser.error(f"argument --optim: {error}")
    try:
        record = run(args.optim, args.lr, args.steps, args.seed, args.quick, args.corpus,
                     args.device)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # no rank tears gloo down while a peer's last transfer is in flight
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if record.pop("rank") == 0:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
        print(json.dumps({k: record[k] for k in ("optimizer", "lr", "steps", "world_size",
                                                  "val_bits_per_char", "seconds")}))
    return record


if __name__ == "__main__":
    main()
