"""Newton–Schulz orthogonalization: the σ read-out of Muon, M3 and DMGD (SPEC §5).

``newton_schulz(X)`` approximates the polar factor ``U Vᵀ`` of ``X = U Σ Vᵀ`` with a fixed
number of odd quintic polynomial steps applied to the singular values:

    X₀ = X / (‖X‖_F · s₀ + ε);   A = X Xᵀ;   B = b A + c A²;   X ← a X + B X

computed with ``r ≤ c`` (the input is transposed first when tall, so ``A`` is the small Gram
matrix), in bfloat16 by default, over any leading batch dimensions.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = ["newton_schulz", "NS_PRESETS", "ns_coefficients", "as_matrix", "matrix_view",
           "adjusted_lr_scale", "ADJUST_LR_FNS", "stable_norm"]

Coefficients = Union[str, Sequence[Sequence[float]]]

# Jordan's quintic: one polynomial every step, chosen to maximise the slope at zero.
_KELLER = ((3.4445, -4.7750, 2.0315),)
# You Jiacheng's six per-step polynomials (published as multiples of 1/1024).
_YOU = tuple(
    (a / 1024, b / 1024, c / 1024)
    for a, b, c in ((3955, -8306, 5008), (3735, -6681, 3463), (3799, -6499, 3211),
                    (4019, -6385, 2906), (2677, -3029, 1162), (2172, -1833, 682))
)
# Polar Express (Amsel et al. 2025, degree 5, ℓ = 1e-3): per-step optimal polynomials; all but
# the last are deflated by the paper's safety factor 1.01 (a/1.01, b/1.01³, c/1.01⁵) and the
# input is normalised by ‖X‖_F · 1.01.
_POLAR_EXPRESS_RAW = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
_POLAR_EXPRESS = tuple((a / 1.01, b / 1.01**3, c / 1.01**5) for a, b, c in _POLAR_EXPRESS_RAW[:-1]
                       ) + _POLAR_EXPRESS_RAW[-1:]

#: name -> (per-step (a, b, c) list, repeated from its last entry past its end; s₀)
NS_PRESETS = {
    "keller": (_KELLER, 1.0),
    "you": (_YOU, 1.0),
    "polar_express": (_POLAR_EXPRESS, 1.01),
}


def ns_coefficients(coefficients: Coefficients, steps: int) -> tuple[list[tuple], float]:
    """The ``steps`` (a, b, c) triples and normalisation factor s₀ of a preset or explicit list.

    A schedule shorter than ``steps`` repeats its last polynomial. Raises ``ValueError`` on an
    unknown preset, a malformed list or ``steps < 1``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"Invalid ns_steps: {steps!r}; ns_steps must be an integer ≥ 1")
    if isinstance(coefficients, str):
        if coefficients not in NS_PRESETS:
            raise ValueError(f"Invalid ns_coefficients: {coefficients!r}; ns_coefficients must be "
                             f"one of {tuple(NS_PRESETS)} or a list of (a, b, c) triples")
        schedule, scale = NS_PRESETS[coefficients]
    else:
        try:
            schedule = [tuple(float(v) for v in abc) for abc in coefficients]
        except (TypeError, ValueError):
            schedule = []
        # A single bare triple (a, b, c), as torch.optim.Muon takes it, means "every step".
        if not schedule and _is_triple(coefficients):
            schedule = [tuple(float(v) for v in coefficients)]
        if not schedule or any(len(abc) != 3 or not all(map(math.isfinite, abc))
                               for abc in schedule):
            raise ValueError(f"Invalid ns_coefficients: {coefficients!r}; expected a preset name "
                             f"{tuple(NS_PRESETS)} or a list of finite (a, b, c) triples")
        scale = 1.0
    schedule = list(schedule[:steps]) + [schedule[-1]] * max(0, steps - len(schedule))
    return schedule, scale


def _is_triple(value) -> bool:
    try:
        return len(value) == 3 and all(isinstance(v, (int, float)) for v in value)
    except TypeError:
        return False


def stable_norm(x: Tensor, dim=None, keepdim: bool = False) -> Tensor:
    """``‖x‖₂`` over ``dim`` (all dims by default) with neither overflow nor underflow.

    ``vector_norm`` squares its input, so in float32/bfloat16 entries above ~1e19 give ``inf``
    and entries below ~1e-19 lose their squares to underflow. Where the plain norm is finite
    and far enough above the underflow range it is returned as is (bit-identical to
    ``torch.linalg.vector_norm``); elsewhere the norm is taken of ``x / max|x|`` and scaled
    back. No host sync: both are computed and one is selected per entry.
    """
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True)
    info = torch.finfo(x.dtype)
    representable = torch.isfinite(norm) & (norm >= math.sqrt(info.tiny) / info.eps)
    scale = torch.amax(x.abs(), dim=dim, keepdim=True)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    rescaled = torch.linalg.vector_norm(x / scale, dim=dim, keepdim=True) * scale
    out = torch.where(representable, norm, rescaled)
    if not keepdim:
        out = out.squeeze(dim) if dim is not None else out.reshape(())
    return out


#: Smallest min(r, c) for which ``backend=None`` picks the Triton kernels on CUDA. Provisional:
#: the crossover against torch's batched matmul is to be measured on a GPU
#: (benchmarks/ns_gpu.py prints it); tiny matrices are launch-bound either way.
TRITON_MIN_SIDE = 256
BACKENDS = (None, "torch", "triton")


