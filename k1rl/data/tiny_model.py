"""A randomly initialised model of a few million parameters, written as a normal HF directory.

Everything the system runs on CPU starts from this: the trainer converts it to Megatron, vLLM
serves it, SFT teaches it the synthetic tasks. It is built offline from nothing but a seed:
task corpus -> tokenizer -> weights, and the same seed gives byte-identical files. By default
the model is a small Qwen2; ``like`` takes a published config.json instead and keeps its
architecture (family, biases, tied head, QK-norm, GQA ratio, head_dim, RoPE scaling) at a
smaller depth and width, so a user's model family can be tried on CPU before any GPU time.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from k1rl.data.tasks import all_levels, generate_suite
from k1rl.data.tokenizer import (
    CHATML_TEMPLATE,
    DEFAULT_VOCAB_SIZE,
    EOS_TOKEN,
    PAD_TOKEN,
    save_tokenizer,
    train_tokenizer,
)

log = logging.getLogger(__name__)

DEFAULT_CORPUS_SIZE = 200  # tasks per (family, difficulty) level for the tokenizer corpus


class ModelSummary(BaseModel):
    path: str
    params: int
    vocab_size: int  # config.vocab_size: the embedding rows, padded to vocab_multiple
    tokenizer_vocab: int  # tokens the tokenizer can actually produce
    eos_token_id: int
    pad_token_id: int
    hidden_size: int
    num_layers: int
    tie_word_embeddings: bool


# The families the tokenizer is trained on. count (digits, commas and words these already
# cover) is left out so that adding it changed no token of the others: the demo's numbers
# stay reproducible across that change.
TOKENIZER_FAMILIES = ("add", "sub", "mul", "multi", "code")


def corpus_texts(seed: int, count_per_level: int) -> list[str]:
    """Prompt + response texts of every level of TOKENIZER_FAMILIES, the tokenizer's
    training set."""
    levels = all_levels(TOKENIZER_FAMILIES)
    return [task.prompt + task.target
            for task in generate_suite(count_per_level, seed, levels=levels)]


def padded_vocab(tokenizer_vocab: int, multiple: int) -> int:
    """Round up so the embedding splits evenly over tensor-parallel ranks."""
    if multiple < 1:
        raise ValueError(f"vocab_multiple must be >= 1, got {multiple}")
    return -(-tokenizer_vocab // multiple) * multiple


def _check_shape(hidden_size: int, num_layers: int, num_heads: int, num_kv_heads: int,
                 intermediate_size: int, max_position: int) -> None:
    for name, value in (("hidden_size", hidden_size), ("num_layers", num_layers),
                        ("num_heads", num_heads), ("num_kv_heads", num_kv_heads),
                        ("intermediate_size", intermediate_size),
                        ("max_position", max_position)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not divisible by num_kv_heads {num_kv_heads}")
    if (hidden_size // num_heads) % 2:
        raise ValueError(f"head dim {hidden_size // num_heads} must be even for rotary embeddings")


def build_config(*, vocab_size: int, hidden_size: int, num_layers: int, num_heads: int,
                 num_kv_heads: int, intermediate_size: int, max_position: int,
                 tie_word_embeddings: bool, eos_token_id: int, pad_token_id: int):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie_word_embeddings,
        # Qwen2 has no separate bos either: sequences start at the first prompt token.
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        use_sliding_window=False,
        dtype="float32",
    )


# What a published config says that is about its own files, tokens or serving, not the
# architecture: replaced by this model's own values.
_NOT_ARCHITECTURE = ("architectures", "torch_dtype", "dtype", "transformers_version",
                     "bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "_name_or_path")


def scaled_config(like: dict[str, Any], *, num_layers: int, num_kv_heads: int,
                  hidden_size: int, intermediate_size: int, vocab_size: int,
                  eos_token_id: int, pad_token_id: int):
    """A transformers config of ``like``'s architecture at a smaller depth and width.

    Kept: the family, every feature flag, RoPE parameters, norm epsilon, tied head,
    head_dim and the ratio of query to key/value heads. Set: layers, key/value heads (the
    query heads follow the ratio), MLP width and vocabulary. The width is heads x head_dim
    when ``like``'s is, else ``hidden_size`` (Qwen3 sets head_dim on its own).
    """
    from transformers import AutoConfig

    heads, kv = like["num_attention_heads"], like.get("num_key_value_heads") or like[
        "num_attention_heads"]
    if heads % kv:
        raise ValueError(f"num_attention_heads {heads} is not a multiple of "
                         f"num_key_value_heads {kv}")
    head_dim = like.get("head_dim") or like["hidden_size"] // heads
    new_heads = num_kv_heads * (heads // kv)
    width = new_heads * head_dim if like["hidden_size"] == heads * head_dim else hidden_size
    fields = {k: v for k, v in like.items() if k not in _NOT_ARCHITECTURE}
    fields.update(
        num_hidden_layers=num_layers, num_attention_heads=new_heads,
        num_key_value_heads=num_kv_heads, hidden_size=width, head_dim=head_dim,
        intermediate_size=intermediate_size, vocab_size=vocab_size,
        bos_token_id=eos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
    )
    if "max_window_layers" in fields:
        fields["max_window_layers"] = num_layers
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def _read_config(like: str | Path | dict[str, Any]) -> dict[str, Any]:
    if isinstance(like, dict):
        return dict(like)
    path = Path(like)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise ValueError(f"like: no config.json at {path}")
    return json.loads(path.read_text())


def _write_weights(config, out_dir: Path, seed: int) -> int:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    # fork_rng restores the caller's global RNG state afterwards: building a model must not
    # change what any later random draw in the same process gives.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    model.save_pretrained(str(out_dir))
    return sum(p.numel() for p in model.parameters())


def init_model(
    out_dir: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 8,
    num_kv_heads: int = 2,
    intermediate_size: int = 704,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    vocab_multiple: int = 64,
    max_position: int = 1024,
    tie_word_embeddings: bool = False,
    corpus_size: int = DEFAULT_CORPUS_SIZE,
    like: str | Path | dict[str, Any] | None = None,
) -> ModelSummary:
    """Build tokenizer and random-init model into out_dir; deterministic for the seed.

    vocab_size is the tokenizer's BPE budget; config.vocab_size is what it produced, rounded
    up to vocab_multiple. corpus_size is the number of tasks per level the tokenizer sees.
    With ``like`` (a config.json, a model directory or the dict), the architecture is that
    config's scaled down (:func:`scaled_config`; ``num_heads`` and ``tie_word_embeddings``
    then come from it) and the tokenizer gets a ChatML chat template.
    """
    _check_shape(hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size,
                 max_position)
    if corpus_size < 1:
        raise ValueError(f"corpus_size must be >= 1, got {corpus_size}")
    out_dir = Path(out_dir)
    tokenizer = train_tokenizer(corpus_texts(seed, corpus_size), vocab_size=vocab_size)
    save_tokenizer(tokenizer, out_dir, model_max_length=max_position,
                   chat_template=CHATML_TEMPLATE if like is not None else None)
    eos_id, pad_id = tokenizer.token_to_id(EOS_TOKEN), tokenizer.token_to_id(PAD_TOKEN)
    vocab = padded_vocab(tokenizer.get_vocab_size(), vocab_multiple)
    if like is None:
        config = build_config(
            vocab_size=vocab, hidden_size=hidden_size, num_layers=num_layers,
            num_heads=num_heads, num_kv_heads=num_kv_heads,
            intermediate_size=intermediate_size, max_position=max_position,
            tie_word_embeddings=tie_word_embeddings, eos_token_id=eos_id, pad_token_id=pad_id,
        )
    else:
        config = scaled_config(
            _read_config(like), num_layers=num_layers, num_kv_heads=num_kv_heads,
            hidden_size=hidden_size, intermediate_size=intermediate_size, vocab_size=vocab,
            eos_token_id=eos_id, pad_token_id=pad_id,
        )
    params = _write_weights(config, out_dir, seed)
    summary = ModelSummary(
        path=str(out_dir), params=params, vocab_size=config.vocab_size,
        tokenizer_vocab=tokenizer.get_vocab_size(), eos_token_id=eos_id, pad_token_id=pad_id,
        hidden_size=config.hidden_size, num_layers=num_layers,
        tie_word_embeddings=bool(config.tie_word_embeddings),
    )
    log.info("tiny model: %s parameters, vocab %d, at %s", f"{params:,}", summary.vocab_size,
             out_dir)
    return summary
