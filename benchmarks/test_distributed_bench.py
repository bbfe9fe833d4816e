"""Smoke test of benchmarks/distributed.py: two gloo ranks, tiny shapes (seconds).

Honest checks of what ``step()`` communicates under FSDP2: Muon's bytes are exactly the
analytic minimum on every rank and travel only by ``all_to_all_single`` (two per step: to
the owners and back; an all-gather of every matrix on every rank fails this — at world size
2 it would move the same bytes, so the kind of collective is what tells them apart), and
AssociativeMomentum's step communicates nothing. Both counters (wrapped functions and the
dispatch mode) must agree.
"""

from __future__ import annotations

import pytest
import torch.distributed as dist

from benchmarks import distributed as bench

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")

TINY = bench.Config(width=16, depth=1, batch=2, seq=4, key_samples=4, warmup=1, counted=2,
                    timed=1)


@pytest.fixture(scope="module")
def rows():
    names = ["Muon", "AssociativeMomentum", "M3 chunk=4"]
    result = bench.spawn_world(2, "gloo", "cpu", TINY, names)
    return {name: bench.summarize(name, 2, result[name]) for name in names}


def test_muon_sends_exactly_the_minimum_by_all_to_all(rows):
    r = rows["Muon"]
    assert "error" not in r, r.get("error")
    assert r["counters_agree"] and not r["unknown_ops"]
    assert min(r["sent_per_rank"]) > 0
    assert r["sent_per_rank"] == r["min_sent_per_rank"]  # per rank, to the byte
    assert r["wire_per_rank"] == r["min_wire_per_rank"]
    assert set(r["by_kind"]) == {"all_to_all"}
    assert r["by_kind"]["all_to_all"]["calls"] == 2  # one dtype: to the owners and back
    # Each of the 4 matrices' shards travels once to its owner and its rows once back:
    # summed over ranks, twice the half of every matrix not on its owner, in bf16 (Muon's
    # ns_dtype: Newton–Schulz casts to it first, so fp32 shards would carry nothing more).
    w = TINY.width
    matrices = [3 * w * w, w * w, 4 * w * w, 4 * w * w]
    assert sum(r["sent_per_rank"]) == sum(2 * (n // 2) * 2 for n in matrices)
    assert r["finite"]


def test_m3_sends_its_minimum_with_the_norm_match_as_an_all_reduce(rows):
    # The normalized form: Newton–Schulz as Muon (and the slow memory's at chunk ends), plus
    # ‖NS(U)‖² and ‖X̂‖² of each row-sharded matrix summed in one all_reduce per step.
    r = rows["M3 chunk=4"]
    assert "error" not in r, r.get("error")
    assert r["counters_agree"] and not r["unknown_ops"]
    assert r["sent_per_rank"] == r["min_sent_per_rank"]
    assert set(r["by_kind"]) == {"all_to_all", "all_reduce"}
    assert r["finite"]


def test_associative_momentum_communicates_nothing(rows):
    r = rows["AssociativeMomentum"]
    assert "error" not in r, r.get("error")
    assert r["counters_agree"]
    assert r["calls_per_step"] == 0
    assert r["sent_per_rank"] == [0.0, 0.0] == r["min_sent_per_rank"]


def test_counter_sees_dtensor_full_tensor_and_raw_collectives():
    """Both counters, on the parent process's conventions (no process group needed)."""
    assert bench._conventions("all_reduce", 4, 100) == (100.0, 150.0)
    assert bench._conventions("all_gather", 4, 100) == (100.0, 300.0)
    assert bench._conventions("all_to_all", 1, 100) == (0.0, 0.0)
    assert bench._kept_per_rank([64, 64], 64) == [32, 32]
    assert bench._kept_per_rank([3, 2], 64) == [3, 2]
