"""A megatron-core GPTModel built from an HF config, and its token-level forward pass.

The model uses megatron-core's local layer spec (RMSNorm, SwiGLU, RoPE, GQA), so it
runs without Transformer Engine or Apex (CPU included). Inputs are built here too:
:class:`TokenBatch` carries rows of one or more documents (padded or packed) with an
explicit block-diagonal causal mask and per-document position ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer_svc.hf_spec import HFModelSpec, rope_inv_freq


def transformer_config_from_hf(hf_config: Any, tp: int = 1, device: str = "cpu",
                               dtype: torch.dtype = torch.float32, pp: int = 1,
                               sequence_parallel: bool = False):
    """megatron-core ``TransformerConfig`` equivalent to an HF config (see hf_spec.FAMILIES),
    with parameters and activations in ``dtype`` (bfloat16: megatron's bf16 mode), split
    over ``tp`` tensor-parallel ranks (tokens too, with ``sequence_parallel``) and ``pp``
    pipeline stages."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    spec = HFModelSpec.of(hf_config)
    spec.check_tp(tp)
    return TransformerConfig(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        num_attention_heads=spec.num_heads,
        num_query_groups=spec.num_kv_heads,
        kv_channels=spec.head_dim,
        ffn_hidden_size=spec.intermediate_size,
        normalization="RMSNorm",
        layernorm_epsilon=spec.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=spec.qkv_bias,
        qk_layernorm=spec.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        sequence_parallel=sequence_parallel,
        pipeline_model_parallel_size=pp,
        pipeline_dtype=dtype,
        # micro-batches are packed rows of varying shape: stages exchange shapes first
        variable_seq_lengths=True,
        # a dense model has no experts; megatron refuses variable lengths with its default
        # (allgather) MoE dispatcher all the same
        moe_token_dispatcher_type="alltoall",
        # a loss share is already normalised by its global denominator: DP replicas' grads
        # are summed, and the schedule divides by nothing
        calculate_per_token_loss=True,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        # Weights are loaded from a checkpoint afterwards, but initialisation must stay
        # on: megatron-core 0.16.1 only tags TP-sharded weights (tensor_model_parallel,
        # partition_dim) inside its init functions, and without the tags the grad norm
        # (hence clipping) and sharded checkpoints treat shards as replicas.
        perform_initialization=True,
        use_cpu_initialization=torch.device(device).type == "cpu",
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
    )


class RMSNorm:
    """The norm of k1rl's layer spec: torch's RMSNorm, as megatron's local spec builds it,
    but usable under sequence parallelism. megatron's torch-norm wrapper refuses it only
    because it does not tag its weight: the norm is per token, so it is exact on a shard of
    the tokens, and a weight tagged ``sequence_parallel`` has its per-shard partial
    gradients summed over the tensor-parallel group by ``finalize_model_grads``."""

    def __new__(cls, config: Any, hidden_size: int, eps: float = 1e-5, **_: Any):
        norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        norm.weight.sequence_parallel = config.sequence_parallel
        return norm


def _layer_specs(config: Any, attention: str, qk_norm: bool):
    """This stage's decoder block: megatron's local GPT layer spec with k1rl's core
    attention and norms."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    from trainer_svc.attention import with_core_attention

    layer = with_core_attention(
        get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=qk_norm), attention)
    attn = layer.submodules.self_attention
    if qk_norm:
        attn = replace(attn, submodules=replace(
            attn.submodules, q_layernorm=RMSNorm, k_layernorm=RMSNorm))
    layer = replace(layer, submodules=replace(
        layer.submodules, input_layernorm=RMSNorm, pre_mlp_layernorm=RMSNorm,
        self_attention=attn))
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config),
                                      layer_norm=RMSNorm)


def build_gpt_model(hf_config: Any, tp: int = 1, device: str = "cpu", attention: str = "sdpa",
                    dtype: torch.dtype = torch.float32, pp: int = 1,
                    sequence_parallel: bool = False):
    """A (randomly initialised) GPTModel with the HF config's architecture: this rank's
    pipeline stage of it (the embedding on the first, the output layer on the last).

    Needs ``parallel_state.initialize_model_parallel(tp, pp)`` first. The output layer
    keeps its vocab-parallel logits (``parallel_output=True``): log-probs are taken with
    the vocab-parallel cross entropy, so full logits are never gathered. The model gets
    an ``hf_spec`` attribute (the :class:`HFModelSpec`) used by the HF export.
    ``attention`` picks the core attention (see :mod:`trainer_svc.attention`);
    ``sequence_parallel`` splits the tokens between the tensor-parallel layers over the
    ``tp`` ranks (rows must then be a multiple of ``tp`` tokens wide).
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_model import GPTModel

    spec = HFModelSpec.of(hf_config)
    config = transformer_config_from_hf(spec, tp=tp, device=device, dtype=dtype, pp=pp,
                                        sequence_parallel=sequence_parallel)
    model = GPTModel(
        config=config,
        transformer_layer_spec=_layer_specs(config, attention, spec.qk_norm),
        vocab_size=spec.vocab_size,
        max_sequence_length=spec.max_position_embeddings,
        parallel_output=True,
        share_embeddings_and_output_weights=spec.tied_embeddings,
        position_embedding_type="rope",
        rotary_base=spec.rope_theta,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )
    # HF's angles for every RoPE type (megatron-core hard-codes Llama 3's scaling constants);
    # set before the first forward, whose angle table is cached per length
    model.rotary_pos_emb.inv_freq = rope_inv_freq(spec).to(device)
    model.hf_spec = spec
    # megatron-core's norms are torch modules created in fp32 whatever params_dtype says;
    # its Float16Module casts the whole model the same way
    return model.to(device=device, dtype=dtype)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside a Megatron DDP wrapper (or the model itself)."""
    return getattr(model, "module", model)


# ----------------------------------------------------------------------------- inputs


@dataclass
class TokenBatch:
    """Rows of tokens with everything a forward pass and a token-level loss need.

    All tensors are ``[B, T]`` except ``attention_mask`` (``[B, 1, T, T]``, True = masked,
    megatron's convention). Position ``t`` predicts ``labels[t]``; ``loss_mask[t]`` is 1
    where ``labels[t]`` is a response token. ``sample_index[t]`` is the index of the
    example (in the order given to the builder) whose response token ``labels[t]`` is,
    or -1; losses use it to sum log-probs per sequence.
    """

    input_ids: Tensor
    position_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    loss_mask: Tensor
    sample_index: Tensor

    @property
    def num_response_tokens(self) -> int:
        return int(self.loss_mask.sum().item())

    def to(self, device: str | torch.device) -> TokenBatch:
        return TokenBatch(**{k: v.to(device) for k, v in vars(self).items()})


def check_examples(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    vocab_size: int,
    max_length: int,
) -> None:
    """Reject inputs the model cannot score, naming the offending example."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        raise ValueError("no examples")
    for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        if not prompt:
            raise ValueError(f"example {i}: empty prompt (the first response token needs context)")
        if not response:
            raise ValueError(f"example {i}: empty response")
        if len(prompt) + len(response) > max_length:
            raise ValueError(
                f"example {i}: {len(prompt) + len(response)} tokens, more than the model's "
                f"max_position_embeddings={max_length}"
            )
        bad = [t for t in (*prompt, *response) if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"example {i}: token id {bad[0]} outside [0, {vocab_size})")


def pack_rows(lengths: Sequence[int], row_length: int) -> list[list[int]]:
    """First-fit-decreasing assignment of documents (by length) to rows of ``row_length``."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        if lengths[i] > row_length:
            raise ValueError(f"example {i} has {lengths[i]} tokens, more than {row_length}")
        slot = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if slot is None:
            rows.append([])
            room.append(row_length)
            slot = len(rows) - 1
        rows[slot].append(i)
        room[slot] -= lengths[i]
    return [sorted(row) for row in rows]


def build_token_batch(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    rows: Sequence[Sequence[int]],
    masks: Sequence[Sequence[bool] | None] | None = None,
    width_multiple: int = 1,
) -> TokenBatch:
    """Lay out examples into rows: ``rows[r]`` lists the examples packed in row ``r``.

    One example per row gives a right-padded batch. Rows are padded to the longest;
    each document attends only to itself (block-diagonal causal mask) and its
    position ids restart at 0. ``sample_index`` holds indices into ``prompts``;
    ``masks[i][j]`` False leaves response token j of example i out of it (and so out of
    every loss), while it still conditions the tokens after it. The width is rounded up
    to a multiple of ``width_multiple`` (sequence parallelism splits it over tp ranks).
    """
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
    width = max(sum(lengths[i] for i in row) for row in rows)
    width = -(-width // width_multiple) * width_multiple
    shape = (len(rows), width)
    input_ids = torch.zeros(shape, dtype=torch.long)
    labels = torch.zeros(shape, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    # Padding gets its own segment (-1) so it never attends to a document.
    segment = torch.full(shape, -1, dtype=torch.long)
    sample_index = torch.full(shape, -1, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            tokens = torch.tensor([*prompts[i], *responses[i]], dtype=torch.long)
            n, p = len(tokens), len(prompts[i])
            span = slice(start, start + n)
            input_ids[r, span] = tokens
            labels[r, start : start + n - 1] = tokens[1:]
            position_ids[r, span] = torch.arange(n)
            segment[r, span] = i
            # labels[t] is response token j when t = start + p - 1 + j
            sample_index[r, start + p - 1 : start + n - 1] = i
            if masks is not None and masks[i] is not None:
                keep = torch.tensor(masks[i], dtype=torch.bool)
                span_index = sample_index[r, start + p - 1 : start + n - 1]
                span_index[~keep] = -1
            start += n
    causal = torch.ones(width, width, dtype=torch.bool).tril_()
    same_doc = segment[:, :, None] == segment[:, None, :]
    attention_mask = ~(same_doc & causal)[:, None]
    loss_mask = (sample_index >= 0).float()
    return TokenBatch(input_ids, position_ids, attention_mask, labels, loss_mask, sample_index)


# ---------------------------------------------------------------------------- forward


def _rope_for_positions(gpt: torch.nn.Module, position_ids: Tensor) -> Tensor:
    """RoPE angles ``[T, B, 1, D]`` for arbitrary per-token positions.

    GPTModel.forward ignores ``position_ids`` for RoPE (it uses 0..T-1); packed rows
    need each document to restart at 0, so the angle table is indexed per token.
    """
    table = gpt.rotary_pos_emb(int(position_ids.max().item()) + 1)  # [P, 1, 1, D]
    return table[:, 0][position_ids.t()]


def forward_logits(model: torch.nn.Module, batch: TokenBatch) -> Tensor:
    """Vocab-parallel logits ``[T, B, V / tp]`` (sequence-first, megatron's layout) of a
    model holding every layer (no pipeline)."""
    gpt = unwrap(model)
    if not (gpt.pre_process and gpt.post_process):
        raise RuntimeError("forward_logits needs the whole model; a pipeline stage runs "
                           "forward_stage")
    return forward_stage(model, batch, logits=True)


def forward_stage(model: torch.nn.Module, batch: TokenBatch, logits: bool = False) -> Tensor:
    """This pipeline stage's forward pass: the last stage returns the log-probs ``[B, T]``
    of ``batch.labels`` (or its vocab-parallel logits when ``logits``), the others their
    hidden states ``[T, B, H]`` for the next stage. A stage after the first reads its input
    from what megatron's schedule set with ``set_input_tensor``.

    Runs GPTModel's embedding, decoder and output layer directly rather than
    GPTModel.forward, whose RoPE ignores ``position_ids``.
    """
    gpt = unwrap(model)
    hidden = None
    if gpt.pre_process:
        hidden = gpt.embedding(input_ids=batch.input_ids, position_ids=batch.position_ids)
    hidden = gpt.decoder(
        hidden_states=hidden,
        attention_mask=batch.attention_mask,
        rotary_pos_emb=_rope_for_positions(gpt, batch.position_ids),
    )
    if not gpt.post_process:
        return hidden
    weight = None
    if gpt.share_embeddings_and_output_weights:
        weight = gpt.shared_embedding_or_output_weight()
    vocab_logits, _ = gpt.output_layer(hidden, weight=weight)
    return vocab_logits if logits else _label_logprobs(vocab_logits, batch)


def forward_logprobs(model: torch.nn.Module, batch: TokenBatch) -> Tensor:
    """Log-prob of ``labels[t]`` at every position, ``[B, T]``, differentiable, from a
    model holding every layer.

    Positions where ``loss_mask`` is 0 hold meaningless values: mask them. Under TP the
    softmax normaliser is reduced across ranks, so every rank gets the full log-probs.
    """
    return _label_logprobs(forward_logits(model, batch), batch)


def _label_logprobs(logits: Tensor, batch: TokenBatch) -> Tensor:
    from megatron.core import tensor_parallel

    # bf16 logits are rounded to ~3 significant digits: the softmax is taken in fp32
    labels = batch.labels.t().contiguous()  # megatron's CE views the target flat
    neg_logprobs = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels)
    return -neg_logprobs.t()
