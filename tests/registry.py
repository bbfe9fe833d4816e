"""One registry of optimizers drives the generic contract tests (test_contract.py).

Adding an optimizer here gives it every contract test. Each entry lists the settings to cover
(``variants``: constructor kwargs beyond the defaults), constructor kwargs that must be rejected
with the argument they must name, and a learning rate that makes progress on the toy problems.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import pytest
import torch

import deepmomentum as dm


#: Parameter shapes of the contract tests: scalar, vector, matrix, conv-like.
SHAPES = ((4, 3), (5,), (2, 3, 2), ())
#: For matrix optimizers: two same-shape matrices (batched together), wide, conv-like.
MATRIX_SHAPES = ((4, 3), (4, 3), (2, 5), (3, 2, 2))
#: For matrix optimizers with batch_dims=1: stacks of matrices.
STACKED_SHAPES = ((2, 4, 3), (2, 4, 3), (3, 2, 5))


@dataclass(frozen=True)
class OptimizerInfo:
    name: str
    cls: type
    lr: float
    variants: tuple[dict[str, Any], ...] = ({},)
    invalid: tuple[tuple[dict[str, Any], str], ...] = ()
    matrix_only: bool = False  # groups with use_muon=False take any shape
    # learning rates for the toy problems (Rosenbrock, noisy quadratic), or a function of the
    # variant giving them (None: the default); default lr × (0.1, 5)
    toy_lrs: tuple[float, float] | Callable[[dict], Optional[tuple[float, float]]] | None = None

    def toy_lr(self, variant: dict[str, Any]) -> tuple[float, float]:
        lrs = self.toy_lrs(variant) if callable(self.toy_lrs) else self.toy_lrs
        return lrs or (self.lr * 0.1, self.lr * 5)

    def make(self, params, **kwargs):
        return self.cls(params, **{"lr": self.lr, **kwargs})

    def shapes(self, variant: dict[str, Any]) -> tuple:
        if not self.matrix_only or variant.get("use_muon") is False:
            return SHAPES
        return STACKED_SHAPES if variant.get("batch_dims") else MATRIX_SHAPES

    @property
    def supports_complex(self) -> bool:
        return self.cls.supports_complex


COMMON_INVALID = (
    ({"lr": -1e-3}, "lr"),
    ({"lr": float("nan")}, "lr"),
    ({"maximize": "yes"}, "maximize"),
    ({"foreach": True, "fused": True}, "fused"),
    ({"skip_nonfinite": "yes"}, "skip_nonfinite"),
    ({"state_dtype": torch.float16}, "state_dtype"),
    ({"state_dtype": "4bit"}, "state_dtype"),
    ({"param_rounding": "up"}, "param_rounding"),
)

#: M3's literal form with deepmomentum 0.1's defaults (its only form then).
M3_LITERAL_0_1 = {"form": "literal", "decays": (0.95, 0.999, 0.9), "alpha": 1.0, "chunk": 16,
                  "weight_decay": 0.0}


REGISTRY: tuple[OptimizerInfo, ...] = (
    OptimizerInfo(
        name="AssociativeMomentum",
        cls=dm.AssociativeMomentum,
        lr=0.01,
        variants=(
            {},
            {"momentum": 0.0},
            {"nesterov": True, "weight_decay": 0.01},
            {"dampening": 0.5, "maximize": True},
            {"weight_decay": 0.05, "decoupled_weight_decay": True},
        ),
        invalid=COMMON_INVALID + (
            ({"momentum": -0.1}, "momentum"),
            ({"momentum": 1.0}, "momentum"),
            ({"dampening": 1.5}, "dampening"),
            ({"weight_decay": -1.0}, "weight_decay"),
            ({"nesterov": True, "dampening": 0.1}, "nesterov"),
            ({"nesterov": True, "momentum": 0.0}, "nesterov"),
        ),
    ),
    OptimizerInfo(
        name="PreconditionedMomentum",
        cls=dm.PreconditionedMomentum,
        lr=0.02,
        variants=(
            {},
            {"weight_decay": 0.01},
            {"precondition": "value"},
            {"preconditioner": "none", "betas": (0.8, 0.99)},
            {"weight_decay": 0.01, "decoupled_weight_decay": False, "maximize": True},
        ),
        invalid=COMMON_INVALID + (
            ({"betas": (1.0, 0.999)}, "betas"),
            ({"betas": (0.9, -0.1)}, "betas"),
            ({"betas": 0.9}, "betas"),
            ({"eps": -1e-8}, "eps"),
            ({"weight_decay": -0.1}, "weight_decay"),
            ({"precondition": "output"}, "precondition"),
            ({"preconditioner": "shampoo"}, "preconditioner"),
        ),
    ),
    OptimizerInfo(
        name="DeltaMomentum",
        cls=dm.DeltaMomentum,
        lr=0.01,
        variants=(
            {},
            {"erase": 0.0},
            {"momentum": 0.0, "erase": 0.0, "dampening": 0.3},
            {"erase": 0.9, "nesterov": True, "weight_decay": 0.01},
            {"keys": "input", "key_samples": 4},  # no attach: falls back to gradient keys
            {"dampening": 0.3, "maximize": True, "decoupled_weight_decay": True,
             "weight_decay": 0.05},
        ),
        invalid=COMMON_INVALID + (
            ({"momentum": 1.0}, "momentum"),
            ({"erase": -0.1}, "erase"),
            ({"erase": 0.95, "momentum": 0.9}, "erase"),
            ({"keys": "output"}, "keys"),
            ({"key_samples": 0}, "key_samples"),
            ({"key_samples": 2.5}, "key_samples"),
            ({"dampening": 2.0}, "dampening"),
            ({"nesterov": True, "dampening": 0.5}, "nesterov"),
        ),
    ),
    OptimizerInfo(
        name="DeepMomentum",
        cls=dm.DeepMomentum,
        lr=0.01,
        variants=(
            {},
            {"hidden": 0},
            {"objective": "l2", "activation": "silu", "nesterov": True, "weight_decay": 0.01,
             "key_decay": None},
            {"values": "preconditioned", "output": "sign", "activation": "gelu", "hidden": 3},
            {"output": "newton_schulz", "activation": "relu", "maximize": True,
             "decoupled_weight_decay": True, "weight_decay": 0.05, "dampening": 0.2},
        ),
        invalid=COMMON_INVALID + (
            ({"momentum": 1.0}, "momentum"),
            ({"hidden": -1}, "hidden"),
            ({"hidden": 2.5}, "hidden"),
            ({"memory_lr": -0.1}, "memory_lr"),
            ({"key_decay": 1.5}, "key_decay"),
            ({"objective": "cosine"}, "objective"),
            ({"values": "adam"}, "values"),
            ({"output": "tanh"}, "output"),
            ({"activation": "sigmoid"}, "activation"),
            ({"beta2": 1.0}, "beta2"),
            ({"output": "newton_schulz", "ns_coefficients": "nope"}, "ns_coefficients"),
            ({"seed": -1}, "seed"),
        ),
    ),
    OptimizerInfo(
        name="Muon",
        cls=dm.Muon,
        lr=0.05,
        matrix_only=True,
        variants=(
            {},
            {"nesterov": False, "weight_decay": 0.0},
            {"ns_coefficients": "polar_express", "adjust_lr_fn": "spectral", "maximize": True},
            {"ns_coefficients": "you", "adjust_lr_fn": "match_rms_adamw", "batch_dims": 1},
            {"use_muon": False, "adamw_weight_decay": 0.01, "adamw_betas": (0.9, 0.99)},
        ),
        invalid=COMMON_INVALID + (
            ({"momentum": 1.0}, "momentum"),
            ({"weight_decay": -0.1}, "weight_decay"),
            ({"ns_coefficients": "newton"}, "ns_coefficients"),
            ({"ns_coefficients": [(1.0, 2.0)]}, "ns_coefficients"),
            ({"ns_steps": 0}, "ns_steps"),
            ({"adjust_lr_fn": "sqrt"}, "adjust_lr_fn"),
            ({"batch_dims": -1}, "batch_dims"),
            ({"ns_dtype": torch.int32}, "ns_dtype"),
            ({"adamw_betas": (1.0, 0.9)}, "adamw_betas"),
            ({"adamw_eps": -1.0}, "adamw_eps"),
            ({"use_muon": "no"}, "use_muon"),
        ),
    ),
    OptimizerInfo(
        name="M3",
        cls=dm.M3,
        lr=0.05,
        # The literal form divides by √V (no bias correction), so its steps shrink like
        # lr/|G|: larger lrs. The normalized form's steps are Muon's: Muon's toy lrs.
        toy_lrs=lambda variant: (1.0, 0.5) if variant.get("form") == "literal" else None,
        matrix_only=True,
        # Variants 0–3 and 5 are the literal form as deepmomentum 0.1 defaulted it (their
        # golden trajectories were recorded then; 4 is an AdamW group); 6–9 the normalized
        # form, 10 the literal one with nesterov.
        variants=(
            {**M3_LITERAL_0_1},
            {**M3_LITERAL_0_1, "chunk": 2, "alpha": 0.5, "weight_decay": 0.01},
            {**M3_LITERAL_0_1, "decays": (1.0, 1.0, 1.0), "writes": (1.0, 0.5, 2.0), "chunk": 3},
            {**M3_LITERAL_0_1, "ns_coefficients": "polar_express", "batch_dims": 1,
             "maximize": True},
            {"use_muon": False, "adamw_eps": 1e-8},  # AdamW groups: no form of their own
            {**M3_LITERAL_0_1, "writes": (0.5, 2.0, 1.0), "decays": (0.9, 0.99, 0.5),
             "chunk": 2},
            {},
            {"nesterov": False, "alpha": 0.0, "adjust_lr_fn": "match_rms_adamw",
             "weight_decay": 0.01},
            {"batch_dims": 1, "maximize": True, "decays": (0.0, 0.0, 0.5), "chunk": 2},
            {"writes": (0.5, 0.0, 2.0), "chunk": 3, "alpha": 1.0, "ns_coefficients": "you"},
            {**M3_LITERAL_0_1, "nesterov": True},
        ),
        invalid=COMMON_INVALID + (
            ({"chunk": 0}, "chunk"),
            ({"chunk": 2.5}, "chunk"),
            ({"decays": (1.1, 0.9, 0.9)}, "decays"),
            ({"decays": (0.9, 0.9)}, "decays"),
            ({"betas": (-1.0, 1.0, 1.0)}, "betas"),
            ({"writes": (-1.0, 1.0, 1.0)}, "writes"),
            ({"writes": (1.0, 1.0)}, "writes"),
            ({"alpha": -1.0}, "alpha"),
            ({"eps": -1.0}, "eps"),
            ({"ns_eps": -1.0}, "ns_eps"),
            ({"form": "adam"}, "form"),
            ({"nesterov": "yes"}, "nesterov"),
            ({"adjust_lr_fn": "sqrt"}, "adjust_lr_fn"),
            ({"form": "literal", "adjust_lr_fn": "original"}, "adjust_lr_fn"),
        ),
    ),
)


def _is_maximize(variant):
    return variant.get("maximize", False)


# Both return lists: pytest 9.1 deprecates a generator (any non-Collection iterable) as
# parametrize's argvalues (PytestRemovedIn10Warning) and pytest 10 rejects it.

def cases(*, minimizing: bool = False) -> list:
    """pytest params (info, variant) for every registered optimizer and setting."""
    return [pytest.param(info, variant, id=f"{info.name}-{i}")
            for info in REGISTRY for i, variant in enumerate(info.variants)
            if not (minimizing and _is_maximize(variant))]


def invalid_cases() -> list:
    """pytest params (info, kwargs, name): constructor kwargs that must raise, naming ``name``."""
    return [pytest.param(info, kwargs, name, id=f"{info.name}-{name}-{kwargs}")
            for info in REGISTRY for kwargs, name in info.invalid]
