"""The in-context chunk kernels (``deepmomentum.kernels.memory_scan``, under TRITON_INTERPRET=1
on the CPU) against their plain-torch twins (``functional.memory_chunk_read``/``_end``), the
twins against a token-by-token scan, and HOPE's CUDA path (kernel forward, torch backward)
against its CPU path."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st

import deepmomentum.functional as dmf

scan = pytest.importorskip("deepmomentum.kernels.memory_scan", reason="needs triton")

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _gates(shape, g):
    eta = torch.rand(shape, generator=g) * 0.95
    theta = torch.rand(shape, generator=g) * 0.2
    alpha = torch.rand(shape, generator=g) * 0.1
    return dmf.scan_coefficients(eta, theta, alpha)


def _read_inputs(batch, H, C, i, o, shared, momentum, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    c = _gates((batch, H, C), g)
    W0 = r(1 if shared else batch, H, i, o)
    S0 = r(1 if shared else batch, H, i, o) if momentum else None
    tensors = (r(batch, H, C, i), W0, S0, r(batch, H, C, i), r(batch, H, C, o),
               c.param_from_start, c.param_from_momentum, c.param_from_grads)
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def _token_by_token_reads(z, W0, S0, x, delta, eta, theta, alpha):
    """``z_t W_t`` with W_t stepped one token at a time: the definition the products fold."""
    W = W0.expand(*z.shape[:-2], *W0.shape[-2:]).clone()
    S = torch.zeros_like(W) if S0 is None else S0.expand_as(W).clone()
    reads = []
    for t in range(z.shape[-2]):
        gate = lambda v: v[..., t, None, None]  # noqa: E731
        S = gate(eta) * S - gate(theta) * (x[..., t, :, None] * delta[..., t, None, :])
        W = (1 - gate(alpha)) * W + S
        reads.append((z[..., t, None, :] @ W).squeeze(-2))
    return torch.stack(reads, dim=-2), W, S


@pytest.mark.parametrize("momentum", [True, False])
@pytest.mark.parametrize("shared", [True, False])
def test_twins_equal_the_token_by_token_scan(momentum, shared):
    g = torch.Generator().manual_seed(3)
    batch, H, C, i, o = 2, 3, 7, 5, 6
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    z, x, delta = r(batch, H, C, i), r(batch, H, C, i), r(batch, H, C, o)
    W0 = r(1 if shared else batch, H, i, o)
    S0 = r(1 if shared else batch, H, i, o) if momentum else None
    eta, theta, alpha = (torch.rand(batch, H, C, generator=g, dtype=torch.float64) * s
                         for s in (0.95, 0.3, 0.2))
    c = dmf.scan_coefficients(eta, theta, alpha)
    reads, W, S = _token_by_token_reads(z, W0, S0, x, delta, eta, theta, alpha)
    torch.testing.assert_close(dmf.memory_chunk_read(
        z, W0, S0, x, delta, c.param_from_start, c.param_from_momentum, c.param_from_grads), reads)
    last = lambda coefficient: coefficient[..., -1, :, None]  # noqa: E731
    end = dmf.memory_chunk_end(W0.unsqueeze(0), None if S0 is None else S0.unsqueeze(0),
                               x.unsqueeze(0), last(c.param_from_grads) * delta,
                               last(c.momentum_from_grads) * delta, c.param_from_start[..., -1],
                               c.param_from_momentum[..., -1], c.momentum_from_start[..., -1])
    torch.testing.assert_close(end[0][0], W)
    torch.testing.assert_close(end[1][0], S)


# (batch, H, C, i, o): tiles of 16; ragged and smaller than a tile; a column count over one
# tile (two column programs); an inner dimension over one tile (the K loop runs twice); a
# chunk longer than one 64-row tile, and the longest taken
READ_SHAPES = [(2, 2, 16, 16, 32), (1, 3, 5, 8, 12), (2, 1, 20, 24, 70), (1, 1, 7, 80, 9),
               (1, 1, 100, 8, 8), (1, 1, scan.MAX_CHUNK, 16, 16)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("momentum", [True, False])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("shape", READ_SHAPES)
def test_chunk_read_kernel_equals_its_twin(shape, shared, momentum, dtype):
    inputs = _read_inputs(*shape, shared, momentum, seed=sum(shape), dtype=dtype)
    expected = dmf.memory_chunk_read(*(None if t is None else t.float() for t in inputs))
    out = scan.chunk_read(*inputs)
    assert out.dtype == dtype and out.shape == expected.shape
    torch.testing.assert_close(out.float(), expected, **TOL[dtype])


@given(batch=st.integers(1, 3), H=st.integers(1, 3), C=st.integers(1, 33),
       i=st.integers(1, 40), o=st.integers(1, 40), shared=st.booleans(),
       momentum=st.booleans(), seed=st.integers(0, 2**16))
def test_chunk_read_kernel_equals_its_twin_on_any_shape(batch, H, C, i, o, shared, momentum,
                                                        seed):
    inputs = _read_inputs(batch, H, C, i, o, shared, momentum, seed)
    torch.testing.assert_close(scan.chunk_read(*inputs), dmf.memory_chunk_read(*inputs),
                               **TOL[torch.float32])


def test_chunk_read_kernel_takes_strided_inputs():
    z, W0, S0, x, delta, a, b, G = _read_inputs(2, 3, 16, 16, 24, False, True, seed=5)
    # z and δ as transposed views, W₀ a column slice of a wider tensor, G a transposed view
    z = z.transpose(-1, -2).contiguous().transpose(-1, -2)
    delta = torch.cat([delta, delta], dim=-1)[..., ::2]
    W0 = torch.cat([W0, W0], dim=-1)[..., :24]
    G = G.mT.contiguous().mT
    assert not (z.is_contiguous() or delta.is_contiguous() or W0.is_contiguous())
    torch.testing.assert_close(scan.chunk_read(z, W0, S0, x, delta, a, b, G),
                               dmf.memory_chunk_read(z, W0, S0, x, delta, a, b, G),
                               **TOL[torch.float32])


def _end_inputs(m, batch, H, C, i, o, shared, momentum, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    W0 = r(m, 1 if shared else batch, H, i, o)
    S0 = r(m, 1 if shared else batch, H, i, o) if momentum else None
    a, b, mu = (torch.rand(batch, H, generator=g) for _ in range(3))
    tensors = (W0, S0, r(m, batch, H, C, i), r(m, batch, H, C, o), r(m, batch, H, C, o), a, b,
               mu)
    return tuple(None if t is None else t.to(dtype) for t in tensors)


END_SHAPES = [(5, 2, 2, 16, 16, 32), (1, 1, 3, 5, 8, 12), (2, 2, 1, 40, 70, 9), (1, 1, 1, 3, 1, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("momentum", [True, False])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("shape", END_SHAPES)
def test_chunk_end_kernel_equals_its_twin(shape, shared, momentum, dtype):
    inputs = _end_inputs(*shape, shared, momentum, seed=sum(shape), dtype=dtype)
    W, S = dmf.memory_chunk_end(*(None if t is None else t.float() for t in inputs))
    Wk, Sk = scan.chunk_end(*inputs)
    assert Wk.dtype == Sk.dtype == dtype and Wk.shape == W.shape and Sk.shape == S.shape
    torch.testing.assert_close(Wk.float(), W, **TOL[dtype])
    torch.testing.assert_close(Sk.float(), S, **TOL[dtype])


@given(m=st.integers(1, 3), batch=st.integers(1, 3), H=st.integers(1, 2), C=st.integers(1, 40),
       i=st.integers(1, 40), o=st.integers(1, 40), shared=st.booleans(),
       momentum=st.booleans(), seed=st.integers(0, 2**16))
def test_chunk_end_kernel_equals_its_twin_on_any_shape(m, batch, H, C, i, o, shared, momentum,
                                                       seed):
    inputs = _end_inputs(m, batch, H, C, i, o, shared, momentum, seed)
    for got, expected in zip(scan.chunk_end(*inputs), dmf.memory_chunk_end(*inputs)):
        torch.testing.assert_close(got, expected, **TOL[torch.float32])


def test_kernels_name_a_mismatched_tensor():
    z, W0, S0, x, delta, a, b, G = _read_inputs(2, 2, 8, 8, 8, False, True, seed=0)
    with pytest.raises(ValueError, match="delta"):
        scan.chunk_read(z, W0, S0, x, delta[..., :4], a, b, G)
    with pytest.raises(ValueError, match="from_grads"):
        scan.chunk_read(z, W0, S0, x, delta, a, b, G[..., :4])
    long = _read_inputs(1, 1, scan.MAX_CHUNK + 1, 4, 4, False, False, seed=0)
    with pytest.raises(ValueError, match="at most"):
        scan.chunk_read(*long)
    W0, S0, x, uW, uS, a, b, mu = _end_inputs(2, 2, 2, 8, 8, 8, False, True, seed=0)
    with pytest.raises(ValueError, match="uS"):
        scan.chunk_end(W0, S0, x, uW, uS[..., :3, :], a, b, mu)
    with pytest.raises(ValueError, match="mu"):
        scan.chunk_end(W0, S0, x, uW, uS, a, b, mu[:1])


# --- HOPE's kernel path ---------------------------------------------------------------------

def _step_inputs(m, batch, H, C, i, o, shared, momentum, seed):
    """``_ChunkStep``'s tensor inputs in float64, all requiring gradients."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    eta, theta, alpha = (torch.rand(batch, H, C, generator=g, dtype=torch.float64) * s
                         for s in (0.95, 0.2, 0.1))
    c = dmf.scan_coefficients(eta, theta, alpha)
    tensors = (r(m, 1 if shared else batch, H, i, o),
               r(m, 1 if shared else batch, H, i, o) if momentum else None,
               r(m, batch, H, C, i), r(m, batch, H, C, o), r(batch, H, C, i),
               c.param_from_start, c.param_from_momentum, c.param_from_grads,
               c.momentum_from_start, c.momentum_from_grads)
    return [None if t is None else t.detach().requires_grad_() for t in tensors]


