"""torch.compile of the foreach step (issue 18, item 5): one graph, no graph breaks, eager's result.

``torch.compile(opt.step, fullgraph=True)`` must trace every registered optimizer's foreach path
whole. The step counters (``state['step']``, float32 CPU tensors) are the only data the rules
branch or scale on: eager reads them on the host (Python floats for Adam's bias corrections,
an int for M3's chunk boundary); traced, deepmomentum.functional keeps them tensors
(``_step_count``, as torch's ``_get_value``) and M3 chooses its boundary with ``torch.cond``
(``_m3_slow_memory_traced``). Eager stays bit for bit as it was (tests/test_golden.py).

Compiled vs eager (inductor, CPU, fp32 state): not bit-identical — inductor's fused
elementwise code rounds differently from eager's kernels (FMA contraction, its own lowerings
of lerp/addcmul; ~1 ulp per op) — so the comparisons use ``assert_close`` with ``RTOL``/``ATOL``
below (measured on these cases: ≤ 5e-7 absolute, ≤ 5e-6 relative, parameters and state, after
4 compiled steps). Newton–Schulz runs in bf16 by default, and inductor keeps fused bf16
intermediates in fp32 unless told to round them as eager does, which moves a bf16 NS result by
bf16 rounding (measured: Muon 4e-3, M3 4e-2 absolute on these cases), so the comparisons set
inductor's ``emulate_precision_casts`` (then within the fp32 figures above).

Cost on two CPU cores: the graph-break checks trace only (~0.2–2 s each); the compiled
comparisons run inductor (~2–15 s each), so they are few and start from a state made by one
eager step (one compilation each: a first step, which creates the state, is a second graph).
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch._inductor.config as inductor_config

import deepmomentum.functional as dmf
from registry import REGISTRY, cases

#: compiled vs eager over STEPS steps (measured: ≤ 5e-7 absolute, ≤ 5e-6 relative)
RTOL, ATOL = 1e-4, 1e-5
STEPS = 4  # compiled steps per comparison
INFO = {info.name: info for info in REGISTRY}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _params(shapes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=generator).requires_grad_() for s in shapes]


def _set_grads(params, seed, *, fresh=False):
    """New gradients, written into the existing ``.grad`` tensors (``fresh``: new tensors)."""
    generator = torch.Generator().manual_seed(seed)
    for p in params:
        g = torch.randn(p.shape, generator=generator)
        if p.grad is None or fresh:
            p.grad = g
        else:
            p.grad.copy_(g)


def _break_report(explanation) -> str:
    lines = []
    for reason in explanation.break_reasons:  # the reason, and its innermost three frames
        frames = " < ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} ({f.name})"
                            for f in reversed(reason.user_stack[-3:]))
        lines.append(f"{reason.reason.strip().splitlines()[0]} at {frames}")
    return "\n".join(lines)


def _assert_no_breaks(opt):
    explanation = torch._dynamo.explain(opt.step)()
    assert explanation.graph_break_count == 0, (
        f"{explanation.graph_break_count} graph break(s):\n{_break_report(explanation)}")
    assert explanation.graph_count == 1


# --- no graph breaks ---------------------------------------------------------------------------


@pytest.mark.parametrize("info, variant", cases())
def test_foreach_step_traces_without_graph_breaks(info, variant):
    """Every registry setting, in its steady state (after a first, state-creating step)."""
    params = _params(info.shapes(variant))
    opt = info.make(params, **{**variant, "foreach": True})
    _set_grads(params, 1)
    opt.step()
    _set_grads(params, 2)
    _assert_no_breaks(opt)


#: one first step per class (the step that creates the state, traced too)
FIRST_STEPS = [
    pytest.param("AssociativeMomentum", 2, id="AssociativeMomentum-2"),
    pytest.param("DeltaMomentum", 3, id="DeltaMomentum-3"),
    pytest.param("PreconditionedMomentum", 0, id="PreconditionedMomentum-0"),
    pytest.param("DeepMomentum", 1, id="DeepMomentum-1"),  # hidden=0: no A₀ to draw
    pytest.param(
        "DeepMomentum", 3, id="DeepMomentum-3",
        marks=pytest.mark.xfail(
            strict=True, reason="DeepMomentum._initial_state (deep.py) seeds A₀ with a "
            "torch.Generator built in the step: an opaque object dynamo cannot create in a "
            "graph. The first step graph-breaks; later steps trace whole (above).")),
    pytest.param("Muon", 4, id="Muon-4"),
    pytest.param("M3", 1, id="M3-1"),
]


@pytest.mark.parametrize("name, index", FIRST_STEPS)
def test_first_foreach_step_traces_without_graph_breaks(name, index):
    info = INFO[name]
    variant = info.variants[index]
    params = _params(info.shapes(variant))
    opt = info.make(params, **{**variant, "foreach": True})
    _set_grads(params, 1)
    _assert_no_breaks(opt)


# --- compiled == eager (closely) ---------------------------------------------------------------


#: small parameter sets: inductor compiles kernels per shape, and its compile time dominates
SHAPES = [(4, 3), (5,)]
MATRICES, ADAMW_SHAPES = [(4, 3), (4, 3)], [(5,)]  # two matrices: Newton–Schulz batched


def _compiled_cases():
    out = []

    def add(name, index, *, adamw=None):
        info = INFO[name]
        variant = {**info.variants[index], "foreach": True}
        if adamw is None:
            shapes = SHAPES

            def make(params):
                return info.make(params, **variant)
        else:  # a use_muon group and an AdamW group: both rules traced in one step
            shapes = MATRICES + ADAMW_SHAPES

            def make(params):
                return info.make([{"params": params[:len(MATRICES)]},
                                  {"params": params[len(MATRICES):], "use_muon": False}],
                                 **variant, **adamw)
        out.append(pytest.param(make, shapes,
                                id=f"{name}-{index}" + ("+adamw" if adamw else "")))

    add("AssociativeMomentum", 2)
    add("DeltaMomentum", 3)
    add("PreconditionedMomentum", 0)  # Adam's bias corrections in the step sizes and d
    add("PreconditionedMomentum", 2)  # precondition="value": sizes without a denominator
    add("DeepMomentum", 3)            # values="preconditioned": bias-corrected values
    add("Muon", 1, adamw={"adamw_weight_decay": 0.01, "adamw_betas": (0.9, 0.99)})
    # chunk=2; one eager step first, so compiled steps 2–5 cross the boundaries at 2 and 4
    add("M3", 1, adamw={"adamw_eps": 1e-8})
    return out


def _state_tensors(opt, params):
    return [value for p in params for key, value in sorted(opt.state[p].items())
            if isinstance(value, torch.Tensor)]


@pytest.mark.parametrize("make, shapes", _compiled_cases())
def test_compiled_foreach_steps_match_eager(make, shapes):
    eager_params, compiled_params = _params(shapes), _params(shapes)
    eager, compiled = make(eager_params), make(compiled_params)
    for params, opt in ((eager_params, eager), (compiled_params, compiled)):
        _set_grads(params, 1)
        opt.step()  # the state, made eagerly: one compilation below
    step = torch.compile(compiled.step, fullgraph=True)
    with inductor_config.patch(emulate_precision_casts=True):
        for k in range(STEPS):
            for params, run in ((eager_params, eager.step), (compiled_params, step)):
                _set_grads(params, 10 + k)
                run()
    torch.testing.assert_close(compiled_params, eager_params, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(_state_tensors(compiled, compiled_params),
                               _state_tensors(eager, eager_params), rtol=RTOL, atol=ATOL)


def test_new_gradient_tensors_do_not_recompile():
    # New .grad tensors every step (zero_grad(set_to_none=True), backward) take the same graph:
    # step() reads no optimizer state before the groups while compiling (DCP's initializing
    # check is eager-only); it recompiled on every step before.
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    info = INFO["AssociativeMomentum"]
    params = _params(SHAPES)
    opt = info.make(params, foreach=True)
    _set_grads(params, 1)
    opt.step()
    step = torch.compile(opt.step, fullgraph=True, backend=counting)
    for k in range(3):
        _set_grads(params, 10 + k, fresh=True)  # as backward() after zero_grad() makes them
        step()
    assert len(graphs) == 1


# --- M3's traced chunk boundary ----------------------------------------------------------------

#: step counters per tensor, chunk 2: all at a boundary, none, mixed (a parameter that missed a
#: gradient on some step counts fewer steps than the others)
COUNTERS = [pytest.param([2, 2, 4], id="all"), pytest.param([3, 3, 1], id="none"),
            pytest.param([2, 3, 4], id="mixed")]


def _slow_memory_inputs(counters):
    generator = torch.Generator().manual_seed(3)
    shapes = [(4, 3), (4, 3), (2, 5)]
    make = [lambda s=s: torch.randn(s, generator=generator) for s in shapes]
    memories = [[m() for m in make] for _ in range(3)]  # slow buffers, O², chunk sums
    steps = [torch.tensor(float(t)) for t in counters]
    return memories, steps


def _slow_memory(fn, memories, steps):
    slow, updates, sums = memories
    fn(slow, updates, sums, steps, chunk=2, decay=0.9, write=0.5,
       ns=dict(dmf._ns_options(0, 5, "keller", 1e-7, torch.bfloat16), shards=None))


@pytest.mark.parametrize("counters", COUNTERS)
def test_traced_chunk_boundary_is_eager_bit_for_bit(counters):
    """The traced form (torch.cond, run eagerly) writes what eager's host-read form writes."""
    expected, steps = _slow_memory_inputs(counters)
    got, _ = _slow_memory_inputs(counters)
    _slow_memory(dmf._m3_slow_memory, expected, steps)
    _slow_memory(dmf._m3_slow_memory_traced, got, steps)
    for xs, ys in zip(got, expected):
        for x, y in zip(xs, ys):
            assert torch.equal(x, y)


def test_compiled_chunk_boundary_matches_eager():
    """Compiled with mixed counters: the boundary tensors written, the others untouched."""
    expected, steps = _slow_memory_inputs([2, 3, 4])
    got, _ = _slow_memory_inputs([2, 3, 4])
    before = [[x.clone() for x in xs] for xs in got]
    _slow_memory(dmf._m3_slow_memory, expected, steps)
    # aot_eager: traced and functionalized as inductor's input, without its (slow) codegen;
    # inductor's lowering of the torch.cond is exercised by the M3 case above
    _slow_memory(torch.compile(dmf._m3_slow_memory, fullgraph=True, backend="aot_eager"),
                 got, steps)
    for xs, ys in zip(got, expected):
        torch.testing.assert_close(xs, ys, rtol=RTOL, atol=ATOL)
    for xs, olds in zip(got, before):  # tensor 1 (step 3) is between boundaries: untouched
        assert torch.equal(xs[1], olds[1])
