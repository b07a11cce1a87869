"""What an HF decoder checkpoint is, as far as conversion and model building care.

:class:`HFModelSpec` reads a ``config.json`` (or a transformers config, or a dict) of one
of the families in :data:`FAMILIES` and refuses, naming the feature, every setting the
converter and the Megatron model would not reproduce: a model is never loaded wrong in
silence. RoPE variants are computed by transformers' own functions
(:func:`rope_inv_freq`), so the trainer's angles are HF's by construction.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


class ConversionError(ValueError):
    """A checkpoint or config that cannot be converted (names the offending key)."""


@dataclass(frozen=True)
class Family:
    """The fixed architecture facts of one HF ``model_type``."""

    qkv_bias: bool        # q/k/v projections always carry a bias (Qwen2)
    qk_norm: bool         # per-head RMSNorm on queries and keys before RoPE (Qwen3)
    window_flag: str      # the config key that turns sliding-window attention on


FAMILIES: dict[str, Family] = {
    "llama": Family(qkv_bias=False, qk_norm=False, window_flag="sliding_window"),
    "mistral": Family(qkv_bias=False, qk_norm=False, window_flag="sliding_window"),
    "qwen2": Family(qkv_bias=True, qk_norm=False, window_flag="use_sliding_window"),
    "qwen3": Family(qkv_bias=False, qk_norm=True, window_flag="use_sliding_window"),
}

# RoPE types whose angles are a fixed table of inverse frequencies with no attention
# scaling: exactly what megatron-core's rotary embedding applies.
ROPE_TYPES = ("default", "linear", "llama3")
_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


@dataclass(frozen=True)
class HFModelSpec:
    """The shape facts of an HF decoder config that conversion and model building need."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    qkv_bias: bool
    tied_embeddings: bool
    qk_norm: bool = False
    rope_type: str = "default"
    # the rope type's own parameters (factor, low_freq_factor, ...), sorted
    rope_scaling: tuple[tuple[str, float], ...] = ()

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def of(cls, hf_config: Any) -> HFModelSpec:
        """``hf_config`` itself if it is a spec already, else :meth:`from_hf_config`."""
        return hf_config if isinstance(hf_config, cls) else cls.from_hf_config(hf_config)

    @classmethod
    def from_hf_config(cls, hf_config: Any) -> HFModelSpec:
        """Read a transformers config object, a config dict, or a model dir's config.json."""
        cfg = _config_dict(hf_config)
        model_type = cfg.get("model_type")
        if model_type not in FAMILIES:
            raise ConversionError(
                f"model_type {model_type!r} is not supported (supported: {', '.join(FAMILIES)})"
            )
        family = FAMILIES[model_type]
        check_supported_features(cfg, model_type)
        heads = _required(cfg, "num_attention_heads")
        hidden = _required(cfg, "hidden_size")
        rope_type, theta, scaling = _rope(cfg)
        spec = cls(
            model_type=model_type,
            num_layers=_required(cfg, "num_hidden_layers"),
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or _derived_head_dim(hidden, heads),
            intermediate_size=_required(cfg, "intermediate_size"),
            vocab_size=_required(cfg, "vocab_size"),
            max_position_embeddings=_required(cfg, "max_position_embeddings"),
            rms_norm_eps=float(_required(cfg, "rms_norm_eps")),
            rope_theta=theta,
            qkv_bias=family.qkv_bias,
            tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qk_norm=family.qk_norm,
            rope_type=rope_type,
            rope_scaling=scaling,
        )
        if spec.num_heads % spec.num_kv_heads:
            raise ConversionError(
                f"num_attention_heads={spec.num_heads} is not a multiple of "
                f"num_key_value_heads={spec.num_kv_heads}"
            )
        return spec

    def check_tp(self, tp_size: int) -> None:
        """Fail early, naming the field, when a dimension does not split over ``tp_size``."""
        if tp_size < 1:
            raise ConversionError(f"tensor-parallel size must be >= 1, got {tp_size}")
        for field, value in (
            ("num_key_value_heads", self.num_kv_heads),
            ("intermediate_size", self.intermediate_size),
            ("vocab_size", self.vocab_size),
        ):
            if value % tp_size:
                raise ConversionError(f"{field}={value} is not divisible by TP {tp_size}")


