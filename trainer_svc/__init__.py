"""k1rl's trainer: megatron-core GPT models loaded from / exported to HF checkpoints.

This package is the only place in k1rl that knows Megatron. Public API:

- :class:`MegatronTrainer` (``from_hf``, ``logprobs``, ``forward_logprobs``,
  ``train_step``, ``sft_step``, ``reset_optimizer``, ``save``/``load``, ``export_hf``,
  ``iter_hf_tensors``, ``policy_version``)
- conversion: :func:`hf_to_megatron`, :func:`megatron_to_hf`, :func:`export_hf_state`
- model inputs: :class:`TokenBatch`, :func:`build_token_batch`
- process groups: :func:`init_distributed`, :func:`run_distributed`

Importing this package does not import megatron-core (only the trainer and model
builders do, when called).
"""

from trainer_svc.convert import (
    ConversionError,
    HFModelSpec,
    export_hf_state,
    hf_to_megatron,
    iter_export_hf,
    megatron_to_hf,
)
from trainer_svc.dist import init_distributed, run_distributed
from trainer_svc.model import TokenBatch, build_token_batch
from trainer_svc.trainer import LossFn, MegatronTrainer, OptimConfig

__all__ = [
    "ConversionError",
    "HFModelSpec",
    "LossFn",
    "MegatronTrainer",
    "OptimConfig",
    "TokenBatch",
    "build_token_batch",
    "export_hf_state",
    "hf_to_megatron",
    "init_distributed",
    "iter_export_hf",
    "megatron_to_hf",
    "run_distributed",
]