@pytest.mark.parametrize("kernel", [False, True])
@pytest.mark.parametrize("outputs", ["each", "W and S together", "read and W", "read (final)"])
@pytest.mark.parametrize("momentum", [True, False])
@pytest.mark.parametrize("shared", [True, False])
def test_chunk_step_backward_is_the_gradient_of_its_forward(monkeypatch, shared, momentum,
                                                            outputs, kernel):
    """HOPE's ``_ChunkStep`` (the last memory's read and every memory's end state, a
    hand-written backward that adds the read's gradients into the stacks' last slot) against
    finite differences, float64: batch-shared and per-sequence start states, zero momentum,
    the gradients of W and S arriving together (gradcheck takes each output's alone), a
    gradient of S that does not arrive, a final chunk (no end state). On the kernel path the
    forward is replaced by its twins so gradcheck can run it; the backward is the same."""
    from examples.hope import model

    if kernel:
        monkeypatch.setattr(scan, "chunk_read", dmf.memory_chunk_read)
        monkeypatch.setattr(scan, "chunk_end", dmf.memory_chunk_end)
    final = outputs == "read (final)"

    def step(*inputs):
        out = model._ChunkStep.apply(*inputs, kernel, final)
        if outputs == "W and S together":
            return out[0], out[1] + 0.5 * out[2]
        return out[:2] if outputs == "read and W" else out

    inputs = _step_inputs(2, 2, 2, 5, 3, 4, shared, momentum, seed=1)
    assert torch.autograd.gradcheck(step, inputs)


