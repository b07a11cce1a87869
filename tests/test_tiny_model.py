"""The offline tiny model: tokenizer, determinism, and loading by transformers and vLLM."""

import hashlib
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from k1rl.cli import app
from k1rl.data.tasks import generate_suite, generate_tasks
from k1rl.data.tiny_model import init_model
from k1rl.data.tokenizer import EOS_TOKEN, PAD_TOKEN, load_tokenizer, train_tokenizer

# Small enough that building one takes well under a second.
SMALL = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
             corpus_size=20)


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "model"
    return out, init_model(out, seed=0, **SMALL)


def test_directory_is_a_complete_hf_model(small_model):
    out, summary = small_model
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= names
    config = json.loads((out / "config.json").read_text())
    tokenizer = load_tokenizer(out)
    assert config["model_type"] == "qwen2" and config["dtype"] == "float32"
    assert config["vocab_size"] % 64 == 0 and config["vocab_size"] >= len(tokenizer)
    assert config["vocab_size"] == summary.vocab_size
    assert config["eos_token_id"] == tokenizer.eos_token_id == summary.eos_token_id
    assert config["pad_token_id"] == tokenizer.pad_token_id == summary.pad_token_id
    assert tokenizer.eos_token == EOS_TOKEN and tokenizer.pad_token == PAD_TOKEN
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    assert tokenizer.model_max_length == config["max_position_embeddings"] == 1024
    assert config["rope_parameters"]["rope_theta"] == 10000.0
    assert config["rms_norm_eps"] == 1e-6
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.eos_token_id


def test_tokenizer_round_trips_task_texts_and_arbitrary_text(small_model):
    tokenizer = load_tokenizer(small_model[0])
    texts = [t.prompt + t.target for t in generate_suite(5, seed=123)]
    texts += ["  two  spaces\n\nnewlines\ttab ", "unicode: Äpfel, 😀, ½", "A:1,000,000."]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.eos_token_id not in ids  # no special token is added on encode
        assert tokenizer.decode(ids) == text


def test_every_digit_is_its_own_token(small_model):
    tokenizer = load_tokenizer(small_model[0])
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        if any(c.isdigit() for c in text):
            assert text in "0123456789" and len(text) == 1, f"token {token_id} is {text!r}"
    ids = tokenizer("write 1024")["input_ids"]
    assert [tokenizer.decode([i]) for i in ids][-4:] == ["1", "0", "2", "4"]


def test_tokenizer_training_is_deterministic_and_validates():
    texts = [t.prompt + t.target for t in generate_suite(10, seed=0)]
    assert train_tokenizer(texts).to_str() == train_tokenizer(texts).to_str()
    with pytest.raises(ValueError, match="vocab_size 100 is below the byte alphabet"):
        train_tokenizer(texts, vocab_size=100)
    with pytest.raises(ValueError, match="empty corpus"):
        train_tokenizer([])


def test_same_seed_gives_identical_files_other_seed_other_weights(small_model, tmp_path):
    out, _ = small_model
    rng_before = torch.random.get_rng_state()
    init_model(tmp_path / "same", seed=0, **SMALL)
    assert torch.equal(rng_before, torch.random.get_rng_state()), "global RNG was touched"
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert _sha(out / name) == _sha(tmp_path / "same" / name), name
    init_model(tmp_path / "other", seed=1, **SMALL)
    assert _sha(out / "model.safetensors") != _sha(tmp_path / "other" / "model.safetensors")


def test_transformers_loads_it_offline_and_runs_forward(small_model):
    from transformers import AutoModelForCausalLM

    out, summary = small_model
    tokenizer = load_tokenizer(out)
    model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    assert model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == summary.params
    task = generate_tasks("add", 2, 1, seed=0)[0]
    batch = tokenizer([task.prompt + task.target], return_tensors="pt")
    with torch.no_grad():
        result = model(**batch, labels=batch["input_ids"])
    assert result.logits.shape == (1, batch["input_ids"].shape[1], summary.vocab_size)
    assert torch.isfinite(result.logits).all()
    # A fresh init predicts close to uniform: loss near log(vocab).
    assert abs(result.loss.item() - math.log(summary.vocab_size)) < 0.5


