"""DeltaMomentum input keys under DistributedDataParallel (issue 14, item 6): the keys of all
ranks are gathered at each update, so the replicas stay identical. gloo on the CPU, two
processes started by torch.multiprocessing.spawn."""

from __future__ import annotations

import datetime
import os
import tempfile

import pytest
import torch
import torch.distributed as dist

import deepmomentum as dm

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

WORLD = 2


class _Net(torch.nn.Module):
    """Two Linear layers in parallel, then a head; ``branch=False`` skips the second one, so
    a rank may see no forward of a hooked layer in a step."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(5, 7)
        self.b = torch.nn.Linear(5, 7)
        self.head = torch.nn.Linear(7, 3)

    def forward(self, x, branch=True):
        h = torch.tanh(self.a(x))
        if branch:
            h = h + torch.tanh(self.b(x))
        return self.head(h)


def _train(rank, update_period, gather, skip_branch_on_rank1):
    """A few DDP steps on this rank's own data; the flattened parameters of every rank."""
    torch.manual_seed(0)  # the same initial model everywhere (DDP also broadcasts it)
    ddp = torch.nn.parallel.DistributedDataParallel(
        _Net(), find_unused_parameters=skip_branch_on_rank1)
    groups = [{"params": list(ddp.parameters()), "update_period": update_period}]
    opt = dm.DeltaMomentum(groups, lr=0.1, momentum=0.9, erase=0.8, keys="input",
                           key_samples=4).attach(ddp)
    if not gather:  # the control: rank-local keys, as before the fix
        opt._gather_input_keys = lambda group, params: None
    data = torch.Generator().manual_seed(100 + rank)  # different data on every rank
    for step in range(6):
        x = torch.randn(6, 5, generator=data)
        y = torch.randn(6, 3, generator=data)
        branch = not (skip_branch_on_rank1 and rank == 1 and step % 2 == 1)
        opt.zero_grad()
        (ddp(x, branch=branch) - y).pow(2).mean().backward()
        opt.step()
    mine = torch.cat([p.detach().flatten() for p in ddp.module.parameters()])
    everyone = [torch.empty_like(mine) for _ in range(WORLD)]
    dist.all_gather(everyone, mine)
    return everyone


def _worker(rank, init_method, out_dir):
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        results = {}
        for name, options in {
            "gathered": dict(update_period=1, gather=True, skip_branch_on_rank1=False),
            "gathered_period_2": dict(update_period=2, gather=True, skip_branch_on_rank1=False),
            "gathered_skipped_layer": dict(update_period=1, gather=True,
                                           skip_branch_on_rank1=True),
            "rank_local": dict(update_period=1, gather=False, skip_branch_on_rank1=False),
        }.items():
            results[name] = _train(rank, **options)
        with pytest.raises(ValueError, match="process_group="):
            dm.DeltaMomentum(_Net().parameters(), keys="input").attach(_Net())
        explicit = _Net()  # process_group= given explicitly: accepted
        dm.DeltaMomentum(explicit.parameters(), keys="input").attach(
            explicit, process_group=dist.group.WORLD)
        results["refused_bare_module"] = True
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "results.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results():
    with tempfile.TemporaryDirectory() as out_dir:
        init_method = "file://" + os.path.join(out_dir, "rendezvous")
        torch.multiprocessing.spawn(_worker, args=(init_method, out_dir), nprocs=WORLD)
        return torch.load(os.path.join(out_dir, "results.pt"))


@pytest.mark.parametrize("case", ["gathered", "gathered_period_2", "gathered_skipped_layer"])
def test_replicas_stay_identical_when_keys_are_gathered(results, case):
    zero, one = results[case]
    assert torch.equal(zero, one)


def test_rank_local_keys_make_the_replicas_drift_apart(results):
    # The control: without the gather (keys of one rank only) the same run diverges, so the
    # test above is sensitive to the keys.
    zero, one = results["rank_local"]
    assert not torch.equal(zero, one)


def test_attach_refuses_a_bare_module_under_distributed(results):
    assert results["refused_bare_module"]
