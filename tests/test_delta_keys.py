"""DeltaMomentum input keys: state that checkpoints, and hooks with a lifecycle (issue 14,
items 6 and 7). Distributed gathering lives in test_delta_ddp.py."""

from __future__ import annotations

import copy
import gc
import io
import pickle
import weakref

import pytest
import torch

import deepmomentum as dm


def _pending(opt):
    """The keys waiting for the next update, by weight (``state[w]["input_keys"]``)."""
    return {p: s["input_keys"] for p, s in opt.state.items() if "input_keys" in s}


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(),
                               torch.nn.Linear(6, 2)).to(dtype)


def _optimizer(model, update_period=1, **kwargs):
    options = dict(lr=0.1, momentum=0.9, erase=0.6, keys="input", key_samples=5)
    groups = [{"params": list(model.parameters()), "update_period": update_period}]
    return dm.DeltaMomentum(groups, **{**options, **kwargs}).attach(model)


def _batches(count, rows=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(rows, 4, generator=g, dtype=dtype),
             torch.randn(rows, 2, generator=g, dtype=dtype)) for _ in range(count)]


def _call(model, opt, batch):
    x, y = batch
    opt.zero_grad()
    (model(x) - y).pow(2).mean().backward()
    opt.step()


def _hook_count(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def _resume(model, opt, **kwargs):
    """A checkpoint through bytes (weights only), loaded into a fresh model and optimizer."""
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fresh = _model(next(model.parameters()).dtype)
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)  # nothing of the fresh model's own values may survive the load
    fresh.load_state_dict(saved["model"])
    fresh_opt = _optimizer(fresh, **kwargs)
    fresh_opt.load_state_dict(saved["opt"])
    return fresh, fresh_opt


# --- item 6: the keys are optimizer state -----------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mid_period_checkpoint_resumes_bit_identically(dtype):
    # update_period = 3: the rule applies at calls 3, 6, 9. The checkpoint is taken after call
    # 5, the second call of a period, when the keys of calls 4 and 5 wait for call 6 (and the
    # memory is no longer empty, so the keys decide the erase term).
    batches = _batches(9, dtype=dtype)
    straight = _model(dtype)
    straight_opt = _optimizer(straight, update_period=3)
    for batch in batches:
        _call(straight, straight_opt, batch)

    model = _model(dtype)
    opt = _optimizer(model, update_period=3)
    for batch in batches[:5]:
        _call(model, opt, batch)
    weight = model[0].weight
    assert opt.state[weight]["input_keys"].shape == (5, 4)  # 8 rows seen, 5 kept
    assert opt.state[weight]["input_keys"].dtype == (
        torch.float32 if dtype == torch.bfloat16 else dtype)
    model, opt = _resume(model, opt, update_period=3)
    for batch in batches[5:]:
        _call(model, opt, batch)

    for a, b in zip(straight.parameters(), model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(straight.parameters(), model.parameters()):
        assert torch.equal(straight_opt.state[a]["momentum_buffer"],
                           opt.state[b]["momentum_buffer"])


def test_captured_rows_continue_identically_after_resume():
    batches = _batches(4, rows=3)
    straight = _model()
    straight_opt = _optimizer(straight, update_period=4, key_samples=4)
    model = _model()
    opt = _optimizer(model, update_period=4, key_samples=4)
    for batch in batches[:2]:
        _call(straight, straight_opt, batch)
        _call(model, opt, batch)
    model, opt = _resume(model, opt, update_period=4, key_samples=4)
    for x, _ in batches[2:]:  # forwards only: the rows the hooks add to the loaded ones
        straight(x)
        model(x)
        for a, b in zip(straight.parameters(), model.parameters()):
            held = straight_opt.state[a].get("input_keys")
            if held is not None:
                assert torch.equal(held, opt.state[b]["input_keys"])
    assert straight_opt.state[straight[2].weight]["input_keys"].shape == (4, 6)


def test_deepcopy_of_model_and_optimizer_mid_period_resumes_identically():
    batches = _batches(6)
    straight = _model()
    straight_opt = _optimizer(straight, update_period=3)
    for batch in batches:
        _call(straight, straight_opt, batch)

    model = _model()
    opt = _optimizer(model, update_period=3)
    for batch in batches[:4]:
        _call(model, opt, batch)
    model, opt = copy.deepcopy((model, opt))  # keys copied with the state; hooks inert
    assert _hook_count(model) == 2
    assert "input_keys" in opt.state[model[0].weight]
    opt.attach(model)  # drops the inert hooks the copy carried
    assert _hook_count(model) == 2
    for batch in batches[4:]:
        _call(model, opt, batch)
    for a, b in zip(straight.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_the_update_consumes_its_keys():
    model = _model()
    opt = _optimizer(model, update_period=2)
    x, y = _batches(1)[0]
    (model(x) - y).pow(2).mean().backward()
    opt.step()
    assert set(_pending(opt)) == {model[0].weight, model[2].weight}  # waiting for call 2
    opt.step()
    assert not _pending(opt)
    assert all("input_keys" not in s for s in opt.state.values())


def test_saved_keys_of_the_wrong_width_are_refused():
    model = _model()
    opt = _optimizer(model)
    model(torch.randn(3, 4))
    saved = opt.state_dict()
    saved["state"][0]["input_keys"] = torch.zeros(3, 5)
    with pytest.raises(ValueError, match="input_keys"):
        _optimizer(_model()).load_state_dict(saved)


def test_detach_drops_pending_keys_and_load_state_dict_keeps_the_hooks():
    model = _model()
    opt = _optimizer(model)
    opt.load_state_dict(opt.state_dict())  # must not lose track of the hooks
    model(torch.randn(3, 4))
    assert _pending(opt)
    opt.detach()
    assert _hook_count(model) == 0
    assert not _pending(opt)


# --- item 7: the hooks -------------------------------------------------------------------------


def test_attaching_twice_hooks_each_layer_once():
    model = _model()
    opt = _optimizer(model, key_samples=256)
    opt.attach(model)
    assert _hook_count(model) == 2
    model(torch.randn(8, 4))
    assert opt.state[model[0].weight]["input_keys"].shape == (8, 4)
    opt.detach()
    assert _hook_count(model) == 0


def test_a_deepcopied_model_does_not_feed_the_original_optimizer():
    model = _model()
    opt = _optimizer(model)
    model(torch.randn(3, 4))
    before = {p: k.clone() for p, k in _pending(opt).items()}
    twin = copy.deepcopy(model)
    twin(torch.randn(7, 4))
    after = _pending(opt)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[p], before[p]) for p in before)
    # A second optimizer attached to the copy gets the copy's keys, and only those.
    twin_opt = _optimizer(twin)
    x = torch.randn(2, 4)
    twin(x)
    assert twin_opt.state[twin[0].weight]["input_keys"].shape == (2, 4)
    assert torch.equal(_pending(opt)[model[0].weight], before[model[0].weight])


