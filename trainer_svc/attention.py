"""Core attention through ``torch.nn.functional.scaled_dot_product_attention``.

megatron-core's local spec uses ``DotProductAttention``: baddbmm, an in-place masked
softmax on a view and bmm, with the grouped keys/values repeated per head. Without
Transformer Engine that is the only core attention it has, and on CPU it is most of a
training step for a small model (a forward+backward of one layer on 32 packed rows of
256 tokens: 126 ms, against 29 ms through SDPA, which picks the fused flash kernel on
CPU and the flash / memory-efficient kernels on CUDA, and handles GQA without copies).

``SDPAttention`` is a drop-in ``core_attention`` submodule: same constructor, same
inputs (``[s, b, heads, dim]``, a boolean mask with True = masked) and output
(``[s, b, heads * dim]``). It computes the same function up to float rounding
(measured max difference ~1e-6 on one layer): megatron fills masked scores with -10000
and SDPA with -inf, which differ only for a fully masked row, and the token batches of
:mod:`trainer_svc.model` have none (padding attends to padding). Configurations it does
not implement (attention dropout while training, sliding windows, softmax offsets,
query-key layer scaling, attention bias, packed-sequence params) fall back to
megatron's implementation.
"""

from __future__ import annotations

import dataclasses

import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from torch import Tensor

ATTENTION_BACKENDS = ("sdpa", "megatron")


class SDPAttention(DotProductAttention):
    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type=None,
        attention_bias: Tensor | None = None,
        packed_seq_params=None,
    ) -> Tensor:
        if not self._supported(attention_bias, packed_seq_params):
            return super().forward(query, key, value, attention_mask, attn_mask_type,
                                   attention_bias, packed_seq_params)
        sq, b = query.shape[:2]
        # [s, b, heads, dim] -> [b, heads, s, dim]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        context = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=None if attention_mask is None else ~attention_mask,
            is_causal=attention_mask is None,
            scale=self.softmax_scale,
            enable_gqa=k.shape[1] != q.shape[1],
        )
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)

    def _supported(self, attention_bias: Tensor | None, packed_seq_params) -> bool:
        cfg = self.config
        dropout = self.attention_dropout.p > 0 and self.training
        return not (
            dropout
            or attention_bias is not None
            or packed_seq_params is not None
            or self.softmax_offset is not None
            or cfg.apply_query_key_layer_scaling
            or self.scale_mask_softmax.window_size is not None
        )


def with_core_attention(layer_spec, backend: str):
    """``layer_spec`` (a megatron local GPT layer spec) with the given core attention:
    "sdpa" (:class:`SDPAttention`) or "megatron" (its own DotProductAttention)."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    if backend == "megatron":
        return layer_spec
    attention = layer_spec.submodules.self_attention
    submodules = dataclasses.replace(attention.submodules, core_attention=SDPAttention)
    attention = dataclasses.replace(attention, submodules=submodules)
    return dataclasses.replace(
        layer_spec, submodules=dataclasses.replace(layer_spec.submodules, self_attention=attention)
    )
