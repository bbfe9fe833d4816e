"""Parameters sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``): DTensor ``Shard(0)``.

Every rule runs on each rank's local shard (``DTensor.to_local()``); the stages that need more
than the shard say how they get it, with torch.distributed collectives over the mesh's process
group and never through DTensor's implicit redistribution (which would all-gather every matrix
on every rank and repeat its matrix work world-size times):

* elementwise stages (every memory write, Adam's preconditioner, the apply, multi-frequency
  accumulation): the local shard, no communication;
* Newton–Schulz (Muon, M3, DMGD's ``output="newton_schulz"``): each matrix has one **owner**
  rank (assigned by :func:`shards_of` so the work is balanced, largest matrices first); one
  ``all_to_all_single`` per dtype sends every shard to its owner (:func:`gather_to_owners`), the
  owner orthogonalizes its matrices (same shapes batched) and a second one sends the results'
  rows back (:func:`scatter_from_owners`): each matrix is orthogonalized once, on one rank,
  and moves ``2·(W−1)/W·r·c`` elements;
* DeltaMomentum's gradient-key erase :math:`bK`, :math:`K = G^\\top G/\\lVert G\\rVert^2`: its
  rows are local, so only the ``c × c`` Gram and the norm are all-reduced (a 1-D tensor:
  two scalars);
* DMGD's inner step: keys, values and reads are row-local; the memory ``(A, B)`` is replicated
  and only its gradients (``c·h`` each) are all-reduced, so every rank holds the same memory.

State that has its parameter's shape is a DTensor with the parameter's placement (DCP shards
it); other state (DMGD's memories, step counters) is replicated.

Supported placements: ``Shard(0)`` or ``Replicate()`` on every dim of one device mesh per
param group (FSDP2 and HSDP's ``(Replicate(), Shard(0))``). Anything else — a tensor-parallel
``Shard(1)``, ``Partial``, a strided shard, two meshes in one group — is refused with a
``ValueError`` naming the tensor and its placement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from .newton_schulz import matrix_shape

__all__ = ["Shard0", "shards_of", "process_groups", "is_dtensor", "local", "replicated",
           "like_param", "state_like", "load_like", "gather_to_owners", "scatter_from_owners",
           "all_reduce_sum", "all_reduce_max", "full_many"]

try:  # torch.distributed may be absent (some builds); then nothing is ever a DTensor
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - torch without distributed
    dist = None
    DTensor = None


def is_dtensor(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Optional[Tensor]) -> Optional[Tensor]:
    """The rank's own shard of a DTensor (the same storage: in-place updates write through),
    or ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t


@dataclass(frozen=True, eq=False)
class Shard0:
    """Where one DTensor parameter's local shard sits in the whole tensor: rows
    ``offset : offset + rows[rank]`` of dim 0 of ``shape``, over the process
    ``group`` of the mesh dim it is sharded on, with ``owner`` the rank that does its matrix
    work (its index in ``group``)."""

    shape: torch.Size
    mesh: Any
    placements: tuple
    group: Any
    rank: int
    world: int
    rows: tuple[int, ...]
    owner: int

    @property
    def offset(self) -> int:
        return sum(self.rows[: self.rank])

    def wrap(self, t: Tensor) -> Tensor:
        """This rank's shard ``t`` of a tensor of the parameter's shape as a DTensor with the
        parameter's placement."""
        return DTensor.from_local(t, self.mesh, self.placements, run_check=False,
                                  shape=self.shape, stride=_contiguous_strides(self.shape))


def replicated(t: Tensor, mesh) -> Tensor:
    """``t``, which every rank holds alike, as a replicated DTensor on ``mesh``."""
    return DTensor.from_local(t, mesh, [Replicate()] * mesh.ndim, run_check=False)




def like_param(t: Tensor, param: Tensor, shard: Optional[Shard0]) -> Tensor:
    """State ``t`` computed on ``param``'s local shard, stored as ``param`` is stored: a
    DTensor with its placement (sharded or replicated), or ``t`` itself."""
    if shard is not None:
        return shard.wrap(t)
    if is_dtensor(param):
        return DTensor.from_local(t, param.device_mesh, param.placements, run_check=False)
    return t


