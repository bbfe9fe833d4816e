"""The HOPE example (examples/hope): its in-context memory rule, the model, training, evaluation.

The acceptance properties of the example: the chunked (parallel) memory update equals the
token-by-token loop; with chunk size 1 the memory follows the delta-rule recursion exactly;
a CMS level of period C changes only every C steps; the model overfits a tiny batch; no output
depends on a later token. Plus the scan rule the memories share with the optimizers.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given

import deepmomentum as dm
from deepmomentum import functional as dmf
from examples.hope import evaluate, train
from examples.hope.model import ARCHITECTURES, STATIC_PARTS, HopeConfig, InContextMemories, \
    build, count_parameters

TINY = dict(d_model=16, n_heads=2, n_layers=1, memory_expansion=2, cms_hidden=8,
            cms_periods=(1, 2))


def _gates(shape, generator, dtype=torch.float64):
    eta = torch.rand(shape, generator=generator, dtype=dtype)
    theta = torch.rand(shape, generator=generator, dtype=dtype)
    alpha = 0.5 * torch.rand(shape, generator=generator, dtype=dtype)
    return eta, theta, alpha


# --- the scan rule ----------------------------------------------------------------------------

@given(batch=st.lists(st.integers(1, 3), max_size=2), steps=st.integers(1, 9),
       event=st.lists(st.integers(1, 4), min_size=1, max_size=2), seed=st.integers(0, 2**16),
       zero_gate=st.booleans())
def test_momentum_scan_equals_step_by_step_recursion(batch, steps, event, seed, zero_gate):
    g = torch.Generator().manual_seed(seed)
    grads = torch.randn(*batch, steps, *event, generator=g, dtype=torch.float64)
    eta, theta, alpha = _gates((*batch, steps), g)
    if zero_gate:  # η = 0 and α = 1 somewhere: exact zeros in the products, no NaN
        eta[..., steps // 2] = 0.0
        alpha[..., -1] = 1.0
    S0 = torch.randn(*batch, *event, generator=g, dtype=torch.float64)
    W0 = torch.randn(*batch, *event, generator=g, dtype=torch.float64)
    S, W = dmf.momentum_scan(grads, eta, theta, alpha, S0, W0)
    expand = lambda x: x.reshape(*x.shape, *([1] * len(event)))  # noqa: E731
    at = lambda x, t: x.select(len(batch), t)  # noqa: E731 — step t of a (*batch, C, *event)
    s, w = S0, W0
    for t in range(steps):
        s = expand(eta[..., t]) * s - expand(theta[..., t]) * at(grads, t)
        w = (1 - expand(alpha[..., t])) * w + s
        torch.testing.assert_close(at(S, t), s, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(at(W, t), w, rtol=1e-12, atol=1e-12)


@given(momentum=st.floats(0.0, 0.99), lr=st.floats(1e-3, 1.0), steps=st.integers(1, 12),
       shape=st.lists(st.integers(1, 5), min_size=1, max_size=3), seed=st.integers(0, 2**16))
def test_momentum_scan_reduces_to_torch_sgd(momentum, lr, steps, shape, seed):
    """Constant η, θ and α = 0: ``W_t`` is torch's SGD with momentum η (dampening 0), lr θ."""
    g = torch.Generator().manual_seed(seed)
    grads = torch.randn(steps, *shape, generator=g, dtype=torch.float64)
    W0 = torch.randn(*shape, generator=g, dtype=torch.float64)
    full = lambda v: torch.full((steps,), v, dtype=torch.float64)  # noqa: E731
    _, W = dmf.momentum_scan(grads, full(momentum), full(lr), full(0.0),
                               torch.zeros_like(W0), W0)
    p = W0.clone().requires_grad_(True)
    sgd = torch.optim.SGD([p], lr=lr, momentum=momentum, foreach=False)
    for t in range(steps):
        p.grad = grads[t].clone()
        sgd.step()
        torch.testing.assert_close(W[t], p.detach(), rtol=1e-11, atol=1e-12)


@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(0, 2),
       st.booleans(), st.sampled_from([torch.float32, torch.float64]))
def test_batch_shared_matmul_is_matmul(batch, heads, rows, lead, shared, dtype):
    """``batch_shared_matmul(z, W)`` is ``z @ W`` for z (…, batch, H, r, i) and W shared by the
    batch (dim −4 of size 1) or per sequence, with 0–2 leading memory dims on either side."""
    g = torch.Generator().manual_seed(batch * 100 + heads * 10 + rows)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    z = r(*(2,) * lead, batch, heads, rows, 5)
    W = r(*(2,) * (2 - lead), 1 if shared else batch, heads, 5, 3)
    torch.testing.assert_close(dmf.batch_shared_matmul(z, W), z @ W)
    assert dmf.batch_shared_matmul(z, W).shape == (z @ W).shape


def test_momentum_scan_rejects_mismatched_gates():
    with pytest.raises(ValueError, match="gates' shape"):
        dmf.momentum_scan(torch.zeros(3, 4), torch.ones(2), torch.ones(2), torch.zeros(2),
                            torch.zeros(4), torch.zeros(4))


@given(rows=st.integers(1, 5), c=st.integers(1, 4), h=st.integers(1, 4),
       activation=st.sampled_from(dmf.DMGD_ACTIVATIONS), objective=st.sampled_from(["dot", "l2"]),
       seed=st.integers(0, 2**16))
