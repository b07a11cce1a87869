"""Bring your own model: the families users bring, from their published configs.

Each published config.json (tests/data/published_configs) is read as it is, and built
scaled down with the same features; the scaled checkpoints go through exactly the loading
code a user's directory goes through, and are checked against HF transformers itself.
"""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from conftest import PUBLISHED_CONFIGS, PUBLISHED_MODELS
from safetensors.torch import load_file

from trainer_svc import MegatronTrainer, run_distributed
from trainer_svc.convert import hf_names, hf_to_megatron, megatron_to_hf
from trainer_svc.hf_spec import ConversionError, HFModelSpec, rope_inv_freq

FEATURES = {  # name -> (model_type, qkv_bias, qk_norm, tied, rope_type, heads per KV head)
    "llama-3.2-1b-instruct": ("llama", False, False, True, "llama3", 4),
    "qwen2.5-0.5b-instruct": ("qwen2", True, False, True, "default", 7),
    "qwen2.5-7b-instruct": ("qwen2", True, False, False, "default", 7),
    "qwen3-0.6b": ("qwen3", False, True, True, "default", 2),
    "mistral-7b-instruct-v0.3": ("mistral", False, False, False, "default", 4),
}


def _published(name: str) -> dict:
    return json.loads((PUBLISHED_CONFIGS / f"{name}.json").read_text())


@pytest.mark.parametrize("name", PUBLISHED_MODELS)
def test_published_configs_are_read_with_their_features(name):
    spec = HFModelSpec.from_hf_config(_published(name))
    model_type, bias, qk_norm, tied, rope_type, ratio = FEATURES[name]
    assert (spec.model_type, spec.qkv_bias, spec.qk_norm) == (model_type, bias, qk_norm)
    assert (spec.tied_embeddings, spec.rope_type, spec.heads_per_group) == (tied, rope_type, ratio)


def test_qwen3_head_dim_is_its_own_and_llama3_scaling_is_kept():
    qwen3 = HFModelSpec.from_hf_config(_published("qwen3-0.6b"))
    assert (qwen3.hidden_size, qwen3.num_heads, qwen3.head_dim) == (1024, 16, 128)
    llama = HFModelSpec.from_hf_config(_published("llama-3.2-1b-instruct"))
    assert dict(llama.rope_scaling) == {"factor": 32.0, "high_freq_factor": 4.0,
                                        "low_freq_factor": 1.0,
                                        "original_max_position_embeddings": 8192.0}


@pytest.mark.parametrize("name", PUBLISHED_MODELS)
def test_scaled_checkpoint_keeps_the_published_features(family_dirs, name):
    spec = HFModelSpec.from_hf_config(family_dirs[name])
    published = HFModelSpec.from_hf_config(_published(name))
    assert spec.num_layers == 2 and spec.num_kv_heads == 2
    for field in ("model_type", "qkv_bias", "qk_norm", "tied_embeddings", "rope_type",
                  "rope_scaling", "rope_theta", "rms_norm_eps", "head_dim", "heads_per_group"):
        assert getattr(spec, field) == getattr(published, field), field


def test_llama3_rope_frequencies_are_transformers_own():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = _published("llama-3.2-1b-instruct")
    spec = HFModelSpec.from_hf_config(config)
    reference, _ = ROPE_INIT_FUNCTIONS["llama3"](LlamaConfig(**config), torch.device("cpu"))
    assert torch.equal(rope_inv_freq(spec), reference)
    plain = torch.tensor([1.0 / 500000.0 ** (i / 64) for i in range(0, 64, 2)])
    # high frequencies are left alone, the lowest are divided by the factor (32)
    assert rope_inv_freq(spec)[0] == pytest.approx(plain[0].item())
    assert rope_inv_freq(spec)[-1] == pytest.approx(plain[-1].item() / 32, rel=1e-5)