def rows_like(param: Tensor, batch_dims: int, dtype: torch.dtype) -> Tensor:
    """Zeros of ``param``'s per-row shape (``param.shape[:batch_dims + 1]``, M3's normalized
    second moment) in ``dtype``; for a DTensor ``param`` placed as it is, so its rows sit on
    the ranks that hold the parameter's rows (a prefix of the shape splits as the shape)."""
    shape = tuple(param.shape)[:batch_dims + 1]
    if not is_dtensor(param):
        return torch.zeros(shape, dtype=dtype, device=param.device)
    rows = torch.zeros(tuple(local(param).shape)[:batch_dims + 1], dtype=dtype,
                       device=local(param).device)
    return DTensor.from_local(rows, param.device_mesh, param.placements, run_check=False,
                              shape=torch.Size(shape), stride=_contiguous_strides(shape))


def stored_like(t: Tensor, param: Tensor, whole: bool = False) -> Tensor:
    """A compressed state tensor computed on ``param``'s local shard — bf16 state or 8-bit
    codes of the shard's shape, or 8-bit block scales (local rows, blocks per row) — stored as
    ``param`` is: a DTensor with its placement (the scales split by rows, as the parameter),
    replicated for an entry every rank holds ``whole``, or ``t`` itself."""
    if not is_dtensor(param):
        return t
    mesh, placements = param.device_mesh, tuple(param.placements)
    if whole or all(isinstance(pl, Replicate) for pl in placements):
        return replicated(t, mesh)
    if tuple(t.shape) == tuple(local(param).shape):
        shape = tuple(param.shape)
    elif all(isinstance(pl, Replicate) or (isinstance(pl, Shard) and pl.dim == 0)
             for pl in placements):
        shape = (param.shape[0], *t.shape[1:])
    else:
        raise ValueError(f"8-bit state needs whole rows on each rank: a parameter placed "
                         f"{placements} (shape {tuple(param.shape)}) is split along another "
                         "dim than 0; use state_dtype=torch.bfloat16 for it")
    return DTensor.from_local(t, mesh, placements, run_check=False, shape=torch.Size(shape),
                              stride=_contiguous_strides(shape))


def state_like(t: Tensor, param: Tensor) -> Tensor:
    """A state tensor made for the DTensor ``param`` (by ``zeros_like`` it already is a
    DTensor with its placement; any other, e.g. DMGD's memories, is replicated)."""
    if not is_dtensor(param) or is_dtensor(t):
        return t
    return replicated(t, param.device_mesh)


def load_like(value: Tensor, param: Tensor, whole: bool = False, rows: bool = False) -> Tensor:
    """A loaded state tensor for the DTensor ``param``: a DTensor as it is; a whole tensor of
    the parameter's shape or of a prefix of it (per-row state; a one-process checkpoint) — or
    with the parameter's rows (``rows``: 8-bit block scales) — placed as the parameter, unless
    it is an entry every rank holds ``whole``; any other replicated."""
    if is_dtensor(value) or not is_dtensor(param):
        return value
    shape = tuple(value.shape)
    prefix = 0 < len(shape) <= param.ndim and shape == tuple(param.shape)[:len(shape)]
    if not whole and (prefix or (rows and shape[:1] == tuple(param.shape)[:1])):
        # of the parameter's shape, or a prefix of it (per-row state): split as the parameter
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
    return replicated(value, param.device_mesh)