def test_gradient_factors_are_each_rows_autograd_gradient(rows, c, h, activation, objective, seed):
    g = torch.Generator().manual_seed(seed)
    X, V = (torch.randn(rows, c, generator=g, dtype=torch.float64) for _ in range(2))
    A = torch.randn(c, h, generator=g, dtype=torch.float64, requires_grad=True)
    B = torch.randn(h, c, generator=g, dtype=torch.float64, requires_grad=True)
    hidden, dZ, D = dmf.deep_memory_gradient_factors(X, V, A.detach(), B.detach(),
                                                       objective=objective, activation=activation)
    for i in range(rows):
        F_i = dmf.activate(activation, X[i] @ A)[0] @ B
        loss = -(F_i * V[i]).sum() if objective == "dot" else 0.5 * ((F_i - V[i]) ** 2).sum()
        gA, gB = torch.autograd.grad(loss, (A, B))
        torch.testing.assert_close(torch.outer(X[i], dZ[i]), gA, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(torch.outer(hidden[i], D[i]), gB, rtol=1e-10, atol=1e-12)


# --- the in-context memory --------------------------------------------------------------------

@given(T=st.integers(1, 12), heads=st.integers(1, 2), e=st.sampled_from([2, 4]),
       m=st.integers(1, 3), clip=st.sampled_from([0.05, 1.0, 1e6]), seed=st.integers(0, 2**16))
def test_chunk_size_one_follows_the_delta_rule_recursion(T, heads, e, m, clip, seed):
    """Token by token, from an autograd gradient ∇ of ½‖M_{t−1}(k_t) − v_t‖², clipped to
    ‖∇‖_F ≤ c: S_t = η_t S_{t−1} − θ_t ∇, M_t = (1 − α_t) M_{t−1} + S_t; the read is M_t(q_t)."""
    torch.manual_seed(seed)
    memories = InContextMemories(m, heads, e, 3, "silu", grad_clip=clip).double()
    g = torch.Generator().manual_seed(seed)
    keys = F.normalize(torch.randn(2, heads, T, e, generator=g, dtype=torch.float64), dim=-1)
    values = torch.randn(m, 2, heads, T, e, generator=g, dtype=torch.float64)
    queries = torch.randn(2, heads, T, e, generator=g, dtype=torch.float64)
    eta, theta, alpha = _gates((2, heads, T), g)
    batch = lambda p: p.detach().unsqueeze(1).expand(m, 2, *p.shape[1:]).clone()  # noqa: E731
    state = (batch(memories.A0), batch(memories.B0), torch.zeros_like(batch(memories.A0)),
             torch.zeros_like(batch(memories.B0)))
    A, B, SA, SB = (t.clone() for t in state)
    for t in range(T):
        step = slice(t, t + 1)
        read, state = memories.learn(state, keys[..., step, :], values[..., step, :],
                                     eta[..., step], theta[..., step], alpha[..., step],
                                     queries[..., step, :])
        A_, B_ = A.clone().requires_grad_(True), B.clone().requires_grad_(True)
        k = keys[..., t, None, :]
        M_k = k + memories.phi(k @ A_) @ B_
        loss = 0.5 * ((M_k - values[..., t, None, :]) ** 2).sum()
        gA, gB = torch.autograd.grad(loss, (A_, B_))
        norms = [g.flatten(-2).norm(dim=-1)[..., None, None] for g in (gA, gB)]
        gA, gB = (torch.where(n > clip, g * clip / n, g) for g, n in zip((gA, gB), norms))
        gate = lambda x: x[..., t, None, None]  # noqa: E731
        SA, SB = gate(eta) * SA - gate(theta) * gA, gate(eta) * SB - gate(theta) * gB
        A, B = (1 - gate(alpha)) * A + SA, (1 - gate(alpha)) * B + SB
        q = queries[..., t, None, :]
        expected = q + memories.phi(q @ A[-1]) @ B[-1]
        torch.testing.assert_close(read, expected, rtol=1e-10, atol=1e-12)
        for got, want in zip(state, (A, B, SA, SB)):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@given(T=st.integers(1, 8), m=st.integers(1, 3), clip=st.sampled_from([0.05, 1e6]),
       seed=st.integers(0, 2**16))
def test_linear_memories_follow_the_delta_rule_recursion(T, m, clip, seed):
    """``memory_depth=1``, chunk size 1: W_t from the autograd gradient of
    ½‖k + k W − v‖² (clipped), the read q + q W_t."""
    torch.manual_seed(seed)
    memories = InContextMemories(m, 2, 3, 0, "silu", grad_clip=clip, depth=1).double()
    g = torch.Generator().manual_seed(seed)
    keys = F.normalize(torch.randn(2, 2, T, 3, generator=g, dtype=torch.float64), dim=-1)
    values = torch.randn(m, 2, 2, T, 3, generator=g, dtype=torch.float64)
    queries = torch.randn(2, 2, T, 3, generator=g, dtype=torch.float64)
    eta, theta, alpha = _gates((2, 2, T), g)
    state = memories.initial_state(2)
    W = memories.W0.detach().unsqueeze(1).expand(m, 2, 2, 3, 3).clone()
    S = torch.zeros_like(W)
    for t in range(T):
        step = slice(t, t + 1)
        read, state = memories.learn(state, keys[..., step, :], values[..., step, :],
                                     eta[..., step], theta[..., step], alpha[..., step],
                                     queries[..., step, :])
        W_ = W.clone().requires_grad_(True)
        k = keys[..., t, None, :]
        loss = 0.5 * ((k + k @ W_ - values[..., t, None, :]) ** 2).sum()
        (gW,) = torch.autograd.grad(loss, (W_,))
        n = gW.flatten(-2).norm(dim=-1)[..., None, None]
        gW = torch.where(n > clip, gW * clip / n, gW)
        gate = lambda x: x[..., t, None, None]  # noqa: E731
        S = gate(eta) * S - gate(theta) * gW
        W = (1 - gate(alpha)) * W + S
        q = queries[..., t, None, :]
        torch.testing.assert_close(read, q + q @ W[-1], rtol=1e-10, atol=1e-12)
        for got, want in zip(state, (W, S)):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_memory_depth_is_validated():
    with pytest.raises(ValueError, match="memory_depth"):
        HopeConfig(memory_depth=3)


# No max_examples pin: the loaded profile sets it (25 under "ci", 500 under "thorough"); the
# model is TINY and T ≤ 13, so an example takes well under 0.1 s.
@given(arch=st.sampled_from(["hope", "titans"]), T=st.integers(1, 13), chunk=st.integers(1, 6),
       clip=st.sampled_from([0.01, 1.0]), seed=st.integers(0, 2**16),
       static=st.one_of(st.just(()), st.sets(st.sampled_from(STATIC_PARTS)).map(sorted)),
       depth=st.sampled_from([1, 2]))
def test_chunked_model_equals_token_by_token_loop(arch, T, chunk, clip, seed, static, depth):
    """The parallel chunk form (factored gradients, scan coefficients) and the reference that
    materializes every per-token gradient and state and loops over tokens: same logits and
    same outer gradients, in float64 — HOPE with any of its parts made static too, and with
    linear memories (``memory_depth=1``)."""
    torch.manual_seed(seed)
    config = HopeConfig(arch=arch, chunk_size=chunk, inner_grad_clip=clip, **TINY,
                        static_parts=tuple(static) if arch == "hope" else (),
                        memory_depth=depth)
    model = build(config).double()
    reference = build(replace(model.config, sequential=True)).double()
    reference.load_state_dict(model.state_dict())
    idx = torch.randint(256, (2, T), generator=torch.Generator().manual_seed(seed))
    out, ref = model(idx), reference(idx)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-11)
    out.square().mean().backward()
    ref.square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-11, msg=name)


