"""What each deepmomentum optimizer's ``step()`` communicates under FSDP2, and what it costs.

    python -m benchmarks.distributed --quick                        # gloo, CPU, world 1 2 4
    python -m benchmarks.distributed --world 1 2 4 8 --backend nccl --device cuda
    torchrun --nproc-per-node 8 -m benchmarks.distributed --backend nccl --device cuda

Every optimizer at representative settings (:data:`SETTINGS`) trains a small transformer
(``--depth`` blocks of width ``--width``: LayerNorm, qkv ``3d×d``, single-head attention,
proj ``d×d``, LayerNorm, MLP ``4d×d`` and ``d×4d``, biases) wrapped with
``torch.distributed.fsdp.fully_shard`` (parameters DTensor ``Shard(0)``), one process per
rank, the global batch split over the ranks. For each world size it reports

(a) the bytes ``opt.step()`` communicates per step, beyond FSDP's own all-gather and
    reduce-scatter (which run in forward and backward, outside ``step()``). Counted twice,
    independently, only while ``opt.step()`` runs: by wrapping every collective of
    ``torch.distributed`` / ``torch.distributed.distributed_c10d`` and of
    ``torch.distributed._functional_collectives`` (DTensor's ``full_tensor`` and
    ``redistribute`` go through the latter), and by a ``TorchDispatchMode`` that sees every
    ``c10d.*`` and ``_c10d_functional.*`` op whatever Python function issued it. The two must
    agree (column ``ok``); an op of those namespaces that neither rule knows is reported.
    (DMGD's 1-D tensors are gathered by ``DTensor.full_tensor()``, i.e.
    ``_functional_collectives.all_gather_single``: counted by both.) FSDP2's own traffic in
    one forward+backward is counted the same way, for scale (``step/FSDP2 wire``).
(b) the minimum the rule needs, computed from the shapes alone (:func:`analytic_step`), in
    the same conventions, and measured / minimum; plus a lower bound over better schemes
    (``lower``; see ``CONVENTIONS`` and the notes the run prints).
(c) the median time of ``opt.step()`` alone (barrier before, slowest rank per step) and of a
    whole train step (zero_grad, forward, backward, step), each as a ratio to world size 1
    in the same run; at world size 1 also the same optimizer on the same model without
    ``fully_shard`` (plain tensors, one process): FSDP2 / plain.

Byte conventions (per rank, per step; 0 at world size 1, where nothing leaves the rank):

* ``sent`` (the payload): ``all_to_all_single``: the bytes of its input that go to other
  ranks (its own split stays local); ``all_reduce``: the tensor's bytes ``n``;
  all-gathers: this rank's contribution (its input's bytes); ``broadcast``/``reduce``/
  reduce-scatter: the tensor's (input's) bytes.
* ``wire``: bytes this rank puts on the wire under the ring algorithms NCCL/gloo use for
  large messages: ``all_to_all``: as ``sent``; ``all_reduce``: ``2·(W−1)/W·n``;
  all-gather: ``(W−1)·contribution`` (= the bytes it receives); reduce-scatter, broadcast,
  reduce: ``(W−1)/W·n``.

Results: a Markdown table on stdout, notes where a collective moves more than its minimum,
and JSON (``--out``, default ``benchmarks/results/distributed_<device>.json``) with an
environment stamp (``benchmarks.core.environment`` plus backend, cores, load average).
Under torchrun one world size is measured per launch and merged into the JSON's other world
sizes of the same config (ratios recomputed when world size 1 is present).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import inspect
import json
import math
import os
import pickle
import platform
import statistics
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import deepmomentum as dm
from deepmomentum import distributed as dmd
from deepmomentum import functional as dmf
from deepmomentum.newton_schulz import matrix_shape

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

CONVENTIONS = {
    "sent": "per rank per step: all_to_all_single: input bytes sent to other ranks; "
            "all_reduce: tensor bytes n; all-gather: this rank's contribution; "
            "broadcast/reduce/reduce-scatter: tensor (input) bytes; 0 at world size 1",
    "wire": "ring-algorithm bytes this rank sends: all_to_all: as sent; all_reduce: "
            "2(W-1)/W n; all-gather: (W-1) x contribution; reduce-scatter/broadcast/reduce: "
            "(W-1)/W n",
    "minimum": "the rule's own scheme with nothing redundant, from shapes: Newton-Schulz: "
               "each sharded tensor to one owner and its rows back, in the dtype sent; "
               "Delta gradient keys: the c x c Gram per matrix (its trace is the squared "
               "norm), 2 scalars per vector; Delta input keys: the kept key rows only; DMGD: "
               "2ch per matrix, one all-gather of each vector per distinct tensor; "
               "skip_nonfinite: one float32 flag",
    "lower": "wire bytes of a better scheme where one is known: Newton-Schulz sent in "
             "ns_dtype (the NS casts to it first and returns its input's dtype: lossless); "
             "Delta's Gram replaced by an all-gather of G where (W-1)/W r c < 2(W-1)/W c^2 "
             "(i.e. r < 2c); else the minimum's wire bytes",
    "time": "median over timed steps of the slowest rank's time; step: opt.step() after a "
            "barrier; train: zero_grad+forward+backward+step after a barrier",
}

# --- the model ---------------------------------------------------------------------------------


class Block(nn.Module):
    """A pre-norm transformer block with one attention head: realistic Linear shapes."""

    def __init__(self, d: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class Net(nn.Module):
    def __init__(self, width: int, depth: int):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


@dataclass(frozen=True)
class Config:
    width: int
    depth: int
    batch: int  # global sequences per step (split over the ranks)
    seq: int
    key_samples: int
    warmup: int
    counted: int  # steps counted for bytes (M3's chunk: one slow update in the window)
    timed: int

    def tokens_per_rank(self, world: int) -> int:
        return self.batch // world * self.seq


QUICK = dict(width=256, depth=2, batch=8, seq=32, key_samples=64, warmup=1, counted=4, timed=5)
FULL = dict(width=512, depth=4, batch=16, seq=64, key_samples=256, warmup=3, counted=4, timed=20)


def batch(cfg: Config, step: int, rank: int, world: int, device) -> tuple:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(cfg.batch, cfg.seq, cfg.width, generator=g)
    y = torch.randn(cfg.batch, cfg.seq, cfg.width, generator=g) * 0.5
    per = cfg.batch // world
    return x[rank * per:(rank + 1) * per].to(device), y[rank * per:(rank + 1) * per].to(device)


# --- the optimizers ------------------------------------------------------------------------


def _muon_groups(model, **options):
    return dm.muon_param_groups(model, muon_options=options or None)


#: name → (model, cfg) → optimizer. Representative settings: each rule's communicating stage.
SETTINGS: dict[str, Callable[[nn.Module, Config], torch.optim.Optimizer]] = {
    "AssociativeMomentum": lambda m, c: dm.AssociativeMomentum(m.parameters(), lr=0.01),
    "AssociativeMomentum skip_nonfinite": lambda m, c: dm.AssociativeMomentum(
        m.parameters(), lr=0.01, skip_nonfinite=True),
    "DeltaMomentum keys=gradient": lambda m, c: dm.DeltaMomentum(
        m.parameters(), lr=0.01, erase=0.5),
    "DeltaMomentum keys=input": lambda m, c: dm.DeltaMomentum(
        m.parameters(), lr=0.01, erase=0.5, keys="input", key_samples=c.key_samples).attach(m),
    "PreconditionedMomentum": lambda m, c: dm.PreconditionedMomentum(m.parameters(), lr=1e-3),
    "DMGD hidden=16": lambda m, c: dm.DMGD(m.parameters(), lr=0.01, hidden=16),
    "DMGD hidden=16 newton_schulz": lambda m, c: dm.DMGD(
        m.parameters(), lr=0.01, hidden=16, output="newton_schulz"),
    "Muon": lambda m, c: dm.Muon(_muon_groups(m), lr=0.02),
    "M3 chunk=4": lambda m, c: dm.M3(_muon_groups(m), lr=0.01, chunk=4),
}

# --- counting collectives --------------------------------------------------------------------


def _nbytes(t) -> int:
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return 0


def _a2a_sent(inp: torch.Tensor, splits, world: int, rank: int) -> int:
    """Bytes of an all_to_all_single input that go to other ranks (splits along dim 0)."""
    total = _nbytes(inp)
    if not splits:
        return total - total // world
    rows = inp.shape[0] if inp.dim() else 1
    return total - (splits[rank] * total // rows if rows else 0)


def _conventions(kind: str, world: int, amount: int) -> tuple[float, float]:
    """(sent, wire) for ``amount``: a2a's bytes to others, all-reduce's n, all-gather's
    contribution, reduce-scatter's/broadcast's n."""
    if world <= 1:
        return 0.0, 0.0
    factor = {"all_to_all": 1.0, "p2p": 1.0, "all_reduce": 2 * (world - 1) / world,
              "all_gather": float(world - 1), "reduce_scatter": (world - 1) / world,
              "broadcast": (world - 1) / world, "reduce": (world - 1) / world,
              "object": float(world - 1)}[kind]
    return float(amount), factor * amount


class Record:
    """What one counter saw: (kind, sent, wire) per call, grouped as it is asked for."""

    def __init__(self):
        self.calls: list[tuple[str, float, float]] = []
        self.unknown: list[str] = []

    def add(self, kind: str, world: int, amount: int) -> None:
        sent, wire = _conventions(kind, world, amount)
        self.calls.append((kind, sent, wire))

    def totals(self) -> dict[str, Any]:
        by_kind: dict[str, dict[str, float]] = {}
        for kind, sent, wire in self.calls:
            k = by_kind.setdefault(kind, {"calls": 0, "sent": 0.0, "wire": 0.0})
            k["calls"] += 1
            k["sent"] += sent
            k["wire"] += wire
        return {"calls": len(self.calls), "sent": sum(c[1] for c in self.calls),
                "wire": sum(c[2] for c in self.calls), "by_kind": by_kind,
                "unknown": list(self.unknown)}


def _group_of(group) -> tuple[int, int]:
    """(world, rank) of a torch.distributed group argument (None: WORLD)."""
    return dist.get_world_size(group), dist.get_rank(group)


def _funcol_group(group) -> tuple[int, int]:
    from torch.distributed import _functional_collectives as funcol
    from torch.distributed.distributed_c10d import _resolve_process_group

    pg = _resolve_process_group(funcol._resolve_group_name(group))
    return pg.size(), pg.rank()


# Python-level: function name → (kind, amount(bound args, world, rank), group argument name).
def _arg(name):
    return lambda a, w, r: _nbytes(a[name])


_C10D_FUNCTIONS = {
    "all_reduce": ("all_reduce", _arg("tensor"), "group"),
    "all_reduce_coalesced": ("all_reduce", _arg("tensors"), "group"),
    "all_to_all_single": ("all_to_all", lambda a, w, r: _a2a_sent(
        a["input"], a["input_split_sizes"], w, r), "group"),
    "all_to_all": ("all_to_all", lambda a, w, r: sum(
        _nbytes(t) for k, t in enumerate(a["input_tensor_list"]) if k != r), "group"),
    "all_gather": ("all_gather", _arg("tensor"), "group"),
    "all_gather_single": ("all_gather", _arg("input_tensor"), "group"),
    "all_gather_into_tensor": ("all_gather", _arg("input_tensor"), "group"),
    "_all_gather_base": ("all_gather", _arg("input_tensor"), "group"),
    "all_gather_coalesced": ("all_gather", _arg("input_tensor_list"), "group"),
    "all_gather_object": ("object", lambda a, w, r: len(pickle.dumps(a["obj"])), "group"),
    "broadcast": ("broadcast", _arg("tensor"), "group"),
    "broadcast_object_list": ("object", lambda a, w, r: len(pickle.dumps(
        a["object_list"])), "group"),
    "reduce": ("reduce", _arg("tensor"), "group"),
    "reduce_scatter": ("reduce_scatter", _arg("input_list"), "group"),
    "reduce_scatter_single": ("reduce_scatter", _arg("input"), "group"),
    "reduce_scatter_tensor": ("reduce_scatter", _arg("input"), "group"),
    "_reduce_scatter_base": ("reduce_scatter", _arg("input"), "group"),
    "gather": ("reduce", _arg("tensor"), "group"),
    "scatter": ("broadcast", lambda a, w, r: _nbytes(a.get("scatter_list") or []), "group"),
    "send": ("p2p", _arg("tensor"), "group"),
    "isend": ("p2p", _arg("tensor"), "group"),
    "recv": ("p2p", lambda a, w, r: 0, "group"),
    "irecv": ("p2p", lambda a, w, r: 0, "group"),
    "batch_isend_irecv": ("p2p", lambda a, w, r: sum(
        _nbytes(op.tensor) for op in a["p2p_op_list"] if "send" in op.op.__name__), None),
}
_FUNCOL_FUNCTIONS = {
    "all_reduce": ("all_reduce", _arg("self"), "group"),
    "all_reduce_coalesced": ("all_reduce", _arg("self"), "group"),
    "all_gather_single": ("all_gather", _arg("self"), "group"),
    "all_gather_single_autograd": ("all_gather", _arg("self"), "group"),
    "all_gather_tensor": ("all_gather", _arg("self"), "group"),
    "all_gather_tensor_autograd": ("all_gather", _arg("self"), "group"),
    "all_gather_single_coalesced": ("all_gather", _arg("self"), "group"),
    "all_gather_into_tensor_coalesced": ("all_gather", _arg("self"), "group"),
    "reduce_scatter_single": ("reduce_scatter", _arg("self"), "group"),
    "reduce_scatter_single_autograd": ("reduce_scatter", _arg("self"), "group"),
    "reduce_scatter_tensor": ("reduce_scatter", _arg("self"), "group"),
    "reduce_scatter_tensor_autograd": ("reduce_scatter", _arg("self"), "group"),
    "reduce_scatter_single_coalesced": ("reduce_scatter", _arg("self"), "group"),
    "reduce_scatter_tensor_coalesced": ("reduce_scatter", _arg("self"), "group"),
    "all_to_all_single": ("all_to_all", lambda a, w, r: _a2a_sent(
        a["self"], a["input_split_sizes"], w, r), "group"),
    "all_to_all_single_autograd": ("all_to_all", lambda a, w, r: _a2a_sent(
        a["self"], a["input_split_sizes"], w, r), "group"),
    "broadcast": ("broadcast", _arg("self"), "group"),
    "permute_tensor": ("p2p", _arg("self"), "group"),
}


class WrappedCollectives:
    """Counts every collective called through ``torch.distributed``,
    ``torch.distributed.distributed_c10d`` or ``torch.distributed._functional_collectives``
    while active (patched in, restored on exit). Nested collectives (one implemented by
    another) count once, as the outermost."""

    def __init__(self):
        self.record = Record()
        self._depth = threading.local()
        self._saved: list[tuple[Any, str, Any]] = []

    def _wrap(self, fn, kind, amount, group_arg, resolve):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def counted(*args, **kwargs):
            depth = getattr(self._depth, "n", 0)
            if depth == 0:
                bound = signature.bind(*args, **kwargs)
                bound.apply_defaults()
                a = bound.arguments
                world, rank = resolve(a.get(group_arg) if group_arg else None)
                self.record.add(kind, world, amount(a, world, rank))
            self._depth.n = depth + 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth.n = depth

        return counted

    def __enter__(self):
        from torch.distributed import _functional_collectives as funcol
        from torch.distributed import distributed_c10d as c10d

        wrapped: dict[int, Any] = {}
        for modules, table, resolve in (((dist, c10d), _C10D_FUNCTIONS, _group_of),
                                        ((funcol,), _FUNCOL_FUNCTIONS, _funcol_group)):
            for name, (kind, amount, group_arg) in table.items():
                for module in modules:
                    fn = getattr(module, name, None)
                    if fn is None:
                        continue
                    if id(fn) not in wrapped:
                        wrapped[id(fn)] = self._wrap(fn, kind, amount, group_arg, resolve)
                    self._saved.append((module, name, fn))
                    setattr(module, name, wrapped[id(fn)])
        return self

    def __exit__(self, *exc):
        for module, name, fn in reversed(self._saved):
            setattr(module, name, fn)
        self._saved.clear()
        return False


def _pg_of(obj) -> tuple[int, int]:
    if isinstance(obj, str):
        from torch.distributed.distributed_c10d import _resolve_process_group

        pg = _resolve_process_group(obj)
    else:
        pg = dist.ProcessGroup.unbox(obj)
    return pg.size(), pg.rank()


# Dispatch-level: op name → (kind, amount(args dict, world, rank), group argument name).
_OPS = {
    "c10d.allreduce_": ("all_reduce", _arg("tensors"), "process_group"),
    "c10d.allreduce_coalesced_": ("all_reduce", _arg("tensors"), "process_group"),
    "c10d.alltoall_base_": ("all_to_all", lambda a, w, r: _a2a_sent(
        a["input"], a["input_split_sizes"], w, r), "process_group"),
    "c10d.alltoall_": ("all_to_all", lambda a, w, r: sum(
        _nbytes(t) for k, t in enumerate(a["input_tensors"]) if k != r), "process_group"),
    "c10d._allgather_base_": ("all_gather", _arg("input_tensor"), "process_group"),
    "c10d.allgather_": ("all_gather", _arg("input_tensors"), "process_group"),
    "c10d.allgather_coalesced_": ("all_gather", _arg("input_list"), "process_group"),
    "c10d.allgather_into_tensor_coalesced_": ("all_gather", _arg("inputs"), "process_group"),
    "c10d.broadcast_": ("broadcast", _arg("tensors"), "process_group"),
    "c10d.reduce_": ("reduce", _arg("tensors"), "process_group"),
    "c10d._reduce_scatter_base_": ("reduce_scatter", _arg("input_tensor"), "process_group"),
    "c10d.reduce_scatter_": ("reduce_scatter", _arg("input_tensors"), "process_group"),
    "c10d.reduce_scatter_tensor_coalesced_": ("reduce_scatter", _arg("inputs"),
                                              "process_group"),
    "c10d.gather_": ("reduce", _arg("input_tensors"), "process_group"),
    "c10d.scatter_": ("broadcast", _arg("input_tensors"), "process_group"),
    "c10d.send": ("p2p", _arg("tensors"), "process_group"),
    "c10d.recv_": ("p2p", lambda a, w, r: 0, "process_group"),
    "c10d.recv_any_source_": ("p2p", lambda a, w, r: 0, "process_group"),
    "_c10d_functional.all_reduce": ("all_reduce", _arg("input"), "group_name"),
    "_c10d_functional.all_reduce_": ("all_reduce", _arg("input"), "group_name"),
    "_c10d_functional.all_reduce_coalesced": ("all_reduce", _arg("inputs"), "group_name"),
    "_c10d_functional.all_reduce_coalesced_": ("all_reduce", _arg("inputs"), "group_name"),
    "_c10d_functional.all_gather_into_tensor": ("all_gather", _arg("input"), "group_name"),
    "_c10d_functional.all_gather_into_tensor_out": ("all_gather", _arg("input"),
                                                    "group_name"),
    "_c10d_functional.all_gather_into_tensor_coalesced": ("all_gather", _arg("inputs"),
                                                          "group_name"),
    "_c10d_functional.reduce_scatter_tensor": ("reduce_scatter", _arg("input"), "group_name"),
    "_c10d_functional.reduce_scatter_tensor_coalesced": ("reduce_scatter", _arg("inputs"),
                                                         "group_name"),
    "_c10d_functional.all_to_all_single": ("all_to_all", lambda a, w, r: _a2a_sent(
        a["input"], a["input_split_sizes"], w, r), "group_name"),
    "_c10d_functional.broadcast": ("broadcast", _arg("input"), "group_name"),
    "_c10d_functional.broadcast_": ("broadcast", _arg("input"), "group_name"),
}
_IGNORED_OPS = ("_c10d_functional.wait_tensor", "_c10d_functional._wrap_tensor_autograd",
                "c10d.barrier", "c10d.monitored_barrier_")


def _dispatch_mode_class():
    from torch.utils._python_dispatch import TorchDispatchMode

    class DispatchedCollectives(TorchDispatchMode):
        """Counts every ``c10d``/``_c10d_functional`` op dispatched while active, whatever
        Python function issued it (an independent check of :class:`WrappedCollectives`)."""

        def __init__(self):
            super().__init__()
            self.record = Record()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func.namespace in ("c10d", "_c10d_functional"):
                name = f"{func.namespace}.{func._schema.name.split('::')[-1]}"
                if name in _OPS:
                    kind, amount, group_arg = _OPS[name]
                    names = [a.name for a in func._schema.arguments]
                    a = dict(zip(names, args))
                    a.update(kwargs)
                    world, rank = _pg_of(a[group_arg])
                    self.record.add(kind, world, amount(a, world, rank))
                elif name not in _IGNORED_OPS:
                    self.record.unknown.append(name)
            return func(*args, **kwargs)

    return DispatchedCollectives


# --- the analytic minimum --------------------------------------------------------------------


def _esize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _ns_bytes(shards, rank: int, esize: int) -> float:
    """Bytes rank ``rank`` sends to move each sharded tensor to its owner and its rows back:
    its shards of the matrices it does not own, and the other ranks' rows of those it owns."""
    sent = 0
    for s in shards:
        if s is None:
            continue
        per_row = math.prod(s.shape[1:])
        if s.owner == rank:
            sent += (math.prod(s.shape) - s.rows[rank] * per_row) * esize
        else:
            sent += s.rows[rank] * per_row * esize
    return float(sent)


