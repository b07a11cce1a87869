"""RL losses of trainer_svc, registered by name (one file per loss).

Each entry is a :class:`~trainer_svc.losses.base.Loss` subclass with its own pydantic
``Config`` (a ``name`` plus its parameters), registered in ``k1rl.registry.LOSSES`` so a
run config's ``trainer.loss`` section is validated when the config loads. Registered:
``mirror_descent`` (k1.5, eq. 3), ``grpo`` (PPO-clip per token, group-normalised
advantages), ``gspo`` (clipped sequence ratio), ``token_clip`` (mirror descent per token,
far-drifted tokens dropped), ``dpo`` (long2short pairs within a group). A loss defined
anywhere else registers the same way (``@LOSSES.register("name")``) and is selected by
config once its module is imported (``RunConfig.plugins``).
"""

from __future__ import annotations

from k1rl.registry import LOSSES
from trainer_svc.losses.base import Loss, LossConfig, MiniBatch, MismatchCorrection, Tokens

# Imported for their registration side effect.
from trainer_svc.losses import dpo as _dpo  # noqa: E402, F401
from trainer_svc.losses import grpo as _grpo  # noqa: E402, F401
from trainer_svc.losses import gspo as _gspo  # noqa: E402, F401
from trainer_svc.losses import mirror_descent as _mirror_descent  # noqa: E402, F401
from trainer_svc.losses import token_clip as _token_clip  # noqa: E402, F401
from trainer_svc.losses.mirror_descent import MirrorDescentConfig, mirror_descent_loss


def create(cfg: LossConfig | dict | str) -> Loss:
    """The loss a config section names, built with its validated parameters."""
    cfg = LOSSES.config(cfg)
    return LOSSES.get(cfg.name)(cfg)


__all__ = [
    "LOSSES",
    "Loss",
    "LossConfig",
    "MiniBatch",
    "MirrorDescentConfig",
    "MismatchCorrection",
    "Tokens",
    "create",
    "mirror_descent_loss",
]
