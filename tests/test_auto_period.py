"""``update_period="auto"`` (issue 19): a group updates when its accumulated gradient is
significant against its noise.

The properties: bounds that force the criterion's hand give the fixed schedules exactly (max 1
is period 1; min = max = C is period C); with the real criterion every update is the fixed
rule applied to the sum (or mean) of its own window, whatever the windows' lengths; the
criterion itself matches its maths (windows of about κ·B_noise steps); same data gives the same
update times; a checkpoint taken mid-window resumes bit for bit; bad options raise naming them.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import deepmomentum as dm
import deepmomentum.optimizer as dmo
from deepmomentum.optimizer import WindowStats, significant
from deepmomentum.testing import assert_same_trajectory, noisy_quadratic_grads

from registry import REGISTRY, cases
from test_frequency import at_calls


def _scheduled(info, variant, **schedule):
    return lambda ps: info.make([{"params": ps, **schedule}], **variant)


class _Recorder:
    """An optimizer's step that writes down the calls (1-based) on which its group updated."""

    def __init__(self, opt, ends):
        self.opt, self.ends, self.calls = opt, ends, 0

    def step(self):
        group = self.opt.param_groups[0]
        before = group["auto_updates"]
        self.opt.step()
        self.calls += 1
        if group["auto_updates"] != before:
            self.ends.append((self.calls, group["last_period"]))


def at_ends(make_plain, ends, mean):
    """The reference: the plain optimizer called only on the calls listed in ``ends`` (call,
    window length) — filled in by the auto run, which goes first."""
    return at_calls(make_plain, lambda call: dict(ends).get(call), mean)


# --- the bounds force the fixed schedules ---------------------------------------------------


@pytest.mark.parametrize("info,variant", cases())
def test_auto_with_max_period_one_is_period_one(info, variant):
    # The criterion always fires (at max_period = 1): the plain optimizer, bit for bit.
    assert_same_trajectory(
        _scheduled(info, variant, update_period="auto", max_period=1, accumulate="mean"),
        lambda ps: info.make(ps, **variant), shapes=info.shapes(variant), steps=8, rtol=0.0)


@pytest.mark.parametrize("info,variant", cases())
@settings(max_examples=6)
@given(period=st.integers(2, 5), mean=st.booleans())
def test_auto_with_min_equal_max_is_the_fixed_period(info, variant, period, mean):
    # A criterion that fires every C calls: update_period = C, bit for bit.
    accumulate = "mean" if mean else "sum"
    assert_same_trajectory(
        _scheduled(info, variant, update_period="auto", min_period=period, max_period=period,
                   accumulate=accumulate),
        _scheduled(info, variant, update_period=period, accumulate=accumulate),
        shapes=info.shapes(variant), steps=11, rtol=0.0)


@pytest.mark.parametrize("period", [1, 3])
def test_a_criterion_that_fires_every_C_calls_is_period_C(monkeypatch, period):
    # The plumbing without the statistic: whatever decides, the window is what it decided.
    monkeypatch.setattr(dmo, "significant", lambda stats, _: stats.calls % period == 0)
    make = lambda ps, **s: dm.PreconditionedMomentum([{"params": ps, **s}], lr=0.01)  # noqa
    assert_same_trajectory(lambda ps: make(ps, update_period="auto", max_period=64),
                           lambda ps: make(ps, update_period=period), steps=12, rtol=0.0)


# --- the real criterion: each update is the fixed rule on its own window --------------------


@pytest.mark.parametrize("info,variant", cases())
@settings(max_examples=5)
@given(significance=st.floats(0.25, 4.0), max_period=st.integers(2, 12),
       min_period=st.integers(1, 3), noise=st.floats(0.1, 4.0), mean=st.booleans())
def test_each_auto_update_is_the_rule_on_its_windows_sum(info, variant, significance,
                                                        max_period, min_period, noise, mean):
    min_period = min(min_period, max_period)
    accumulate = "mean" if mean else "sum"
    ends: list = []
    auto = _scheduled(info, variant, update_period="auto", min_period=min_period,
                      max_period=max_period, period_significance=significance,
                      accumulate=accumulate)
    assert_same_trajectory(
        lambda ps: _Recorder(auto(ps), ends),
        at_ends(lambda ps: info.make(ps, **variant), ends, mean),
        shapes=info.shapes(variant), dtype=torch.float64, steps=20, rtol=1e-12, atol=1e-14,
        grad_fn_factory=lambda: noisy_quadratic_grads(0, noise))
    assert ends, "no window ended in 20 calls"
    lengths = [n for _, n in ends]
    assert all(min_period <= n <= max_period for n in lengths)
    assert [c for c, _ in ends] == [sum(lengths[:i + 1]) for i in range(len(lengths))]