def _use_triton(X: Tensor, backend) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"Invalid backend: {backend!r}; backend must be one of {BACKENDS}")
    if backend == "torch":
        return False
    from . import kernels

    if backend == "triton":
        if not kernels.triton_available():
            raise ValueError("backend='triton' needs the triton package")
        return True
    return X.is_cuda and kernels.triton_available() and min(X.shape[-2:]) >= TRITON_MIN_SIDE


def newton_schulz(X: Tensor, steps: int = 5, coefficients: Coefficients = "keller",
                  eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16,
                  backend: Optional[str] = None) -> Tensor:
    """Orthogonalize ``X`` of shape ``(..., r, c)`` by Newton–Schulz; same shape and dtype out.

    Args:
        X: a matrix or a batch of matrices (each orthogonalized on its own).
        steps: number of polynomial steps.
        coefficients: ``"keller"`` (3.4445, −4.7750, 2.0315 every step), ``"you"`` (You's six
            per-step polynomials), ``"polar_express"`` (Amsel et al.'s per-step optimal
            polynomials with their 1.01 normalisation), a single (a, b, c) used every step, or
            a list of per-step triples. Short schedules repeat their last polynomial.
        eps: added to the normaliser ‖X‖_F · s₀, so a zero matrix maps to zero.
        dtype: the arithmetic dtype (bfloat16 by default; float32 or float64 for accuracy).

        backend: "torch" (batched matmul), "triton" (the symmetric Gram and fused NS-line
            kernels of :mod:`deepmomentum.kernels.newton_schulz`), or None: Triton for CUDA
            matrices with min(r, c) ≥ ``TRITON_MIN_SIDE``, else torch.

    The input is never modified and never aliased by the output.
    """
    if X.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix or a batch of matrices, got shape "
                         f"{tuple(X.shape)}")
    schedule, scale = ns_coefficients(coefficients, steps)
    if X.numel() and _use_triton(X, backend):
        from .kernels.newton_schulz import newton_schulz_triton

        return newton_schulz_triton(X, steps, coefficients, eps, dtype)
    Y = X.to(dtype)
    transposed = Y.size(-2) > Y.size(-1)
    if transposed:
        Y = Y.mT
    # Out of place: Y may still be X itself when X already has the arithmetic dtype. The norm
    # is overflow-safe, so a matrix of huge entries is orthogonalized, not zeroed.
    Y = Y / (stable_norm(Y, dim=(-2, -1), keepdim=True) * scale + eps)
    batch_shape = Y.shape[:-2]
    if Y.ndim > 3:
        Y = Y.reshape(-1, *Y.shape[-2:])
    for a, b, c in schedule:
        if Y.ndim == 2:
            A = Y @ Y.mT
            B = torch.addmm(A, A, A, beta=b, alpha=c)  # b·A + c·A²
            Y = torch.addmm(Y, B, Y, beta=a)  # a·Y + B·Y
        else:
            A = torch.bmm(Y, Y.mT)
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)
            Y = torch.baddbmm(Y, B, Y, beta=a)
    Y = Y.reshape(*batch_shape, *Y.shape[-2:])
    if transposed:
        Y = Y.mT
    return Y.to(X.dtype)


def as_matrix(t: Tensor) -> Tensor:
    """The matrix view ``r × c`` of one tensor (SPEC: matrix view), the one definition in the
    package: 2-D as is, ≥3-D as ``(shape[0], prod(shape[1:]))`` (a conv kernel), 1-D and 0-D
    as one row ``1 × numel``."""
    return t.reshape(matrix_shape(t.shape))  # explicit sizes: an empty FSDP2 shard too


def matrix_shape(shape) -> tuple[int, int]:
    """The (rows, cols) of :func:`as_matrix` for a tensor of ``shape``, read from the shape
    alone (an FSDP2 parameter's global shape: reshaping the DTensor itself would move data)."""
    shape = tuple(shape)
    return (1, math.prod(shape)) if len(shape) < 2 else (shape[0], math.prod(shape[1:]))


def matrix_view_shape(shape, batch_dims: int = 0) -> tuple[int, int, int]:
    """The ``(n, r, c)`` of :func:`matrix_view` for a tensor of ``shape``, from the shape
    alone (an FSDP2 parameter's global shape, or the step's shape factor without a view)."""
    shape, k = tuple(shape), batch_dims
    if k == 0:
        return (1, *matrix_shape(shape))
    if len(shape) < k + 2:
        raise ValueError(f"a tensor of shape {shape} has no matrix view with "
                         f"batch_dims={k}: it needs at least {k + 2} dims")
    return math.prod(shape[:k]), shape[k], math.prod(shape[k + 1:])


def matrix_view(t: Tensor, batch_dims: int = 0) -> Tensor:
    """``t`` as a batch of matrices ``(n, r, c)``: with ``batch_dims = 0`` the one matrix
    :func:`as_matrix`; with ``batch_dims = k`` the first k dims index independent matrices
    ``(shape[k], prod(shape[k+1:]))`` (stacked experts or heads).
    """
    return t.reshape(matrix_view_shape(t.shape, batch_dims))


ADJUST_LR_FNS = (None, "original", "match_rms_adamw", "spectral")


def adjusted_lr_scale(adjust_lr_fn, rows: int, cols: int) -> float:
    """Muon's lr factor s(r, c): "original" √max(1, r/c), "match_rms_adamw" 0.2·√max(r, c),
    "spectral" √(r/c)."""
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    if adjust_lr_fn == "spectral":
        return math.sqrt(rows / cols)
    raise ValueError(f"Invalid adjust_lr_fn: {adjust_lr_fn!r}; adjust_lr_fn must be one of "
                     f"{ADJUST_LR_FNS}")
