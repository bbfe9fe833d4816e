"""Train HOPE or a baseline as a byte-level LM on Shakespeare, with a deepmomentum optimizer.

    python -m examples.hope.train --arch hope --size tiny --seed 0 --out runs/hope-0
    python -m examples.hope.train --arch transformer --optim torch.AdamW --lr 3e-3 ...
    python -m examples.hope.train --out runs/hope-0 --resume      # continue from its checkpoint

The outer optimizer is any deepmomentum or ``torch.optim`` class, by name (``Muon``/``M3``
get deepmomentum's matrix/AdamW split), with its own options (repeatable
``--optim-option betas=(0.9,0.95)``); weight decay applies to weight matrices only (≥ 2-D, not
biases or norm gains; ``--decay-all`` decays every tensor). ``--model-option KEY=VALUE``
overrides a ``HopeConfig`` field of the size (``inner_grad_clip=1e6``, ``cms_periods=(1,1,1)``):
the ablations' switch. HOPE's CMS levels are param groups with
``update_period = C^(ℓ)`` (mean-accumulated); a ``torch.optim`` class gets the schedule from
``deepmomentum.MultiFrequency``. Every ``--ckpt-every`` steps and at the end, ``OUT/checkpoint.pt``
holds the model, optimizer, scheduler and data-sampler state, so a resumed run follows the same
trajectory; ``OUT/metrics.json`` holds the config, the loss curve, validation bits per byte
(= bits per char: the texts are ASCII) and the environment.

**Several processes (FSDP2).** ``torchrun --nproc-per-node N examples/hope/train.py ... --fsdp``
(or ``torchrun ... -m examples.hope.train ... --fsdp``) trains one model on N ranks: the process
group comes from torchrun's environment (gloo on the CPU, nccl on CUDA, one GPU per rank), each
block and then the whole model is a ``fully_shard`` unit (parameters are DTensors ``Shard(0)``),
and every rank takes its ``batch/N`` rows of the same global batch, so the trajectory is the
one-process run's (up to float rounding of FSDP's averaged gradients). Logging, validation
results and files come from rank 0 (every rank runs the validation forward on all windows: an
FSDP forward is collective). Checkpoints are ``torch.distributed.checkpoint`` directories,
``OUT/checkpoint/`` (sharded model and optimizer, plus ``trainer.pt`` with the schedule, sampler
and metrics); ``--resume`` continues from one, on any number of ranks. Without ``--fsdp`` the
script is the one-process run it always was; under torchrun with ``WORLD_SIZE > 1`` it refuses
to start without ``--fsdp`` (N independent runs would write the same files).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Optional

if __package__ in (None, ""):  # run as a file (torchrun examples/hope/train.py): the repo root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
        __file__)))))

import torch
import torch.nn.functional as F

import deepmomentum as dm
from examples.hope.model import ARCHITECTURES, HopeConfig, LanguageModel, build, \
    count_parameters

# Sizes: the tiny one trains on 2 CPU cores in ≤ 10 minutes (HOPE, the slowest of the three).
# CMS periods (1, 2, 4) since issue 21: the slowest level then takes ≥ 125 updates (200 at
# tiny); at (1, 4, 16) it took 50 (31 at small) and HOPE lost 0.021 bits/byte at tiny. The gpu
# size keeps that count with (1, 4, 16) over 5,000 steps (not measured).
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(model=dict(d_model=64, n_layers=2, n_heads=4, chunk_size=16,
                            cms_periods=(1, 2, 4), cms_hidden=128),
                 batch=16, seq_len=128, steps=800, lr=3e-3, warmup=50, eval_every=200,
                 eval_windows=128),
    # ~1.1M parameters at context 128 (issue 21's char-level benchmark): d 128, 3 layers.
    "small": dict(model=dict(d_model=128, n_layers=3, n_heads=4, chunk_size=16,
                             cms_periods=(1, 2, 4), cms_hidden=192),
                  batch=32, seq_len=128, steps=500, lr=3e-3, warmup=50, eval_every=100,
                  eval_windows=128),
    "gpu": dict(model=dict(d_model=384, n_layers=6, n_heads=6, chunk_size=64,
                           cms_periods=(1, 4, 16), cms_hidden=768),
                batch=64, seq_len=512, steps=5000, lr=2e-3, warmup=200, eval_every=500,
                eval_windows=512),
    "micro": dict(model=dict(d_model=16, n_layers=1, n_heads=2, chunk_size=4,  # for the tests
                             cms_periods=(1, 2), cms_hidden=8),
                  batch=2, seq_len=16, steps=6, lr=3e-3, warmup=2, eval_every=3, eval_windows=4),
}


# --- data -------------------------------------------------------------------------------------

def environment() -> dict[str, Any]:
    """The benchmarks' record of git sha, versions and device."""
    from benchmarks.core import environment as record

    return record()


