"""HF <-> Megatron weight conversion for the decoder families of :mod:`trainer_svc.hf_spec`.

megatron-core ships no HF converter, so this module is the one place that knows
both layouts. Everything is a pure function of tensors and an :class:`HFModelSpec`
(no megatron import), so it can be tested on its own; :func:`iter_export_hf` adds
the tensor-parallel gather over a ``torch.distributed`` group for weight sync.

Layouts (Megatron local layer spec, TP rank r of t):

- ``linear_qkv``: rows grouped per query group, each group ``[q heads of the group,
  k, v]``; TP splits whole groups (dim 0). Same for the bias (Qwen2).
- Qwen3's ``q_layernorm`` / ``k_layernorm`` (``q_norm`` / ``k_norm``) are per-head RMSNorm
  weights of ``head_dim``, replicated.
- ``linear_fc1``: ``[gate; up]``; with TP each shard is ``[gate_r; up_r]``.
- vocab (embedding, output layer), qkv, fc1 are split on dim 0; ``linear_proj`` and
  ``linear_fc2`` on dim 1; norms are replicated.
- RoPE is rotate-half in both, so q/k need no permutation.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from trainer_svc.hf_spec import ConversionError, HFModelSpec

EMBED_NAME = "model.embed_tokens.weight"

Kind = Literal["replicated", "split0", "split1", "qkv", "fc1"]


# ------------------------------------------------------------------------- name rules


@dataclass(frozen=True)
class ParamRule:
    """One Megatron parameter and the HF tensors it is made of."""

    megatron: str
    hf: tuple[str, ...]
    kind: Kind
    # False for the last pipeline stage's copy of a tied embedding: loaded, never exported
    exported: bool = True


@dataclass(frozen=True)
class Stage:
    """The part of the model one pipeline stage holds: decoder layers ``first_layer`` ..
    ``first_layer + num_layers - 1`` (Megatron numbers them from 0 in every stage), the
    embedding when ``pre_process``, the final norm and output layer when ``post_process``."""

    first_layer: int
    num_layers: int
    pre_process: bool = True
    post_process: bool = True

    @classmethod
    def of(cls, spec: HFModelSpec, pp_rank: int = 0, pp_size: int = 1) -> Stage:
        """Stage ``pp_rank`` of ``pp_size`` equal stages (the whole model for one)."""
        if pp_size < 1 or spec.num_layers % pp_size:
            raise ConversionError(f"{spec.num_layers} layers cannot be split into {pp_size} "
                                  "equal pipeline stages")
        if not 0 <= pp_rank < pp_size:
            raise ConversionError(f"pp_rank {pp_rank} is outside [0, {pp_size})")
        per = spec.num_layers // pp_size
        return cls(pp_rank * per, per, pp_rank == 0, pp_rank == pp_size - 1)


# Per decoder layer: (Megatron suffix, HF suffixes, kind, the HFModelSpec flag the
# parameter exists under or None), in HF's module order.
_LAYER_RULES: tuple[tuple[str, tuple[str, ...], Kind, str | None], ...] = (
    ("input_layernorm.weight", ("input_layernorm.weight",), "replicated", None),
    ("self_attention.linear_qkv.weight",
     ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), "qkv",
     None),
    ("self_attention.linear_qkv.bias",
     ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), "qkv",
     "qkv_bias"),
    ("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), "split1", None),
    ("self_attention.q_layernorm.weight", ("self_attn.q_norm.weight",), "replicated", "qk_norm"),
    ("self_attention.k_layernorm.weight", ("self_attn.k_norm.weight",), "replicated", "qk_norm"),
    ("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",), "replicated", None),
    ("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "fc1", None),
    ("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), "split1", None),
)


def param_rules(spec: HFModelSpec, stage: Stage | None = None) -> list[ParamRule]:
    """The Megatron parameters of ``stage`` (default: the whole model) in model order
    (embedding, layers, head), each with the HF tensors it is made of."""
    stage = stage or Stage.of(spec)
    rules = []
    if stage.pre_process:
        rules.append(ParamRule("embedding.word_embeddings.weight", (EMBED_NAME,), "split0"))
    for local in range(stage.num_layers):
        i = stage.first_layer + local
        for mg, hf, kind, flag in _LAYER_RULES:
            if flag is None or getattr(spec, flag):
                hf_full = tuple(f"model.layers.{i}.{name}" for name in hf)
                rules.append(ParamRule(f"decoder.layers.{local}.{mg}", hf_full, kind))
    if stage.post_process:
        rules.append(ParamRule("decoder.final_layernorm.weight", ("model.norm.weight",),
                               "replicated"))
        if not spec.tied_embeddings:
            rules.append(ParamRule("output_layer.weight", ("lm_head.weight",), "split0"))
        elif not stage.pre_process:
            # a pipeline's last stage holds its own copy of the tied embedding
            rules.append(ParamRule("output_layer.weight", (EMBED_NAME,), "split0",
                                   exported=False))
    return rules


def exported_names(spec: HFModelSpec, stage: Stage) -> list[str]:
    """The HF names a stage exports, in order (a tied lm_head only from a whole model)."""
    names = [n for rule in param_rules(spec, stage) if rule.exported for n in rule.hf]
    if spec.tied_embeddings and stage.pre_process and stage.post_process:
        names.append("lm_head.weight")
    return names


def hf_names(spec: HFModelSpec) -> list[str]:
    """Every HF tensor name the export emits, in export order (lm_head always included)."""
    return exported_names(spec, Stage.of(spec))


def hf_shapes(spec: HFModelSpec) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every HF tensor the export emits, in export order."""
    h, v, inter = spec.hidden_size, spec.vocab_size, spec.intermediate_size
    q_rows, kv_rows = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    per_layer = {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q_rows, h),
        "self_attn.k_proj.weight": (kv_rows, h),
        "self_attn.v_proj.weight": (kv_rows, h),
        "self_attn.q_proj.bias": (q_rows,),
        "self_attn.k_proj.bias": (kv_rows,),
        "self_attn.v_proj.bias": (kv_rows,),
        "self_attn.o_proj.weight": (h, q_rows),
        "self_attn.q_norm.weight": (spec.head_dim,),
        "self_attn.k_norm.weight": (spec.head_dim,),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (inter, h),
        "mlp.up_proj.weight": (inter, h),
        "mlp.down_proj.weight": (h, inter),
    }
    shapes = {}
    for name in hf_names(spec):
        if name.startswith("model.layers."):
            shapes[name] = per_layer[name.split(".", 3)[3]]
        else:
            shapes[name] = (v, h) if name in (EMBED_NAME, "lm_head.weight") else (h,)
    return shapes


