"""Fused Triton kernels for CUDA, reached through the rules' ``fused=True``.

``elementwise`` holds the multi-tensor kernels that fuse runs of the elementwise stages of
:mod:`deepmomentum.functional` (SGD-momentum, Adam-style, the Delta/DMGD memory step, Muon's and
M3's memory and apply stages, multi-frequency accumulation); each is tested against the
composition of the stages it fuses. Triton is imported
only when a kernel is used, so the package works without it on the CPU; tests run the kernels on
the CPU under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import importlib.util
from typing import Sequence

import torch

__all__ = ["triton_available", "usable", "SUPPORTED_DTYPES"]

#: Parameter dtypes the Triton kernels take (their state and arithmetic are fp32).
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def usable(params: Sequence[torch.Tensor]) -> bool:
    """Whether the Triton kernels can update these parameters: CUDA, fp32/bf16/fp16,
    contiguous, and Triton installed."""
    return bool(params) and triton_available() and all(
        p.is_cuda and p.dtype in SUPPORTED_DTYPES and p.is_contiguous() for p in params)
