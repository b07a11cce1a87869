"""The trainer's own checkpoints: one file per rank with its weights (its TP shard of its
pipeline stage), its optimizer state (its DP shard of it with the distributed optimizer)
and the policy version. A checkpoint reloads only into the same model, dtype and layout;
:meth:`MegatronTrainer.export_hf` is the way across layouts.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from trainer_svc import convert
from trainer_svc.model import unwrap
from trainer_svc.parallel import barrier

if TYPE_CHECKING:
    from trainer_svc.trainer import MegatronTrainer

# 1: one file per TP rank (world == TP); 2: one per global rank, with the layout
FORMAT = 2


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _layout_key(trainer: MegatronTrainer) -> dict:
    layout = trainer.layout
    return {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp,
            "distributed_optimizer": trainer.distributed_optimizer}


def _optimizer_state(trainer: MegatronTrainer) -> dict | None:
    from trainer_svc.trainer import torch_optimizers

    inner = torch_optimizers(trainer.optimizer)
    if trainer.distributed_optimizer and not any(o.optimizer.state for o in inner):
        return None  # megatron's distributed optimizer cannot describe a state before step 1
    state = {"optimizer": trainer.optimizer.state_dict()}
    if trainer.distributed_optimizer:
        state["parameters"] = [_mark_unpadded(o.get_parameter_state_dp_reshardable())
                               for o in inner]
    return state


def _mark_unpadded(state: dict) -> dict:
    """megatron-core 0.16.1's loader of this DP rank's parameter state skips elements flagged
    as padding, a flag its own saver leaves out: every element saved here is a parameter."""
    for key, by_dtype in state.items():
        if isinstance(key, int):
            for buckets in by_dtype.values():
                for bucket in buckets:
                    for element in bucket:
                        element.setdefault("padding", False)
    return state


def save(trainer: MegatronTrainer, ckpt_dir: Path) -> Path:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    rank = _rank()
    state = {
        "format": FORMAT,
        "layout": _layout_key(trainer),
        "spec": vars(trainer.spec),
        "dtype": trainer.dtype_name,
        "policy_version": trainer.policy_version,
        "optim": vars(trainer.optim),
        "model": {n: p.detach().clone() for n, p in unwrap(trainer.model).named_parameters()},
        "optimizer": _optimizer_state(trainer),
    }
    tmp = ckpt_dir / f"rank_{rank:03d}.pt.tmp"
    torch.save(state, tmp)
    tmp.replace(ckpt_dir / f"rank_{rank:03d}.pt")
    barrier()
    return ckpt_dir


def load(trainer: MegatronTrainer, ckpt_dir: Path) -> None:
    from trainer_svc.trainer import OptimConfig, copy_into_params, torch_optimizers

    path = ckpt_dir / f"rank_{_rank():03d}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint shard {path}")
    state = torch.load(path, map_location=trainer.device, weights_only=True)
    if state.get("format") not in (1, FORMAT):
        raise ValueError(f"{path}: unknown checkpoint format {state.get('format')!r}")
    saved = state.get("layout") or {"tp": state["tp"], "pp": 1, "dp": 1,
                                    "distributed_optimizer": False}
    if saved != _layout_key(trainer):
        raise ValueError(f"{path} was saved with {saved}, this trainer runs "
                         f"{_layout_key(trainer)}: go through export_hf to change the layout")
    # fields added to the spec since a checkpoint was written take their defaults
    if convert.HFModelSpec(**state["spec"]) != trainer.spec:
        raise ValueError(f"{path} was saved from another model")
    saved_dtype = state.get("dtype", "float32")
    if saved_dtype != trainer.dtype_name:
        raise ValueError(f"{path} was saved in {saved_dtype}, this trainer runs "
                         f"{trainer.dtype_name} (model.dtype)")
    copy_into_params(unwrap(trainer.model), state["model"])
    trainer.optim = OptimConfig(**{**state["optim"], "betas": tuple(state["optim"]["betas"])})
    trainer.optimizer = trainer._make_optimizer()
    optimizer = state["optimizer"]
    if optimizer is not None and "optimizer" not in optimizer:  # format 1
        optimizer = {"optimizer": optimizer}
    if optimizer is not None:
        trainer.optimizer.load_state_dict(optimizer["optimizer"])
        for inner, params in zip(torch_optimizers(trainer.optimizer),
                                 optimizer.get("parameters", ()), strict=False):
            with torch.no_grad():  # it copies into the master weights, which require grad
                inner.load_parameter_state_from_dp_reshardable(params)
    trainer.policy_version = state["policy_version"]
    barrier()
