"""The public testing helpers must catch what they claim to catch."""

import pytest
import torch
from hypothesis import given, settings

import deepmomentum as dm
from deepmomentum.testing import (
    TrajectoryMismatch,
    adam_hyperparameters,
    assert_same_trajectory,
    float_dtypes,
    parameter_shapes,
    sgd_hyperparameters,
)


def test_same_trajectory_passes_for_equal_optimizers():
    final = assert_same_trajectory(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
                                   lambda ps: dm.AssociativeMomentum(ps, lr=0.1, momentum=0.9),
                                   steps=5, dtype=torch.float64, rtol=1e-12)
    assert len(final) == 2 and final[0].shape == (4, 3)


def test_mismatch_names_the_first_step_and_tensor():
    class LateBug(torch.optim.SGD):
        calls = 0

        def step(self, closure=None):
            LateBug.calls += 1
            if LateBug.calls == 4:  # a bug that shows on step 4, in tensor 1 only
                self.param_groups[0]["params"][1].grad.mul_(2)
            return super().step(closure)

    with pytest.raises(TrajectoryMismatch) as err:
        assert_same_trajectory(lambda ps: LateBug(ps, lr=0.1),
                               lambda ps: torch.optim.SGD(ps, lr=0.1),
                               shapes=[(3,), (2, 2)], steps=6)
    assert (err.value.step, err.value.tensor) == (4, 1)
    assert "step 4, tensor 1" in str(err.value)


def test_tolerances_are_applied():
    make_a = lambda ps: torch.optim.SGD(ps, lr=0.1)  # noqa: E731
    make_b = lambda ps: torch.optim.SGD(ps, lr=0.1 * (1 + 1e-4))  # noqa: E731
    assert_same_trajectory(make_a, make_b, dtype=torch.float64, steps=3, rtol=1e-3, atol=1e-3)
    with pytest.raises(TrajectoryMismatch):
        assert_same_trajectory(make_a, make_b, dtype=torch.float64, steps=3, rtol=1e-8)


def test_nan_is_a_mismatch():
    with pytest.raises(TrajectoryMismatch):
        assert_same_trajectory(lambda ps: torch.optim.SGD(ps, lr=float("nan")),
                               lambda ps: torch.optim.SGD(ps, lr=0.1), steps=1, rtol=1.0)


@given(shapes=parameter_shapes(), dtype=float_dtypes(low_precision=True),
       sgd=sgd_hyperparameters(), adam=adam_hyperparameters())
def test_strategies_draw_valid_inputs(shapes, dtype, sgd, adam):
    params = [torch.zeros(s, dtype=dtype, requires_grad=True) for s in shapes]
    assert 1 <= len(shapes) <= 4 and all(len(s) <= 4 for s in shapes)
    torch.optim.SGD(params, **sgd)  # torch accepts every draw
    torch.optim.AdamW(params, **adam)
    dm.AssociativeMomentum(params, **sgd)
    dm.PreconditionedMomentum(params, **adam)


def test_sgd_hyperparameters_draw_the_edge_cases_often():
    # μ = 0 (where torch ignores dampening) and τ ∈ {0, 1} must come up within a CI-sized run,
    # not once in hundreds of draws: a bug that only shows there (e.g. dampening applied at
    # μ = 0) must be caught by R1/R2a/R4a under the "ci" profile. 50 draws, fixed seed.
    draws = []

    @settings(max_examples=50, derandomize=True, database=None, deadline=None)
    @given(kw=sgd_hyperparameters())
    def collect(kw):
        draws.append(kw)

    collect()
    assert len(draws) == 50
    for kw in draws:  # every draw valid for torch: Nesterov needs μ > 0 and τ = 0
        assert 0.0 <= kw["momentum"] < 1.0 and 0.0 <= kw["dampening"] <= 1.0
        if kw["nesterov"]:
            assert kw["momentum"] > 0 and kw["dampening"] == 0
    no_memory = [kw["dampening"] for kw in draws if kw["momentum"] == 0.0]
    assert len(no_memory) >= 8, no_memory
    assert sum(t > 0 for t in no_memory) >= 4, no_memory  # dampening that must be ignored
    assert 1.0 in no_memory and 0.0 in no_memory, no_memory
    dampenings = [kw["dampening"] for kw in draws]
    assert dampenings.count(1.0) >= 3 and dampenings.count(0.0) >= 3, dampenings
    assert any(0.0 < t < 1.0 for t in dampenings), dampenings
    assert sum(kw["nesterov"] for kw in draws) >= 5