def byte_tokens(name: str = "shakespeare") -> tuple[str, torch.Tensor]:
    """(corpus used, its bytes as int64 tokens), from the benchmarks' checksummed loader."""
    from benchmarks.data import load_corpus

    used, data = load_corpus(name)
    return used, torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def split(tokens: torch.Tensor, fraction: float = 0.9) -> tuple[torch.Tensor, torch.Tensor]:
    cut = int(fraction * len(tokens))
    return tokens[:cut], tokens[cut:]


def windows(tokens: torch.Tensor, starts: torch.Tensor, length: int) -> torch.Tensor:
    return tokens[starts[:, None] + torch.arange(length + 1)]


def validation_windows(tokens: torch.Tensor, count: int, length: int) -> torch.Tensor:
    """Evenly spaced windows over the held-out text: the same for every model and seed."""
    starts = torch.linspace(0, len(tokens) - length - 2, count).long()
    return windows(tokens, starts, length)


@torch.no_grad()
def bits_per_byte(model: LanguageModel, batches: torch.Tensor, batch_size: int = 16) -> float:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for chunk in batches.split(batch_size):
        chunk = chunk.to(device)
        logits = model(chunk[:, :-1])
        total += F.cross_entropy(logits.flatten(0, 1).float(), chunk[:, 1:].flatten(),
                                 reduction="sum").item()
        count += chunk[:, 1:].numel()
    model.train(was_training)
    return total / count / math.log(2)


# --- optimizer --------------------------------------------------------------------------------

# Optimizer subclasses that are not an optimizer to train with: base classes and the wrapper.
_NOT_OPTIMIZERS = {"Optimizer", "MemoryOptimizer", "MultiFrequency"}


def _optimizer(module, name: str) -> Optional[type]:
    cls = getattr(module, name, None)
    if (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)
            and cls.__name__ not in _NOT_OPTIMIZERS and name not in _NOT_OPTIMIZERS):
        return cls
    return None


def optimizer_names() -> list[str]:
    """The names ``--optim`` takes: deepmomentum's classes, then torch's as ``torch.X``."""
    ours = sorted(n for n in dm.__all__ if _optimizer(dm, n))
    theirs = sorted(f"torch.{n}" for n in dir(torch.optim) if _optimizer(torch.optim, n))
    return ours + theirs


def optimizer_class(name: str) -> type:
    """``torch.AdamW`` / ``torch.optim.AdamW`` → torch's; ``AdamW`` → deepmomentum's if it has
    one, else torch's; ``dm.X`` → deepmomentum's."""
    for prefix, modules in (("torch.optim.", (torch.optim,)), ("torch.", (torch.optim,)),
                            ("dm.", (dm,)), ("deepmomentum.", (dm,)), ("", (dm, torch.optim))):
        if name.startswith(prefix):
            for module in modules:
                cls = _optimizer(module, name[len(prefix):])
                if cls is not None:
                    return cls
            break
    raise ValueError(f"invalid optim: {name!r} (choose from {', '.join(optimizer_names())}; "
                     "torch's also without 'torch.' where deepmomentum has no such name)")