def _kept_per_rank(held: list[int], samples: int) -> list[int]:
    """How many of each rank's held key rows survive DeltaMomentum's even subsampling of the
    rank-ordered concatenation down to ``samples`` (``momentum._evenly_spaced``)."""
    total = sum(held)
    if total <= samples:
        return list(held)
    index = torch.linspace(0, total - 1, samples).round().long()
    out, start = [], 0
    for n in held:
        out.append(int(((index >= start) & (index < start + n)).sum()))
        start += n
    return out


#: The collective each analytic stage is measured against.
STAGE_KIND = {"newton-schulz": "all_to_all", "newton-schulz (slow)": "all_to_all",
              "gram": "all_reduce", "gradient keys": "all_gather",
              "dmgd inner grads": "all_reduce",
              "nonfinite flag": "all_reduce", "dmgd vectors": "all_gather",
              "input keys": "all_gather", "norm match": "all_reduce"}


class Parts:
    """The analytic bytes of one step, by stage: (sent, wire, lower-bound wire)."""

    def __init__(self):
        self.parts: dict[str, list[float]] = {}

    def add(self, name: str, sent: float, wire: float, lower: Optional[float] = None):
        p = self.parts.setdefault(name, [0.0, 0.0, 0.0])
        p[0] += sent
        p[1] += wire
        p[2] += wire if lower is None else lower

    def total(self) -> tuple[float, float, float]:
        return tuple(sum(p[i] for p in self.parts.values()) for i in range(3))