# ---------------------------------------------------------------------- HF -> Megatron


def shard_hf_tensors(
    rule: ParamRule, tensors: list[Tensor], spec: HFModelSpec, tp_rank: int, tp_size: int
) -> Tensor:
    """Build TP rank ``tp_rank``'s shard of one Megatron parameter from its HF tensors."""
    if rule.kind == "replicated":
        return tensors[0]
    if rule.kind == "split0":
        return tensors[0].chunk(tp_size, dim=0)[tp_rank]
    if rule.kind == "split1":
        return tensors[0].chunk(tp_size, dim=1)[tp_rank]
    if rule.kind == "fc1":
        gate, up = (t.chunk(tp_size, dim=0)[tp_rank] for t in tensors)
        return torch.cat([gate, up], dim=0)
    return _interleave_qkv(tensors, spec).chunk(tp_size, dim=0)[tp_rank]


def _interleave_qkv(tensors: list[Tensor], spec: HFModelSpec) -> Tensor:
    q, k, v = tensors
    groups, hd = spec.num_kv_heads, spec.head_dim
    tail = q.shape[1:]
    grouped = [
        q.reshape(groups, spec.heads_per_group * hd, *tail),
        k.reshape(groups, hd, *tail),
        v.reshape(groups, hd, *tail),
    ]
    return torch.cat(grouped, dim=1).reshape(-1, *tail)