def test_a_hook_records_only_for_the_weight_it_was_registered_for():
    model = _model()
    opt = _optimizer(model)
    model[0].weight = torch.nn.Parameter(model[0].weight.detach().clone())
    model(torch.randn(3, 4))
    assert set(_pending(opt)) == {model[2].weight}


def test_an_attached_model_pickles_and_its_copy_is_inert():
    model = _model()
    opt = _optimizer(model)
    data = pickle.dumps(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    twin = pickle.loads(data)
    twin(torch.randn(3, 4))
    assert not _pending(opt)
    model(torch.randn(3, 4))
    assert set(_pending(opt)) == {model[0].weight, model[2].weight}


def test_dropped_optimizers_take_their_hooks_and_are_collected():
    model = _model()
    refs = []
    for _ in range(20):
        opt = _optimizer(model)  # the previous one is dropped without detach()
        refs.append(weakref.ref(opt))
    gc.collect()
    assert _hook_count(model) <= 2  # at most the live optimizer's
    assert all(r() is None for r in refs[:-1])
    model(torch.randn(3, 4))
    assert set(_pending(opt)) == {model[0].weight, model[2].weight}
    del opt
    gc.collect()
    assert refs[-1]() is None
    assert _hook_count(model) == 0
    model(torch.randn(3, 4))  # no hook left to run


def test_a_pickled_optimizer_comes_back_detached_with_its_keys():
    model = _model()
    opt = _optimizer(model)
    model(torch.randn(3, 4))
    twin = pickle.loads(pickle.dumps(opt))
    assert twin._hooks == [] and twin._key_process_group is None
    assert len(_pending(twin)) == 2
    twin.detach()  # removes nothing of the original's
    assert _hook_count(model) == 2
