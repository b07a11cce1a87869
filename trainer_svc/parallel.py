"""Where this rank sits in the trainer's TP × PP × DP grid, and the few collectives that
cross it: megatron-core's parallel state is set up here, micro-batches are shared out among
the data-parallel replicas, per-micro-batch results are gathered to every rank, and the
pipeline stages' HF tensors are brought to global rank 0 (the publisher) in model order.

megatron-core orders ranks TP fastest, then DP, then PP, so global rank 0 is TP rank 0 of
the first pipeline stage of DP replica 0: the rank that serves ZMQ and owns the sender.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from trainer_svc import convert
from trainer_svc.hf_spec import HFModelSpec


@dataclass(frozen=True)
class Layout:
    """Sizes of, and this rank's coordinates in, the TP × PP × DP grid."""

    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int

    @classmethod
    def current(cls) -> Layout:
        from megatron.core import parallel_state as ps

        return cls(
            tp=ps.get_tensor_model_parallel_world_size(),
            pp=ps.get_pipeline_model_parallel_world_size(),
            dp=ps.get_data_parallel_world_size(),
            tp_rank=ps.get_tensor_model_parallel_rank(),
            pp_rank=ps.get_pipeline_model_parallel_rank(),
            dp_rank=ps.get_data_parallel_rank(),
        )

    @property
    def is_root(self) -> bool:
        """Global rank 0: answers requests, publishes weights, writes exports."""
        return self.tp_rank == 0 and self.pp_rank == 0 and self.dp_rank == 0

    @property
    def last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def stage(self, spec: HFModelSpec) -> convert.Stage:
        return convert.Stage.of(spec, self.pp_rank, self.pp)

    def describe(self) -> str:
        return f"tp={self.tp} pp={self.pp} dp={self.dp}"


def init_model_parallel(tp: int, pp: int = 1) -> Layout:
    """megatron-core's parallel state over the initialised default group: TP × PP model
    parallelism, and the world size divided by TP × PP data-parallel replicas."""
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised (see trainer_svc.dist)")
    world = dist.get_world_size()
    if tp < 1 or pp < 1 or world % (tp * pp):
        raise ValueError(f"the world size {world} is not a multiple of tp × pp = {tp} × {pp}: "
                         "the data-parallel size is world / (tp × pp)")
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        layout = Layout.current()
        if (layout.tp, layout.pp) != (tp, pp):
            raise RuntimeError(f"model parallel is already initialised with {layout.describe()}")
        return layout
    ps.initialize_model_parallel(tensor_model_parallel_size=tp,
                                 pipeline_model_parallel_size=pp)
    return Layout.current()


def share_out(costs: Sequence[int], replicas: int) -> list[list[int]]:
    """Indices of ``costs`` split among ``replicas`` with near-equal sums (longest first,
    each to the least loaded replica); each replica's indices in ascending order."""
    loads = [0] * replicas
    shares: list[list[int]] = [[] for _ in range(replicas)]
    for i in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        target = min(range(replicas), key=lambda r: (loads[r], r))
        shares[target].append(i)
        loads[target] += costs[i]
    return [sorted(s) for s in shares]


def gather_to_all(local: dict[int, Any]) -> dict[int, Any]:
    """Union of every rank's ``{micro-batch index: result}`` on every rank (results are
    produced where the loss is, the last pipeline stage of each DP replica)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return dict(local)
    parts: list[dict[int, Any]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(parts, local)
    merged: dict[int, Any] = {}
    for part in parts:
        merged.update(part)
    return merged


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def iter_export_pipeline(
    named_params: Iterable[tuple[str, Tensor]],
    spec: HFModelSpec,
    layout: Layout,
    dtype: torch.dtype,
    out: MutableMapping[str, Tensor] | None = None,
) -> Iterator[tuple[str, Tensor]]:
    """Full HF tensors of the whole model on global rank 0, in export order; every other
    rank yields nothing (collective: drain it on every rank).

    DP replica 0 exports: each pipeline stage gathers its TP shards to its TP rank 0, which
    sends its layers (already under their HF names) to rank 0 as they are ready. Rank 0
    writes what it receives straight into ``out`` where given. A tied ``lm_head.weight`` is
    the first stage's embedding, yielded last as in a single-rank export.
    """
    from megatron.core import parallel_state as ps

    if layout.dp_rank != 0:
        return
    stage = layout.stage(spec)
    receive_here = layout.pp_rank == 0 and layout.tp_rank == 0
    local = convert.iter_export_hf(named_params, spec, ps.get_tensor_model_parallel_group(),
                                   out if receive_here else None, dst=0, stage=stage)
    if not receive_here:
        pp_group = ps.get_pipeline_model_parallel_group()
        for _, tensor in local:  # only TP rank 0 of stages > 0 gets tensors to send
            dist.send(tensor.contiguous(), group=pp_group, group_dst=0)
        return
    embedding = None
    for name, tensor in local:
        if name == convert.EMBED_NAME:
            embedding = tensor
        yield name, tensor
    if layout.pp > 1:
        yield from _receive_stages(spec, layout, dtype, out, embedding)


def _receive_stages(spec: HFModelSpec, layout: Layout, dtype: torch.dtype,
                    out: MutableMapping[str, Tensor] | None,
                    embedding: Tensor | None) -> Iterator[tuple[str, Tensor]]:
    from megatron.core import parallel_state as ps

    pp_group = ps.get_pipeline_model_parallel_group()
    shapes = convert.hf_shapes(spec)
    device = embedding.device if embedding is not None else torch.device("cpu")
    for source in range(1, layout.pp):
        for name in convert.exported_names(spec, convert.Stage.of(spec, source, layout.pp)):
            into = out.get(name) if out is not None else None
            # receive in place unless the destination lives on another device (pinned host
            # memory while the trainer is on GPU)
            direct = into is not None and into.device == device and into.dtype == dtype
            buffer = into if direct else torch.empty(shapes[name], dtype=dtype, device=device)
            dist.recv(buffer, group=pp_group, group_src=source)
            if into is not None and not direct:
                buffer = into.copy_(buffer)
            yield name, buffer
    if spec.tied_embeddings and embedding is not None:
        yield convert.emit_tensor("lm_head.weight", embedding, out)
