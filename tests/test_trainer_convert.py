"""HF <-> Megatron conversion as pure functions: layouts, round trips, errors.

No process group and no megatron model here: the shards of every TP rank are built
in-process from the HF tensors. The model-backed checks (logits, TP gather over gloo)
are in test_trainer.py.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file

from trainer_svc.convert import (
    EMBED_NAME,
    ConversionError,
    HFModelSpec,
    hf_names,
    hf_shapes,
    hf_to_megatron,
    iter_export_hf,
    megatron_to_hf,
    param_rules,
)


def _hf_state(model_dir):
    return load_file(str(model_dir / "model.safetensors"))


@pytest.mark.parametrize(
    ("kind", "qkv_bias", "tied"),
    [("qwen2", True, False), ("llama", False, False), ("qwen2_tied", True, True)],
)
def test_spec_reads_architecture_from_config_json(trainer_hf_dirs, kind, qkv_bias, tied):
    spec = HFModelSpec.from_hf_config(trainer_hf_dirs[kind])
    assert (spec.num_layers, spec.hidden_size, spec.num_heads, spec.num_kv_heads) == (2, 64, 4, 2)
    assert (spec.head_dim, spec.intermediate_size, spec.vocab_size) == (16, 128, 128)
    assert spec.rope_theta == 10000.0 and spec.rms_norm_eps == 1e-6
    assert spec.qkv_bias is qkv_bias and spec.tied_embeddings is tied


@pytest.mark.parametrize("kind", ["qwen2", "llama", "qwen2_tied"])
@pytest.mark.parametrize("tp", [1, 2])
def test_hf_megatron_hf_round_trip_is_bit_exact(trainer_hf_dirs, kind, tp):
    hf = _hf_state(trainer_hf_dirs[kind])
    spec = HFModelSpec.from_hf_config(trainer_hf_dirs[kind])
    shards = [hf_to_megatron(hf, spec, rank, tp) for rank in range(tp)]
    back = megatron_to_hf(shards, spec)
    assert set(back) == set(hf) | {"lm_head.weight"}
    for name, tensor in hf.items():
        assert torch.equal(back[name], tensor), name
    if spec.tied_embeddings:
        assert "lm_head.weight" not in hf
        assert torch.equal(back["lm_head.weight"], hf[EMBED_NAME])


def test_shards_have_megatron_names_and_per_rank_shapes(trainer_hf_dir):
    hf = _hf_state(trainer_hf_dir)
    spec = HFModelSpec.from_hf_config(trainer_hf_dir)
    full = hf_to_megatron(hf, spec, 0, 1)
    half = hf_to_megatron(hf, spec, 1, 2)
    assert set(full) == set(half) == {rule.megatron for rule in param_rules(spec)}
    layer = "decoder.layers.0."
    # qkv rows: (4 q heads + 2 k + 2 v) * 16; fc1: gate + up rows
    assert full[layer + "self_attention.linear_qkv.weight"].shape == (128, 64)
    assert half[layer + "self_attention.linear_qkv.weight"].shape == (64, 64)
    assert half[layer + "self_attention.linear_qkv.bias"].shape == (64,)
    assert half[layer + "mlp.linear_fc1.weight"].shape == (128, 64)
    assert half[layer + "self_attention.linear_proj.weight"].shape == (64, 32)
    assert half[layer + "mlp.linear_fc2.weight"].shape == (64, 64)
    assert half["embedding.word_embeddings.weight"].shape == (64, 64)
    assert half["output_layer.weight"].shape == (64, 64)
    norm = layer + "input_layernorm.weight"
    assert torch.equal(half[norm], full[norm])


def test_qkv_rows_are_grouped_per_query_group_and_split_by_whole_groups(trainer_hf_dir):
    spec = HFModelSpec.from_hf_config(trainer_hf_dir)
    hd = spec.head_dim
    # Label every row with its origin: q rows 0.., k rows 1000.., v rows 2000..
    q = torch.arange(4 * hd, dtype=torch.float32)[:, None].expand(-1, 64)
    k = 1000 + torch.arange(2 * hd, dtype=torch.float32)[:, None].expand(-1, 64)
    v = 2000 + torch.arange(2 * hd, dtype=torch.float32)[:, None].expand(-1, 64)
    hf = {**_hf_state(trainer_hf_dir)}
    hf.update({"model.layers.0.self_attn.q_proj.weight": q,
               "model.layers.0.self_attn.k_proj.weight": k,
               "model.layers.0.self_attn.v_proj.weight": v})
    name = "decoder.layers.0.self_attention.linear_qkv.weight"
    for rank in range(2):
        rows = hf_to_megatron(hf, spec, rank, 2)[name][:, 0]
        # rank r holds query group r: its two q heads, then its k head, then its v head
        expected = torch.cat([q[2 * rank * hd:(2 * rank + 2) * hd, 0],
                              k[rank * hd:(rank + 1) * hd, 0], v[rank * hd:(rank + 1) * hd, 0]])
        assert torch.equal(rows, expected)


def test_fc1_shard_is_gate_part_then_up_part(trainer_hf_dir):
    hf = _hf_state(trainer_hf_dir)
    spec = HFModelSpec.from_hf_config(trainer_hf_dir)
    gate, up = hf["model.layers.1.mlp.gate_proj.weight"], hf["model.layers.1.mlp.up_proj.weight"]
    shard = hf_to_megatron(hf, spec, 1, 2)["decoder.layers.1.mlp.linear_fc1.weight"]
    assert torch.equal(shard, torch.cat([gate[64:], up[64:]]))


def test_single_process_export_streams_views_in_planned_order(trainer_hf_dirs):
    for kind in ("qwen2", "qwen2_tied"):
        hf = _hf_state(trainer_hf_dirs[kind])
        spec = HFModelSpec.from_hf_config(trainer_hf_dirs[kind])
        params = hf_to_megatron(hf, spec)
        streamed = list(iter_export_hf(params.items(), spec))
        assert [n for n, _ in streamed] == hf_names(spec) == list(hf_shapes(spec))
        assert {n: tuple(t.shape) for n, t in streamed} == hf_shapes(spec)
        out = dict(streamed)
        for name, tensor in hf.items():
            assert torch.equal(out[name], tensor), name
        # TP=1: the embedding and fc1 halves are views of the parameters, not copies
        fc1 = params["decoder.layers.0.mlp.linear_fc1.weight"]
        assert out["model.layers.0.mlp.up_proj.weight"].data_ptr() == fc1[128:].data_ptr()
        if spec.tied_embeddings:
            assert out["lm_head.weight"] is out[EMBED_NAME]


def test_export_into_destination_tensors_fills_them_in_place(trainer_hf_dir):
    hf = _hf_state(trainer_hf_dir)
    spec = HFModelSpec.from_hf_config(trainer_hf_dir)
    params = hf_to_megatron(hf, spec)
    flat = torch.full((sum(torch.Size(s).numel() for s in hf_shapes(spec).values()),), -1.0)
    dest, offset = {}, 0
    for name, shape in hf_shapes(spec).items():
        n = torch.Size(shape).numel()
        dest[name] = flat[offset:offset + n].view(shape)
        offset += n
    for name, tensor in iter_export_hf(params.items(), spec, out=dest):
        assert tensor.data_ptr() == dest[name].data_ptr()
    for name, tensor in hf.items():
        assert torch.equal(dest[name], tensor), name
    assert not (flat == -1.0).any()


def test_missing_hf_tensor_is_named(trainer_hf_dir):
    hf = _hf_state(trainer_hf_dir)
    del hf["model.layers.1.self_attn.k_proj.bias"]
    with pytest.raises(ConversionError, match="model.layers.1.self_attn.k_proj.bias"):
        hf_to_megatron(hf, trainer_hf_dir)


def test_hf_tensor_of_the_wrong_shape_is_named(trainer_hf_dir):
    hf = _hf_state(trainer_hf_dir)
    hf["model.layers.0.mlp.up_proj.weight"] = torch.zeros(64, 64)
    with pytest.raises(ConversionError, match=r"up_proj.weight has shape \(64, 64\), .*\(128"):
        hf_to_megatron(hf, trainer_hf_dir)


def test_missing_megatron_shard_entry_is_named(trainer_hf_dir):
    spec = HFModelSpec.from_hf_config(trainer_hf_dir)
    shards = [hf_to_megatron(_hf_state(trainer_hf_dir), spec, r, 2) for r in range(2)]
    del shards[1]["decoder.final_layernorm.weight"]
    with pytest.raises(ConversionError, match="shard 1 .*final_layernorm"):
        megatron_to_hf(shards, spec)


def _config(**changes):
    base = dict(model_type="qwen2", hidden_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                vocab_size=128, max_position_embeddings=512, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    return {**base, **changes}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"model_type": "llama", "attention_bias": True}, "attention_bias"),
        ({"use_sliding_window": True}, "use_sliding_window"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope_type 'yarn'"),
        ({"rope_parameters": None}, "rope_theta"),
        ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads=3"),
        ({"intermediate_size": None}, "intermediate_size"),
    ],
)
def test_unsupported_configs_fail_naming_the_field(changes, message):
    with pytest.raises(ConversionError, match=message):
        HFModelSpec.from_hf_config(_config(**changes))


def test_legacy_top_level_rope_theta_is_read():
    spec = HFModelSpec.from_hf_config(_config(rope_parameters=None, rope_theta=5e5))
    assert spec.rope_theta == 5e5


def test_tp_size_that_does_not_divide_a_dimension_is_refused(trainer_hf_dir):
    hf = _hf_state(trainer_hf_dir)
    with pytest.raises(ConversionError, match="num_key_value_heads=2 is not divisible by TP 4"):
        hf_to_megatron(hf, trainer_hf_dir, 0, 4)
    with pytest.raises(ConversionError, match="tp_rank 2 is outside"):
        hf_to_megatron(hf, trainer_hf_dir, 2, 2)