def _contiguous_strides(shape) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(tuple(shape)):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def _chunk_rows(n: int, world: int) -> tuple[int, ...]:
    """Rows of each rank under ``Shard(0)``: torch.chunk's split (ceil(n/W) each, the last
    ranks fewer or none), as DTensor and FSDP2 lay them out."""
    size = -(-n // world) if world else 0
    return tuple(max(0, min(n, (k + 1) * size) - k * size) for k in range(world))


def _describe(name: str, t: Tensor) -> str:
    return f"{name} (placements {tuple(t.placements)} on mesh {tuple(t.device_mesh.shape)})"


def shards_of(params: Sequence[Tensor], names: Callable[[Tensor], str],
              grads: Optional[Sequence[Tensor]] = None, *, matrices: bool = True,
              cost: Callable[[torch.Size], float] = None) -> Optional[list[Optional[Shard0]]]:
    """Each parameter's :class:`Shard0` (None for an ordinary tensor, a replicated DTensor, or
    — for an elementwise rule — a DTensor sharded along another dim), or None where no
    parameter is a DTensor. Owners are assigned greedily, largest ``cost`` first (default:
    ``r·c·min(r, c)``, Newton–Schulz's flops), each to the least loaded rank (ties: lowest
    rank): the same on every rank, since it reads only global shapes.

    Raises ``ValueError`` naming the tensor (``names(p)``) and its placement for what the
    rule cannot take: with ``matrices`` (a rule with matrix stages) anything but ``Shard(0)``
    or ``Replicate()``, for any rule ``Partial`` or strided placements, a mesh other than the
    group's first DTensor's, or a gradient placed otherwise than its parameter.
    """
    if DTensor is None or not any(isinstance(p, DTensor) for p in params):
        return None
    cost = cost or _ns_cost
    mesh = None
    out: list[Optional[Shard0]] = [None] * len(params)
    sharded = []
    for i, p in enumerate(params):
        if not isinstance(p, DTensor):
            continue
        if mesh is None:
            mesh = p.device_mesh
        elif p.device_mesh != mesh:
            raise ValueError(
                f"{_describe(names(p), p)} lives on another device mesh than the group's other "
                f"DTensor parameters (mesh {tuple(mesh.shape)}, dims {mesh.mesh_dim_names}): "
                "put parameters of different meshes in different param groups")
        if grads is not None:
            g = grads[i]
            if not isinstance(g, DTensor) or g.device_mesh != mesh or \
                    tuple(g.placements) != tuple(p.placements):
                where = (f"placements {tuple(g.placements)}" if isinstance(g, DTensor)
                         else "a plain tensor")
                raise ValueError(f"the gradient of {_describe(names(p), p)} has {where}; it "
                                 "must be placed as its parameter (FSDP2 reduce-scatters it so)")
        strange = [pl for pl in p.placements
                   if not isinstance(pl, (Replicate, Shard)) or
                   (isinstance(pl, Shard) and type(pl) is not Shard)]
        dims = [d for d, pl in enumerate(p.placements) if isinstance(pl, Shard)]
        row_sharded = len(dims) == 1 and p.placements[dims[0]].dim == 0
        if strange or (matrices and dims and not row_sharded):
            raise ValueError(
                f"{_describe(names(p), p)}: "
                + ("this rule has matrix stages and takes parameters sharded along dim 0 over "
                   "one mesh dim (FSDP2's Shard(0), HSDP's (Replicate(), Shard(0))) or "
                   "replicated; a tensor-parallel Shard(1) is not supported"
                   if not strange else
                   "Partial and strided placements are not supported (only Shard and "
                   "Replicate)"))
        if not row_sharded:
            continue  # replicated, or an elementwise rule's other sharding: local only
        group = mesh.get_group(dims[0])
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        if world == 1:
            continue  # the whole tensor is local: nothing to communicate
        rows = _chunk_rows(p.shape[0], world)
        if p.to_local().shape[0] != rows[rank]:
            raise ValueError(f"{_describe(names(p), p)} holds {p.to_local().shape[0]} rows on "
                             f"rank {rank}; Shard(0) over {world} ranks gives {rows[rank]}")
        out[i] = (p, mesh, tuple(p.placements), group, rank, world, rows)
        sharded.append(i)
    load = {}
    for i in sorted(sharded, key=lambda j: (-cost(params[j].shape), j)):
        p, mesh, placements, group, rank, world, rows = out[i]
        owner = min(range(world), key=lambda k: (load.get(k, 0.0), k))
        load[owner] = load.get(owner, 0.0) + cost(p.shape)
        out[i] = Shard0(p.shape, mesh, placements, group, rank, world, rows, owner)
    return out


def process_groups(tensors: Sequence[Tensor]) -> list:
    """The process groups of every mesh dim of the DTensors among ``tensors`` (where ranks
    must agree on a host-side decision)."""
    groups = []
    for t in tensors:
        if is_dtensor(t):
            for d in range(t.device_mesh.ndim):
                g = t.device_mesh.get_group(d)
                if all(g is not h for h in groups):
                    groups.append(g)
    return groups


def squared_norm_sums(lists: Sequence[Sequence[Any]]) -> list[float]:
    """``Σ_t ‖t‖²`` of each list of tensors, over every rank's shards, read to the host in one
    transfer: the statistics a host-side decision all ranks must share (``update_period=
    "auto"``). An entry is a tensor (a DTensor counts its shards on every rank) or a pair
    ``(local, like)``: a local shard laid out as the DTensor ``like``. Shards add over the mesh
    dims they are split along (Replicate dims hold copies: not added); one ``all_reduce`` per
    such set of dims. Each norm is taken in the tensor's dtype (fp32 for 16-bit ones; no
    copy of the tensor) and squared in float64, in list order: the same tensors give the same
    sums."""
    if not any(lists):
        return [0.0] * len(lists)
    buckets: dict[tuple, list[list[Tensor]]] = {}
    for j, entries in enumerate(lists):
        for entry in entries:
            tensor, like = entry if isinstance(entry, tuple) else (entry, entry)
            x = local(tensor)
            if x.is_complex():
                x = torch.view_as_real(x)
            dims = ()
            if is_dtensor(like):
                dims = tuple(like.device_mesh.get_group(d)
                             for d, placement in enumerate(like.placements)
                             if placement.is_shard())
            per_list = buckets.setdefault(dims, [[] for _ in lists])
            wide = torch.float32 if x.dtype in (torch.bfloat16, torch.float16) else None
            per_list[j].append(torch.linalg.vector_norm(x, dtype=wide))
    totals = []
    for dims, per_list in buckets.items():
        device = next(v for vs in per_list for v in vs).device
        sums = torch.stack([torch.stack([v.to(device) for v in vs]).double().square().sum()
                            if vs else torch.zeros((), dtype=torch.float64, device=device)
                            for vs in per_list])
        for group in dims:
            sums = all_reduce_sum([sums], group)[0]
        totals.append(sums.cpu())
    return [float(v) for v in torch.stack(totals).sum(0)]


def _ns_cost(shape: torch.Size) -> float:
    """Newton–Schulz's flops up to a constant, ``r·c·min(r, c)``, of a shape's matrix view."""
    r, c = matrix_shape(shape)
    return float(r) * c * min(r, c)


# --- collectives ----------------------------------------------------------------------------


def _by_group(shards: Sequence[Optional[Shard0]]) -> dict[Any, list[int]]:
    groups: dict[Any, list[int]] = {}
    for i, s in enumerate(shards):
        if s is not None:
            groups.setdefault(s.group, []).append(i)
    return groups


def gather_to_owners(tensors: Sequence[Tensor], shards: Sequence[Optional[Shard0]]
                     ) -> dict[int, Tensor]:
    """The whole tensor of every sharded entry this rank owns, by index, assembled from every
    rank's shard: one ``all_to_all_single`` per (process group, dtype), in index order on
    every rank. Each rank sends each shard to its owner only (nothing for its own)."""
    fulls: dict[int, Tensor] = {}
    for group, indices in _by_group(shards).items():
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i in indices:
            by_dtype.setdefault(tensors[i].dtype, []).append(i)
        for dtype, idx in by_dtype.items():
            world, rank = shards[idx[0]].world, shards[idx[0]].rank
            per_row = {i: math.prod(shards[i].shape[1:]) for i in idx}
            send = [[i for i in idx if shards[i].owner == k] for k in range(world)]
            send_sizes = [sum(shards[i].rows[rank] * per_row[i] for i in s) for s in send]
            mine = send[rank]
            recv_sizes = [sum(shards[i].rows[k] * per_row[i] for i in mine) for k in range(world)]
            device = tensors[idx[0]].device
            flat = torch.cat([tensors[i].reshape(-1) for s in send for i in s]) if any(
                send_sizes) else torch.empty(0, dtype=dtype, device=device)
            received = torch.empty(sum(recv_sizes), dtype=dtype, device=device)
            dist.all_to_all_single(received, flat.contiguous(), recv_sizes, send_sizes,
                                   group=group)
            # From rank k: its shards of my matrices, in index order.
            parts = {i: [] for i in mine}
            offset = 0
            for k in range(world):
                for i in mine:
                    n = shards[i].rows[k] * per_row[i]
                    parts[i].append(received[offset:offset + n])
                    offset += n
            for i in mine:
                fulls[i] = torch.cat(parts[i]).view(shards[i].shape)
    return fulls


def scatter_from_owners(fulls: dict[int, Tensor], like: Sequence[Tensor],
                        shards: Sequence[Optional[Shard0]]) -> dict[int, Tensor]:
    """The inverse of :func:`gather_to_owners`: each owner sends every rank its rows of each
    whole tensor in ``fulls``; returns this rank's shard of every sharded entry, by index, in
    the dtype and local shape of its entry of ``like`` (the tensors that were gathered)."""
    shard_out: dict[int, Tensor] = {}
    for group, indices in _by_group(shards).items():
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i in indices:
            by_dtype.setdefault(like[i].dtype, []).append(i)
        for _, idx in by_dtype.items():
            world, rank = shards[idx[0]].world, shards[idx[0]].rank
            mine = [i for i in idx if shards[i].owner == rank]
            out_dtype = like[idx[0]].dtype  # results in their inputs' dtype (as NS returns)
            per_row = {i: math.prod(shards[i].shape[1:]) for i in idx}
            send_chunks, send_sizes = [], []
            for k in range(world):
                size = 0
                for i in mine:
                    start = sum(shards[i].rows[:k])
                    rows = fulls[i].reshape(shards[i].shape[0], -1)[start:start + shards[i].rows[k]]
                    send_chunks.append(rows.reshape(-1).to(out_dtype))
                    size += rows.numel()
                send_sizes.append(size)
            recv_from = [[i for i in idx if shards[i].owner == k] for k in range(world)]
            recv_sizes = [sum(shards[i].rows[rank] * per_row[i] for i in r) for r in recv_from]
            device = like[idx[0]].device
            flat = torch.cat(send_chunks) if send_chunks else torch.empty(
                0, dtype=out_dtype, device=device)
            received = torch.empty(sum(recv_sizes), dtype=out_dtype, device=device)
            dist.all_to_all_single(received, flat.contiguous(), recv_sizes, send_sizes,
                                   group=group)
            offset = 0
            for k in range(world):
                for i in recv_from[k]:
                    n = shards[i].rows[rank] * per_row[i]
                    shard_out[i] = received[offset:offset + n].view(like[i].shape)
                    offset += n
    return shard_out


def all_reduce_sum(tensors: Sequence[Tensor], group) -> list[Tensor]:
    """The sums over ``group`` of each tensor (one flattened ``all_reduce`` per dtype)."""
    return _all_reduce(tensors, group, dist.ReduceOp.SUM)


def all_reduce_max(tensors: Sequence[Tensor], group) -> list[Tensor]:
    return _all_reduce(tensors, group, dist.ReduceOp.MAX)


def _all_reduce(tensors: Sequence[Tensor], group, op) -> list[Tensor]:
    out = list(tensors)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    for idx in by_dtype.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in idx])
        dist.all_reduce(flat, op=op, group=group)
        for i, part in zip(idx, flat.split([tensors[i].numel() for i in idx])):
            out[i] = part.view(tensors[i].shape)
    return out


