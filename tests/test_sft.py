"""`k1rl sft` (k1rl/sft/): staged learning-rate schedules, problems turned into SFT examples
(raw or through the chat template, loss on assistant turns only or on every token), and
the command end to end on the tiny model."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from k1rl.config import ConfigError, RunConfig
from k1rl.data.problem import Problem
from k1rl.data.prompts import PromptConfig
from k1rl.sft.config import SFTStage
from k1rl.sft.examples import SFTEncoder

# ------------------------------------------------------------------ schedules


def test_a_stage_warms_up_then_decays_to_its_floor_at_its_last_step():
    stage = SFTStage(steps=12, lr=1.0, warmup_steps=2, min_lr_fraction=0.1)
    lrs = [stage.lr_at(s, 12) for s in range(12)]
    assert lrs[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))  # cosine: never rises after warm-up
    linear = SFTStage(steps=5, lr=1.0, decay="linear", min_lr_fraction=0.0)
    assert [linear.lr_at(s, 5) for s in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    constant = SFTStage(steps=3, lr=0.2, decay="constant")
    assert {constant.lr_at(s, 3) for s in range(3)} == {0.2}


def test_a_stage_is_steps_or_epochs_long():
    assert SFTStage(epochs=1.5, lr=1e-3).total_steps(rows=100, batch=16) == 10  # ceil(9.4)
    assert SFTStage(steps=7, lr=1e-3).total_steps(rows=100, batch=16) == 7
    with pytest.raises(ConfigError, match="exactly one of steps or epochs"):
        RunConfig.from_yaml_text("sft: {stages: [{lr: 1.0e-3}]}")
    with pytest.raises(ConfigError, match="exactly one of steps or epochs"):
        RunConfig.from_yaml_text("sft: {stages: [{lr: 1.0e-3, steps: 2, epochs: 1}]}")


# ------------------------------------------------------------------ examples


@pytest.fixture(scope="module")
def tokenizer(chat_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(chat_model_dir))


def test_a_raw_example_learns_the_response_and_its_eos(tokenizer):
    enc = SFTEncoder(PromptConfig(), tokenizer)
    ex = enc.encode(Problem(id="a", prompt="Q: 2+3 A:", answer="5", response=" 5"))
    # as the engine gets a raw prompt: no special tokens added
    assert ex.prompt_token_ids == tokenizer.encode("Q: 2+3 A:", add_special_tokens=False)
    assert ex.response_token_ids == [*tokenizer.encode(" 5", add_special_tokens=False),
                                     tokenizer.eos_token_id]
    assert ex.response_mask is None
    every = SFTEncoder(PromptConfig(), tokenizer, loss_on="all").encode(
        Problem(id="a", prompt="Q: 2+3 A:", answer="5", response=" 5"))
    assert every.prompt_token_ids + every.response_token_ids == (
        ex.prompt_token_ids + ex.response_token_ids)
    assert len(every.prompt_token_ids) == 1  # the first token has nothing to predict it


def test_a_multi_turn_chat_learns_only_the_assistant_turns(tokenizer):
    enc = SFTEncoder(PromptConfig(template="chat", system_prompt="Be brief."), tokenizer)
    turns = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
             {"role": "user", "content": "times 3?"}]
    ex = enc.encode(Problem(id="c", messages=turns, answer="12", response="12"))
    full = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, *turns,
         {"role": "assistant", "content": "12"}], tokenize=True, return_dict=False)
    assert ex.prompt_token_ids + ex.response_token_ids == list(full)
    learned = [t for t, keep in zip(ex.response_token_ids, ex.response_mask) if keep]
    # each assistant turn's content and the newline that ends it; never the user's turn
    assert tokenizer.decode(learned) == "4\n12\n"
    assert tokenizer.decode(ex.prompt_token_ids).endswith("<|assistant|>")


def test_a_row_with_nothing_to_learn_or_an_unmaskable_template_is_refused(tokenizer):
    enc = SFTEncoder(PromptConfig(template="chat"), tokenizer)
    with pytest.raises(ValueError, match="q: no response to learn from"):
        enc.encode(Problem(id="q", messages=[{"role": "user", "content": "hi"}], answer="1"))
    with pytest.raises(ValueError, match="r: no response to learn from"):
        SFTEncoder(PromptConfig(), tokenizer).encode(Problem(id="r", prompt="hi", answer="1"))
    # a template that drops past assistant turns' content once a later turn follows
    tokenizer = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
        "<|assistant|>\n{% else %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
             {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    with pytest.raises(ValueError, match="renders turn 1 differently.*loss_on: all"):
        SFTEncoder(PromptConfig(template="chat"), tokenizer).encode(
            Problem(id="s", messages=turns, answer="d"))
    assert SFTEncoder(PromptConfig(template="chat"), tokenizer, loss_on="all").encode(
        Problem(id="s", messages=turns, answer="d")).response_mask is None


def test_a_conversation_opening_with_the_assistant_keeps_one_token_of_context(tokenizer):
    enc = SFTEncoder(PromptConfig(template="chat"), tokenizer)
    turns = [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "hi"},
             {"role": "assistant", "content": "bye"}]
    ex = enc.encode(Problem(id="o", messages=turns, answer="-"))
    assert len(ex.prompt_token_ids) >= 1
    assert tokenizer.decode([t for t, keep in zip(ex.response_token_ids, ex.response_mask)
                             if keep]).endswith("bye\n")


def test_a_mask_leaves_tokens_out_of_the_loss_as_if_they_were_prompt():
    from trainer_svc import build_token_batch

    masked = build_token_batch([[1, 2]], [[3, 4, 5, 6]], rows=[[0]],
                               masks=[[False, False, True, True]])
    moved = build_token_batch([[1, 2, 3, 4]], [[5, 6]], rows=[[0]])
    assert masked.labels.tolist() == moved.labels.tolist()
    assert masked.loss_mask.tolist() == moved.loss_mask.tolist()
    assert masked.num_response_tokens == 2


def test_k1rl_sft_needs_rows_and_stages(tmp_path):
    from k1rl.sft.run import run_sft

    with pytest.raises(ConfigError, match="needs sft.data.train and sft.stages"):
        run_sft(RunConfig(), tmp_path / "run")


# ------------------------------------------------------------------ end to end


def _rows(tmp_path, family, split, count):
    path = tmp_path / f"{family}-{split}.jsonl"
    subprocess.run([sys.executable, "-m", "k1rl", "gen-tasks", str(path), "--family", family,
                    "--difficulty", "2", "--count", str(count), "--split", split], check=True,
                   capture_output=True, timeout=120)
    return str(path)


@pytest.mark.slow
def test_k1rl_sft_trains_in_stages_and_writes_an_hf_checkpoint(tmp_path, chat_model_dir):
    from k1rl.launch import free_tcp_address

    model = chat_model_dir
    dialogues = tmp_path / "dialogues.jsonl"  # two assistant turns each: masked loss
    dialogues.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"{i}+1?"}, {"role": "assistant", "content": str(i + 1)},
        {"role": "user", "content": "and +2?"},
        {"role": "assistant", "content": str(i + 3)}], "answer": str(i + 3)}) + "\n"
        for i in range(40)))
    train = [_rows(tmp_path, "add", "train", 200), _rows(tmp_path, "sub", "train", 200),
             str(dialogues)]
    rows = sum(len(open(path).readlines()) for path in train)
    cfg = RunConfig.model_validate({
        "run_id": "sft", "seed": 0, "model": {"path": str(model)},
        "trainer": {"address": free_tcp_address(), "seq_length": 128},
        "rollout": {"max_model_len": 128},
        "sft": {"data": {"train": [{"path": path} for path in train],
                         "eval": [{"path": _rows(tmp_path, "add", "heldout", 40)}],
                         "prompt": {"template": "chat"}},
                "batch": 16, "eval_every": 4, "eval_examples": 24,
                "stages": [{"steps": 8, "lr": 5.0e-3, "warmup_steps": 2},
                           {"epochs": 0.25, "lr": 1.0e-3, "decay": "linear",
                            "seq_length": 256}]}})
    config = tmp_path / "sft.yaml"
    config.write_text(cfg.dump_yaml())
    run_dir = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "k1rl", "sft", "--config", str(config),
                          "--run-dir", str(run_dir)], capture_output=True, text=True,
                         timeout=900, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "sft_metrics.jsonl").open()]
    second = math.ceil(0.25 * rows / 16)  # a quarter pass in batches of 16
    assert [r["stage"] for r in records] == [0] * 8 + [1] * second
    assert records[0]["lr"] == pytest.approx(2.5e-3)  # warm-up: (0 + 1) / 2 of the peak
    assert records[8]["lr"] == pytest.approx(1.0e-3)  # the second stage starts at its peak
    assert records[-1]["lr"] == pytest.approx(1.0e-4)  # ... and ends at its floor
    validated = [r["step"] for r in records if "val_loss" in r]
    assert validated == [*range(3, 8 + second, 4), *([7 + second] if (8 + second) % 4 else [])]
    assert records[-1]["val_loss"] < records[3]["val_loss"]  # it learns the held-out rows
    assert (run_dir / "final" / "config.json").is_file()
    assert (run_dir / "sft_loss.png").is_file()
    assert f"sft done: {8 + second} steps" in out.stdout


def _sft_config(model, tmp_path, **sft) -> RunConfig:
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "answer": str(2 * i),
                                        "response": f" {2 * i}"}) + "\n" for i in range(30)))
    return RunConfig.model_validate({"model": {"path": str(model)}, "sft": {
        "data": {"train": [{"path": str(rows)}], "heldout_fraction": 0.0},
        "stages": [{"steps": 1, "lr": 1.0e-3}], **sft}})


def test_rows_longer_than_a_stages_packed_rows_are_refused_before_training(
        tmp_path, trainer_model_dir):
    from k1rl.sft.run import encoded_rows

    cfg = _sft_config(trainer_model_dir, tmp_path,
                      stages=[{"steps": 1, "lr": 1.0e-3}, {"steps": 1, "lr": 1.0e-3,
                                                            "seq_length": 4}])
    with pytest.raises(ValueError, match=r"30 rows are longer than stage 1's 4-token rows"):
        encoded_rows(cfg, tmp_path / "cache")


def test_validation_without_held_out_rows_is_refused(tmp_path, trainer_model_dir):
    from k1rl.sft.run import encoded_rows

    cfg = _sft_config(trainer_model_dir, tmp_path, eval_every=5)
    with pytest.raises(ValueError, match="no held-out rows"):
        encoded_rows(cfg, tmp_path / "cache")


def test_overrides_apply_to_the_file_before_validation(tmp_path):
    from k1rl.config import load_config

    config = tmp_path / "run.yaml"
    config.write_text("run_id: x\n")  # no rl.tasks: they would default to synthetic levels
    cfg = load_config(config, ["data.train=[{path: rows.jsonl}]", "rl.iterations=3"])
    assert [s.path for s in cfg.data.train] == ["rows.jsonl"] and cfg.rl.tasks is None
    assert cfg.rl.iterations == 3


def test_each_command_checks_the_data_it_reads(tmp_path, trainer_model_dir):
    from k1rl.preflight import check_paths

    cfg = RunConfig.model_validate({
        "model": {"path": str(trainer_model_dir)},
        "data": {"train": [{"path": str(tmp_path / "rl.jsonl")}]},
        "sft": {"data": {"train": [{"path": str(tmp_path / "sft.jsonl")}]}}})
    with pytest.raises(ConfigError) as rl:
        check_paths(cfg, "run.yaml")
    assert [p.split(":")[0] for p in rl.value.problems] == ["data.train[0].path"]
    with pytest.raises(ConfigError) as sft:
        check_paths(cfg, "run.yaml", sections=("sft.data",))
    assert [p.split(":")[0] for p in sft.value.problems] == ["sft.data.train[0].path"]


@pytest.mark.slow
def test_sft_stops_at_the_first_measurement_reaching_stop_when(tmp_path, trainer_model_dir):
    """The stop rule on its own: the sampled accuracies are scripted here (the real
    measurement through vLLM and reward_svc is the miniature demo's, tests/test_demo.py)."""
    from k1rl.launch import free_tcp_address
    from k1rl.metrics.record import Accuracy
    from k1rl.sft.run import _trainer, encoded_rows, train_stages

    cfg = _sft_config(trainer_model_dir, tmp_path, stages=[{"steps": 10, "lr": 1.0e-3}],
                      stop_when={"accuracy": 0.3, "every": 2, "min_steps": 4,
                                 "data": [{"path": str(tmp_path / "rows.jsonl")}]})
    cfg.trainer.address = free_tcp_address()
    config = tmp_path / "sft.yaml"
    config.write_text(cfg.dump_yaml())
    measured = iter([0.1, 0.35, 0.9])
    train, heldout = encoded_rows(cfg, tmp_path / "cache")
    with _trainer(cfg, config, tmp_path / "logs") as (trainer, _):
        history = train_stages(cfg, trainer, train, heldout, tmp_path / "metrics.jsonl",
                               lambda: Accuracy(accuracy=next(measured), greedy=0.0))
    assert [r.step + 1 for r in history if r.val] == [4, 6]  # due from step 4, every 2
    assert len(history) == 6  # stopped at 0.35 >= 0.3, four steps before the stage's end
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert [r.get("val_accuracy") for r in rows] == [None] * 3 + [0.1, None, 0.35]


def test_stop_when_is_due_every_n_steps_from_min_steps_on(tmp_path):
    from k1rl.sft.config import SFTStop

    stop = SFTStop(accuracy=0.2, every=20, min_steps=200, data=[{"path": "v.jsonl"}])
    assert [n for n in range(1, 301) if stop.due(n)] == [200, 220, 240, 260, 280, 300]


def test_stop_when_problems_are_checked_before_anything_starts(tmp_path, trainer_model_dir):
    from k1rl.preflight import check_paths

    cfg = _sft_config(trainer_model_dir, tmp_path,
                      stop_when={"accuracy": 0.2, "data": [{"path": str(tmp_path / "v.jsonl")}]})
    with pytest.raises(ConfigError) as err:
        check_paths(cfg, "sft.yaml", sections=("sft.data",))
    assert [p.split(":")[0] for p in err.value.problems] == ["sft.stop_when.data[0].path"]