def _config_dict(hf_config: Any) -> dict[str, Any]:
    if isinstance(hf_config, (str, Path)):
        path = Path(hf_config)
        path = path / "config.json" if path.is_dir() else path
        return json.loads(path.read_text())
    if isinstance(hf_config, Mapping):
        return dict(hf_config)
    if hasattr(hf_config, "to_dict"):
        return hf_config.to_dict()
    raise ConversionError(f"cannot read an HF config from {type(hf_config).__name__}")


def _required(cfg: Mapping[str, Any], key: str) -> Any:
    if cfg.get(key) is None:
        raise ConversionError(f"HF config has no {key!r}")
    return cfg[key]


def _derived_head_dim(hidden: int, heads: int) -> int:
    if hidden % heads:
        raise ConversionError(f"hidden_size={hidden} is not a multiple of "
                              f"num_attention_heads={heads} and the config sets no head_dim")
    return hidden // heads


def check_supported_features(cfg: Mapping[str, Any], model_type: str) -> None:
    """Refuse, naming it, any setting of the config that conversion would not reproduce."""
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"hidden_act {cfg['hidden_act']!r} is not supported (only 'silu')")
    if cfg.get("attention_bias") and not FAMILIES[model_type].qkv_bias:
        raise ConversionError(f"attention_bias=true (biases on the q/k/v/o projections) is "
                              f"not supported for {model_type}")
    if cfg.get("mlp_bias"):
        raise ConversionError("mlp_bias=true (biases on the MLP projections) is not supported")
    window_flag = FAMILIES[model_type].window_flag
    if cfg.get(window_flag):
        raise ConversionError(
            f"{window_flag}={cfg[window_flag]} (sliding-window attention) is not supported: "
            "the trainer attends over the whole sequence"
        )
    layer_types = set(cfg.get("layer_types") or ()) - {"full_attention"}
    if layer_types:
        raise ConversionError(f"layer_types {sorted(layer_types)} are not supported "
                              "(only full_attention layers)")
    for key in _MOE_KEYS:
        if cfg.get(key):
            raise ConversionError(f"{key}={cfg[key]} (mixture of experts) is not supported")
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if cfg.get(key) is not None:
            raise ConversionError(f"{key}={cfg[key]} (logit soft-capping) is not supported")


def _rope(cfg: Mapping[str, Any]) -> tuple[str, float, tuple[tuple[str, float], ...]]:
    """(rope type, theta, the type's parameters) from ``rope_parameters`` (transformers 5)
    or the older ``rope_scaling`` + top-level ``rope_theta``."""
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ConversionError(f"rope_type {rope_type!r} is not supported "
                              f"(supported: {', '.join(ROPE_TYPES)})")
    theta = rope.pop("rope_theta", cfg.get("rope_theta"))
    if theta is None:
        raise ConversionError("HF config has no 'rope_theta' (nor rope_parameters.rope_theta)")
    partial = rope.pop("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ConversionError(f"partial_rotary_factor={partial} (RoPE on part of each head) "
                              "is not supported")
    scaling = tuple(sorted((k, float(v)) for k, v in rope.items() if v is not None))
    if rope_type == "default" and scaling:
        raise ConversionError(f"rope parameters {dict(scaling)} without a rope_type")
    return rope_type, float(theta), scaling


def rope_inv_freq(spec: HFModelSpec) -> Tensor:
    """RoPE's inverse frequencies ``[head_dim / 2]`` (fp32), as HF computes them."""
    dim = spec.head_dim
    if spec.rope_type == "default":
        exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
        return 1.0 / (spec.rope_theta ** exponents)
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = LlamaConfig(
        hidden_size=spec.hidden_size, num_attention_heads=spec.num_heads, head_dim=dim,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        rope_parameters={"rope_type": spec.rope_type, "rope_theta": spec.rope_theta,
                         **dict(spec.rope_scaling)},
    )
    inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[spec.rope_type](hf, torch.device("cpu"))
    if attention_scaling != 1.0:  # megatron's rotary embedding has no cos/sin scaling
        raise ConversionError(f"rope_type {spec.rope_type!r} scales attention by "
                              f"{attention_scaling}, which is not supported")
    return inv_freq.to(torch.float32)