def _layer_from_the_equations(layer, x: torch.Tensor) -> torch.Tensor:
    """The Titans/HOPE memory layer written out from its docstrings, one token at a time, with
    the inner gradients from autograd: an independent reference for the wiring the chunked and
    the sequential forms share (which projection makes which part, which gate is η and which
    α, the convolutions' carried tails, the self-generated values). Residual MLP memories."""
    config, H = layer.config, layer.n_heads
    Bsz, T, d = x.shape
    e, C = d // H, config.chunk_size
    mem = layer.memories
    phi = mem.phi
    split = lambda t: t.unflatten(-1, (H, e)).transpose(1, 2)  # noqa: E731 — (B, H, T, e)

    def conv(module, z, tail):  # y_t = Σ_w weight_w ⊙ z_{t − (width − 1) + w}
        width = module.width
        padded = torch.cat([tail, z], dim=2)
        y = torch.stack([sum(module.weight[:, 0, :, w] * padded[:, :, t + w]
                             for w in range(width)) for t in range(z.shape[2])], dim=2)
        return y, padded[:, :, -(width - 1):]

    def memory(z, A, B):  # M(z) = z + φ(z A) B, per (batch, head)
        return z + phi(z @ A) @ B

    zeros = lambda: x.new_zeros(Bsz, H, config.conv_width - 1, e)  # noqa: E731
    tails = {"k": zeros(), "v": zeros()}  # carried from chunk to chunk
    q, _ = conv(layer.conv_q, split(layer.q(x)), zeros())
    q = F.normalize(q, dim=-1)
    static = {}
    for name in ("k", "v"):
        if name not in layer.generated:
            static[name] = F.normalize(conv(getattr(layer, f"conv_{name}"),
                                            split(getattr(layer, name)(x)), zeros())[0], dim=-1)
    if layer.static_gates:
        raw = torch.sigmoid(layer.gates(x))  # (B, T, gates·H): η's H columns, then α's
        for i, name in enumerate(layer.static_gates):
            static[name] = raw[..., i * H:(i + 1) * H].transpose(1, 2)
    sigma_theta = torch.sigmoid(layer.theta(x)).transpose(1, 2)
    xh = F.normalize(split(x), dim=-1)
    names = [*layer.generated, "out"]  # the memories, in order
    A = [mem.A0[i][None].expand(Bsz, H, *mem.A0.shape[-2:]) for i in range(len(names))]
    Bm = [mem.B0[i][None].expand(Bsz, H, *mem.B0.shape[-2:]) for i in range(len(names))]
    SA = [torch.zeros_like(a) for a in A]
    SB = [torch.zeros_like(b) for b in Bm]
    outputs = []
    for start in range(0, T, C):
        part = slice(start, min(start + C, T))
        parts = {n: t[:, :, part] for n, t in static.items()}
        reads = {n: memory(xh[:, :, part], A[i], Bm[i]) for i, n in enumerate(names)}
        for name in ("k", "v"):
            if name in layer.generated:
                read, tails[name] = conv(getattr(layer, f"conv_{name}"), reads[name],
                                         tails[name])
                parts[name] = F.normalize(read, dim=-1)
        for i, name in enumerate(layer.read_gates):
            parts[name] = torch.sigmoid((reads[name] * layer.gate_readout[i][:, None]).sum(-1)
                                        + layer.gate_bias[i][:, None])
        eta, alpha = parts["eta"], parts["alpha"]
        theta = layer.inner_lr_scale * (1 - eta) * sigma_theta[:, :, part]
        keys = parts["k"]
        starts = [(a, b) for a, b in zip(A, Bm)]  # every gradient is taken here
        for t in range(keys.shape[2]):
            for i in range(len(names)):
                a0, b0 = (w.detach().requires_grad_() for w in starts[i])
                target = memory(parts["v"], *starts[i])[:, :, t] \
                    if layer.self_generated_values else parts["v"][:, :, t]
                loss = 0.5 * (memory(keys[:, :, t, None], a0, b0)[:, :, 0]
                              - target).square().sum()
                gA, gB = torch.autograd.grad(loss, (a0, b0))  # the step's value only
                gA, gB = (g * (config.inner_grad_clip
                               / g.norm(dim=(-2, -1), keepdim=True)
                               .clamp_min(config.inner_grad_clip)) for g in (gA, gB))
                gate = lambda v: v[:, :, t, None, None]  # noqa: E731
                SA[i] = gate(eta) * SA[i] - gate(theta) * gA
                SB[i] = gate(eta) * SB[i] - gate(theta) * gB
                A[i] = (1 - gate(alpha)) * A[i] + SA[i]
                Bm[i] = (1 - gate(alpha)) * Bm[i] + SB[i]
            qt = q[:, :, start + t, None]
            outputs.append(memory(qt, A[-1], Bm[-1])[:, :, 0])
    o = torch.stack(outputs, dim=2).transpose(1, 2).flatten(-2)
    return layer.out(o)


