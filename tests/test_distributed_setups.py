"""DDP keeps every optimizer's replicas bit-identical; HSDP (a 2-D mesh) trains as one process;
placements a rule cannot take are refused by name before anything changes (issue 16, items 1,
2, 4). gloo on the CPU in spawned processes."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import deepmomentum as dm
from distributed_cases import Net, data, snapshot, spawn, train
from registry import REGISTRY

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

DDP_STEPS = 5


def _two_rank_worker(rank, world, model_sd, optim_sd):
    """Every two-rank check of this file in one spawn (each spawn costs seconds)."""
    return {"ddp": _ddp_worker(rank, world), "refusal": _refusal_worker(rank, world),
            "amp": _amp_worker(rank, world), "ddp schedules": _ddp_schedule_worker(rank, world),
            "load plain": _load_plain_worker(rank, world, model_sd, optim_sd),
            "input keys": _input_keys_worker(rank, world)}


@pytest.fixture(scope="module")
def two_ranks():
    return spawn(_two_rank_worker, 2, *_one_process_checkpoint())


def _ddp_optimizer(info, variant, module):
    """``info``'s optimizer with ``variant`` on ``module``: matrix optimizers take the
    matrices (with enough dims for ``batch_dims``) and an AdamW group for the rest."""
    params = list(module.parameters())
    if info.matrix_only and variant.get("use_muon") is not False:
        dims = 2 + variant.get("batch_dims", 0)
        groups = [{"params": [p for p in params if p.ndim >= dims]},
                  {"params": [p for p in params if p.ndim < dims], "use_muon": False}]
        return info.make(groups, **variant)
    return info.make(params, **variant)


def _ddp_worker(rank, world):
    out = {}
    for info in REGISTRY:
        for k, variant in enumerate(info.variants):
            torch.manual_seed(0)
            ddp = torch.nn.parallel.DistributedDataParallel(Net())
            opt = _ddp_optimizer(info, variant, ddp.module)
            if variant.get("keys") == "input":
                opt.attach(ddp)
            for step in range(DDP_STEPS):
                x, y = data(100 * rank + step)  # every rank its own data
                opt.zero_grad()
                (ddp(x) - y).pow(2).mean().backward()
                opt.step()
            mine = torch.cat([p.detach().flatten() for p in ddp.module.parameters()])
            everyone = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(everyone, mine)
            out[f"{info.name}-{k}"] = everyone
    return out


def test_ddp_keeps_every_optimizer_bit_identical_across_ranks(two_ranks):
    results = two_ranks[0]["ddp"]
    assert len(results) == sum(len(info.variants) for info in REGISTRY)
    for name, (zero, one) in results.items():
        assert torch.isfinite(zero).all(), name
        assert torch.equal(zero, one), name


# --- HSDP: a (replicate, shard) mesh --------------------------------------------------------

HSDP_SETTINGS = {
    "Muon": lambda m: dm.Muon(dm.muon_param_groups(m), lr=0.02, ns_dtype=torch.float32),
    "DMGD": lambda m: dm.DMGD(m.parameters(), lr=0.05, hidden=3, memory_lr=0.1),
    "DeltaMomentum": lambda m: dm.DeltaMomentum(m.parameters(), lr=0.05, erase=0.5),
    "PreconditionedMomentum": lambda m: dm.PreconditionedMomentum(m.parameters(), lr=0.01),
}


def _hsdp_worker(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    out = {}
    for name, build in HSDP_SETTINGS.items():
        torch.manual_seed(0)
        model = Net()
        fully_shard(model, mesh=mesh)
        opt = build(model)
        train(model, opt, range(6), rank, world)
        out[name] = snapshot(model, opt)
    out["placements"] = tuple(model.a.weight.placements)
    return out


def _one_process(build):
    torch.manual_seed(0)
    model = Net()
    opt = build(model)
    train(model, opt, range(6))
    return snapshot(model, opt)


def test_hsdp_trains_as_one_process():
    from torch.distributed.tensor import Replicate, Shard

    ranks = spawn(_hsdp_worker, 4)
    assert ranks[0]["placements"] == (Replicate(), Shard(0))
    for name, build in HSDP_SETTINGS.items():
        ref = _one_process(build)
        for rank, result in enumerate(ranks):
            for key, value in ref["params"].items():
                torch.testing.assert_close(result[name]["params"][key], value, atol=2e-5,
                                           rtol=1e-5, msg=lambda m: f"{name}, rank {rank}, {key}: {m}")


# --- refused placements ---------------------------------------------------------------------

def _refusal_worker(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Partial, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    other = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "tp"))
    messages = {}

    def attempt(label, params_and_grads, build=lambda ps: dm.Muon(ps, lr=0.02)):
        params = []
        for value, placements, grad_placements, on in params_and_grads:
            p = torch.nn.Parameter(distribute_tensor(value, on, placements))
            p.grad = distribute_tensor(torch.ones_like(value), on, grad_placements) \
                if grad_placements else None
            params.append(p)
        before = [p.detach().full_tensor().clone() for p in params]
        try:
            build([{"params": params, "param_names": [f"w{i}" for i in range(len(params))]}]
                  ).step()
        except ValueError as error:
            messages[label] = str(error)
        after = [p.detach().full_tensor() for p in params]
        messages[label + " unchanged"] = all(torch.equal(a, b) for a, b in zip(before, after))

    torch.manual_seed(0)
    w = torch.randn(4, 6)
    attempt("Shard(1)", [(w, [Shard(1)], [Shard(1)], mesh)])
    # An elementwise rule takes any sharding: a tensor-parallel Shard(1) steps on its shard.
    p = torch.nn.Parameter(distribute_tensor(w, mesh, [Shard(1)]))
    p.grad = distribute_tensor(w.sin(), mesh, [Shard(1)])
    plain = torch.nn.Parameter(w.clone())
    plain.grad = w.sin()
    for params in ([p], [plain]):
        opt = dm.PreconditionedMomentum(params, lr=0.1)
        opt.step()
        opt.step()
    messages["Shard(1) elementwise"] = torch.equal(p.detach().full_tensor(), plain.detach())
    attempt("mixed mesh", [(w, [Shard(0)], [Shard(0)], mesh),
                           (w.clone(), [Shard(0), Shard(0)], [Shard(0), Shard(0)], other)])
    attempt("Partial grad", [(w, [Shard(0)], [Partial()], mesh)])
    return messages


def test_unsupported_placements_are_refused_by_name(two_ranks):
    messages = two_ranks[0]["refusal"]
    assert "w0" in messages["Shard(1)"] and "Shard(dim=1)" in messages["Shard(1)"]
    assert messages["Shard(1) elementwise"] is True
    assert "w1" in messages["mixed mesh"] and "mesh" in messages["mixed mesh"]
    assert "w0" in messages["Partial grad"] and "Partial" in messages["Partial grad"]
    for label in ("Shard(1)", "mixed mesh", "Partial grad"):
        assert messages[label + " unchanged"], label


# --- GradScaler and MultiFrequency under FSDP2 and DDP --------------------------------------

def _multi_frequency(model):
    params = list(model.parameters())
    return dm.MultiFrequency(torch.optim.AdamW(
        [{"params": params[:2], "update_period": 1},
         {"params": params[2:], "update_period": 2, "accumulate": "mean"}], lr=0.01))


def _muon(model):
    return dm.Muon(dm.muon_param_groups(model), lr=0.02, ns_dtype=torch.float32)


def _scaled_steps(model, opt, scaler, steps, rank, world, poison=None):
    """``train`` with a GradScaler; ``poison = (step, rank)`` puts an inf into that rank's
    first gradient shard holding entries at that step."""
    from torch.distributed.tensor import DTensor

    per = 8 // world
    for step in steps:
        x, y = data(step)
        opt.zero_grad()
        scaler.scale((model(x[rank * per:(rank + 1) * per]) - y[rank * per:(rank + 1) * per])
                     .pow(2).mean()).backward()
        if poison == (step, rank):
            for p in model.parameters():
                g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                if g.numel():
                    g.view(-1)[0] = float("inf")
                    break
        scaler.step(opt)
        scaler.update()


def _amp_worker(rank, world):
    from torch.distributed.fsdp import fully_shard

    out = {}
    for name, build in {"Muon": _muon, "MultiFrequency": _multi_frequency}.items():
        torch.manual_seed(0)
        model = Net()
        fully_shard(model)
        opt = build(model)
        _scaled_steps(model, opt, torch.amp.GradScaler("cpu", init_scale=1024.0), range(6),
                      rank, world)
        out[name] = snapshot(model, opt)["params"]
    # An inf in rank 1's shards only: every rank skips that step (and none waits for another).
    torch.manual_seed(0)
    model = Net()
    fully_shard(model)
    opt = _muon(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1000)
    _scaled_steps(model, opt, scaler, range(2), rank, world)
    before = snapshot(model, opt)["params"]
    _scaled_steps(model, opt, scaler, range(2, 3), rank, world, poison=(2, 1))
    out["after poisoned step"] = snapshot(model, opt)["params"]
    out["before poisoned step"] = before
    _scaled_steps(model, opt, scaler, range(3, 4), rank, world)  # and training goes on
    # torch's GradScaler finds the inf on every rank (DTensor reduces its check); a found_inf
    # that only one rank raises must stop every rank too.
    opt.zero_grad()
    x, y = data(5)
    (model(x[rank * 4:(rank + 1) * 4]) - y[rank * 4:(rank + 1) * 4]).pow(2).mean().backward()
    before = snapshot(model, opt)["params"]
    opt.grad_scale, opt.found_inf = None, torch.tensor(float(rank == 1))
    opt.step()
    del opt.grad_scale, opt.found_inf
    out["after rank-local inf"] = snapshot(model, opt)["params"]
    out["before rank-local inf"] = before
    return out


def test_grad_scaler_and_multi_frequency_under_fsdp2(two_ranks):
    ranks = [r["amp"] for r in two_ranks]
    for name, build in {"Muon": _muon, "MultiFrequency": _multi_frequency}.items():
        torch.manual_seed(0)
        model = Net()
        opt = build(model)
        train(model, opt, range(6))
        for rank, result in enumerate(ranks):
            for key, p in model.named_parameters():
                torch.testing.assert_close(result[name][key], p.detach(), atol=2e-5, rtol=1e-5,
                                           msg=lambda m: f"{name}, rank {rank}, {key}: {m}")
    for rank, result in enumerate(ranks):
        for when in ("poisoned step", "rank-local inf"):
            for key, value in result[f"before {when}"].items():
                assert torch.equal(result[f"after {when}"][key], value), (when, rank, key)


def _ddp_schedule_worker(rank, world):
    out = {}
    builds = {
        "AssociativeMomentum-period3": lambda m: dm.AssociativeMomentum(
            m.parameters(), lr=0.05, update_period=3, accumulate="mean"),
        "Muon-period2": lambda m: dm.Muon(dm.muon_param_groups(m, muon_options=dict(
            update_period=2)), lr=0.02),
        "MultiFrequency": _multi_frequency,
    }
    for name, build in builds.items():
        torch.manual_seed(0)
        ddp = torch.nn.parallel.DistributedDataParallel(Net())
        opt = build(ddp.module)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        for step in range(5):
            x, y = data(100 * rank + step)
            opt.zero_grad()
            scaler.scale((ddp(x) - y).pow(2).mean()).backward()
            scaler.step(opt)
            scaler.update()
        mine = torch.cat([p.detach().flatten() for p in ddp.module.parameters()])
        everyone = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(everyone, mine)
        out[name] = everyone
    return out


def test_ddp_schedules_and_grad_scaler_keep_ranks_identical(two_ranks):
    for name, (zero, one) in two_ranks[0]["ddp schedules"].items():
        assert torch.equal(zero, one), name


# --- a one-process checkpoint loaded under FSDP2 --------------------------------------------

def _one_process_checkpoint():
    torch.manual_seed(0)
    model = Net()
    opt = dm.DMGD(model.parameters(), lr=0.05, hidden=3, memory_lr=0.1)
    train(model, opt, range(3))
    return model.state_dict(), opt.state_dict()


def _load_plain_worker(rank, world, model_sd, optim_sd):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = Net()
    model.load_state_dict(model_sd)
    fully_shard(model)
    opt = dm.DMGD(model.parameters(), lr=0.05, hidden=3, memory_lr=0.1)
    opt.load_state_dict(optim_sd)  # whole tensors: each rank keeps its rows
    train(model, opt, range(3, 6), rank, world)
    return snapshot(model, opt)


def test_a_one_process_state_dict_loads_into_fsdp2(two_ranks):
    got = two_ranks[1]["load plain"]
    torch.manual_seed(0)
    model = Net()
    opt = dm.DMGD(model.parameters(), lr=0.05, hidden=3, memory_lr=0.1)
    train(model, opt, range(6))
    ref = snapshot(model, opt)
    for kind in ("params", "state"):
        assert set(got[kind]) == set(ref[kind])
        for key, value in ref[kind].items():
            torch.testing.assert_close(got[kind][key], value, atol=2e-5, rtol=1e-5,
                                       msg=lambda m: f"{key}: {m}")


# --- input keys: only the rows the subsampling keeps travel ---------------------------------

def _input_keys_worker(rank, world):
    """Each rank holds its own number of key rows; the gathered keys must be the subsampling
    of every rank's rows concatenated in rank order."""
    layer = torch.nn.Linear(3, 2)
    opt = dm.DeltaMomentum(layer.parameters(), lr=0.1, keys="input", key_samples=4)
    opt._key_process_group = dist.group.WORLD
    out = {}
    for counts in ((5, 3), (2, 1), (0, 6)):
        g = torch.Generator().manual_seed(7)
        rows = [torch.randn(n, 3, generator=g) for n in counts]  # every rank knows them all
        if counts[rank]:
            opt.state[layer.weight]["input_keys"] = rows[rank].clone()
        opt._gather_input_keys(opt.param_groups[0], [layer.weight, layer.bias])
        out[counts] = (opt.state[layer.weight].pop("input_keys"),
                       torch.cat(rows)[torch.linspace(0, sum(counts) - 1, 4).round().long()]
                       if sum(counts) > 4 else torch.cat(rows))
    return out


def test_gathered_input_keys_are_the_subsampled_concatenation(two_ranks):
    for rank, result in enumerate(two_ranks):
        for counts, (got, expected) in result["input keys"].items():
            assert torch.equal(got, expected), (rank, counts)
