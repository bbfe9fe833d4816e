"""HOPE training with M3 (issue 14): ``python -m examples.hope.train --optim M3`` reached a NaN
loss at step 2–3, at the size's lr and at lr 1e-4.

M3's literal rule divides the orthogonalized momentum (entries ~1/√n) by √V + ε of the raw
gradients, so with ε = 1e-8 an entry whose gradient is ~0 stepped by ~γ/ε: the first step moved
the η-gate bias by hundreds, σ saturated to exactly 0 and log η = −inf in the memories' scan gave
NaN gradients. M3's default is now the normalized form (issue 17), whose step has Muon's norm
whatever the gradients' scale; ``train`` gives it the size's lr and no options.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from examples.hope import train
from examples.hope.model import HopeConfig, build

MICRO = dict(d_model=16, n_heads=2, n_layers=1, chunk_size=4, cms_hidden=8, cms_periods=(1, 2))


def test_first_m3_step_is_bounded_by_muon_norm():
    """M3's normalized form steps every matrix by γ s(r, c) ‖NS(U)‖_F, whatever its gradients'
    scale (NS's singular values lie in ~[0.7, 1.2]); the literal form's ε = 1e-8 gave ~1e5·γ."""
    torch.manual_seed(0)
    model = build(HopeConfig(arch="hope", **MICRO))
    lr = 1e-3
    optimizer = train.make_optimizer(model, "M3", lr, 0.0)
    matrices = [p for g in optimizer.param_groups if g["use_muon"] for p in g["params"]]
    assert any(p is model.blocks[0].mixer.gate_bias for p in matrices)  # the one that saturated
    before = [p.detach().clone() for p in matrices]
    idx = torch.randint(256, (2, 17), generator=torch.Generator().manual_seed(0))
    loss = F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # as train.py: tiny gradients
    optimizer.step()
    moved = 0
    for p, b in zip(matrices, before):
        r, c = p.shape[0], p[0].numel()
        bound = 1.3 * lr * math.sqrt(max(1.0, r / c)) * math.sqrt(min(r, c))
        step = (p.detach() - b).norm()  # 0 for a matrix with no gradient yet (a zero factor)
        assert step <= bound, (tuple(p.shape), step, bound)
        moved += int(step > 0)
        if p is model.blocks[0].mixer.gate_bias:
            assert step > 0.5 * lr
    assert moved > len(matrices) // 2


@pytest.mark.parametrize("lr", [None, "1e-4"])  # the size's default lr and issue 14's 1e-4
def test_hope_trains_with_m3_without_nan(tmp_path, lr):
    args = ["--arch", "hope", "--size", "micro", "--corpus", "stdlib", "--optim", "M3",
            "--steps", "6", "--out", str(tmp_path), "--quiet", "--device", "cpu"]
    metrics = train.train(train.parse_args(args + (["--lr", lr] if lr else [])))  # raises on NaN
    assert len(metrics["train_loss"]) == 6
    assert all(math.isfinite(v) for v in metrics["train_loss"])
    assert math.isfinite(metrics["final_val_bits_per_byte"])
    # M3 takes no options of its own; the record names what its AdamW part is given
    assert metrics["optim_options"] == {**train.MUON_ADAMW_0_1, **train.M3_OPTIONS}
    assert metrics["lr"] == pytest.approx(float(lr) if lr else 3e-3)  # the micro size's, or --lr


def test_a_saturated_gate_has_finite_scan_gradients():
    """σ(η) underflowing to exactly 0 (what M3's first step did to HOPE's η bias) used to give
    log η = −∞ and a NaN gradient through ``torch.log``; the scan now backpropagates zeros."""
    from deepmomentum import functional as dmf

    momentum = torch.tensor([[0.9, 0.0, 0.5, 0.7]], requires_grad=True)
    decay = torch.tensor([[0.1, 0.2, 1.0, 0.0]], requires_grad=True)  # 1 − α = 0 too
    lr = torch.full((1, 4), 0.1, requires_grad=True)
    grads = torch.randn(1, 4, 3, generator=torch.Generator().manual_seed(0))
    S, W = dmf.momentum_scan(grads, momentum, lr, decay, torch.ones(1, 3), torch.ones(1, 3))
    (S.sum() + W.sum()).backward()
    for t in (momentum, decay, lr):
        assert torch.isfinite(t.grad).all()
    # and the forward is still exact: a zero gate cuts the product to exactly zero
    c = dmf.scan_coefficients(momentum.detach(), lr.detach(), decay.detach())
    assert c.momentum_from_start[0, 1:].eq(0).all() and c.param_from_start[0, 2:].eq(0).all()