def test_tied_embeddings_store_one_matrix(tmp_path):
    from transformers import AutoModelForCausalLM

    summary = init_model(tmp_path / "tied", tie_word_embeddings=True, **SMALL)
    with safe_open(str(tmp_path / "tied" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "tied"), local_files_only=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == summary.params


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_heads": 3}, "hidden_size 64 is not divisible by num_heads 3"),
        ({"num_kv_heads": 3}, "num_heads 4 is not divisible by num_kv_heads 3"),
        ({"num_layers": 0}, "num_layers must be >= 1"),
        ({"corpus_size": 0}, "corpus_size must be >= 1"),
    ],
)
def test_bad_shapes_are_refused_naming_the_field(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        init_model(tmp_path / "bad", **{**SMALL, **kwargs})
    assert not (tmp_path / "bad").exists()


def test_cli_init_model_and_gen_tasks(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["init-model", str(tmp_path / "m"), "--hidden-size", "64",
                                 "--layers", "1", "--heads", "4", "--intermediate-size", "128",
                                 "--corpus-size", "5", "--tie-embeddings"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "m" / "config.json").read_text())["tie_word_embeddings"]
    result = runner.invoke(app, ["gen-tasks", str(tmp_path / "t.jsonl"), "--family", "multi",
                                 "--difficulty", "2", "--count", "7", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "t.jsonl").read_text().splitlines()) == 7
    result = runner.invoke(app, ["gen-tasks", str(tmp_path / "x.jsonl"), "--family", "pow"])
    assert result.exit_code != 0 and "unknown task family 'pow'" in result.output


def test_init_model_like_a_published_config_keeps_its_architecture(tmp_path):
    published = Path(__file__).parent / "data" / "published_configs" / "qwen3-0.6b.json"
    result = CliRunner().invoke(app, [
        "init-model", str(tmp_path / "m"), "--like", str(published), "--layers", "2",
        "--kv-heads", "2", "--hidden-size", "128", "--intermediate-size", "256",
        "--corpus-size", "5"])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    # Qwen3-0.6B: 16 query heads per 8 KV heads, head_dim 128 apart from the width, tied
    assert config["model_type"] == "qwen3" and config["num_hidden_layers"] == 2
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    assert (config["head_dim"], config["hidden_size"]) == (128, 128)
    assert config["tie_word_embeddings"] is True and config["rms_norm_eps"] == 1e-6
    tokenizer = load_tokenizer(tmp_path / "m")
    assert tokenizer.chat_template and config["eos_token_id"] == tokenizer.eos_token_id


def test_init_model_like_a_missing_config_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(app, ["init-model", str(tmp_path / "m"), "--like",
                                      str(tmp_path / "none.json")])
    assert result.exit_code != 0 and "no config.json" in result.output


def test_gen_tasks_writes_several_levels_and_can_leave_out_another_files_problems(tmp_path):
    runner = CliRunner()
    train = tmp_path / "train.jsonl"
    result = runner.invoke(app, ["gen-tasks", str(train), "--level", "add:1", "--level",
                                 "sub:2", "--count", "500", "--up-to", "--split", "train"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    per_level = {level: sum(level in r["tags"] for r in rows) for level in ("add:1", "sub:2")}
    assert 0 < per_level["add:1"] < 81 and per_level["sub:2"] == 500  # add:1 has 81 in all
    assert [r["tags"][1] for r in rows] == sorted(r["tags"][1] for r in rows)  # level order
    val = tmp_path / "val.jsonl"
    result = runner.invoke(app, ["gen-tasks", str(val), "--level", "sub:2", "--count", "300",
                                 "--seed", "1", "--split", "train", "--exclude", str(train)])
    assert result.exit_code == 0, result.output
    val_ids = {json.loads(line)["id"] for line in val.read_text().splitlines()}
    assert len(val_ids) == 300 and not val_ids & {r["id"] for r in rows}
    result = runner.invoke(app, ["gen-tasks", str(tmp_path / "x.jsonl"), "--level", "add:1",
                                 "--count", "500"])
    assert result.exit_code != 0 and "found only" in result.output


_VLLM_SCRIPT = textwrap.dedent(
    """
    import json, sys

    def main():
        from vllm import LLM, SamplingParams
        llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=256,
                  seed=0)
        params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=0)
        out = llm.generate([sys.argv[2]], params)[0]
        sample = out.outputs[0]
        print("RESULT " + json.dumps({
            "prompt_token_ids": list(out.prompt_token_ids),
            "token_ids": list(sample.token_ids),
            "text": sample.text,
            "logprobs": [lp[t].logprob for lp, t in zip(sample.logprobs, sample.token_ids)],
        }))

    if __name__ == "__main__":
        main()
    """
)


@pytest.mark.slow
def test_vllm_serves_it_like_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "model"
    init_model(out, seed=0)  # the default size, as the system runs it
    prompt = generate_tasks("add", 2, 1, seed=0)[0].prompt
    script = tmp_path / "run_vllm.py"
    script.write_text(_VLLM_SCRIPT)
    # In-process engine: no spawned engine process, 4-6 s start instead of ~30 s.
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
           "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(script), str(out), prompt], env=env,
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    got = json.loads(lines[-1][len("RESULT "):])

    tokenizer = load_tokenizer(out)
    prompt_ids = tokenizer(prompt)["input_ids"]
    assert got["prompt_token_ids"] == prompt_ids
    assert len(got["token_ids"]) == 8
    assert got["text"] == tokenizer.decode(got["token_ids"])
    # Greedy continuation and its log-probs match transformers on the same weights.
    model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    ids = torch.tensor([prompt_ids + got["token_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, len(prompt_ids) - 1 : -1], dim=-1)
    assert logp.argmax(-1).tolist() == got["token_ids"]
    hf = logp.gather(1, torch.tensor(got["token_ids"])[:, None])[:, 0]
    assert torch.allclose(hf, torch.tensor(got["logprobs"]), atol=1e-3)
