"""One registry of optimizers drives the generic contract tests (test_contract.py).

Adding an optimizer here gives it every contract test. Each entry lists the settings to cover
(``variants``: constructor kwargs beyond the defaults), constructor kwargs that must be rejected
with the argument they must name, and a learning rate that makes progress on the toy problems.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

import deepmomentum as dm


@dataclass(frozen=True)
class OptimizerInfo:
    name: str
    cls: type
    lr: float
    variants: tuple[dict[str, Any], ...] = ({},)
    invalid: tuple[tuple[dict[str, Any], str], ...] = ()
    # kwargs of the toy runs (Rosenbrock, noisy quadratic) that differ from lr=...
    toy_kwargs: dict[str, Any] = field(default_factory=dict)

    def make(self, params, **kwargs):
        return self.cls(params, **{"lr": self.lr, **kwargs})


COMMON_INVALID = (
    ({"lr": -1e-3}, "lr"),
    ({"lr": float("nan")}, "lr"),
    ({"maximize": "yes"}, "maximize"),
    ({"foreach": True, "fused": True}, "fused"),
)

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
            ({"precondition": "value", "fused": True}, "fused"),
        ),
    ),
)


def _is_maximize(variant):
    return variant.get("maximize", False)


def cases(*, minimizing: bool = False):
    """pytest params (info, variant) for every registered optimizer and setting."""
    for info in REGISTRY:
        for i, variant in enumerate(info.variants):
            if minimizing and _is_maximize(variant):
                continue
            yield pytest.param(info, variant, id=f"{info.name}-{i}")


def invalid_cases():
    for info in REGISTRY:
        for kwargs, name in info.invalid:
            yield pytest.param(info, kwargs, name, id=f"{info.name}-{name}-{kwargs}")
