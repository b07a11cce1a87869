"""Micro-batches through megatron-core's forward-backward schedule.

Every rank holds every micro-batch (the requests are broadcast), so each data-parallel
replica takes its share (:func:`~trainer_svc.parallel.share_out` by tokens) and runs it
through ``get_forward_backward_func()``: 1F1B across pipeline stages when PP > 1, plain
gradient accumulation otherwise. The loss runs on the last stage; what it reports per
micro-batch is gathered to every rank, so callers see the same results whatever the
layout.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from trainer_svc.cpu_shims import cuda_as_cpu
from trainer_svc.model import TokenBatch, forward_stage
from trainer_svc.parallel import Layout, gather_to_all, share_out

# A loss over one micro-batch's log-probs ``[B, T]``: its share of the step's loss (already
# normalised by the step's global denominator), optionally with a record of what it saw
# (any picklable value), handed back to the caller on every rank.
LossFn = Callable[[Tensor, TokenBatch], "Tensor | tuple[Tensor, Any]"]


def run(model: torch.nn.Module, micro: Sequence[TokenBatch], layout: Layout,
        loss_fn: LossFn | None = None) -> list[tuple[float, Any]]:
    """Forward (and, with ``loss_fn``, backward) of every micro-batch, shared among the DP
    replicas; gradients accumulate in the model's buffers (not reduced across replicas).

    Returns, in micro-batch order and on every rank, ``(loss share, record)`` per
    micro-batch; without ``loss_fn`` the record is the micro-batch's loss-token log-probs
    (``logprobs[sample_index >= 0]``) and the loss 0.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    mine = share_out([b.input_ids.numel() for b in micro], layout.dp)[layout.dp_rank]
    results: dict[int, tuple[float, Any]] = {}

    def loss_func(k: int, batch: TokenBatch, logprobs: Tensor):
        if loss_fn is None:
            results[k] = (0.0, logprobs[batch.sample_index >= 0].detach().cpu())
            return logprobs.sum() * 0, torch.ones((), dtype=torch.int), {}
        value = loss_fn(logprobs, batch)
        loss, record = value if isinstance(value, tuple) else (value, None)
        results[k] = (float(loss.detach()), record)
        return loss, torch.ones((), dtype=torch.int), {}

    queue = iter(mine)

    def forward_step(_data: Any, stage_model: torch.nn.Module):
        k = next(queue)
        return forward_stage(stage_model, micro[k]), lambda out: loss_func(k, micro[k], out)

    if mine:
        widths = [micro[k].input_ids.shape for k in mine]
        # the schedule counts tokens in tensors it creates on "cuda"
        with cuda_as_cpu(micro[mine[0]].input_ids.device):
            get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=None,
                model=[model],
                num_microbatches=len(mine),
                seq_length=max(w[1] for w in widths),
                micro_batch_size=max(w[0] for w in widths),
                forward_only=loss_fn is None,
            )
    if layout.tp_rank != 0:  # every TP rank of the last stage computes the same values
        results = {}
    gathered = gather_to_all(results)
    if sorted(gathered) != list(range(len(micro))):
        raise RuntimeError(f"results for {len(gathered)} of {len(micro)} micro-batches came "
                           "back from the last pipeline stage")
    return [gathered[k] for k in range(len(micro))]
