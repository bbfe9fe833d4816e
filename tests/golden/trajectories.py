"""Golden trajectories: every registry setting × implementation × dtype, 20 steps on fixed data.

Used two ways:

* ``python tests/golden/record.py`` writes ``trajectories.json.gz`` from the code it imports
  (``--commit SHA`` imports the package from a git worktree of that commit instead: the
  pre-refactor code, with the case definitions of this file);
* ``tests/test_golden.py`` replays every case on the current code and compares bit for bit.

A case is identified by ``"{optimizer}-{variant}-{implementation}-{dtype}"``. Implementations
are the public switches: ``default`` (no flag), ``single`` (``foreach=False``), ``foreach``
(``foreach=True``), ``fused`` (``fused=True``, where the class takes it on the CPU) and
``triton`` (the Triton path under ``TRITON_INTERPRET=1``, routed to CPU tensors by patching
``deepmomentum.kernels.usable``; fp32 only, the kernels' dtypes), and ``period3`` (the default
path under ``update_period=3, accumulate="mean"``, the multi-frequency schedule).

What is stored per case: a short SHA-256 of the parameters' bytes after each step, one of the
optimizer state's tensors after the last step, and the last parameters themselves (to measure a
deliberate difference).
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import torch

STEPS = 20
DTYPES = {"float64": torch.float64, "float32": torch.float32}
IMPLEMENTATIONS = {"default": {}, "single": {"foreach": False}, "foreach": {"foreach": True},
                   "fused": {"fused": True}, "triton": {},
                   "period3": {"update_period": 3, "accumulate": "mean"}}
HERE = Path(__file__).resolve().parent
CPUS = HERE / "cpus"  # a recording per CPU whose kernels round differently: cpus/<flags' hash>/
ISA_PREFIXES = ("sse", "ssse", "avx", "amx", "fma", "f16c", "bmi", "adx", "gfni", "vaes",
                "vpclmulqdq", "sha_ni")


def cpu_flags() -> list[str]:
    """The x86 CPU's vector-ISA flags (``/proc/cpuinfo``; [] elsewhere). Two machines with
    the same :func:`environment` can still round differently: torch's and its libraries' CPU
    kernels choose code by features the capability does not name (seen: AVX-512 with and
    without AMX/AVX512-FP16, 140 of the cases differing from the first step)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    for line in text.splitlines():
        if line.startswith("flags"):
            return sorted({f for f in line.split(":", 1)[1].split() if f.startswith(ISA_PREFIXES)})
    return []


def cpu_dir(flags: list[str]) -> Path:
    """The folder of the recording for a CPU with ``flags``."""
    return CPUS / hashlib.sha256(" ".join(flags).encode()).hexdigest()[:12]


def golden_files() -> tuple[Path, Path]:
    """``(trajectories, checkpoints)`` to replay on this machine: the recording of a CPU with
    this one's flags where there is one (``record.py --commit … --this-cpu``), else the first
    recording."""
    here = cpu_dir(cpu_flags())
    if (here / "trajectories.json.gz").exists():
        return here / "trajectories.json.gz", here / "checkpoints.pt"
    return HERE / "trajectories.json.gz", HERE / "checkpoints.pt"


GOLDEN, CHECKPOINTS = golden_files()


def _registry():
    sys.path.insert(0, str(HERE.parent))
    try:
        import registry
    finally:
        sys.path.pop(0)
    return registry


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def state_tensors(optimizer):
    """The state's tensors in a fixed order: by parameter index, then key."""
    state = optimizer.state_dict()["state"]
    out = []
    for index in sorted(state):
        for key in sorted(state[index]):
            value = state[index][key]
            if isinstance(value, torch.Tensor):
                out.append(value)
    return out


def cases():
    """(case id, info, variant, implementation name, dtype) for every golden case."""
    reg = _registry()
    out = []
    for info in reg.REGISTRY:
        for v, variant in enumerate(info.variants):
            for impl in IMPLEMENTATIONS:
                for dname, dtype in DTYPES.items():
                    if impl == "triton" and dtype != torch.float32:
                        continue
                    out.append((f"{info.name}-{v}-{impl}-{dname}", info, variant, impl, dtype))
    return out


