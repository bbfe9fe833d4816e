"""Multi-frequency updates, SPEC §7: R7a, R7b, checkpoints, errors, MultiFrequency."""

from __future__ import annotations

import inspect
import io

import pytest
import torch
from hypothesis import given, strategies as st

import deepmomentum as dm
from deepmomentum.testing import assert_same_trajectory

from registry import REGISTRY, cases


def at_calls(make_plain, window_of, mean=False):
    """The reference of a schedule, written out: the plain optimizer called only on the calls
    where ``window_of(call)`` (1-based) gives a window's length, with the sum (or the mean over
    that length) of the gradients since its last call."""

    def make(params):
        opt = make_plain(params)

        class AtCalls:
            calls = 0
            sums: dict = {}

            def step(self):
                self.calls += 1
                for p in params:
                    if p.grad is not None:
                        self.sums[p] = self.sums.get(p, 0) + p.grad.clone()
                length = window_of(self.calls)
                if length is None:
                    return
                saved = {p: p.grad for p in params}
                for p in params:
                    total = self.sums.pop(p, None)
                    p.grad = None if total is None else (total / length if mean else total)
                opt.step()
                for p in params:
                    p.grad = saved[p]

        return AtCalls()

    return make


def every_kth(make_plain, period, mean=False, offset=0):
    """R7b's reference: the plain optimizer on every period-th call (counting from offset)."""
    return at_calls(make_plain, lambda call: None if (call - offset) % period else period, mean)


def _scheduled(info, variant, **schedule):
    return lambda ps: info.make([{"params": ps, **schedule}], **variant)


@pytest.mark.parametrize("info,variant", cases())
def test_R7a_period_one_is_the_plain_optimizer(info, variant):
    # Alone, a group of period 1 is the plain optimizer (it never reaches the accumulator)...
    assert_same_trajectory(_scheduled(info, variant, update_period=1, accumulate="mean"),
                           lambda ps: info.make(ps, **variant),
                           shapes=info.shapes(variant), steps=8, rtol=0.0)

    # ... and so it stays next to a scheduled group listed before it, whose accumulator is live
    # on every call and which updates on only one call in three: the period-1 group still
    # steps on every call with its own gradient (a skipped call, an early exit on a
    # non-boundary call, a gradient or counter shared across groups would show here), while
    # the scheduled one is R7b's explicit every-3rd-call loop.
    def mixed(ps):
        return info.make([{"params": ps[:2], "update_period": 3, "update_offset": 1,
                           "accumulate": "mean"},
                          {"params": ps[2:], "update_period": 1, "accumulate": "mean"}],
                         **variant, foreach=False)

    def separate(ps):
        slow = every_kth(lambda qs: info.make(qs, **variant, foreach=False), 3, True, 1)(ps[:2])
        fast = info.make(ps[2:], **variant, foreach=False)

        class Both:
            def step(self):
                slow.step()
                fast.step()

        return Both()

    assert_same_trajectory(mixed, separate, shapes=info.shapes(variant), dtype=torch.float64,
                           steps=8, rtol=0.0)


@pytest.mark.parametrize("info,variant", cases())
@given(period=st.integers(2, 4), mean=st.booleans(), offset_fraction=st.floats(0, 0.99))
def test_R7b_period_k_is_the_plain_optimizer_every_kth_call(info, variant, period, mean,
                                                           offset_fraction):
    offset = int(offset_fraction * period)
    schedule = dict(update_period=period, accumulate="mean" if mean else "sum",
                    update_offset=offset)
    assert_same_trajectory(
        _scheduled(info, variant, **schedule),
        every_kth(lambda ps: info.make(ps, **variant), period, mean, offset),
        shapes=info.shapes(variant), dtype=torch.float64, steps=12, rtol=1e-12, atol=1e-14)


TORCH_OPTIMIZERS = {
    "SGD": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True),
    "AdamW": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.01),
    "Muon": lambda ps: torch.optim.Muon(ps, lr=0.02),
}


@pytest.mark.parametrize("name", sorted(TORCH_OPTIMIZERS))
@given(period=st.integers(1, 4), mean=st.booleans(), offset_fraction=st.floats(0, 0.99))
def test_R7_multi_frequency_around_torch_optimizers(name, period, mean, offset_fraction):
    make = TORCH_OPTIMIZERS[name]
    offset = int(offset_fraction * period)
    accumulate = "mean" if mean else "sum"
    assert_same_trajectory(
        lambda ps: dm.MultiFrequency(make(ps), update_period=period, accumulate=accumulate,
                                     update_offset=offset),
        every_kth(make, period, mean, offset) if period > 1 else make,
        shapes=[(4, 3), (3, 5)], steps=10, rtol=0.0)