@pytest.mark.parametrize("arch,static", [("titans", ()), ("hope", ()), ("hope", ("eta",)),
                                         ("hope", ("v", "values")), ("hope", ("k", "alpha"))])
def test_memory_layer_follows_its_equations(arch, static):
    """The layer (chunked, as trained) against :func:`_layer_from_the_equations`, float64,
    a ragged last chunk: the same outputs."""
    torch.manual_seed(3)
    config = HopeConfig(arch=arch, chunk_size=3, static_parts=static, inner_grad_clip=0.3,
                        **TINY)
    layer = build(config).double().blocks[0].mixer
    with torch.no_grad():  # gates and conv taps away from their identity initialization
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(2, 8, config.d_model, dtype=torch.float64)
    torch.testing.assert_close(layer(x), _layer_from_the_equations(layer, x), rtol=1e-9,
                               atol=1e-11)


@pytest.mark.parametrize("arch", [*ARCHITECTURES, ("k", "values"), ("eta", "alpha")])
def test_causal_no_output_depends_on_a_later_token(arch):
    torch.manual_seed(0)
    static = () if isinstance(arch, str) else arch  # HOPE with these parts static
    model = build(HopeConfig(arch=arch if isinstance(arch, str) else "hope", chunk_size=4,
                             static_parts=static, **TINY)).double()
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(256, (2, 19), generator=g)
    base = model(idx)
    for position in (0, 3, 4, 9, 18):
        changed = idx.clone()
        changed[:, position] = (changed[:, position] + 1 + torch.randint(254, (2,), generator=g)) % 256
        out = model(changed)
        torch.testing.assert_close(out[:, :position], base[:, :position], rtol=0, atol=1e-12)
        assert (out[:, position] - base[:, position]).abs().max() > 1e-6  # the test can fail


def test_models_have_equal_parameter_counts():
    counts = {arch: count_parameters(build(HopeConfig(arch=arch))) for arch in ARCHITECTURES}
    assert max(counts.values()) / min(counts.values()) < 1.005, counts
    tiny = {arch: count_parameters(build(HopeConfig(arch=arch, **TINY))) for arch in ARCHITECTURES}
    assert max(tiny.values()) / min(tiny.values()) < 1.03, tiny