def decays(name: str, p: torch.Tensor) -> bool:
    """Whether weight decay applies to parameter ``name``: weight matrices and tensors of ≥ 2
    dims, as Transformer recipes decay them; not norm gains, biases (``gate_bias`` too, though
    it is 2-D) or other vectors."""
    return p.dim() >= 2 and not name.endswith("bias")


def param_groups(model: LanguageModel, matrix_split: bool, decay_all: bool = False,
                 lr: Optional[float] = None, cms_lr_power: float = 0.0,
                 auto_periods: Optional[dict[str, Any]] = None
                 ) -> list[dict[str, Any]]:
    """Everything but the CMS levels at period 1, HOPE's level ℓ at ``cms_periods[ℓ]``; for a
    Muon-type optimizer each is split further by :func:`deepmomentum.muon_param_groups`; then
    by :func:`decays` (``weight_decay=0`` for the rest; ``decay_all``: no such split).

    ``cms_lr_power`` p gives level ℓ the lr ``lr · C^(ℓ)^p`` (p = 0: the one lr; p = 1: a level
    that steps C times less often takes C times the step, so that it travels as far under a
    normalized optimizer such as Adam, whose step size ignores the accumulated gradient's
    scale).

    ``auto_periods`` (``max_period``, ``period_significance``, ``min_period``): every CMS level
    at ``update_period="auto"`` with these options instead of its fixed period (issue 19); the
    rest stays at period 1."""
    levels = model.cms_levels() if model.config.arch == "hope" else []
    in_levels = {id(p) for level in levels for p in level}
    names = {id(p): n for n, p in model.named_parameters()}
    rest = [p for p in model.parameters() if id(p) not in in_levels]
    matrices = {id(p) for group in dm.muon_param_groups(model) if group["use_muon"]
                for _, p in group["params"]}
    groups = []
    for params, period in [(rest, 1), *zip(levels, model.config.cms_periods)]:
        parts = [(params, {})] if not matrix_split else [
            ([p for p in params if id(p) in matrices], {"use_muon": True}),
            ([p for p in params if id(p) not in matrices], {"use_muon": False})]
        if not decay_all:
            parts = [split for part, options in parts for split in (
                ([p for p in part if decays(names[id(p)], p)], options),
                ([p for p in part if not decays(names[id(p)], p)],
                 {**options, "weight_decay": 0.0,  # Muon's AdamW part has its own decay
                  **({"adamw_weight_decay": 0.0} if matrix_split else {})}))]
        scaled = {"lr": lr * period ** cms_lr_power} if cms_lr_power and period > 1 else {}
        schedule = {"update_period": period} if auto_periods is None or params is rest else \
            {"update_period": "auto", **auto_periods}
        groups += [{"params": [(names[id(p)], p) for p in part], **schedule,
                    "accumulate": "mean", **scaled, **options} for part, options in parts if part]
    return groups


# M3: its default, normalized form steps as Muon does (a row-normalized read-out scaled to
# Muon's norm), so it takes the size's lr and no options. Its literal form (form="literal",
# issue 14) divides an orthogonalized matrix by √V of the raw gradients, an entry's step
# ~γ/(|G| + ε): at ε = 1e-8 its first step moved HOPE's η-gate bias by 443, σ(η) underflowed
# to 0 and the loss was NaN at step 2; it needed ε = 1e-2 and a 30th of the lr.
M3_OPTIONS: dict = {}
# Muon/M3's AdamW groups (embeddings, head, norms) as deepmomentum 0.1.0 defaulted them; the
# defaults are torch.optim.AdamW's now (lr 1e-3, betas (0.9, 0.999), eps 1e-8, decay 0.01).
MUON_ADAMW_0_1 = dict(adamw_lr=3e-4, adamw_betas=(0.9, 0.95), adamw_eps=1e-10,
                      adamw_weight_decay=0.0)