def hf_to_megatron(
    hf_state: Mapping[str, Tensor], hf_config: Any, tp_rank: int = 0, tp_size: int = 1,
    stage: Stage | None = None,
) -> dict[str, Tensor]:
    """Megatron state dict (parameters only) of one TP rank of one pipeline ``stage``
    (default: the whole model), from full HF tensors.

    ``hf_state`` may be any mapping (e.g. a lazy safetensors reader); each HF tensor is
    read once. With tied embeddings ``lm_head.weight`` is ignored if present. The result
    contains fresh tensors, never views of ``hf_state``.
    """
    spec = HFModelSpec.of(hf_config)
    spec.check_tp(tp_size)
    if not 0 <= tp_rank < tp_size:
        raise ConversionError(f"tp_rank {tp_rank} is outside [0, {tp_size})")
    shapes = hf_shapes(spec)
    out: dict[str, Tensor] = {}
    for rule in param_rules(spec, stage):
        missing = [n for n in rule.hf if n not in hf_state]
        if missing:
            raise ConversionError(f"HF checkpoint is missing {missing[0]!r}")
        tensors = [hf_state[n] for n in rule.hf]
        for name, tensor in zip(rule.hf, tensors, strict=True):
            if tuple(tensor.shape) != shapes[name]:
                raise ConversionError(
                    f"{name} has shape {tuple(tensor.shape)}, the config implies {shapes[name]}"
                )
        out[rule.megatron] = shard_hf_tensors(rule, tensors, spec, tp_rank, tp_size).clone()
    return out


# ---------------------------------------------------------------------- Megatron -> HF


def merge_shards(
    rule: ParamRule,
    shards: list[Tensor],
    spec: HFModelSpec,
    out: MutableMapping[str, Tensor] | None = None,
) -> list[tuple[str, Tensor]]:
    """HF tensors of one Megatron parameter from all its TP shards (rank order).

    With one shard, tensors are views of it wherever the layouts agree (no copy).
    With ``out``, each HF tensor is written into ``out[name]`` when present (a single
    copy from the shards) and that destination is returned instead.
    """
    if rule.kind == "replicated":
        parts = [shards[0]]
    elif rule.kind == "split0":
        parts = [_cat(shards, 0)]
    elif rule.kind == "split1":
        parts = [_cat(shards, 1)]
    elif rule.kind == "fc1":
        halves = [s.chunk(2, dim=0) for s in shards]
        parts = [_cat([h[0] for h in halves], 0), _cat([h[1] for h in halves], 0)]
    else:
        return _split_qkv(rule, _cat(shards, 0), spec, out)
    return [emit_tensor(name, part, out) for name, part in zip(rule.hf, parts, strict=True)]


def _cat(tensors: list[Tensor], dim: int) -> Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)


def emit_tensor(name: str, tensor: Tensor,
                out: MutableMapping[str, Tensor] | None) -> tuple[str, Tensor]:
    """``(name, tensor)``, written into ``out[name]`` first when ``out`` has that name."""
    if out is not None and name in out:
        return name, out[name].copy_(tensor)
    return name, tensor


def _split_qkv(
    rule: ParamRule, full: Tensor, spec: HFModelSpec, out: MutableMapping[str, Tensor] | None
) -> list[tuple[str, Tensor]]:
    groups, hd, per = spec.num_kv_heads, spec.head_dim, spec.heads_per_group
    tail = full.shape[1:]
    q, k, v = full.view(groups, (per + 2) * hd, *tail).split([per * hd, hd, hd], dim=1)
    result = []
    for name, part in zip(rule.hf, (q, k, v), strict=True):
        rows = part.shape[0] * part.shape[1]
        if out is not None and name in out:
            # Copy the strided per-group view straight into the destination.
            out[name].view_as(part).copy_(part)
            result.append((name, out[name]))
        else:
            result.append((name, part.reshape(rows, *tail)))
    return result