def test_hope_with_every_part_static_is_titans():
    """static_parts = all of them: the same layer as Titans (same parameters, same outputs)."""
    torch.manual_seed(0)
    size = {**TINY, "cms_periods": (1,), "cms_hidden": 24}
    titans = build(HopeConfig(arch="titans", mlp_hidden=24, **size)).double()
    hope = build(HopeConfig(arch="hope", static_parts=STATIC_PARTS, **size)).double()
    assert hope.state_dict().keys() == titans.state_dict().keys()
    hope.load_state_dict(titans.state_dict())
    idx = torch.randint(256, (2, 11), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(hope(idx), titans(idx), rtol=0, atol=0)
    partly = build(HopeConfig(arch="hope", static_parts=STATIC_PARTS[:-1], **size)).double()
    partly.load_state_dict(titans.state_dict())  # self-generated values: another layer
    assert not torch.allclose(partly(idx), titans(idx))


@pytest.mark.parametrize("kwargs, name", [
    (dict(arch="mamba"), "arch"), (dict(chunk_size=0), "chunk_size"),
    (dict(cms_periods=()), "cms_periods"), (dict(cms_periods=(1, 0)), "cms_periods"),
    (dict(d_model=30, n_heads=4), "d_model"), (dict(inner_grad_clip=0.0), "inner_grad_clip"),
    (dict(static_parts=("q",)), "static_parts")])
def test_config_rejects_bad_values(kwargs, name):
    with pytest.raises(ValueError, match=name):
        HopeConfig(**kwargs)


def test_hope_overfits_a_tiny_batch():
    torch.manual_seed(0)
    model = build(HopeConfig(arch="hope", chunk_size=8, **TINY))
    idx = torch.randint(256, (2, 33), generator=torch.Generator().manual_seed(0))
    optimizer = dm.PreconditionedMomentum(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(150):
        loss = F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 5.0 and losses[-1] < 0.1, (losses[0], losses[-1])


# --- training: CMS schedule, optimizers by name, checkpoints ---------------------------------

@pytest.mark.parametrize("optim", ["PreconditionedMomentum", "torch.AdamW", "Muon"])
def test_cms_level_changes_only_every_period_steps(optim):
    torch.manual_seed(0)
    model = build(HopeConfig(arch="hope", chunk_size=4, **{**TINY, "cms_periods": (1, 2, 3)}))
    optimizer = train.make_optimizer(model, optim, 1e-2, 0.0)
    levels = model.cms_levels()
    changed_at = [[] for _ in levels]
    idx = torch.randint(256, (2, 9), generator=torch.Generator().manual_seed(0))
    for step in range(1, 13):
        before = [[p.detach().clone() for p in level] for level in levels]
        loss = F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for i, level in enumerate(levels):
            if any(not torch.equal(a, p) for a, p in zip(before[i], level)):
                changed_at[i].append(step)
    assert changed_at == [list(range(1, 13)), [2, 4, 6, 8, 10, 12], [3, 6, 9, 12]]


@pytest.mark.parametrize("optim", ["PreconditionedMomentum", "Muon", "torch.AdamW"])
@pytest.mark.parametrize("power", [0.0, 0.5, 1.0])
def test_cms_lr_power_scales_each_slow_level_by_its_period(optim, power):
    periods = (1, 2, 8)
    model = build(HopeConfig(arch="hope", **{**TINY, "cms_periods": periods}))
    optimizer = train.make_optimizer(model, optim, 1e-2, 0.0, cms_lr_power=power)
    level_of = {id(p): i for i, level in enumerate(model.cms_levels()) for p in level}
    for group in optimizer.param_groups:
        params = [p[1] if isinstance(p, tuple) else p for p in group["params"]]
        levels = {level_of.get(id(p)) for p in params}
        assert len(levels) == 1  # a group is one level's, or the rest's
        level = levels.pop()
        period = 1 if level is None else periods[level]
        base = train.MUON_ADAMW_0_1["adamw_lr"] if not group.get("use_muon", True) else 1e-2
        assert group["lr"] == pytest.approx(base * period ** power)
        assert group["update_period"] == period


def test_optimizer_by_name():
    assert train.optimizer_class("DeltaMomentum") is dm.DeltaMomentum
    assert train.optimizer_class("torch.AdamW") is torch.optim.AdamW
    assert train.optimizer_class("torch.optim.SGD") is torch.optim.SGD
    assert train.optimizer_class("Adam") is torch.optim.Adam  # not in deepmomentum: torch's
    with pytest.raises(ValueError, match="optim"):
        train.optimizer_class("Adamm")
    for not_one in ("MultiFrequency", "MemoryOptimizer", "torch.Optimizer"):  # not trainable
        with pytest.raises(ValueError, match="choose from"):
            train.optimizer_class(not_one)
    names = train.optimizer_names()
    assert {"PreconditionedMomentum", "M3", "torch.AdamW", "torch.SGD"} <= set(names)
    assert all(train.optimizer_class(n) for n in names)


@pytest.mark.parametrize("optim", ["PreconditionedMomentum", "Muon", "torch.AdamW"])
def test_make_optimizer_decays_only_weight_matrices_and_passes_the_options(optim):
    """Weight decay on ≥ 2-D weights only (not norm gains, biases, gate_bias), unless
    decay_all; the class's own options (betas, …) reach every group."""
    model = build(HopeConfig(arch="hope", **train.SIZES["micro"]["model"]))
    names = {id(p): n for n, p in model.named_parameters()}
    option = {"Muon": {"adamw_betas": (0.8, 0.9)}}.get(optim, {"betas": (0.8, 0.9)})
    optimizer = train.make_optimizer(model, optim, 1e-2, 0.1, **option)
    seen = set()
    for group in optimizer.param_groups:
        key, value = next(iter(option.items()))
        assert tuple(group[key]) == value
        for p in group["params"]:
            p = p[1] if isinstance(p, tuple) else p
            name = names[id(p)]
            seen.add(name)
            weight = p.dim() >= 2 and not name.endswith("bias")
            if optim == "Muon" and not group["use_muon"]:  # AdamW part: its own adamw decay
                if not weight:
                    assert group["adamw_weight_decay"] == 0.0, name
                continue
            assert group["weight_decay"] == (0.1 if weight else 0.0), name
    assert seen == set(names.values())  # every parameter
    assert {"blocks.0.norm.weight", "blocks.0.mixer.gate_bias"} <= seen
    everything = train.make_optimizer(model, optim, 1e-2, 0.1, decay_all=True, **option)
    assert all(g["weight_decay"] == 0.1 for g in everything.param_groups
               if g.get("use_muon", True))


def test_optim_option_is_parsed_and_a_wrong_one_is_a_usage_error(capsys):
    args = train.parse_args(["--out", "x", "--optim", "torch.AdamW",
                             "--optim-option", "betas=(0.9, 0.95)", "--optim-option", "eps=1e-10"])
    assert dict(args.optim_option) == {"betas": (0.9, 0.95), "eps": 1e-10}
    with pytest.raises(SystemExit) as exit_:
        train.parse_args(["--out", "x", "--optim-option", "betaz=1"])
    assert exit_.value.code == 2
    assert "no option 'betaz'" in capsys.readouterr().err
    args = train.parse_args(["--out", "x", "--model-option", "cms_periods=(1, 1)",
                             "--model-option", "inner_grad_clip=1e6"])
    assert dict(args.model_option) == {"cms_periods": (1, 1), "inner_grad_clip": 1e6}
    for wrong, says in (("arch=titans", "no field 'arch'"), ("inner_grad_clip=-1",
                                                              "inner_grad_clip")):
        with pytest.raises(SystemExit):
            train.parse_args(["--out", "x", "--model-option", wrong])
        assert says in capsys.readouterr().err


def test_unknown_optim_is_a_usage_error_listing_the_names(tmp_path, capsys):
    """``--optim Foo`` exits like argparse (status 2, usage, the valid names), before any work;
    it was a ValueError traceback from inside the training."""
    with pytest.raises(SystemExit) as exit_:
        train.main(["--optim", "Foo", "--size", "micro", "--out", str(tmp_path / "run")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage:") and "argument --optim: invalid optim: 'Foo'" in err
    for name in ("PreconditionedMomentum", "DeltaMomentum", "Muon", "M3", "torch.AdamW"):
        assert name in err
    assert not (tmp_path / "run").exists()


def _args(tmp_path, *extra):
    return train.parse_args(["--arch", "hope", "--size", "micro", "--corpus", "stdlib",
                             "--out", str(tmp_path), "--quiet", "--device", "cpu", *extra])


def test_train_writes_metrics_and_resumes_bit_for_bit(tmp_path):
    straight = train.train(_args(tmp_path / "straight", "--steps", "6"))
    assert len(straight["train_loss"]) == 6 and math.isfinite(straight["final_val_bits_per_byte"])
    saved = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert saved["parameters"] == straight["parameters"] and saved["config"]["arch"] == "hope"
    # The same run, stopped after 3 steps (with its checkpoint), then resumed to the end.
    first = train.train(_args(tmp_path / "cut", "--steps", "6", "--ckpt-every", "3",
                              "--stop-after", "3"))
    assert len(first["train_loss"]) == 3
    resumed = train.train(_args(tmp_path / "cut", "--steps", "6", "--resume"))
    assert resumed["train_loss"] == straight["train_loss"]
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)["model"]
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_resume_refuses_a_change_of_compile(tmp_path):
    """A run trained eager resumes eager (and a compiled one compiled): a compiled step rounds
    differently, so resuming the other way would not continue the run's trajectory."""
    train.train(_args(tmp_path, "--steps", "4", "--ckpt-every", "2", "--stop-after", "2"))
    assert json.loads((tmp_path / "metrics.json").read_text())["compile"] is False
    with pytest.raises(ValueError, match="without --compile"):
        train.train(_args(tmp_path, "--steps", "4", "--resume", "--compile"))


@pytest.mark.parametrize("arch", ["titans", "hope"])
def test_memory_layer_traces_as_one_graph(arch):
    """Dynamo traces the whole memory layer — its chunk loop and ``_ChunkStep`` — as one graph
    with no break (a break would split inductor's fusions: the speed ``compile_mixers`` is
    for). Tracing only, no compilation."""
    import torch._dynamo

    layer = build(HopeConfig(arch=arch, **TINY)).blocks[0].mixer
    explained = torch._dynamo.explain(layer)(torch.randn(2, 9, TINY["d_model"]))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), \
        [b.reason for b in explained.break_reasons]


def test_compiled_mixers_equal_eager():
    """``compile_mixers`` (inductor, CPU) against eager: the same logits and gradients to
    fp32 rounding (measured: ≤ 7e-7 absolute in logits, ≤ 2e-6 relative in gradients), the
    state dict's names unchanged. One HOPE layer of two chunks keeps the compile short
    (~1 minute on two cores)."""
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    config = HopeConfig(arch="hope", **{**TINY, "n_layers": 1, "chunk_size": 4})
    eager = build(config)
    compiled = build(config)
    compiled.load_state_dict(eager.state_dict())
    assert compiled.compile_mixers() is compiled
    assert list(compiled.state_dict()) == list(eager.state_dict())
    idx = torch.randint(256, (2, 8), generator=torch.Generator().manual_seed(0))
    outputs = []
    for net in (eager, compiled):
        logits = net(idx)
        logits.square().mean().backward()
        outputs.append((logits, {n: p.grad for n, p in net.named_parameters()}))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it did compile
    torch.testing.assert_close(outputs[1][0], outputs[0][0], rtol=1e-5, atol=1e-5)
    for name, grad in outputs[0][1].items():
        torch.testing.assert_close(outputs[1][1][name], grad, rtol=1e-4, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")


def test_partial_run_says_where_it_stopped_and_records_it(tmp_path, capsys):
    """A run cut short by --stop-after says "stopped at step N of M" (it printed only
    ``"final_val_bits_per_byte": null``) and metrics.json records it as partial; resumed to
    the end it is complete."""
    argv = ["--arch", "hope", "--size", "micro", "--corpus", "stdlib", "--out", str(tmp_path),
            "--quiet", "--device", "cpu", "--steps", "5"]
    train.main(argv + ["--stop-after", "2"])
    out, err = capsys.readouterr()
    assert "stopped at step 2 of 5" in err and "--resume" in err
    printed = json.loads(out)
    assert printed["partial"] is True and printed["steps_done"] == 2 and printed["steps"] == 5
    assert "final_val_bits_per_byte" not in printed
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["partial"] is True and saved["steps_done"] == 2 and saved["steps"] == 5
    assert "final_val_bits_per_byte" not in saved and len(saved["train_loss"]) == 2
    train.main(argv + ["--resume"])
    out, err = capsys.readouterr()
    assert "stopped" not in err and math.isfinite(json.loads(out)["final_val_bits_per_byte"])
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["partial"] is False and saved["steps_done"] == 5
    assert saved["tokens"] == 5 * train.SIZES["micro"]["batch"] * train.SIZES["micro"]["seq_len"]
    # extended (a larger --steps) and cut short again: partial, its old final no longer final
    train.main(argv[:-1] + ["7", "--resume", "--stop-after", "1"])
    assert "stopped at step 6 of 7" in capsys.readouterr().err
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["partial"] is True and (saved["steps_done"], saved["steps"]) == (6, 7)
    assert "final_val_bits_per_byte" not in saved


# --- evaluation -------------------------------------------------------------------------------

def test_mqar_layout():
    tokens, mask = evaluate.mqar(3, 40, pairs=4, generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (3, 41) and mask.shape == (3, 40) and mask.sum() == 12
    for row, m in zip(tokens, mask):
        pairs = dict(zip(row[:8:2].tolist(), row[1:8:2].tolist()))
        asked, answers = row[:-1][m].tolist(), row[1:][m].tolist()
        assert sorted(asked) == sorted(pairs) and [pairs[k] for k in asked] == answers
        assert ((row[8:33] >= 128) & (row[8:33] < 192)).all()  # filler between


def test_test_time_learning_updates_only_cms_levels_on_their_schedule():
    torch.manual_seed(0)
    model = build(HopeConfig(arch="hope", chunk_size=4, **TINY))
    stream = torch.randint(256, (4, 9), generator=torch.Generator().manual_seed(0))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    off = evaluate.test_time_learning(model, stream, None, 1e-2)
    assert all(torch.equal(frozen[n], p) for n, p in model.named_parameters())
    on = evaluate.test_time_learning(model, stream, (1, 4), 1e-2)
    assert on[0] == pytest.approx(off[0])  # prequential: scored before learning from it
    changed = {n for n, p in model.named_parameters() if not torch.equal(frozen[n], p)}
    assert changed and all(n.startswith("blocks.0.cms.") for n in changed)
    # level 1 (period 4) stepped once, after the 4th window: it changed too
    assert any(n.startswith("blocks.0.cms.1.") for n in changed)
    assert all(p.requires_grad for p in model.parameters())
    # "auto" levels: each window is logged as it ends, and the windows tile the stream's calls
    # (one window over and over: consistent gradients, so windows end early)
    log: dict = {}
    stream = torch.randint(256, (1, 9), generator=torch.Generator().manual_seed(1)).repeat(12, 1)
    evaluate.test_time_learning(model, stream, ("auto", "auto"), 1e-2, log)
    assert {level for _, level, _ in log["windows"]} == {0, 1}
    for level in (0, 1):
        ends = [(w, n) for w, lv, n in log["windows"] if lv == level]
        assert all(w - n == (ends[i - 1][0] if i else 0) for i, (w, n) in enumerate(ends))


def test_table_aggregates_runs_over_seeds(tmp_path):
    for arch, seed, val in (("hope", 0, 2.0), ("hope", 1, 2.2), ("transformer", 0, 1.9)):
        run = tmp_path / f"{arch}-{seed}"
        run.mkdir()
        (run / "metrics.json").write_text(json.dumps(
            {"final_val_bits_per_byte": val, "seed": seed, "parameters": 1234}))
        (run / "ttt.json").write_text(json.dumps({"shakespeare_before": val, **{
            key: {"stream": val + 1, "shakespeare_after": val + 0.1}
            for key in ("off", "cms", "every_step")}}))
    text = evaluate.table(str(tmp_path))
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines()[2:]}
    assert set(rows) == {"hope", "transformer"}
    assert "2.100 ± 0.141" in rows["hope"] and "| 1.900 |" in rows["transformer"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["hope"]["val_bits_per_byte"] == [2.0, 2.2]


def test_ablation_table_gives_each_variant_its_difference_and_calls_ties(tmp_path):
    base = HopeConfig().to_dict()
    runs = [("hope", 0, 2.50, {}), ("hope", 1, 2.52, {}), ("hope-clip", 0, 2.515,
                                                         {"inner_grad_clip": 1e6}),
            ("hope-cms", 0, 2.40, {"cms_periods": [1, 1, 1]}), ("hope-cut", 0, None, {})]
    for variant, seed, val, change in runs:
        run = tmp_path / f"{variant}-{seed}"
        run.mkdir()
        (run / "metrics.json").write_text(json.dumps(
            {"final_val_bits_per_byte": val, "seed": seed, "parameters": 1234, "arch": "hope",
             "optim": "PreconditionedMomentum", "lr": 3e-3, "seconds": 10.0,
             "config": {**base, **change}}))
    text = evaluate.ablation(str(tmp_path))
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines()[2:]}
    assert list(rows) == ["hope-cms", "hope", "hope-clip"]  # best first; the cut run left out
    assert "2.510 ± 0.014" in rows["hope"]
    assert "+0.005 (tie)" in rows["hope-clip"] and "inner_grad_clip=1000000.0" in rows["hope-clip"]
    assert "-0.110 |" in rows["hope-cms"] and "cms_periods=(1, 1, 1)" in rows["hope-cms"]
    saved = json.loads((tmp_path / "ablation.json").read_text())
    assert saved["variants"]["hope-cms"]["delta"] == pytest.approx(-0.11)
    assert saved["tie_within"] == pytest.approx(2 * 0.0141421, rel=1e-4)


def test_table_marks_a_partial_run_instead_of_crashing(tmp_path):
    """`evaluate table` over a run cut short raised KeyError: 'final_val_bits_per_byte'; the
    run is now left out of the mean and marked partial with the step it reached."""
    done = tmp_path / "hope-0"
    done.mkdir()
    (done / "metrics.json").write_text(json.dumps(
        {"final_val_bits_per_byte": 2.0, "seed": 0, "parameters": 1234}))
    train.train(_args(tmp_path / "hope-1", "--seed", "1", "--steps", "6", "--stop-after", "3"))
    old = tmp_path / "transformer-0"  # written before steps_done/partial were recorded
    old.mkdir()
    (old / "metrics.json").write_text(json.dumps(
        {"seed": 0, "parameters": 1234, "steps": 800, "train_loss": [3.0] * 200,
         "val": [{"step": 200, "bits_per_byte": 2.9}]}))
    text = evaluate.table(str(tmp_path))
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines()[2:]}
    assert "| 2.000 (partial: seed 1 at step 3/6) |" in rows["hope"]
    assert "| — (partial: seed 0 at step 200/800) |" in rows["transformer"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["hope"]["val_bits_per_byte"] == [2.0] and summary["hope"]["seeds"] == [0]
    (partial,) = summary["hope"]["partial"]
    assert partial["seed"] == 1 and (partial["steps_done"], partial["steps"]) == (3, 6)
    assert partial["last_val_step"] == 3 and math.isfinite(partial["last_val_bits_per_byte"])
    assert summary["transformer"]["partial"][0]["last_val_bits_per_byte"] == 2.9


def _dry_run(script: str, *args: str) -> list:
    """``DRY_RUN=1 examples/hope/SCRIPT ARGS``: each run's train.py arguments, parsed."""
    import shlex
    import subprocess

    path = os.path.join(os.path.dirname(train.__file__), script)
    lines = subprocess.run(["bash", path, *args], check=True, capture_output=True, text=True,
                           env={**os.environ, "DRY_RUN": "1"}).stdout.splitlines()
    return [train.parse_args(shlex.split(line)) for line in lines]


def test_ablation_script_runs_are_valid_train_invocations(tmp_path):
    """``DRY_RUN=1 examples/hope/ablation.sh``: every run parses as train.py arguments, builds
    its HopeConfig, and has a name of its own; "hope" is the (1, 4, 16) reference every
    screened variant changes one thing of."""
    outs = []
    for args in _dry_run("ablation.sh", str(tmp_path), "tiny", "small"):
        config = HopeConfig(arch=args.arch, **{**train.SIZES[args.size]["model"],
                                               **dict(args.model_option)})
        name = os.path.basename(args.out).rsplit("-", 1)[0]
        if name == "hope" or (name.startswith("hope-") and "cms1" not in name):
            assert config.cms_periods == (1, 4, 16), args.out
        outs.append(args.out)
    assert len(outs) == len(set(outs)) and len(outs) >= 30
    assert {os.path.basename(o) for o in outs} >= {"hope-0", "hope-cms124-1", "titans-1",
                                                     "hope-depth1-0", "hope-static-kv-0"}


def test_periods_script_runs_are_the_named_schedules(tmp_path):
    """``DRY_RUN=1 examples/hope/periods.sh`` (issue 19's HOPE records): every run parses, has a
    name of its own, and its name says its schedule — hope-fixedAxBxC at CMS periods (A, B, C)
    without --auto-periods, hope-auto* with it (and its knobs)."""
    runs = _dry_run("periods.sh", str(tmp_path))
    names = [os.path.basename(args.out) for args in runs]
    assert len(names) == len(set(names)) == 28
    for args, name in zip(runs, names):
        variant = name.rsplit("-", 1)[0]
        assert (args.arch, args.size) == ("hope", "tiny")
        periods = dict(args.model_option).get("cms_periods")
        if variant.startswith("hope-fixed"):
            assert not args.auto_periods, name
            assert periods == tuple(int(c) for c in variant[len("hope-fixed"):].split("x"))
        else:
            assert args.auto_periods and periods is None, name
            assert args.auto_max_period == (16 if "max16" in variant else 64)
            assert args.auto_significance == (0.25 if "k0.25" in variant else 1.0)
    # every level alike on three seeds; the screen's best (in a dry run, one of its rows) too
    assert {n for n in names if n.endswith("-2")} == {
        "hope-auto-2", "hope-fixed1x1x1-2", "hope-fixed4x4x4-2", "hope-fixed16x16x16-2",
        "hope-fixed64x64x64-2", "hope-fixed1x1x4-2"}


def test_auto_periods_train_every_cms_level_by_its_criterion_and_resume_bit_for_bit(tmp_path):
    """``--auto-periods`` (issue 19): every CMS level's group at update_period="auto", the rest
    at period 1; the windows are in metrics.json; a run stopped mid-window resumes to the same
    losses, windows and weights."""
    options = ["--auto-periods", "--auto-max-period", "4", "--steps", "10"]
    straight = train.train(_args(tmp_path / "straight", *options))
    windows = straight["cms_windows"]
    levels = len(train.SIZES["micro"]["model"]["cms_periods"])
    assert {level for _, level, _ in windows} == set(range(levels))
    assert all(1 <= n <= 4 for _, _, n in windows)
    assert straight["auto_periods"] == {"max_period": 4, "period_significance": 1.0}
    model = build(HopeConfig(arch="hope", **train.SIZES["micro"]["model"]))
    groups = train.param_groups(model, False, auto_periods={"max_period": 4})
    assert [g["update_period"] for g in groups].count("auto") == levels
    assert all(g["update_period"] == 1 for g in groups if g["update_period"] != "auto")
    # Each level's windows tile its steps: a window ending at step s began after the last one.
    for level in range(levels):
        ends = [(s, n) for s, lv, n in windows if lv == level]
        assert all(s - n == (ends[i - 1][0] if i else 0) for i, (s, n) in enumerate(ends))
    train.train(_args(tmp_path / "cut", *options, "--ckpt-every", "5", "--stop-after", "5"))
    resumed = train.train(_args(tmp_path / "cut", *options, "--resume"))
    assert resumed["train_loss"] == straight["train_loss"]
    assert resumed["cms_windows"] == windows
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(a[name], b[name]) for name in a)
