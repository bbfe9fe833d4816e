"""torch.distributed.checkpoint (DCP) for every optimizer (issue 16, item 3).

In one process: every registry setting, also mid-period (``update_period=3``), and
``MultiFrequency`` over torch optimizers, saved with ``get_optimizer_state_dict`` + ``dcp.save``
and loaded into a fresh optimizer with ``dcp.load`` + ``set_optimizer_state_dict``, resumes
the uninterrupted trajectory bit for bit. Under FSDP2: saved at world size 2, loaded at world
sizes 1 and 4 (resharded), the run continues the one-process trajectory (float32 tolerance).
"""

from __future__ import annotations

import os
import tempfile
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict,
                                                     set_optimizer_state_dict)

import deepmomentum as dm
from distributed_cases import (STEPS, Net, dcp_load, dcp_save, dtype_of, make, snapshot, spawn,
                              train)
from registry import cases

SAVE_AT = 5  # mid-period for update_period 2 and 3 (5 calls)
#: Resharded under FSDP2: every optimizer, mid-period where it has a period, bf16, DMGD's
#: memory shaped as its parameter (the FSDP2 tests train every setting).
RESHARDED = ("AssociativeMomentum-nesterov-period2", "AssociativeMomentum-bf16",
             "DeltaMomentum", "DeltaMomentum-input", "PreconditionedMomentum-value-period2",
             "DMGD-hidden5", "DMGD-preconditioned-ns", "Muon-bf16-ns-period2", "M3")


class _Params(torch.nn.Module):
    def __init__(self, shapes, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.values = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for s in shapes])


def _loss(model: _Params, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    return sum(((p - torch.randn(p.shape, generator=g, dtype=p.dtype)) ** 2).sum() * (k + 1)
               for k, p in enumerate(model.values))


def _steps(model, opt, steps):
    for step in steps:
        opt.zero_grad()
        _loss(model, step).backward()
        opt.step()


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _resumes(build, shapes, total=8, save_at=SAVE_AT) -> None:
    """Uninterrupted ``total`` steps versus ``save_at`` steps, DCP round trip into a fresh
    optimizer, and the rest: bit for bit."""
    model = _Params(shapes)
    opt = build(model)
    _steps(model, opt, range(total))
    expected = _flat(model)

    model = _Params(shapes)
    opt = build(model)
    _steps(model, opt, range(save_at))
    with tempfile.TemporaryDirectory() as path, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns that it runs without a process group
        dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=path)
        resumed = _Params(shapes)
        with torch.no_grad():
            for p, q in zip(resumed.parameters(), model.parameters()):
                p.copy_(q)
        fresh = build(resumed)
        template = {"optim": get_optimizer_state_dict(resumed, fresh)}
        dcp.load(template, checkpoint_id=path)
        set_optimizer_state_dict(resumed, fresh, template["optim"])
    assert torch.equal(_flat(resumed), _flat(model))  # the warm-up moved nothing
    _steps(resumed, fresh, range(save_at, total))
    assert torch.equal(_flat(resumed), expected)


@pytest.mark.parametrize("schedule", [{"update_period": 1}, {"update_period": 3},
                                      {"update_period": "auto", "max_period": 4}],
                         ids=["period1", "period3", "auto"])
@pytest.mark.parametrize("info, variant", cases())
def test_dcp_round_trip_resumes_bit_for_bit(info, variant, schedule):
    shapes = [s for s in info.shapes(variant) if s != ()]  # DCP keeps no 0-d parameters apart
    _resumes(lambda m: info.make(m.parameters(), **{**variant, **schedule}), shapes)


@pytest.mark.parametrize("info, variant", cases())
def test_dcp_saved_at_a_period_boundary_resumes_bit_for_bit(info, variant):
    # Saved right after a period's update (call 6 of period 3): the accumulators are zeros
    # there, and the checkpoint has them, as a fresh optimizer's template does.
    shapes = [s for s in info.shapes(variant) if s != ()]
    _resumes(lambda m: info.make(m.parameters(), **{**variant, "update_period": 3}), shapes,
             total=9, save_at=6)


@pytest.mark.parametrize("slow_period", [3, 1, "auto"])  # 1: no accumulators at all
@pytest.mark.parametrize("inner", [
    lambda ps: torch.optim.AdamW(ps, lr=0.01),
    lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9),
], ids=["AdamW", "SGD"])
def test_dcp_round_trip_of_multi_frequency(inner, slow_period):
    def build(model):
        params = list(model.parameters())
        groups = [{"params": params[:1], "update_period": 1},
                  {"params": params[1:], "update_period": slow_period}]
        return dm.MultiFrequency(inner(groups))

    _resumes(build, [(4, 3), (5,), (2, 3, 2)])
    _resumes(build, [(4, 3), (5,), (2, 3, 2)], total=9, save_at=6)  # at a period's end


def test_multi_frequency_state_dict_has_torch_layout():
    model = _Params([(4, 3), (5,)])
    opt = dm.MultiFrequency(torch.optim.AdamW(
        [{"params": [model.values[0]]}, {"params": [model.values[1]], "update_period": 2}]))
    _steps(model, opt, range(3))
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    assert "grad_accumulator" in sd["state"][1] and "exp_avg" in sd["state"][1]
    # The layout of versions ≤ 0.1 still loads.
    old = {"optimizer": opt.optimizer.state_dict(),
           "multi_frequency": torch.optim.Optimizer.state_dict(opt)}
    again = dm.MultiFrequency(torch.optim.AdamW(
        [{"params": [model.values[0]]}, {"params": [model.values[1]], "update_period": 2}]))
    again.load_state_dict(old)
    assert torch.equal(again.state[model.values[1]]["grad_accumulator"],
                       opt.state[model.values[1]]["grad_accumulator"])


# --- FSDP2: save at world size 2, load at 1 and 4 --------------------------------------------

def _sharded_model(dtype=torch.float32):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = Net().to(dtype)
    fully_shard(model.a)
    fully_shard(model)
    return model


def _save_worker(rank, world, path):
    for name in RESHARDED:
        model = _sharded_model(dtype_of(name))
        opt = make(name, model)
        train(model, opt, range(SAVE_AT), rank, world)
        dcp_save(model, opt, os.path.join(path, name))
    return None


def _load_worker(rank, world, path):
    out = {}
    for name in RESHARDED:
        model = _sharded_model(dtype_of(name))
        opt = make(name, model)
        dcp_load(model, opt, os.path.join(path, name))
        train(model, opt, range(SAVE_AT, STEPS), rank, world)
        out[name] = snapshot(model, opt)
    return out


@pytest.fixture(scope="module")
def resharded():
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    with tempfile.TemporaryDirectory() as path:
        spawn(_save_worker, 2, path)
        return {world: spawn(_load_worker, world, path)[0] for world in (1, 4)}


@pytest.mark.parametrize("world", [1, 4])
@pytest.mark.parametrize("name", RESHARDED)
def test_dcp_saved_at_two_ranks_resumes_at_one_and_four(resharded, world, name):
    from test_distributed import DEFAULT_TOLERANCE, TOLERANCE, _reference

    ref = _reference(name)
    got = resharded[world][name]
    tolerance = TOLERANCE.get(name, DEFAULT_TOLERANCE)
    for key, value in ref["params"].items():
        torch.testing.assert_close(got["params"][key], value, **tolerance,
                                   msg=lambda m: f"{key}: {m}")
    assert set(got["state"]) == set(ref["state"])
    for key, value in ref["state"].items():
        torch.testing.assert_close(got["state"][key], value, **tolerance,
                                   msg=lambda m: f"state {key}: {m}")