@pytest.mark.parametrize("name", PUBLISHED_MODELS)
@pytest.mark.parametrize("tp", [1, 2])
def test_hf_megatron_hf_round_trip_is_bit_exact(family_dirs, name, tp):
    hf = load_file(str(family_dirs[name] / "model.safetensors"))
    spec = HFModelSpec.from_hf_config(family_dirs[name])
    back = megatron_to_hf([hf_to_megatron(hf, spec, rank, tp) for rank in range(tp)], spec)
    assert set(hf) <= set(back) and set(back) == set(hf_names(spec))
    for key, tensor in hf.items():
        assert torch.equal(back[key], tensor), key


def test_qwen3_qk_norms_are_converted_per_layer(family_dirs):
    hf = load_file(str(family_dirs["qwen3-0.6b"] / "model.safetensors"))
    megatron = hf_to_megatron(hf, family_dirs["qwen3-0.6b"])
    q_norm = megatron["decoder.layers.1.self_attention.q_layernorm.weight"]
    assert q_norm.shape == (128,)
    assert torch.equal(q_norm, hf["model.layers.1.self_attn.q_norm.weight"])
    assert torch.equal(megatron["decoder.layers.1.self_attention.k_layernorm.weight"],
                       hf["model.layers.1.self_attn.k_norm.weight"])


def _base(**changes):
    return {**_published("llama-3.2-1b-instruct"), **changes}


