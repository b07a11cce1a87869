"""A randomly initialised Qwen2 of a few million parameters, written as a normal HF directory.

Everything the system runs on CPU starts from this: the trainer converts it to Megatron, vLLM
serves it, SFT teaches it the synthetic tasks. It is built offline from nothing but a seed:
task corpus -> tokenizer -> Qwen2 weights, and the same seed gives byte-identical files.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import BaseModel

from k1rl.data.tasks import all_levels, generate_suite
from k1rl.data.tokenizer import (
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


def _write_weights(config, out_dir: Path, seed: int) -> int:
    import torch
    from transformers import GenerationConfig, Qwen2ForCausalLM

    # fork_rng restores the caller's global RNG state afterwards: building a model must not
    # change what any later random draw in the same process gives.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).to(torch.float32)
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
) -> ModelSummary:
    """Build tokenizer and random-init Qwen2 into out_dir; deterministic for the seed.

    vocab_size is the tokenizer's BPE budget; config.vocab_size is what it produced, rounded
    up to vocab_multiple. corpus_size is the number of tasks per level the tokenizer sees.
    """
    _check_shape(hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size,
                 max_position)
    if corpus_size < 1:
        raise ValueError(f"corpus_size must be >= 1, got {corpus_size}")
    out_dir = Path(out_dir)
    tokenizer = train_tokenizer(corpus_texts(seed, corpus_size), vocab_size=vocab_size)
    save_tokenizer(tokenizer, out_dir, model_max_length=max_position)
    eos_id, pad_id = tokenizer.token_to_id(EOS_TOKEN), tokenizer.token_to_id(PAD_TOKEN)
    config = build_config(
        vocab_size=padded_vocab(tokenizer.get_vocab_size(), vocab_multiple),
        hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
        num_kv_heads=num_kv_heads, intermediate_size=intermediate_size,
        max_position=max_position, tie_word_embeddings=tie_word_embeddings,
        eos_token_id=eos_id, pad_token_id=pad_id,
    )
    params = _write_weights(config, out_dir, seed)
    summary = ModelSummary(
        path=str(out_dir), params=params, vocab_size=config.vocab_size,
        tokenizer_vocab=tokenizer.get_vocab_size(), eos_token_id=eos_id, pad_token_id=pad_id,
        hidden_size=hidden_size, num_layers=num_layers, tie_word_embeddings=tie_word_embeddings,
    )
    log.info("tiny model: %s parameters, vocab %d, at %s", f"{params:,}", summary.vocab_size,
             out_dir)
    return summary