def megatron_to_hf(
    shards: list[Mapping[str, Tensor]], hf_config: Any
) -> dict[str, Tensor]:
    """Full HF state dict from the Megatron state dicts of all TP ranks (rank order).

    ``lm_head.weight`` is always present; with tied embeddings it is the embedding
    tensor itself (vLLM needs it in every weight update).
    """
    spec = HFModelSpec.of(hf_config)
    if not shards:
        raise ConversionError("megatron_to_hf needs at least one shard")
    result: dict[str, Tensor] = {}
    for rule in param_rules(spec):
        missing = [i for i, s in enumerate(shards) if rule.megatron not in s]
        if missing:
            raise ConversionError(f"Megatron shard {missing[0]} is missing {rule.megatron!r}")
        for name, tensor in merge_shards(rule, [s[rule.megatron] for s in shards], spec):
            result[name] = tensor
    if spec.tied_embeddings:
        result["lm_head.weight"] = result[EMBED_NAME]
    return result


# ------------------------------------------------------------- in-process TP gather


def iter_export_hf(
    named_params: Iterable[tuple[str, Tensor]],
    spec: HFModelSpec,
    group: Any = None,
    out: MutableMapping[str, Tensor] | None = None,
    dst: int | None = None,
    stage: Stage | None = None,
) -> Iterator[tuple[str, Tensor]]:
    """Yield full HF tensors in model order from this rank's Megatron parameters (those of
    pipeline ``stage``, default the whole model).

    Collective over ``group`` (the TP group; ``None`` or size 1 means no communication):
    every rank of the group must iterate to the end. With ``dst=None`` every rank gets
    the full tensors (all-gather); with ``dst=r`` only group rank ``r`` does (a gather,
    ~3x faster over gloo) and the other ranks' iterators yield nothing.

    With TP=1 the tensors are detached views of the live parameters wherever the
    layouts agree (no copy): consume them before the next optimizer step. With ``out``
    (name -> destination tensor), tensors are written into their destinations, one
    copy each. ``lm_head.weight`` is always yielded last (the embedding when tied) by the
    stage that holds it; a tied one only by a stage holding the whole model.
    """
    import torch.distributed as dist

    stage = stage or Stage.of(spec)
    tp_size = 1 if group is None else dist.get_world_size(group)
    if dst is not None and not 0 <= dst < tp_size:
        raise ValueError(f"dst={dst} is not a rank of the TP group of size {tp_size}")
    receive = tp_size == 1 or dst is None or dist.get_rank(group) == dst
    params = dict(named_params)
    embedding = None
    for rule in param_rules(spec, stage):
        if not rule.exported:
            continue
        if rule.megatron not in params:
            raise ConversionError(f"model has no parameter {rule.megatron!r}")
        local = params[rule.megatron].detach()
        if tp_size == 1 or rule.kind == "replicated":
            shards = [local]
        else:
            shards = _gather(rule.kind, local.contiguous(), group, tp_size, dst, receive)
        if not receive:
            continue
        for name, tensor in merge_shards(rule, shards, spec, out):
            yield name, tensor
            if name == EMBED_NAME:
                embedding = tensor
    if spec.tied_embeddings and embedding is not None and stage.post_process:
        yield emit_tensor("lm_head.weight", embedding, out)


def _gather(
    kind: Kind, local: Tensor, group: Any, tp_size: int, dst: int | None, receive: bool
) -> list[Tensor]:
    """TP shards of one parameter in rank order (an empty list where ``receive`` is False)."""
    import torch.distributed as dist

    if not receive:
        dist.gather(local, None, group=group, group_dst=dst)
        return []
    # One stacked buffer: a dim-0 split is then already concatenated (no extra copy).
    stacked = torch.empty((tp_size, *local.shape), dtype=local.dtype, device=local.device)
    shards = list(stacked.unbind(0))
    if dst is None:
        dist.all_gather(shards, local, group=group)
    else:
        dist.gather(local, shards, group=group, group_dst=dst)
    return [stacked.flatten(0, 1)] if kind in ("split0", "qkv") else shards


def export_hf_state(model: torch.nn.Module, spec: HFModelSpec | None = None) -> dict[str, Tensor]:
    """Full HF-named tensors of a (possibly DDP-wrapped) GPTModel, on every TP rank.

    Collective over megatron's tensor-parallel group. See :func:`iter_export_hf`.
    """
    from megatron.core import parallel_state

    inner = getattr(model, "module", model)
    if spec is None:
        spec = inner.hf_spec
    group = parallel_state.get_tensor_model_parallel_group()
    return dict(iter_export_hf(inner.named_parameters(), spec, group))