def default_lr(name: str, size_lr: float) -> float:
    """The lr of a run without ``--lr``: the size's (every optimizer, M3 included)."""
    return size_lr


def make_optimizer(model: LanguageModel, name: str, lr: float, weight_decay: float,
                   decay_all: bool = False, cms_lr_power: float = 0.0,
                   auto_periods: Optional[dict[str, Any]] = None,
                   **options: Any) -> torch.optim.Optimizer:
    """The optimizer ``name`` over :func:`param_groups`: ``lr`` (the slow CMS levels' scaled by
    ``cms_lr_power``) and ``weight_decay`` (on the weights :func:`decays` picks, every tensor
    with ``decay_all``) and any other option of the class (``betas``, ``eps``, ``momentum``,
    Muon's ``adamw_*``, …), passed as given."""
    cls = optimizer_class(name)
    groups = param_groups(model, cls in (dm.Muon, dm.M3), decay_all, lr, cms_lr_power,
                          auto_periods)
    if issubclass(cls, dm.MemoryOptimizer):
        return cls(groups, lr=lr, weight_decay=weight_decay, **optim_options(cls, options))
    plain = [{**g, "params": [p for _, p in g["params"]]} for g in groups]  # torch: tensors
    return dm.MultiFrequency(cls(plain, lr=lr, weight_decay=weight_decay, **options))


def optim_options(cls: type, given: dict[str, Any]) -> dict[str, Any]:
    """What :func:`make_optimizer` passes to ``cls`` beyond lr and weight decay (the record in
    ``metrics.json``): the ``given`` options over Muon's/M3's AdamW part as deepmomentum 0.1.0
    defaulted it (so earlier results stay valid) and M3's own."""
    defaults = M3_OPTIONS if cls is dm.M3 else {}
    if cls in (dm.Muon, dm.M3):
        defaults = {**MUON_ADAMW_0_1, **defaults}
    return {**defaults, **given}


def parse_option(text: str) -> tuple[str, Any]:
    """``--optim-option KEY=VALUE``: the value as a Python literal (``0.9``, ``(0.9, 0.95)``,
    ``True``), else as the string."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def schedule(warmup: int, steps: int):
    """Linear warm-up, then cosine decay to 10%."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


# --- the run ----------------------------------------------------------------------------------

class Progress:
    """A one-line progress bar on stderr (a plain log line per update when not a terminal)."""

    def __init__(self, total: int, start: int = 0, enabled: bool = True):
        self.total, self.start, self.enabled = total, start, enabled
        self.t0 = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def update(self, step: int, text: str, every: int = 50) -> None:
        if not self.enabled or (not self.tty and step % every and step != self.total):
            return
        done = step / self.total
        elapsed = time.perf_counter() - self.t0
        rate = (step - self.start) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        bar = "#" * int(24 * done) + "." * (24 - int(24 * done))
        line = f"[{bar}] {step}/{self.total} {text} {elapsed:5.0f}s eta {eta:4.0f}s"
        print("\r" + line if self.tty else line, end="" if self.tty else "\n", file=sys.stderr,
              flush=True)
        if self.tty and step == self.total:
            print(file=sys.stderr)


# --- several processes: torchrun + FSDP2 --------------------------------------------------------

CHECKPOINT_DIR = "checkpoint"  # a distributed run's torch.distributed.checkpoint directory
TRAINER_FILE = "trainer.pt"  # in it: what is not model or optimizer (schedule, sampler, metrics)


@dataclass
class Ranks:
    """Where this process stands: rank ``rank`` of ``world``; ``fsdp`` when the model is
    sharded over them (``--fsdp``), else the one-process run (rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    fsdp: bool = False
    mesh: Any = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def rows(self, batch: int) -> slice:
        """This rank's rows of a global batch of ``batch``: ``rank·B/N : (rank+1)·B/N``."""
        per = batch // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def mean(self, value: torch.Tensor) -> float:
        """The mean over the ranks of a scalar (each rank's mean over its equal share of the
        batch: the global batch's mean); the value itself in one process."""
        if not self.fsdp:
            return value.item()
        import torch.distributed as dist

        total = value.detach().float().reshape(1).clone()
        dist.all_reduce(total)  # SUM: gloo has no AVG
        return total.item() / self.world

    def barrier(self) -> None:
        if self.fsdp:
            import torch.distributed as dist

            dist.barrier()