@settings(max_examples=10)
@given(significance=st.floats(0.25, 4.0), noise=st.floats(0.1, 4.0), mean=st.booleans())
def test_multi_frequency_auto_updates_are_the_wrapped_rule_on_their_windows(significance,
                                                                           noise, mean):
    accumulate = "mean" if mean else "sum"
    ends: list = []

    def auto(ps):
        inner = torch.optim.AdamW([{"params": ps, "update_period": "auto"}], lr=0.01)
        return _Recorder(dm.MultiFrequency(inner, accumulate=accumulate, max_period=10,
                                           period_significance=significance), ends)

    assert_same_trajectory(auto, at_ends(lambda ps: torch.optim.AdamW(ps, lr=0.01), ends, mean),
                           shapes=[(4, 3), (3, 5)], dtype=torch.float64, steps=20, rtol=0.0,
                           grad_fn_factory=lambda: noisy_quadratic_grads(0, noise))
    assert ends


@pytest.mark.parametrize("period", [1, 4])
def test_multi_frequency_auto_bounds_give_the_fixed_schedules(period):
    make = lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9)  # noqa: E731
    assert_same_trajectory(
        lambda ps: dm.MultiFrequency(make(ps), update_period="auto", min_period=period,
                                     max_period=period),
        lambda ps: dm.MultiFrequency(make(ps), update_period=period), steps=12, rtol=0.0)


# --- the criterion ---------------------------------------------------------------------------


def test_significant_is_the_mean_gradients_signal_to_noise_against_kappa():
    g = 3.0
    # No noise: any two equal gradients are significant, for any κ.
    assert significant(WindowStats(2, 2 * g, 4 * g), 100.0)
    # One call has no noise estimate.
    assert not significant(WindowStats(1, g, g), 1e-9)
    # n(Q − S) ≥ κ(nS − Q), at the boundary and either side of it: n = 4, ‖G‖² = 1, tr Σ = 2
    # in expectation: S = 4·(1 + 2) = 12, Q = 16·1 + 4·2 = 24: SNR n‖G‖²/trΣ = 2.
    stats = WindowStats(4, 12.0, 24.0)
    assert significant(stats, 2.0) and not significant(stats, 2.0 + 1e-9)
    # Gradients that cancel (Q < S) are never significant.
    assert not significant(WindowStats(3, 3.0, 0.5), 1e-6)


def _window_lengths(noise_to_signal, significance, calls=400, d=4096, groups=1):
    """Window lengths of a group whose gradients are ``1 + σ ξ`` (‖G‖² = d, tr Σ = d σ²,
    so B_noise = σ² = ``noise_to_signal``)."""
    p = torch.zeros(d, requires_grad=True)
    opt = dm.AssociativeMomentum([p], lr=0.0, update_period="auto", max_period=256,
                                 period_significance=significance)
    gen = torch.Generator().manual_seed(1)
    lengths = []
    for _ in range(calls):
        p.grad = 1.0 + math.sqrt(noise_to_signal) * torch.randn(d, generator=gen)
        before = opt.param_groups[0]["auto_updates"]
        opt.step()
        if opt.param_groups[0]["auto_updates"] != before:
            lengths.append(opt.param_groups[0]["last_period"])
    return lengths


@pytest.mark.parametrize("noise_scale", [4, 16])
@pytest.mark.parametrize("significance", [0.5, 1.0, 2.0])
def test_windows_last_about_kappa_times_the_noise_scale(noise_scale, significance):
    # The estimate concentrates in 4096 dims: the mean window is κ·B_noise within 25%.
    lengths = _window_lengths(noise_scale, significance)
    mean = sum(lengths) / len(lengths)
    assert 0.75 * significance * noise_scale <= mean <= 1.25 * significance * noise_scale + 1


def test_pure_noise_waits_for_max_period_and_clean_gradients_update_at_two():
    p, q = torch.zeros(2048, requires_grad=True), torch.zeros(2048, requires_grad=True)
    opt = dm.AssociativeMomentum([{"params": [p]}, {"params": [q]}], lr=0.0,
                                 update_period="auto", max_period=8)
    gen = torch.Generator().manual_seed(0)
    lengths: dict[int, set] = {0: set(), 1: set()}
    for _ in range(40):
        p.grad = torch.randn(2048, generator=gen)             # mean zero: nothing to learn
        q.grad = 1.0 + 0.01 * torch.randn(2048, generator=gen)  # a sharp, consistent signal
        counts = [g["auto_updates"] for g in opt.param_groups]
        opt.step()
        for i, g in enumerate(opt.param_groups):
            if g["auto_updates"] != counts[i]:
                lengths[i].add(g["last_period"])
    assert lengths == {0: {8}, 1: {2}}


def test_same_data_gives_the_same_update_times():
    assert _window_lengths(8, 1.0, calls=120) == _window_lengths(8, 1.0, calls=120)


# --- checkpoints ----------------------------------------------------------------------------


def _round_trip(opt, make, params):
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    fresh = make(params)
    fresh.load_state_dict(torch.load(buffer, weights_only=False))
    return fresh


@pytest.mark.parametrize("name", ["PreconditionedMomentum", "Muon", "DeltaMomentum",
                                  "MultiFrequency"])