def test_groups_keep_their_own_periods_and_state_is_frozen_between_updates():
    fast, slow = torch.randn(3, 3, requires_grad=True), torch.randn(3, 3, requires_grad=True)
    opt = dm.PreconditionedMomentum([{"params": [fast]}, {"params": [slow], "update_period": 4}],
                                    lr=0.01)
    history = []
    for call in range(1, 9):
        fast.grad, slow.grad = torch.randn(3, 3), torch.randn(3, 3)
        before = slow.detach().clone(), {k: v.clone() for k, v in opt.state[slow].items()
                                          if k != "grad_accumulator"}
        opt.step()
        moved = not torch.equal(before[0], slow)
        after = {k: v for k, v in opt.state[slow].items() if k != "grad_accumulator"}
        rule_state_changed = after.keys() != before[1].keys() or any(
            not torch.equal(v, after[k]) for k, v in before[1].items())
        history.append((moved, rule_state_changed))
        assert opt.state[fast]["step"].item() == call
    assert [m for m, _ in history] == [False, False, False, True] * 2
    assert [c for _, c in history] == [False, False, False, True] * 2
    assert opt.state[slow]["step"].item() == 2  # t counts applied updates only


def test_accumulators_exist_only_in_scheduled_groups_and_survive_zero_grad():
    a, b = torch.randn(2, 2, requires_grad=True), torch.randn(2, 2, requires_grad=True)
    opt = dm.AssociativeMomentum([{"params": [a]}, {"params": [b], "update_period": 3}])
    a.grad, b.grad = torch.ones(2, 2), torch.ones(2, 2)
    opt.step()
    opt.zero_grad()
    assert "grad_accumulator" not in opt.state[a]
    assert torch.equal(opt.state[b]["grad_accumulator"], torch.ones(2, 2))
    assert b.grad is None  # zero_grad cleared the user's gradient, not ours


@pytest.mark.parametrize("info,variant", cases())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mid_period_checkpoint_resumes_bit_identically(info, variant, dtype):
    # Every registered setting (the Newton–Schulz ones included), with few steps: period 3,
    # offset 1, so updates on calls 1, 4, 7; saved after call 5, mid-period, with call 5's
    # gradient in the accumulator; resumed over calls 6–8, through the update on call 7.
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g).to(dtype).requires_grad_()
              for s in info.shapes(variant)]

    def make(ps):
        return info.make([{"params": ps, "update_period": 3, "update_offset": 1}], **variant)

    def run(opt, ps, steps, start):
        for step in range(start, start + steps):
            gen = torch.Generator().manual_seed(step)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen).to(dtype)
            opt.step()

    opt = make(params)
    run(opt, params, 5, 0)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert all("grad_accumulator" in s for s in saved["opt"]["state"].values())  # mid-period
    resumed_params = [p.clone().requires_grad_() for p in saved["params"]]
    resumed = make(resumed_params)
    resumed.load_state_dict(saved["opt"])
    run(opt, params, 3, 5)
    run(resumed, resumed_params, 3, 5)
    assert all(torch.equal(p, q) for p, q in zip(params, resumed_params))
    assert any(not torch.equal(p, q) for p, q in zip(resumed_params, saved["params"]))  # moved


def test_multi_frequency_checkpoint_resumes_bit_identically():
    def make(ps):
        return dm.MultiFrequency(torch.optim.AdamW(ps, lr=0.01), update_period=3)

    params = [torch.randn(4, 3), torch.randn(5)]
    first = [p.clone().requires_grad_() for p in params]
    opt = make(first)
    for step in range(4):  # updates on call 3; call 4's gradient is pending in the checkpoint
        for p in first:
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step))
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    second = [p.detach().clone().requires_grad_() for p in first]
    resumed = make(second)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for step in range(4, 10):
        for p, q in zip(first, second):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step))
            q.grad = p.grad.clone()
        opt.step()
        resumed.step()
    assert all(torch.equal(p, q) for p, q in zip(first, second))