def analytic_step(opt, model, cfg: Config, world: int, rank: int, step: int) -> Parts:
    """The least the rule of each param group needs to move at step ``step`` (1-based), per
    rank, from the global shapes (and deepmomentum's owner assignment, which only decides
    *which* rank does a matrix's Newton–Schulz). Stages that are elementwise move nothing."""
    out = Parts()
    if world == 1:
        return out
    ar = lambda n: 2 * (world - 1) / world * n  # noqa: E731  ring all-reduce wire bytes
    names = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        params = [p for p in group["params"] if p.grad is not None]
        shards = dmd.shards_of(params, lambda p: names.get(id(p), "?"))
        if not shards or all(s is None for s in shards):
            continue
        esize = _esize(dmf.state_dtype(params[0].dtype))
        if group.get("skip_nonfinite"):
            out.add("nonfinite flag", 4, ar(4))
        if isinstance(opt, (dm.Muon, dm.M3)) and group.get("use_muon", True) or \
                isinstance(opt, dm.DMGD) and group["output"] == "newton_schulz":
            # Shards travel in ns_dtype where it is narrower than the state (the same result).
            sent = _ns_bytes(shards, rank, min(esize, _esize(group["ns_dtype"])))
            out.add("newton-schulz", sent, sent)
            if isinstance(opt, dm.M3) and step % group["chunk"] == 0:
                out.add("newton-schulz (slow)", sent, sent)
            if isinstance(opt, dm.M3) and group["form"] == "normalized" and \
                    group["batch_dims"] == 0:
                # the norm match: ‖NS(U)‖² and ‖X̂‖² of each row-sharded matrix, one all-reduce
                n = 2 * esize * sum(s is not None for s in shards)
                out.add("norm match", n, ar(n))
        if isinstance(opt, dm.DeltaMomentum) and group["erase"] != 0 and step > 1:
            input_keys = group["keys"] == "input"
            linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
            keyed = []
            for p, s in zip(params, shards):
                if s is None:
                    continue
                r, c = matrix_shape(s.shape)
                if input_keys and p.ndim == 2 and id(p) in linear:
                    keyed.append(c)
                elif len(s.shape) < 2:
                    out.add("gram", 2 * esize, ar(2 * esize))  # b·g and ‖g‖²
                elif r <= c:  # wide or square: G all-gathered (r·c ≤ the c × c Gram)
                    mine = s.rows[rank] * c * esize
                    out.add("gradient keys", mine, (world - 1) * mine,
                            (world - 1) * -(-r // world) * c * esize)
                else:  # tall: the c × c Gram all-reduced (less than G)
                    out.add("gram", c * c * esize, ar(c * c * esize))
            if keyed:
                held = [min(cfg.key_samples, cfg.tokens_per_rank(world))] * world
                kept = _kept_per_rank(held, cfg.key_samples)
                for c in keyed:
                    out.add("input keys", kept[rank] * c * esize,
                            sum(kept[k] for k in range(world) if k != rank) * c * esize)
        if isinstance(opt, dm.DMGD) and group["hidden"] > 0:
            h = group["hidden"]
            vectors = 1 if group["values"] == "gradient" else 2  # g (and v if it differs)
            for s in shards:
                if s is None:
                    continue
                r, c = matrix_shape(s.shape)
                if len(s.shape) < 2:
                    n = s.rows[rank] * esize * vectors
                    out.add("dmgd vectors", n, (world - 1) * n)
                else:
                    out.add("dmgd inner grads", 2 * c * h * esize, ar(2 * c * h * esize))
    return out


# --- one rank --------------------------------------------------------------------------------


def _barrier(device: str) -> None:
    if device == "cuda":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _summary(stats: list[dict], key: str) -> float:
    return sum(s[key] for s in stats)


def run_setting(name: str, cfg: Config, rank: int, world: int, device: str, sharded: bool,
                mesh) -> dict[str, Any]:
    """Train ``name`` on this rank: warm-up, counted steps (bytes, both counters, and the
    analytic minimum), then timed steps; every rank returns its own numbers."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = Net(cfg.width, cfg.depth).to(device)
    if sharded:
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = SETTINGS[name](model, cfg)
    ranks = world if sharded else 1
    me = rank if sharded else 0
    step = 0

    def forward_backward():
        nonlocal step
        step += 1
        x, y = batch(cfg, step, me, ranks, device)
        opt.zero_grad(set_to_none=True)
        (model(x) - y).pow(2).mean().backward()

    for _ in range(cfg.warmup):
        forward_backward()
        opt.step()
    counted = []
    if sharded:
        Dispatched = _dispatch_mode_class()
        for k in range(cfg.counted):
            if k == 0:  # FSDP2's own traffic (all-gathers, reduce-scatter), for scale
                fsdp = WrappedCollectives()
                with fsdp:
                    forward_backward()
                fsdp_own = fsdp.record.totals()
            else:
                forward_backward()
            _sync(device)
            wrapped, dispatched = WrappedCollectives(), Dispatched()
            with wrapped, dispatched:
                opt.step()
            _sync(device)
            minimum = analytic_step(opt, model, cfg, world, rank, step)
            counted.append({"wrapped": wrapped.record.totals(),
                            "dispatched": dispatched.record.totals(),
                            "minimum": minimum.total(), "parts": minimum.parts})
    step_times, train_times = [], []
    for _ in range(cfg.timed):
        forward_backward()
        _sync(device)
        _barrier(device) if sharded else None
        t0 = time.perf_counter()
        opt.step()
        _sync(device)
        step_times.append(time.perf_counter() - t0)
    for _ in range(cfg.timed):
        _sync(device)
        _barrier(device) if sharded else None
        t0 = time.perf_counter()
        forward_backward()
        opt.step()
        _sync(device)
        train_times.append(time.perf_counter() - t0)
    finite = all(bool(torch.isfinite(dmd.local(p.detach())).all()) for p in model.parameters())
    result = {"step_s": step_times, "train_s": train_times, "finite": finite}
    if counted:
        n = len(counted)
        result["comm"] = {
            "steps": n,
            "calls": sum(c["wrapped"]["calls"] for c in counted) / n,
            "sent": sum(c["wrapped"]["sent"] for c in counted) / n,
            "wire": sum(c["wrapped"]["wire"] for c in counted) / n,
            "dispatched_calls": sum(c["dispatched"]["calls"] for c in counted) / n,
            "dispatched_sent": sum(c["dispatched"]["sent"] for c in counted) / n,
            "dispatched_wire": sum(c["dispatched"]["wire"] for c in counted) / n,
            "unknown_ops": sorted({u for c in counted for u in c["dispatched"]["unknown"]}),
            "by_kind": _mean_by_kind([c["wrapped"]["by_kind"] for c in counted], n),
            "min_sent": sum(c["minimum"][0] for c in counted) / n,
            "min_wire": sum(c["minimum"][1] for c in counted) / n,
            "lower_wire": sum(c["minimum"][2] for c in counted) / n,
            "min_parts": _mean_parts([c["parts"] for c in counted], n),
            "fsdp": fsdp_own,
        }
    return result


def _mean_by_kind(records: list[dict], n: int) -> dict:
    out: dict[str, dict[str, float]] = {}
    for record in records:
        for kind, v in record.items():
            o = out.setdefault(kind, {"calls": 0.0, "sent": 0.0, "wire": 0.0})
            for key in o:
                o[key] += v[key] / n
    return out


def _mean_parts(records: list[dict], n: int) -> dict:
    out: dict[str, list[float]] = {}
    for record in records:
        for name, v in record.items():
            o = out.setdefault(name, [0.0, 0.0, 0.0])
            for i in range(3):
                o[i] += v[i] / n
    return out


def worker(rank: int, world: int, device: str, cfg: Config, names: list[str],
           log: bool = True) -> Optional[dict]:
    """Every setting on this rank (torch.distributed already initialized); rank 0 returns
    ``{name: {"ranks": [per-rank results], "plain": ...}}``, the others None."""
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    mesh = init_device_mesh(device, (world,))
    out = {}
    for name in names:
        t0 = time.perf_counter()
        try:
            mine = run_setting(name, cfg, rank, world, device, True, mesh)
        except Exception:  # noqa: BLE001  one setting's failure is reported, not fatal
            mine = {"error": traceback.format_exc()}
        everyone: list = [None] * world
        dist.all_gather_object(everyone, mine)
        entry = {"ranks": everyone}
        if world == 1:
            try:
                entry["plain"] = run_setting(name, cfg, 0, 1, device, False, None)
            except Exception:  # noqa: BLE001
                entry["plain"] = {"error": traceback.format_exc()}
        out[name] = entry
        if rank == 0 and log:
            print(f"  world {world}: {name} ({time.perf_counter() - t0:.1f} s)",
                  file=sys.stderr, flush=True)
    return out if rank == 0 else None


def _spawned(rank: int, world: int, backend: str, device: str, cfg: Config, names: list[str],
             folder: str) -> None:
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method="file://" + os.path.join(folder, "rdzv"),
                            rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    try:
        result = worker(rank, world, device, cfg, names)
        if rank == 0:
            with open(os.path.join(folder, "result.pkl"), "wb") as f:
                pickle.dump(result, f)
        _barrier(device)  # no rank tears gloo down while a peer's last transfer is in flight
    finally:
        dist.destroy_process_group()
    # No interpreter finalization: gloo's worker threads can still hold tensors then, and
    # freeing them takes the GIL of a dying interpreter — SIGABRT ("terminate called without
    # an active exception"), seen at exit after every result was written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_world(world: int, backend: str, device: str, cfg: Config,
                names: list[str]) -> dict:
    """One process per rank (one GPU each on CUDA); rank 0's results."""
    with tempfile.TemporaryDirectory() as folder:
        torch.multiprocessing.spawn(_spawned, args=(world, backend, device, cfg, names, folder),
                                    nprocs=world, join=True)
        with open(os.path.join(folder, "result.pkl"), "rb") as f:
            return pickle.load(f)


# --- the report ------------------------------------------------------------------------------


def _median(xs):
    return statistics.median(xs) if xs else None


def _slowest(per_rank: list[list[float]]) -> list[float]:
    """Per step, the slowest rank's time."""
    return [max(ts) for ts in zip(*per_rank)]


def summarize(name: str, world: int, entry: dict) -> dict[str, Any]:
    ranks = entry["ranks"]
    errors = [r["error"] for r in ranks if "error" in r]
    row: dict[str, Any] = {"optimizer": name, "world": world}
    if errors:
        row["error"] = errors[0]
        return row
    comm = [r["comm"] for r in ranks]
    row.update(
        calls_per_step=max(c["calls"] for c in comm),
        sent_per_rank=[c["sent"] for c in comm],
        wire_per_rank=[c["wire"] for c in comm],
        min_sent_per_rank=[c["min_sent"] for c in comm],
        min_wire_per_rank=[c["min_wire"] for c in comm],
        lower_wire_per_rank=[c["lower_wire"] for c in comm],
        by_kind=_sum_kinds([c["by_kind"] for c in comm]),
        min_by_kind=_min_kinds([c["min_parts"] for c in comm]),
        min_parts_rank0={k: {"sent": v[0], "wire": v[1], "lower": v[2]}
                         for k, v in comm[0]["min_parts"].items()},
        counters_agree=all(
            c["calls"] == c["dispatched_calls"] and math.isclose(c["sent"], c["dispatched_sent"])
            and math.isclose(c["wire"], c["dispatched_wire"]) and not c["unknown_ops"]
            for c in comm),
        unknown_ops=sorted({u for c in comm for u in c["unknown_ops"]}),
        finite=all(r["finite"] for r in ranks),
        fsdp_calls=max(c["fsdp"]["calls"] for c in comm),
        fsdp_sent_per_rank=[c["fsdp"]["sent"] for c in comm],
        fsdp_wire_per_rank=[c["fsdp"]["wire"] for c in comm],
        fsdp_by_kind_rank0=comm[0]["fsdp"]["by_kind"],
    )
    fsdp_wire = sum(row["fsdp_wire_per_rank"])
    row["step_over_fsdp_wire"] = sum(row["wire_per_rank"]) / fsdp_wire if fsdp_wire else None
    sent, minimum = sum(row["sent_per_rank"]), sum(row["min_sent_per_rank"])
    wire, lower = sum(row["wire_per_rank"]), sum(row["lower_wire_per_rank"])
    row["sent_over_min"] = _ratio(sent, minimum)
    row["wire_over_lower"] = _ratio(wire, lower)
    step = _slowest([r["step_s"] for r in ranks])
    train = _slowest([r["train_s"] for r in ranks])
    row.update(step_ms=1e3 * _median(step), step_ms_mean=1e3 * statistics.fmean(step),
               train_ms=1e3 * _median(train), train_ms_mean=1e3 * statistics.fmean(train))
    plain = entry.get("plain")
    if plain is not None and "error" not in plain:
        row["plain_step_ms"] = 1e3 * _median(plain["step_s"])
        row["plain_train_ms"] = 1e3 * _median(plain["train_s"])
        row["fsdp_over_plain_step"] = row["step_ms"] / row["plain_step_ms"]
        row["fsdp_over_plain_train"] = row["train_ms"] / row["plain_train_ms"]
    elif plain is not None:
        row["plain_error"] = plain["error"]
    return row


def _sum_kinds(per_rank: list[dict]) -> dict:
    """Measured calls (per rank) and bytes (summed over ranks) by kind of collective."""
    out: dict[str, dict[str, float]] = {}
    for by_kind in per_rank:
        for kind, v in by_kind.items():
            o = out.setdefault(kind, {"calls": v["calls"], "sent": 0.0, "wire": 0.0})
            o["sent"] += v["sent"]
            o["wire"] += v["wire"]
    return out


def _min_kinds(per_rank: list[dict]) -> dict:
    """The analytic minimum (summed over ranks) by the collective its stages use."""
    out: dict[str, dict[str, Any]] = {}
    for parts in per_rank:
        for stage, (sent, wire, lower) in parts.items():
            o = out.setdefault(STAGE_KIND[stage], {"sent": 0.0, "wire": 0.0, "lower": 0.0,
                                                   "stages": []})
            o["sent"] += sent
            o["wire"] += wire
            o["lower"] += lower
            if stage not in o["stages"]:
                o["stages"].append(stage)
    return out


def _ratio(a: float, b: float) -> Optional[float]:
    if b == 0:
        return 1.0 if a == 0 else None  # None: bytes where the rule needs none
    return a / b


def add_scaling(rows: list[dict]) -> None:
    """Each row's step/train time as a ratio to world size 1 of the same optimizer."""
    base = {r["optimizer"]: r for r in rows if r["world"] == 1 and "error" not in r}
    for r in rows:
        b = base.get(r["optimizer"])
        if b is None or "error" in r:
            continue
        r["step_over_w1"] = r["step_ms"] / b["step_ms"]
        r["train_over_w1"] = r["train_ms"] / b["train_ms"]


def _kib(x: Optional[float]) -> str:
    if x is None:
        return "—"
    if x == 0:
        return "0"
    return f"{x / 1024:.1f}" if x < 1024 ** 2 * 10 else f"{x / 1024 ** 2:.1f} Mi"


def _x(x: Optional[float], spec: str = "{:.2f}") -> str:
    return "—" if x is None else spec.format(x)


def table(rows: list[dict]) -> str:
    head = ("| optimizer | W | calls | sent KiB (max rank) | minimum KiB | sent/min | "
            "wire KiB (max rank) | lower KiB | wire/lower | step/FSDP2 wire | ok |")
    lines = ["Communication of opt.step() per step, beyond FSDP2's (both counters); "
             "step/FSDP2 wire: over FSDP2's own forward+backward wire bytes:", "",
             head, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['optimizer']} | {r['world']} | error: "
                         f"{r['error'].strip().splitlines()[-1]} |")
            continue
        lines.append(
            f"| {r['optimizer']} | {r['world']} | {r['calls_per_step']:.3g} | "
            f"{_kib(max(r['sent_per_rank']))} | {_kib(max(r['min_sent_per_rank']))} | "
            f"{_x(r['sent_over_min'])} | {_kib(max(r['wire_per_rank']))} | "
            f"{_kib(max(r['lower_wire_per_rank']))} | {_x(r['wire_over_lower'])} | "
            f"{_x(r['step_over_fsdp_wire'])} | {'yes' if r['counters_agree'] else 'NO'} |")
    lines += ["", "Time (median of the slowest rank; ratios to world size 1 of this run):", "",
              "| optimizer | W | step ms | step/W1 | train ms | train/W1 | FSDP2/plain step | "
              "FSDP2/plain train |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            continue
        lines.append(
            f"| {r['optimizer']} | {r['world']} | {r['step_ms']:.2f} | "
            f"{_x(r.get('step_over_w1'))} | {r['train_ms']:.1f} | "
            f"{_x(r.get('train_over_w1'))} | {_x(r.get('fsdp_over_plain_step'))} | "
            f"{_x(r.get('fsdp_over_plain_train'))} |")
    return "\n".join(lines)


def environment(device: str, backend: str, worlds: list[int]) -> dict[str, Any]:
    try:
        from . import core

        env = core.environment(device)
    except Exception:  # noqa: BLE001  the stamp must not fail the run
        env = {"torch": torch.__version__, "deepmomentum": dm.__version__,
               "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M")}
    cores = os.cpu_count() or 1
    env.update(backend=backend, threads_per_rank=1, cpu_cores=cores, world_sizes=worlds)
    if hasattr(os, "getloadavg"):  # other work on the machine skews every time
        env["load_average_1_5_15min_at_end"] = [round(x, 2) for x in os.getloadavg()]
    if device == "cpu":
        env["device"] = f"{platform.machine()} CPU, {cores} cores, 1 thread per rank"
        over = [w for w in worlds if w > cores]
        if over:
            env["oversubscribed"] = (
                f"world size {', '.join(map(str, over))} runs more ranks than the {cores} "
                "cores: their times measure contention, not scaling")
    return env


def _notes(rows: list[dict]) -> list[str]:
    """What the numbers say where measured exceeds the minimum (read from the rows)."""
    notes = []
    for r in rows:
        if "error" in r or r["world"] == 1:
            continue
        found = []
        for kind, m in sorted(r["by_kind"].items()):
            least = r["min_by_kind"].get(kind, {"sent": 0.0, "lower": 0.0, "stages": []})
            stages = ", ".join(least["stages"]) or "no stage needs it"
            sent, lower = _ratio(m["sent"], least["sent"]), _ratio(m["wire"], least["lower"])
            if sent is None or sent > 1.005:
                found.append(f"{kind} ({stages}) sends "
                             f"{'bytes' if sent is None else f'{sent:.2f}x'} its minimum")
            if lower is not None and lower > 1.005 and (sent is None or lower > sent * 1.005):
                found.append(f"{kind} ({stages}) puts {lower:.2f}x the wire bytes of a better "
                             "scheme on the wire")
        if found:
            notes.append(f"{r['optimizer']}, W={r['world']}: " + "; ".join(found) + ".")
    return notes


def write(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=float)
        f.write("\n")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--quick", action="store_true", help="small model, few steps (≤ 3 min)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--backend", choices=("gloo", "nccl"), default=None,
                        help="default: nccl on cuda, else gloo")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--optimizers", default=None,
                        help=f"comma-separated subset of: {', '.join(SETTINGS)}")
    for key in QUICK:
        parser.add_argument("--" + key.replace("_", "-"), type=int, default=None)
    args = parser.parse_args(argv)
    backend = args.backend or ("nccl" if args.device == "cuda" else "gloo")
    cfg = Config(**{k: getattr(args, k) if getattr(args, k) is not None else v
                    for k, v in (QUICK if args.quick else FULL).items()})
    names = list(SETTINGS) if args.optimizers is None else [
        n.strip() for n in args.optimizers.split(",") if n.strip()]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        parser.error(f"unknown optimizers {unknown}; choose from {list(SETTINGS)}")
    out = args.out or os.path.join(RESULTS, f"distributed_{args.device}.json")
    torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ
    worlds = [int(os.environ["WORLD_SIZE"])] if torchrun else sorted(set(args.world))
    if cfg.counted < 1 or cfg.timed < 1 or cfg.warmup < 0:
        parser.error("--counted and --timed must be ≥ 1, --warmup ≥ 0")
    bad = [w for w in worlds if w < 1 or cfg.batch % w]
    if bad:
        parser.error(f"--batch {cfg.batch} must split evenly over world sizes {bad}")
    if args.device == "cuda" and not torchrun and max(worlds) > torch.cuda.device_count():
        parser.error(f"world size {max(worlds)} needs as many GPUs; "
                     f"{torch.cuda.device_count()} visible")
    start = time.perf_counter()
    results: dict[int, dict] = {}
    if torchrun:
        local = int(os.environ["LOCAL_RANK"])
        if args.device == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend)
        try:
            result = worker(dist.get_rank(), dist.get_world_size(), args.device, cfg, names)
            _barrier(args.device)  # no rank tears down while another still talks
        finally:
            dist.destroy_process_group()
        if result is None:
            return {}
        results[worlds[0]] = result
    else:
        for world in worlds:
            print(f"world {world} ({backend}, {args.device}) ...", file=sys.stderr, flush=True)
            results[world] = spawn_world(world, backend, args.device, cfg, names)
    rows = [summarize(name, world, results[world][name]) for world in worlds for name in names]
    merged_worlds = list(worlds)
    if torchrun and os.path.exists(out):  # one world size per launch: keep the others
        with open(out) as f:
            previous = json.load(f)
        if previous.get("config") == cfg.__dict__:
            keep = [r for r in previous.get("results", []) if r["world"] not in worlds]
            rows = keep + rows
            merged_worlds = sorted({r["world"] for r in rows})
    rows.sort(key=lambda r: (names.index(r["optimizer"]) if r["optimizer"] in names else 99,
                             r["world"]))
    add_scaling(rows)
    payload = {
        "benchmark": "benchmarks/distributed.py",
        "command": "python -m benchmarks.distributed " + " ".join(
            sys.argv[1:] if argv is None else argv),
        "environment": environment(args.device, backend, merged_worlds),
        "config": cfg.__dict__,
        "model": f"{cfg.depth} transformer blocks of width {cfg.width}: LayerNorm, qkv "
                 f"{3 * cfg.width}x{cfg.width}, proj {cfg.width}x{cfg.width}, LayerNorm, fc1 "
                 f"{4 * cfg.width}x{cfg.width}, fc2 {cfg.width}x{4 * cfg.width}, biases; "
                 f"fully_shard per block and at the root",
        "conventions": CONVENTIONS,
        "seconds": time.perf_counter() - start,
        "results": rows,
        "notes": _notes(rows),
    }
    print(table(rows))
    env = payload["environment"]
    if "oversubscribed" in env:
        print(f"\nNote: {env['oversubscribed']}.")
    for note in payload["notes"]:
        print("- " + note)
    print(f"\n{payload['seconds']:.0f} s; JSON: {os.path.relpath(out)}")
    write(out, payload)
    return payload


if __name__ == "__main__":
    main()