@pytest.mark.parametrize("arch, depth", [("hope", 2), ("titans", 2), ("hope", 1)])
def test_hope_kernel_path_equals_the_torch_path(arch, depth):
    """A whole model with ``kernel="triton"`` (the interpreter here; CUDA's path) against
    ``kernel="torch"``: the same logits and gradients (linear memories too)."""
    from examples.hope.model import HopeConfig, build

    config = dict(arch=arch, d_model=32, n_layers=1, n_heads=2, chunk_size=8,
                  cms_periods=(1, 2), cms_hidden=16, memory_depth=depth)
    torch.manual_seed(0)
    reference = build(HopeConfig(**config, kernel="torch"))
    kernel = build(HopeConfig(**config, kernel="triton"))
    kernel.load_state_dict(reference.state_dict())
    assert kernel.blocks[0].mixer.memories.uses_kernel(torch.zeros(1))
    assert not reference.blocks[0].mixer.memories.uses_kernel(torch.zeros(1))
    tokens = torch.randint(0, 256, (2, 20))  # 2.5 chunks: a partial last chunk
    outputs = []
    for net in (reference, kernel):
        logits = net(tokens)
        logits.square().mean().backward()
        outputs.append((logits, {n: p.grad for n, p in net.named_parameters()}))
    torch.testing.assert_close(outputs[1][0], outputs[0][0], rtol=1e-5, atol=1e-5)
    for name, grad in outputs[0][1].items():
        torch.testing.assert_close(outputs[1][1][name], grad, rtol=1e-4, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")


def test_hope_kernel_option_is_validated():
    from examples.hope.model import HopeConfig

    with pytest.raises(ValueError, match="kernel"):
        HopeConfig(kernel="cuda")