@pytest.mark.parametrize("save_at", [3, 7])
def test_a_checkpoint_mid_window_resumes_bit_for_bit(name, save_at):
    schedule = dict(update_period="auto", max_period=6, accumulate="mean")
    builds = {
        "PreconditionedMomentum": lambda ps: dm.PreconditionedMomentum(ps, lr=0.01, **schedule),
        "Muon": lambda ps: dm.Muon(ps, lr=0.02, **schedule),
        "DeltaMomentum": lambda ps: dm.DeltaMomentum(ps, lr=0.05, erase=0.5, **schedule),
        "MultiFrequency": lambda ps: dm.MultiFrequency(torch.optim.AdamW(ps, lr=0.01),
                                                       **schedule),
    }
    make = builds[name]
    grads = noisy_quadratic_grads(0, noise=2.0)
    stream = [None] * 16
    torch.manual_seed(0)
    start = [torch.randn(4, 3, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)]

    def run(resume_at):
        params = [t.clone().requires_grad_() for t in start]
        opt = make(params)
        windows = []
        for call in range(16):
            if call == resume_at:
                mid = opt.param_groups[0]["window_calls"]
                opt = _round_trip(opt, make, params)
                assert opt.param_groups[0]["window_calls"] == mid
            if stream[call] is None:
                stream[call] = grads(call, params)
            for p, g in zip(params, stream[call]):
                p.grad = g.clone()
            before = opt.param_groups[0]["auto_updates"]
            opt.step()
            if opt.param_groups[0]["auto_updates"] != before:
                windows.append(opt.param_groups[0]["last_period"])
        return [p.detach() for p in params], windows, opt.param_groups[0]["window_calls"]

    straight, windows, _ = run(None)
    assert len(windows) >= 2
    resumed, windows_resumed, _ = run(save_at)
    assert windows_resumed == windows
    for a, b in zip(resumed, straight):
        assert torch.equal(a, b)


def test_the_chosen_periods_are_in_the_state_dict():
    p = torch.zeros(64, requires_grad=True)
    opt = dm.AssociativeMomentum([p], lr=0.1, update_period="auto", max_period=3)
    for _ in range(4):
        p.grad = torch.randn(64)
        opt.step()
    group = opt.state_dict()["param_groups"][0]
    assert group["update_period"] == "auto" and group["auto_updates"] == 1
    assert group["last_period"] == 3 and group["window_calls"] == 1
    assert group["window_sq_sum"] > 0


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("info", REGISTRY, ids=lambda info: info.name)
@pytest.mark.parametrize("kwargs,name", [
    ({"update_period": "fast"}, "update_period"),
    ({"update_period": "auto", "min_period": 0}, "min_period"),
    ({"update_period": "auto", "min_period": 4, "max_period": 3}, "max_period"),
    ({"update_period": "auto", "max_period": 2.5}, "max_period"),
    ({"update_period": "auto", "period_significance": 0.0}, "period_significance"),
    ({"update_period": "auto", "period_significance": math.inf}, "period_significance"),
    ({"update_period": "auto", "update_offset": 1}, "update_offset"),
])
def test_invalid_auto_options_raise_naming_them(info, kwargs, name):
    with pytest.raises(ValueError, match=name):
        info.make([torch.zeros(s, requires_grad=True) for s in info.shapes({})], **kwargs)


def test_multi_frequency_and_continuum_groups_check_auto_options():
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="max_period"):
        dm.MultiFrequency(torch.optim.SGD([p], lr=0.1), update_period="auto", max_period=0)
    with pytest.raises(ValueError, match="period_significance"):
        dm.continuum_groups([([p], "auto", {"period_significance": -1.0})])
    groups = dm.continuum_groups([([p], "auto")], stagger=True)
    assert groups[0]["update_period"] == "auto" and groups[0]["update_offset"] == 0
    # The levels take the optimizer's auto options unless they set their own.
    own = dm.continuum_groups([([torch.zeros(2)], "auto", {"max_period": 4})])
    opt = dm.AssociativeMomentum(groups + own, max_period=16)
    assert [g["max_period"] for g in opt.param_groups] == [16, 4]



def test_window_log_records_each_auto_groups_windows_as_they_end():
    fast, slow, other = (torch.zeros(8, requires_grad=True) for _ in range(3))
    opt = dm.AssociativeMomentum([{"params": [fast]},  # period 1: not an auto group
                                  {"params": [slow], "update_period": "auto", "min_period": 3,
                                   "max_period": 3},
                                  {"params": [other], "update_period": "auto", "max_period": 2,
                                   "min_period": 2}], lr=0.1)
    log = dm.WindowLog(opt)
    for call in range(1, 7):
        for p in (fast, slow, other):
            p.grad = torch.randn(8)
        opt.step()
        log.record(call)
    assert log.rows == [[2, 1, 2], [3, 0, 3], [4, 1, 2], [6, 0, 3], [6, 1, 2]]
