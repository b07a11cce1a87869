"""Long2short (k1.5 §2.4): merging is the exact weighted average, the shortest correct
response and the DPO pairs follow the 1.5x rule, the RL preset cuts the length and turns
the penalty on, and `k1rl merge`, `k1rl long2short sample` and `k1rl long2short dpo` run
end to end on the tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from k1rl.config import RunConfig
from k1rl.data.problem import Problem
from k1rl.long2short.dpo import batches, dpo_config, train_batch
from k1rl.long2short.merge import check_weights, merge_checkpoints
from k1rl.long2short.pairs import dpo_pairs, shortest_correct
from k1rl.long2short.preset import long2short_rl
from k1rl.long2short.rejection import write_outputs
from k1rl.master.responses import Response
from k1rl.yaml_config import ConfigError

# ----------------------------------------------------------------------- merging


def write_model(path: Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    path.mkdir(parents=True)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config))
    (path / "tokenizer.json").write_text("{}")
    return path


def test_merge_is_the_weighted_average_in_the_first_models_dtype(tmp_path):
    a = write_model(tmp_path / "a", {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
                                     "h": torch.tensor([1.0, 0.0], dtype=torch.bfloat16)},
                    {"model_type": "qwen2", "from": "a"})
    b = write_model(tmp_path / "b", {"w": torch.tensor([[5.0, 6.0], [7.0, 8.0]]),
                                     "h": torch.tensor([3.0, 2.0], dtype=torch.bfloat16)},
                    {"model_type": "qwen2", "from": "b"})
    merge_checkpoints([a, b], [0.25, 0.75], tmp_path / "m")
    out = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert torch.equal(out["w"], torch.tensor([[4.0, 5.0], [6.0, 7.0]]))
    assert out["h"].dtype == torch.bfloat16 and torch.equal(out["h"].float(),
                                                           torch.tensor([2.5, 1.5]))
    assert json.loads((tmp_path / "m" / "config.json").read_text())["from"] == "a"
    assert (tmp_path / "m" / "tokenizer.json").is_file()
    merge_checkpoints([a, b], None, tmp_path / "even")  # default: equal weights
    assert torch.equal(load_file(str(tmp_path / "even" / "model.safetensors"))["w"],
                       torch.tensor([[3.0, 4.0], [5.0, 6.0]]))


def test_merge_refuses_models_that_do_not_match_and_bad_weights(tmp_path):
    a = write_model(tmp_path / "a", {"w": torch.zeros(2, 2)}, {})
    wide = write_model(tmp_path / "wide", {"w": torch.zeros(2, 3)}, {})
    other = write_model(tmp_path / "other", {"v": torch.zeros(2, 2)}, {})
    with pytest.raises(ValueError, match="shape"):
        merge_checkpoints([a, wide], None, tmp_path / "m1")
    with pytest.raises(ValueError, match="different tensors"):
        merge_checkpoints([a, other], None, tmp_path / "m2")
    for weights, message in (([0.5], "1 weights for 2"), ([0.7, 0.7], "sum to 1"),
                             ([1.5, -0.5], "positive")):
        with pytest.raises(ValueError, match=message):
            check_weights(weights, 2)
    with pytest.raises(ValueError, match="at least two"):
        check_weights(None, 1)
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        merge_checkpoints([a, tmp_path], None, tmp_path / "m3")


# ------------------------------------------------------------ shortest and pairs


def test_the_shortest_correct_response_is_chosen_and_ties_go_to_the_first():
    assert shortest_correct([False, True, True, True], [5, 30, 20, 20]) == 2
    assert shortest_correct([False, False], [5, 6]) is None


def test_dpo_negatives_are_wrong_answers_and_correct_ones_at_least_one_and_a_half_longer():
    correct = [True, True, True, True, False]
    lengths = [20, 29, 30, 45, 10]
    # 29 < 1.5 x 20 = 30 <= 30: the 29-token correct answer is no negative, the 30 one is
    assert dpo_pairs(correct, lengths) == [(0, 2), (0, 3), (0, 4)]
    assert dpo_pairs(correct, lengths, length_ratio=2.5) == [(0, 4)]
    assert dpo_pairs([False, False], [3, 4]) == []
    with pytest.raises(ValueError, match="2 verdicts for 3"):
        dpo_pairs([True, False], [1, 2, 3])


def response(text: str, tokens: int, correct: bool) -> Response:
    return Response(text=text, prompt_token_ids=[7, 8], token_ids=list(range(tokens)),
                    logprobs=[-0.5] * tokens, finish_reason="stop", correct=correct,
                    reward=float(correct))


def test_rejection_sampling_writes_the_shortest_correct_as_sft_and_the_pairs(tmp_path):
    problems = [Problem(id="p0", prompt="2+3?", answer="5"),
                Problem(id="p1", prompt="4+4?", answer="8"),
                Problem(id="p2", prompt="9+9?", answer="18")]
    sampled = [
        [response(" long 5", 40, True), response(" 5", 10, True), response(" 6", 8, False),
         response(" mid 5", 14, True)],
        [response(" 7", 5, False), response(" 9", 6, False), response(" 1", 5, False),
         response(" 2", 5, False)],
        [response(" 18", 12, True), response(" 18!", 12, True), response(" 18?", 13, True),
         response(" 18.", 17, True)],
    ]
    report = write_outputs(tmp_path, problems, sampled, 1.5)
    sft = [json.loads(x) for x in (tmp_path / "sft.jsonl").read_text().splitlines()]
    assert [(r["id"], r["response"]) for r in sft] == [("p0", " 5"), ("p2", " 18")]
    pairs = [json.loads(x) for x in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert [(p["id"], p["chosen"], p["rejected"], p["rejected_is"]) for p in pairs] == [
        ("p0", " 5", " long 5", "long"), ("p0", " 5", " 6", "wrong")]
    groups = [json.loads(x) for x in (tmp_path / "groups.jsonl").read_text().splitlines()]
    assert [g["id"] for g in groups] == ["p0"]  # p2 has no pair: 17 < 1.5 x 12
    assert [s["correct"] for s in groups[0]["samples"]] == [True, True, False, True]
    assert (report.prompts, report.prompts_with_correct, report.pairs, report.pairs_long,
            report.pairs_wrong, report.groups) == (3, 2, 2, 1, 1, 1)
    assert report.mean_tokens_kept == 11.0 and report.pass1 == 7 / 12


# --------------------------------------------------------------- DPO and preset


def test_dpo_batches_carry_each_groups_samples_with_their_verdict_as_reward():
    groups = [{"prompt_token_ids": [1, 2], "samples": [
        {"token_ids": [3], "logprobs": [-1.0], "correct": True},
        {"token_ids": [4, 5], "logprobs": [-1.0, -2.0], "correct": False}]}] * 2
    batch = train_batch(groups)
    assert [(s.group_id, s.reward, s.response_token_ids) for s in batch.samples] == [
        (0, 1.0, [3]), (0, 0.0, [4, 5]), (1, 1.0, [3]), (1, 0.0, [4, 5])]
    chunks = list(batches(list(range(5)), epochs=2, per_step=2, seed=0))
    assert [len(c) for c in chunks] == [2, 2, 1, 2, 2, 1]
    assert sorted(x for c in chunks[:3] for x in c) == [0, 1, 2, 3, 4]


def test_dpo_trains_the_dpo_loss_against_the_sampling_model():
    cfg = dpo_config(RunConfig(), "t")
    assert cfg.trainer.loss.name == "dpo" and cfg.trainer.loss.length_ratio == 1.5
    assert cfg.trainer.reference == "rollout"
    mine = RunConfig.model_validate({"trainer": {"loss": {"name": "dpo", "beta": 0.3}}})
    assert dpo_config(mine, "t").trainer.loss.beta == 0.3
    clash = RunConfig.model_validate({"trainer": {"loss": {"name": "dpo", "length_ratio": 2.0}}})
    with pytest.raises(ConfigError, match="long2short.length_ratio"):
        dpo_config(clash, "t")


def test_the_long2short_rl_preset_turns_the_penalty_on_and_cuts_the_length():
    cfg = RunConfig.model_validate({
        "rollout": {"max_tokens": 300}, "reward": {"length_penalty_weight": 0.0,
                                                   "length_penalty_warmup_iters": 20},
        "long2short": {"rl": {"length_penalty_weight": 0.3, "max_tokens_fraction": 0.4}}})
    out = long2short_rl(cfg)
    assert out.rollout.max_tokens == 120
    assert (out.reward.length_penalty_weight, out.reward.length_penalty_warmup_iters) == (0.3, 0)


# ------------------------------------------------------------------ end to end


def test_k1rl_merge_averages_two_tiny_models(tmp_path, trainer_model_dir):
    from k1rl.data.tiny_model import init_model

    other = tmp_path / "other"
    init_model(other, seed=1, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
               intermediate_size=256, corpus_size=50)
    out = subprocess.run([sys.executable, "-m", "k1rl", "merge", str(trainer_model_dir),
                          str(other), "--weights", "0.3", "--weights", "0.7", "--out",
                          str(tmp_path / "m")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    a, b = (load_file(str(p / "model.safetensors")) for p in (trainer_model_dir, other))
    merged = load_file(str(tmp_path / "m" / "model.safetensors"))
    for name, t in merged.items():
        assert torch.equal(t, (0.3 * a[name].double() + 0.7 * b[name].double()).to(t.dtype))


@pytest.mark.slow
def test_k1rl_long2short_sample_writes_consistent_files(tmp_path, trainer_model_dir):
    data = tmp_path / "add.jsonl"
    subprocess.run([sys.executable, "-m", "k1rl", "gen-tasks", str(data), "--family", "add",
                    "--difficulty", "1", "--count", "5"], check=True, timeout=120)
    cfg = RunConfig.model_validate({"rollout": {"max_tokens": 12},
                                    "long2short": {"data": [{"path": str(data)}]}})
    config = tmp_path / "run.yaml"
    config.write_text(cfg.dump_yaml())
    out = subprocess.run(
        [sys.executable, "-m", "k1rl", "long2short", "sample", "--config", str(config),
         "--out", str(tmp_path / "s"), "--model", str(trainer_model_dir)],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert (report["prompts"], report["samples_per_prompt"]) == (5, 8)
    assert 0 < report["mean_tokens"] <= 12
    lines = {name: (tmp_path / "s" / name).read_text().splitlines()
             for name in ("sft.jsonl", "pairs.jsonl", "groups.jsonl")}
    assert len(lines["sft.jsonl"]) == report["sft_rows"] == report["prompts_with_correct"]
    assert len(lines["pairs.jsonl"]) == report["pairs"]
    assert len(lines["groups.jsonl"]) == report["groups"]
    assert report["model"] == str(trainer_model_dir.resolve())


def sequence_logprob(model, prompt_ids: list[int], response_ids: list[int]) -> float:
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, :-1].float()
    picked = torch.log_softmax(logits, -1)[torch.arange(ids.shape[1] - 1), ids[0, 1:]]
    return picked[len(prompt_ids) - 1:].sum().item()


@pytest.mark.slow
def test_k1rl_long2short_dpo_prefers_the_short_correct_answer(tmp_path, trainer_model_dir):
    """Groups written as `long2short sample` writes them (the reference log-probs the tiny
    model's own): after DPO the short correct answer gains on the long and the wrong one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(trainer_model_dir))
    base = AutoModelForCausalLM.from_pretrained(str(trainer_model_dir), torch_dtype=torch.float32)
    groups = []
    for a, b in ((2, 3), (4, 1), (3, 3), (6, 2)):
        prompt = tok.encode(f"Q: Max has {a} pens and {b} pens. How many pens?\nA:")
        texts = [(f" The answer is {a + b}.", True),
                 (f" {a} + {b}: {a} + {b} = {a + b}, write {a + b}; result {a + b}. Check: "
                  f"{a} + {b} = {a + b}. The answer is {a + b}.", True),
                 (f" The answer is {a + b + 1}.", False)]
        samples = []
        for text, ok in texts:
            ids = tok.encode(text)
            lp = sequence_logprob(base, prompt, ids)
            samples.append({"token_ids": ids, "logprobs": [lp / len(ids)] * len(ids),
                            "correct": ok})
        groups.append({"id": f"{a}+{b}", "prompt_token_ids": prompt, "samples": samples})
    sampled = tmp_path / "samples"
    sampled.mkdir()
    (sampled / "groups.jsonl").write_text("".join(json.dumps(g) + "\n" for g in groups))
    (sampled / "report.json").write_text(json.dumps({"model": str(trainer_model_dir)}))
    cfg = RunConfig.model_validate({"trainer": {"lr": 3e-3, "optimizer_policy": "keep"},
                                    "long2short": {"dpo": {"epochs": 4, "prompts_per_step": 2}}})
    config = tmp_path / "run.yaml"
    config.write_text(cfg.dump_yaml())
    out = subprocess.run(
        [sys.executable, "-m", "k1rl", "long2short", "dpo", "--config", str(config),
         "--samples", str(sampled), "--run-dir", str(tmp_path / "dpo")],
        capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    steps = (tmp_path / "dpo" / "dpo_metrics.jsonl").read_text().splitlines()
    assert len(steps) == 8  # 4 epochs of 4 groups, 2 per step
    tuned = AutoModelForCausalLM.from_pretrained(str(tmp_path / "dpo" / "final"),
                                                 torch_dtype=torch.float32)

    def margins(model) -> list[tuple[float, float]]:
        out = []
        for g in groups:
            short, long, wrong = (sequence_logprob(model, g["prompt_token_ids"], s["token_ids"])
                                  for s in g["samples"])
            out.append((short - long, short - wrong))
        return out

    for (long0, wrong0), (long1, wrong1) in zip(margins(base), margins(tuned)):
        assert long1 > long0 and wrong1 > wrong0


@pytest.mark.slow
def test_k1rl_rl_preset_long2short_trains_with_the_penalty_on_and_the_length_cut(
        tmp_path, trainer_model_dir):
    from k1rl.launch import free_tcp_address

    cfg = RunConfig(run_id="l2s", seed=0)
    cfg.model.path = str(trainer_model_dir)
    for section in (cfg.trainer, cfg.rollout, cfg.reward, cfg.checkpoint_engine):
        section.address = free_tcp_address()
    cfg.rollout.n, cfg.rollout.max_tokens = 4, 16
    cfg.rl.iterations, cfg.rl.prompts_per_iteration, cfg.rl.pool_size = 1, 4, 20
    cfg.reward.length_penalty_weight, cfg.reward.length_penalty_warmup_iters = 0.0, 5
    config = tmp_path / "run.yaml"
    config.write_text(cfg.dump_yaml())
    out = subprocess.run(
        [sys.executable, "-m", "k1rl", "rl", "--config", str(config), "--run-dir",
         str(tmp_path / "run"), "--preset", "long2short"],
        capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    [row] = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text()
             .splitlines()]
    assert (row["max_tokens"], row["length_penalty_weight"]) == (8, 0.5)
    assert row["response_tokens_mean"] <= 8
    bad = subprocess.run([sys.executable, "-m", "k1rl", "rl", "--config", str(config),
                          "--preset", "shorter"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "long2short" in bad.stdout + bad.stderr