def torchrun_world() -> int:
    """The world size torchrun set (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def start_ranks(args: argparse.Namespace) -> Ranks:
    """Join torchrun's process group (``--fsdp``): gloo on the CPU, nccl on CUDA (each rank
    on GPU ``LOCAL_RANK``; ``args.device`` is set to it), and a 1-D device mesh over all."""
    if not args.fsdp:
        return Ranks()
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        args.device = str(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    return Ranks(rank, world, True, init_device_mesh(device.type, (world,)))


def stop_ranks(ranks: Ranks) -> None:
    if ranks.fsdp:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def shard(model: LanguageModel, mesh) -> LanguageModel:
    """FSDP2: each block its own ``fully_shard`` unit (its parameters gathered for its forward
    and backward only), then the root (embedding, final norm, head)."""
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _swap_in(tmp: str, final: str) -> None:
    """Replace the directory ``final`` by ``tmp`` (``final.old`` only for the moment between
    the two renames: a crash there leaves the previous checkpoint, which ``_dcp_dir`` finds)."""
    old = final + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _dcp_dir(out: str) -> Optional[str]:
    """The run's distributed checkpoint directory, if it has a complete one."""
    for name in (CHECKPOINT_DIR, CHECKPOINT_DIR + ".old"):
        path = os.path.join(out, name)
        if os.path.exists(os.path.join(path, TRAINER_FILE)):
            return path
    return None