def _grads(step, params, curvature, noise):
    # Fixed data: a quadratic with a per-tensor curvature plus seeded noise, computed in
    # float64 and rounded to the parameter's dtype, so trajectories feed back on themselves.
    return [(c * p.detach().double() + n[step]).to(p.dtype)
            for p, c, n in zip(params, curvature, noise)]


def _data(info, variant, dtype, steps=STEPS):
    shapes = info.shapes(variant)
    g = torch.Generator().manual_seed(1234)
    params = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
              for s in shapes]
    curvature = [0.1 + 1.9 * torch.rand(s, generator=g, dtype=torch.float64) for s in shapes]
    noise = [torch.randn((steps, *s), generator=g, dtype=torch.float64) * 0.5 for s in shapes]
    return params, curvature, noise


#: Checkpoint cases: every registry setting on the default path in float64, saved after
#: CHECKPOINT_AT steps by the recording code and resumed by the current code.
CHECKPOINT_AT = 10


def checkpoint_cases():
    return [case for case in cases() if case[3] == "default" and case[4] == torch.float64]


def save_checkpoint(info, variant, dtype):
    """The parameters and ``optimizer.state_dict()`` after CHECKPOINT_AT steps (the recording
    code's own format: what a user's checkpoint of that version holds)."""
    params, curvature, noise = _data(info, variant, dtype)
    opt = info.make(params, **variant)
    for step in range(CHECKPOINT_AT):
        for p, grad in zip(params, _grads(step, params, curvature, noise)):
            p.grad = grad
        opt.step()
    return {"params": [p.detach().clone() for p in params], "optimizer": opt.state_dict()}


def resume_checkpoint(info, variant, dtype, checkpoint):
    """Load ``checkpoint`` into a fresh optimizer of the current code and run the remaining
    steps on the same data; returns the step hashes from CHECKPOINT_AT + 1 on."""
    params, curvature, noise = _data(info, variant, dtype)
    with torch.no_grad():
        for p, saved in zip(params, checkpoint["params"]):
            p.copy_(saved)
    opt = info.make(params, **variant)
    opt.load_state_dict(checkpoint["optimizer"])
    hashes = []
    for step in range(CHECKPOINT_AT, STEPS):
        for p, grad in zip(params, _grads(step, params, curvature, noise)):
            p.grad = grad
        opt.step()
        hashes.append(digest(params))
    return hashes


def run_case(info, variant, impl, dtype, steps=STEPS):
    """Run one case; None where the implementation does not exist for it (constructor or
    first step refuses it)."""
    from deepmomentum import kernels

    params, curvature, noise = _data(info, variant, dtype, steps)
    patched = None
    if impl == "triton":
        if dtype != torch.float32 or not kernels.triton_available():
            return None
        patched = kernels.usable
        kernels.usable = lambda ps: bool(ps)
    try:
        # recording from an older commit (record.py --commit), a setting it has no option for
        refused = (ValueError, RuntimeError, TypeError) if os.environ.get(
            "DEEPMOMENTUM_GOLDEN_SOURCE") else (ValueError, RuntimeError)
        try:
            opt = info.make(params, **variant, **IMPLEMENTATIONS[impl])
        except refused:
            return None
        if impl == "triton":
            group = opt.param_groups[0]
            if not opt._has_triton_path(group):
                return None
        hashes = []
        for step in range(steps):
            for p, grad in zip(params, _grads(step, params, curvature, noise)):
                p.grad = grad
            try:
                opt.step()
            except (ValueError, RuntimeError):
                if step == 0:
                    return None
                raise
            hashes.append(digest(params))
        return {"steps": hashes, "state": digest(state_tensors(opt)),
                "final": [p.detach().double().reshape(-1).tolist() for p in params]}
    finally:
        if patched is not None:
            kernels.usable = patched


def environment():
    """What must match for bit-identical replay: torch, the CPU's vector ISA, threads."""
    return {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(),
            "interpret": os.environ.get("TRITON_INTERPRET", "")}
