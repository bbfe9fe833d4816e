"""Drop-in defaults (issue 22 item 6): what a user replacing torch's AdamW or Muon gets without
passing anything, and the warning on an embedding or head in a Newton–Schulz group."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch

import deepmomentum as dm
from deepmomentum.testing import assert_same_trajectory


def _defaults(cls) -> dict:
    return {n: p.default for n, p in inspect.signature(cls).parameters.items()
            if p.default is not inspect.Parameter.empty}


ADAMW = _defaults(torch.optim.AdamW)


def test_preconditioned_momentum_at_its_defaults_is_torch_adamw_at_its():
    assert_same_trajectory(dm.PreconditionedMomentum, torch.optim.AdamW,
                           shapes=((4, 3), (5,)), steps=20, rtol=1e-6, atol=1e-8)
    assert _defaults(dm.PreconditionedMomentum)["weight_decay"] == ADAMW["weight_decay"]


@pytest.mark.parametrize("cls", [dm.Muon, dm.M3], ids=lambda c: c.__name__)
def test_the_adamw_part_defaults_to_torch_adamw(cls):
    ours = _defaults(cls)
    for name in ("lr", "betas", "eps", "weight_decay"):
        assert ours[f"adamw_{name}"] == ADAMW[name], name


def test_muon_matrix_part_defaults_to_torch_muon():
    ours, theirs = _defaults(dm.Muon), _defaults(torch.optim.Muon)
    for name in ("lr", "weight_decay", "momentum", "nesterov", "eps", "ns_steps", "adjust_lr_fn"):
        assert ours[name] == theirs[name], name
    assert theirs["weight_decay"] == 0.1  # torch's, documented as such


def test_muon_at_its_defaults_is_torch_muon_plus_torch_adamw_at_theirs():
    def theirs(ps):
        muon, adamw = torch.optim.Muon(ps[:1]), torch.optim.AdamW(ps[1:])

        class Both:
            def step(self):
                muon.step()
                adamw.step()

        return Both()

    assert_same_trajectory(lambda ps: dm.Muon([{"params": ps[:1]},
                                               {"params": ps[1:], "use_muon": False}]),
                           theirs, shapes=((5, 4), (4,), (3, 2)), steps=10, rtol=1e-6,
                           atol=1e-7)


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = torch.nn.Embedding(11, 8)
        self.hidden = torch.nn.Linear(8, 8)
        self.lm_head = torch.nn.Linear(8, 11, bias=False)


def _matrices(model):
    return [(n, p) for n, p in model.named_parameters() if p.ndim >= 2]


@pytest.mark.parametrize("cls", [dm.Muon, dm.M3], ids=lambda c: c.__name__)
def test_an_embedding_or_head_in_a_matrix_group_warns_naming_it(cls):
    with pytest.warns(UserWarning, match=r"\['wte.weight', 'lm_head.weight'\]"):
        cls(_matrices(_Net()))
    cls([p for _, p in _matrices(_Net())])  # tensors only: it cannot tell, and does not warn
    opt = cls(_matrices(_Net())[1:2])
    with pytest.warns(UserWarning, match="lm_head.weight.*muon_param_groups"):
        opt.add_param_group({"params": [("lm_head.weight", torch.zeros(11, 8))]})
    with pytest.raises(UserWarning):  # pytest.ini: deepmomentum's UserWarnings are errors
        cls([("decoder.output.weight", torch.zeros(3, 3))])


@pytest.mark.parametrize("cls", [dm.Muon, dm.M3], ids=lambda c: c.__name__)
def test_muon_param_groups_and_hidden_matrices_do_not_warn(cls):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cls(dm.muon_param_groups(_Net()))
        cls([("blocks.0.attn.weight", torch.zeros(4, 4)), ("headless", torch.zeros(4, 4))])
        cls([{"params": _matrices(_Net()), "use_muon": False}])  # AdamW takes anything
