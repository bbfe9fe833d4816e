"""FSDP2 (``fully_shard``: DTensor Shard(0) parameters) with every optimizer, against one-process
training (issue 16). gloo on the CPU, world sizes 1, 2 and 4 in spawned processes.

Each world size is one spawn that trains every setting of ``distributed_cases.SETTINGS`` for
``STEPS`` steps; the parent trains the same settings in one process and compares whole
parameters and whole state within float32 tolerance. Newton–Schulz calls are counted on each
rank: every matrix is orthogonalized on exactly one rank per step, and with more than one rank
no rank does them all.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist

import deepmomentum as dm
import deepmomentum.functional as dmf
from distributed_cases import BF16, SETTINGS, STEPS, Net, dtype_of, make, snapshot, spawn, train

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

from torch.distributed.fsdp import fully_shard  # noqa: E402

TOLERANCE = {
    "Muon-bf16-ns-period2": dict(atol=2e-3, rtol=0),  # bf16 Newton–Schulz
    # M3's literal form divides by √V + ε: in one process, averaging the gradients of the two
    # half batches instead of taking the whole batch's moves its parameters by 5.7e-5 after 10
    # steps.
    "M3-literal": dict(atol=2e-4, rtol=0),
    **{name: dict(atol=2e-2, rtol=2e-2) for name in BF16},  # bf16 parameters and gradients
}
DEFAULT_TOLERANCE = dict(atol=2e-5, rtol=1e-5)


def _counting(counter: dict):
    """A Newton–Schulz that counts the matrices it orthogonalizes into ``counter``."""
    original = dmf.newton_schulz

    @functools.wraps(original)
    def counted(x, *args, **kwargs):
        counter["matrices"] += x.shape[0] if x.ndim == 3 else 1
        return original(x, *args, **kwargs)

    return counted


def _sharded_model(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    model = Net().to(dtype)
    fully_shard(model.a)  # its own FSDP unit, the rest in the root's
    fully_shard(model)
    return model


def _fsdp_worker(rank: int, world: int) -> dict:
    out = {}
    for name in SETTINGS:
        model = _sharded_model(dtype_of(name))
        opt = make(name, model)
        counter = {"matrices": 0}
        original = dmf.newton_schulz
        dmf.newton_schulz = _counting(counter)
        try:
            train(model, opt, range(STEPS), rank, world)
        finally:
            dmf.newton_schulz = original
        out[name] = dict(snapshot(model, opt), matrices=counter["matrices"])
    out["placements"] = _placements(rank, world)
    return out


@functools.lru_cache(maxsize=None)
def _fsdp_results(world: int):
    return spawn(_fsdp_worker, world)


@functools.lru_cache(maxsize=None)
def _reference(name: str) -> dict:
    torch.manual_seed(0)
    model = Net().to(dtype_of(name))
    opt = make(name, model)
    counter = {"matrices": 0}
    original = dmf.newton_schulz
    dmf.newton_schulz = _counting(counter)
    try:
        train(model, opt, range(STEPS))
    finally:
        dmf.newton_schulz = original
    return dict(snapshot(model, opt), matrices=counter["matrices"])


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("name", list(SETTINGS))
def test_fsdp2_matches_one_process(world, name):
    ranks = _fsdp_results(world)
    ref = _reference(name)
    tolerance = TOLERANCE.get(name, DEFAULT_TOLERANCE)
    for rank, result in enumerate(ranks):
        got = result[name]
        assert set(got["params"]) == set(ref["params"])
        for key, value in ref["params"].items():
            torch.testing.assert_close(got["params"][key], value, **tolerance,
                                       msg=lambda m: f"rank {rank}, {key}: {m}")
        assert set(got["state"]) == set(ref["state"]), (rank, name)
        for key, value in ref["state"].items():
            torch.testing.assert_close(got["state"][key], value, **tolerance,
                                       msg=lambda m: f"rank {rank}, state {key}: {m}")


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", [n for n in SETTINGS if "Muon" in n or "M3" in n
                                  or "newton_schulz" in n or "-ns" in n])
def test_each_matrix_is_orthogonalized_on_exactly_one_rank(world, name):
    counts = [r[name]["matrices"] for r in _fsdp_results(world)]
    expected = _reference(name)["matrices"]
    assert expected > 0
    assert sum(counts) == expected, counts  # once in all, not once per rank
    assert max(counts) < expected, counts  # and spread over the ranks


def _placements(rank, world):
    from torch.distributed.tensor import DTensor

    model = _sharded_model()
    opt = dm.DMGD(model.parameters(), lr=0.05, hidden=3)
    train(model, opt, range(2), rank, world)
    placements = {}
    for n, p in model.named_parameters():
        for key, value in opt.state[p].items():
            placements[f"{n}.{key}"] = (tuple(value.placements), tuple(value.shape)) if \
                isinstance(value, DTensor) else type(value).__name__
    return placements


def test_fsdp2_state_is_sharded_like_its_parameter():
    from torch.distributed.tensor import Replicate, Shard

    placements = _fsdp_results(2)[0]["placements"]
    assert placements["a.weight.momentum_buffer"] == ((Shard(0),), (5, 6))
    assert placements["a.weight.memory_A"] == ((Replicate(),), (6, 3))
    assert placements["a.weight.step"] == "Tensor"