def full_many(tensors: Sequence[Tensor], shards: Sequence[Shard0]) -> list[Tensor]:
    """The whole tensors on every rank, from each rank's row shards ``tensors`` (explicit
    all-gathers, for tensors whose whole is what the rule needs: DMGD's vectors, Delta's wide
    gradients): one per (process group, dtype), each rank's rows padded to the chunk size
    ``ceil(r/W)``, so all ranks send alike."""
    out: list[Optional[Tensor]] = [None] * len(tensors)
    kinds: dict[tuple, list[int]] = {}
    for i, (t, s) in enumerate(zip(tensors, shards)):
        kinds.setdefault((s.group, t.dtype), []).append(i)
    for (group, dtype), idx in kinds.items():
        world = shards[idx[0]].world
        chunks = [max(shards[i].rows) * math.prod(shards[i].shape[1:]) for i in idx]
        flat = torch.zeros(sum(chunks), dtype=dtype, device=tensors[idx[0]].device)
        offset = 0
        for i, n in zip(idx, chunks):
            mine = tensors[i].reshape(-1)
            flat[offset:offset + mine.numel()] = mine
            offset += n
        gathered = torch.empty(world * flat.numel(), dtype=dtype, device=flat.device)
        _all_gather_single(gathered, flat, group)
        gathered = gathered.view(world, -1)
        offset = 0
        for i, n in zip(idx, chunks):
            per_row = math.prod(shards[i].shape[1:])
            out[i] = torch.cat([gathered[r, offset:offset + shards[i].rows[r] * per_row]
                                for r in range(world)]).view(shards[i].shape)
            offset += n
    return out


def _all_gather_single(output: Tensor, tensor: Tensor, group: Any) -> None:
    """``torch.distributed.all_gather_single`` (``all_gather_into_tensor`` before 2.13)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, tensor, group=group)