@pytest.mark.parametrize(
    ("config", "feature"),
    [
        (_base(model_type="gemma2"), "model_type 'gemma2' is not supported"),
        (_base(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_type 'yarn'"),
        (_base(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "rope_type 'dynamic'"),
        (_base(rope_scaling={"rope_type": "longrope"}), "rope_type 'longrope'"),
        (_base(attention_bias=True), "attention_bias=true"),
        (_base(mlp_bias=True), "mlp_bias=true"),
        (_base(hidden_act="gelu_pytorch_tanh"), "hidden_act 'gelu_pytorch_tanh'"),
        (_base(partial_rotary_factor=0.5), "partial_rotary_factor=0.5"),
        ({**_published("mistral-7b-instruct-v0.3"), "sliding_window": 4096},
         "sliding_window=4096 .sliding-window attention."),
        ({**_published("qwen2.5-7b-instruct"), "use_sliding_window": True},
         "use_sliding_window=True"),
        ({**_published("qwen3-0.6b"), "layer_types": ["full_attention", "sliding_attention"]},
         "layer_types \\['sliding_attention'\\]"),
        ({**_published("qwen3-0.6b"), "num_experts": 128}, "num_experts=128 .mixture of experts."),
        (_base(num_local_experts=8), "num_local_experts=8"),
        ({**_published("qwen3-0.6b"), "attention_bias": True}, "attention_bias=true .* qwen3"),
        (_base(final_logit_softcapping=30.0), "final_logit_softcapping=30.0"),
        (_base(head_dim=None, hidden_size=2050), "hidden_size=2050 is not a multiple"),
    ],
)
def test_unsupported_features_are_refused_by_name(config, feature):
    with pytest.raises(ConversionError, match=feature):
        HFModelSpec.from_hf_config(config)


def test_a_sliding_window_that_is_switched_off_is_not_a_sliding_window():
    # Qwen2.5 configs carry sliding_window=131072 with use_sliding_window=false
    assert HFModelSpec.from_hf_config(_published("qwen2.5-7b-instruct")).model_type == "qwen2"


# ------------------------------------------------ the Megatron model against transformers


def _families_scenario(rank, world, dirs):
    """Per family: log-probs and the gradients of one SFT step, as HF-named tensors."""
    from megatron.core import parallel_state

    from trainer_svc import convert
    from trainer_svc.model import unwrap

    out = {}
    for name, hf_dir in dirs.items():
        trainer = MegatronTrainer.from_hf(hf_dir, tp=world, lr=1e-3, seed=0, grad_clip=0.0)
        logprobs = trainer.logprobs(_PROMPTS, _RESPONSES)
        trainer.sft_step(list(zip(_PROMPTS, _RESPONSES)))
        named = [(n, p.main_grad) for n, p in unwrap(trainer.model).named_parameters()]
        group = parallel_state.get_tensor_model_parallel_group()
        grads = {n: t.clone() for n, t in convert.iter_export_hf(named, trainer.spec, group)}
        out[name] = {"logprobs": logprobs, "grads": grads if rank == 0 else None}
    return out


# No pad token (id 1) among the inputs: HF's embedding gives the padding row no gradient.
_PROMPTS = [[5, 17, 99, 3], [42, 7], [200, 11, 12, 13, 14, 15, 16]]
_RESPONSES = [[8, 9, 10], [33, 34, 35, 36, 120], [0, 2]]


def _hf_reference(hf_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    logprobs, total = [], 0.0
    for prompt, response in zip(_PROMPTS, _RESPONSES):
        logits = model(torch.tensor([prompt + response])).logits[0]
        lp = torch.log_softmax(logits[len(prompt) - 1 : -1], -1)
        token_lp = lp.gather(-1, torch.tensor(response)[:, None])[:, 0]
        logprobs.append(token_lp)
        total = total + token_lp.sum()
    (-total / sum(map(len, _RESPONSES))).backward()
    return logprobs, {n: p.grad for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def families_tp2(family_dirs):
    return run_distributed(_families_scenario, 2, {n: str(d) for n, d in family_dirs.items()})


@pytest.mark.slow
@pytest.mark.parametrize("name", PUBLISHED_MODELS)
def test_megatron_model_matches_transformers_at_tp2(families_tp2, family_dirs, name):
    logprobs, grads = _hf_reference(family_dirs[name])
    for rank in families_tp2:
        got = rank[name]["logprobs"]
        for ours, theirs in zip(got, logprobs):
            torch.testing.assert_close(torch.tensor(ours), theirs.detach(), rtol=0, atol=1e-4)
    ours = families_tp2[0][name]["grads"]
    for key, grad in grads.items():
        torch.testing.assert_close(ours[key], grad, rtol=1e-3, atol=1e-6,
                                   msg=lambda detail, key=key: f"{key}: {detail}")


# ------------------------------------------------------------- sharded checkpoints


def _shard(model_dir, out):
    """``model_dir``'s weights as two shards and their index, as save_pretrained writes."""
    from safetensors.torch import save_file

    tensors = load_file(str(model_dir / "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    out.mkdir()
    weight_map = {}
    for k, part in enumerate((names[:half], names[half:])):
        file = f"model-{k + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return tensors


def test_a_sharded_checkpoint_is_read_through_its_index_and_a_stale_shard_ignored(
        family_dirs, tmp_path):
    from safetensors.torch import save_file

    from trainer_svc.trainer import SafetensorsDir

    tensors = _shard(family_dirs["qwen3-0.6b"], tmp_path / "m")
    name = "model.layers.0.mlp.up_proj.weight"
    save_file({name: tensors[name].flip(0).contiguous()},
              str(tmp_path / "m" / "model-00003-of-00003.safetensors"))  # left by an old save
    loaded = SafetensorsDir(tmp_path / "m")
    assert set(loaded) == set(tensors)
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())


def test_a_tensor_in_two_files_without_an_index_is_refused(family_dirs, tmp_path):
    from safetensors.torch import save_file

    from trainer_svc.trainer import SafetensorsDir

    tensors = _shard(family_dirs["qwen3-0.6b"], tmp_path / "m")
    (tmp_path / "m" / "model.safetensors.index.json").unlink()
    name = "model.norm.weight"
    save_file({name: tensors[name]}, str(tmp_path / "m" / "stale.safetensors"))
    with pytest.raises(ValueError, match="model.norm.weight is stored in both .* stale"):
        SafetensorsDir(tmp_path / "m")
