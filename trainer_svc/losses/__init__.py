"""Training losses of trainer_svc, registered by name (one file per loss).

Each entry pairs a loss function with its pydantic config model, so a config section
``{"name": ..., **fields}`` can be validated and dispatched without knowing the loss.
Registered: ``mirror_descent`` (k1.5 online policy mirror descent).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from trainer_svc.losses.mirror_descent import MirrorDescentConfig, mirror_descent_loss


@dataclass(frozen=True)
class RegisteredLoss:
    name: str
    config: type[BaseModel]
    fn: Callable[..., Any]


LOSSES: dict[str, RegisteredLoss] = {
    "mirror_descent": RegisteredLoss("mirror_descent", MirrorDescentConfig, mirror_descent_loss),
}


def get_loss(name: str) -> RegisteredLoss:
    """The registered loss called ``name``; an unknown name lists the known ones."""
    try:
        return LOSSES[name]
    except KeyError:
        raise KeyError(f"unknown loss {name!r}; registered: {sorted(LOSSES)}") from None


def loss_config(name: str, **fields: Any) -> BaseModel:
    """Validate ``fields`` against the config model of loss ``name``."""
    return get_loss(name).config(**fields)


__all__ = [
    "LOSSES",
    "MirrorDescentConfig",
    "RegisteredLoss",
    "get_loss",
    "loss_config",
    "mirror_descent_loss",
]