@pytest.mark.parametrize("schedule,name", [
    ({"update_period": 0}, "update_period"), ({"update_period": 2.5}, "update_period"),
    ({"update_period": True}, "update_period"), ({"accumulate": "max"}, "accumulate"),
    ({"update_period": 3, "update_offset": 3}, "update_offset"),
    ({"update_offset": -1}, "update_offset"),
])
def test_bad_schedules_raise_naming_the_option(schedule, name):
    for info in REGISTRY:
        with pytest.raises(ValueError, match=name):
            info.make([{"params": [torch.zeros(2, 2, requires_grad=True)], **schedule}])
    with pytest.raises(ValueError, match=name):
        dm.MultiFrequency(torch.optim.SGD([{"params": [torch.zeros(2)], **schedule}], lr=0.1))
    with pytest.raises(ValueError, match=name):
        dm.continuum_groups([([torch.zeros(2)], schedule.get("update_period", 1),
                              {k: v for k, v in schedule.items() if k != "update_period"})])


def test_multi_frequency_restores_user_grads_and_refuses_our_optimizers():
    p = torch.zeros(3, requires_grad=True)
    opt = dm.MultiFrequency(torch.optim.SGD([p], lr=0.1), update_period=2)
    p.grad = torch.ones(3)
    opt.step()
    assert torch.equal(p.grad, torch.ones(3)) and torch.equal(p, torch.zeros(3))
    with pytest.raises(TypeError, match="update_period"):
        dm.MultiFrequency(dm.AssociativeMomentum([p]))


def test_continuum_groups_build_named_levels_with_periods():
    levels = [torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)]
    groups = dm.continuum_groups([(levels[0], 1), (levels[1], 16, {"lr": 0.5}), (levels[2], 256)],
                                 lr=0.1, stagger=True, accumulate="mean")
    assert [g["update_period"] for g in groups] == [1, 16, 256]
    assert [g["update_offset"] for g in groups] == [0, 1, 2]
    assert [g["lr"] for g in groups] == [0.1, 0.5, 0.1]
    assert [n for n, _ in groups[0]["params"]] == ["weight", "bias"]
    opt = dm.AssociativeMomentum(groups)
    assert [g["accumulate"] for g in opt.param_groups] == ["mean"] * 3


def test_lr_schedulers_see_every_call():
    p = torch.zeros(2, requires_grad=True)
    opt = dm.AssociativeMomentum([{"params": [p], "update_period": 4}], lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(4):
        p.grad = torch.ones(2)
        opt.step()
        sched.step()
    # The update on call 4 used the lr of call 4: 1 · 0.5³, applied to the sum of 4 gradients.
    torch.testing.assert_close(p.detach(), -0.125 * 4 * torch.ones(2))


# --- the schedule as constructor arguments ----------------------------------------------------


@pytest.mark.parametrize("info,variant", cases())
def test_constructor_schedule_equals_the_same_param_group_option(info, variant):
    # update_period/accumulate/update_offset are constructor arguments of every optimizer, as
    # group defaults: the same as giving them to the group.
    schedule = dict(update_period=3, accumulate="mean", update_offset=1)
    assert_same_trajectory(
        lambda ps: info.make(ps, **variant, **schedule),
        lambda ps: info.make([{"params": ps, **schedule}], **variant),
        shapes=info.shapes(variant), steps=8, rtol=0.0)
    opt = info.make([torch.zeros(s, requires_grad=True) for s in info.shapes(variant)],
                    **variant, **schedule)
    assert {k: opt.param_groups[0][k] for k in schedule} == schedule


@pytest.mark.parametrize("info", REGISTRY, ids=lambda info: info.name)
@pytest.mark.parametrize("kwargs,name", [({"update_period": 0}, "update_period"),
                                         ({"accumulate": "max"}, "accumulate"),
                                         ({"update_period": 2, "update_offset": 2},
                                          "update_offset")])
def test_invalid_constructor_schedule_raises_naming_it(info, kwargs, name):
    with pytest.raises(ValueError, match=name):
        info.make([torch.zeros(s, requires_grad=True) for s in info.shapes({})], **kwargs)


@pytest.mark.parametrize("info", REGISTRY, ids=lambda info: info.name)
def test_signatures_list_the_shared_group_options_last(info):
    # Keyword arguments after the class's own, so torch's positional order is kept.
    names = [n for n, p in inspect.signature(info.cls).parameters.items()
             if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert names[:2] == ["params", "lr"]
    assert names[-7:] == ["skip_nonfinite", "update_period", "accumulate", "update_offset",
                          "min_period", "max_period", "period_significance"]
    assert info.cls.__doc__.count("update_period") >= 1