def save_distributed(path: str, ranks: Ranks, model, optimizer, trainer: dict[str, Any]) -> None:
    """A ``torch.distributed.checkpoint`` of the sharded model and optimizer (each rank writes
    its shards) and rank 0's ``trainer.pt``, written to ``path.tmp`` and then swapped in."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    tmp = path + ".tmp"
    if ranks.main:
        shutil.rmtree(tmp, ignore_errors=True)
    ranks.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp)
    if ranks.main:
        torch.save(trainer, os.path.join(tmp, TRAINER_FILE))
        _swap_in(tmp, path)
    ranks.barrier()


def load_distributed(path: str, model, optimizer) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_distributed` (by any number of ranks: DCP
    reshards) into the sharded model and optimizer; returns the trainer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=path)  # in place, into the live tensors of both
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])
    return torch.load(os.path.join(path, TRAINER_FILE), map_location="cpu", weights_only=False)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=ARCHITECTURES, default="hope")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--optim", default="PreconditionedMomentum")
    parser.add_argument("--lr", type=float, default=None, help="default: the size's")
    parser.add_argument("--weight-decay", type=float, default=0.01,
                        help="on weight matrices (≥ 2-D, not biases) unless --decay-all")
    parser.add_argument("--decay-all", action="store_true",
                        help="decay every tensor, norm gains and biases too (what train.py "
                             "did before issue 21)")
    parser.add_argument("--optim-option", type=parse_option, action="append", default=[],
                        metavar="KEY=VALUE",
                        help="an option of the optimizer class, e.g. betas=(0.9,0.95) eps=1e-10 "
                             "(repeatable)")
    parser.add_argument("--model-option", type=parse_option, action="append", default=[],
                        metavar="KEY=VALUE",
                        help="a HopeConfig field over the size's, e.g. inner_grad_clip=1e6 "
                             "cms_periods=(1,1,1) (repeatable; recorded in metrics' config)")
    parser.add_argument("--cms-lr-power", type=float, default=0.0, metavar="P",
                        help="HOPE's CMS level of period C trains at lr·C^P (default 0: one lr)")
    parser.add_argument("--auto-periods", action="store_true",
                        help="every CMS level at update_period='auto' (issue 19): it updates "
                             "when its accumulated gradient is significant against its noise")
    parser.add_argument("--auto-max-period", type=int, default=64, metavar="N",
                        help="with --auto-periods: a level's longest window (default 64)")
    parser.add_argument("--auto-significance", type=float, default=1.0, metavar="K",
                        help="with --auto-periods: κ, the mean gradient's signal-to-noise a "
                             "window must reach (default 1: windows of ~B_noise steps)")
    parser.add_argument("--steps", type=int, default=None, help="default: the size's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corpus", default="shakespeare", choices=("shakespeare", "stdlib"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", required=True)
    parser.add_argument("--ckpt-every", type=int, default=200)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="stop (with a checkpoint) after this many steps of this call")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each block's sequence mixer: faster steps after "
                             "minutes of compiling (for training, and again for evaluation)")
    parser.add_argument("--fsdp", action="store_true",
                        help="under torchrun: shard the model over the ranks with FSDP2 and "
                             "split each batch across them")
    args = parser.parse_args(argv)
    try:
        cls = optimizer_class(args.optim)
    except ValueError as e:  # argparse's way: usage, the names, exit status 2
        parser.error(f"argument --optim: {e}")
    fields = [f.name for f in dataclasses.fields(HopeConfig) if f.name != "arch"]
    for key, value in args.model_option:
        if key not in fields:
            parser.error(f"argument --model-option: HopeConfig has no field {key!r} (fields: "
                         f"{', '.join(fields)}; the architecture is --arch)")
    try:
        HopeConfig(arch=args.arch, **{**SIZES[args.size]["model"], **dict(args.model_option)})
    except (ValueError, TypeError) as e:
        parser.error(f"argument --model-option: {e}")
    accepted = inspect.signature(cls).parameters
    for key, _ in args.optim_option:
        if key not in accepted or key in ("params", "lr", "weight_decay"):
            names = ", ".join(n for n in accepted if n not in ("params", "lr", "weight_decay"))
            parser.error(f"argument --optim-option: {cls.__name__} has no option {key!r} "
                         f"(lr and weight decay have their own flags; options: {names})")
    world = torchrun_world()
    if world > 1 and not args.fsdp:
        parser.error(f"launched on {world} ranks (WORLD_SIZE={world}) without --fsdp: each "
                     "rank would train its own copy into the same --out; add --fsdp")
    if args.fsdp:
        if "RANK" not in os.environ:
            parser.error("--fsdp runs under torchrun (torchrun --nproc-per-node N "
                         "examples/hope/train.py ... --fsdp)")
        batch = SIZES[args.size]["batch"]
        if batch % world:
            parser.error(f"--fsdp on {world} ranks: the size's batch ({batch}) must split "
                         "evenly across them")
    return args


def train(args: argparse.Namespace, ranks: Optional[Ranks] = None) -> dict[str, Any]:
    """The run of ``args``; ``ranks`` (from :func:`start_ranks`): this process's part of an
    FSDP2 run, by default the one-process run."""
    ranks = ranks or Ranks()
    size = SIZES[args.size]
    steps = args.steps or size["steps"]
    lr = args.lr or default_lr(args.optim, size["lr"])
    device = torch.device(args.device)
    if ranks.main:
        os.makedirs(args.out, exist_ok=True)
    ranks.barrier()
    checkpoint_path = os.path.join(args.out, "checkpoint.pt")
    dcp_path = os.path.join(args.out, CHECKPOINT_DIR)

    torch.manual_seed(args.seed)  # every rank: the same initial model, then its shards of it
    config = HopeConfig(arch=args.arch, **{**size["model"], **dict(args.model_option)})
    model = build(config).to(device)
    config = model.config
    parameters = count_parameters(model)
    if ranks.fsdp:
        shard(model, ranks.mesh)
    if args.compile:
        model.compile_mixers()
    options = dict(args.optim_option)
    auto = None if not args.auto_periods else {
        "max_period": args.auto_max_period, "period_significance": args.auto_significance}
    optimizer = make_optimizer(model, args.optim, lr, args.weight_decay, args.decay_all,
                               args.cms_lr_power, auto, **options)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(size["warmup"], steps))
    sampler = torch.Generator().manual_seed(args.seed)
    corpus, tokens = byte_tokens(args.corpus)
    train_tokens, val_tokens = split(tokens)
    val = validation_windows(val_tokens, size["eval_windows"], size["seq_len"])
    metrics: dict[str, Any] = {
        "arch": args.arch, "size": args.size, "optim": args.optim, "lr": lr,
        "optim_options": optim_options(optimizer_class(args.optim), options),
        "weight_decay": args.weight_decay, "decay_all": args.decay_all,
        "cms_lr_power": args.cms_lr_power, "auto_periods": auto, "seed": args.seed,
        "compile": args.compile,
        "steps": steps,
        "batch": size["batch"], "seq_len": size["seq_len"], "config": config.to_dict(),
        "parameters": parameters, "corpus": corpus,
        "environment": environment() if ranks.main else {}, "train_loss": [], "val": [],
        "seconds": 0.0}
    if ranks.fsdp:
        metrics["fsdp_world_size"] = ranks.world
    step = 0
    if args.resume:
        _check_resumable(args.out, ranks)
    if args.resume and ranks.fsdp and _dcp_dir(args.out):
        saved = load_distributed(_dcp_dir(args.out), model, optimizer)
        scheduler.load_state_dict(saved["scheduler"])
        sampler.set_state(saved["sampler"])
        torch.set_rng_state(saved["torch_rng"])
        metrics, step = saved["metrics"], saved["step"]
        metrics["fsdp_world_size"] = ranks.world
    elif args.resume and not ranks.fsdp and os.path.exists(checkpoint_path):
        saved = torch.load(checkpoint_path, map_location=device, weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        sampler.set_state(saved["sampler"])
        torch.set_rng_state(saved["torch_rng"])
        metrics, step = saved["metrics"], saved["step"]
    if args.resume and metrics.get("compile", False) != args.compile:
        trained = "with" if metrics.get("compile") else "without"
        raise ValueError(f"{args.out} was trained {trained} --compile: resume it the same way "
                         "(a compiled step rounds differently, so the run would not continue "
                         "its own trajectory)")

    def record_progress() -> None:
        # a run cut short (--stop-after, or a checkpoint of an interrupted run) is partial:
        # it has no final_val_bits_per_byte, and `evaluate table` marks it as such
        metrics["steps"], metrics["steps_done"], metrics["partial"] = steps, step, step < steps
        metrics["tokens"] = step * size["batch"] * size["seq_len"]
        if step < steps:  # resumed with a larger --steps: the old final is no longer final
            metrics.pop("final_val_bits_per_byte", None)

    def save() -> None:
        record_progress()
        if ranks.fsdp:
            save_distributed(dcp_path, ranks, model, optimizer, {
                "scheduler": scheduler.state_dict(), "sampler": sampler.get_state(),
                "torch_rng": torch.get_rng_state(), "metrics": metrics, "step": step,
                "config": config.to_dict()})
            if ranks.main:
                with open(os.path.join(args.out, "metrics.json"), "w") as f:
                    json.dump(metrics, f, indent=1)
            return
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "sampler": sampler.get_state(),
                    "torch_rng": torch.get_rng_state(), "metrics": metrics, "step": step,
                    "config": config.to_dict()}, checkpoint_path + ".tmp")
        os.replace(checkpoint_path + ".tmp", checkpoint_path)  # never a torn checkpoint
        with open(os.path.join(args.out, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1)

    window_log = None if auto is None else dm.WindowLog(
        optimizer, metrics.setdefault("cms_windows", []))
    stop = steps if args.stop_after is None else min(steps, step + args.stop_after)
    progress = Progress(steps, step, enabled=not args.quiet and ranks.main)
    rows = ranks.rows(size["batch"])  # this rank's rows of each global batch (all in one process)
    model.train()
    t0 = time.perf_counter() - metrics["seconds"]
    while step < stop:
        starts = torch.randint(len(train_tokens) - size["seq_len"] - 1, (size["batch"],),
                               generator=sampler)
        batch = windows(train_tokens, starts[rows], size["seq_len"]).to(device)
        logits = model(batch[:, :-1])
        # the mean over this rank's rows: FSDP's averaged gradient is the whole batch's
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        value = ranks.mean(loss)  # one host sync a step, for the log and the NaN check
        if not math.isfinite(value):
            raise FloatingPointError(f"loss is {value} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        step += 1
        if window_log is not None:  # each CMS level's windows as they end: [step, level, length]
            window_log.record(step)
        metrics["train_loss"].append(round(value, 5))
        text = f"loss {value:.3f}"
        if step % size["eval_every"] == 0 or step == steps:
            metrics["val"].append({"step": step, "bits_per_byte": bits_per_byte(model, val)})
            text += f" val {metrics['val'][-1]['bits_per_byte']:.3f} bpb"
        metrics["seconds"] = time.perf_counter() - t0
        progress.update(step, text)
        if step % args.ckpt_every == 0 or step == stop:
            if step == steps:
                metrics["final_val_bits_per_byte"] = metrics["val"][-1]["bits_per_byte"]
            save()
    record_progress()
    return metrics


def _check_resumable(out: str, ranks: Ranks) -> None:
    """``--resume`` of a run whose checkpoint is the other kind is refused (it would start
    over and overwrite the run's metrics)."""
    one_process = os.path.exists(os.path.join(out, "checkpoint.pt"))
    if ranks.fsdp and one_process and not _dcp_dir(out):
        raise ValueError(f"{out} holds a one-process checkpoint (checkpoint.pt): resume it "
                         "without torchrun and --fsdp")
    if not ranks.fsdp and not one_process and _dcp_dir(out):
        raise ValueError(f"{out} holds a distributed checkpoint ({CHECKPOINT_DIR}/): resume it "
                         "with torchrun ... --fsdp (any number of ranks)")


def load(run_dir: str, device: str = "cpu") -> LanguageModel:
    """The trained model of a run directory (a one-process run's ``checkpoint.pt``, or a
    distributed run's ``checkpoint/``, read whole in this one process)."""
    path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.exists(path) and _dcp_dir(run_dir):
        import torch.distributed.checkpoint as dcp

        directory = _dcp_dir(run_dir)
        saved = torch.load(os.path.join(directory, TRAINER_FILE), map_location="cpu",
                           weights_only=False)
        model = LanguageModel(HopeConfig(**saved["config"])).to(device)
        state = {"model": model.state_dict()}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=directory, no_dist=True)  # the shards, reassembled
        model.load_state_dict(state["model"])
        return model
    saved = torch.load(path, map_location=device, weights_only=False)
    model = LanguageModel(HopeConfig(**saved["config"])).to(device)
    model.load_state_dict(saved["model"])
    return model


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    ranks = start_ranks(args)
    try:
        metrics = train(args, ranks)
        ranks.barrier()  # no rank tears gloo down while a peer's last transfer is in flight
    finally:
        stop_ranks(ranks)
    if not ranks.main:
        return
    keys = ["arch", "parameters", "tokens", "seconds"]
    if metrics["partial"]:
        last = metrics["val"][-1] if metrics["val"] else None
        print(f"stopped at step {metrics['steps_done']} of {metrics['steps']} "
              f"(partial: no final validation; checkpoint in {args.out}, continue with "
              "--resume)", file=sys.stderr)
        keys += ["steps_done", "steps", "partial"]
        extra = {"last_val": last}
    else:
        keys += ["final_val_bits_per_byte"]
        extra = {}
    print(json.dumps({**{k: metrics.get(k) for k in keys}, **extra}))


if __name__ == "__main__":
    main()
