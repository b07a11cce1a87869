"""A run's problems (k1rl/master/problems.py, k1rl/data/problem.py): data sources and
synthetic levels become the same pools and held-out set; chat prompts reach the engine as
the token ids transformers' chat template gives."""

from __future__ import annotations

import json
import random

import pytest

from k1rl.config import RunConfig
from k1rl.data.problem import ChainedPool, DatasetPool, Problem, pool_values
from k1rl.data.prompts import PromptConfig, PromptRenderer
from k1rl.master import samplers
from k1rl.master.problems import load_problems


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _data_config(tmp_path, **rl) -> RunConfig:
    math = _jsonl(tmp_path / "math.jsonl", [
        {"id": f"m{i}", "messages": [{"role": "user", "content": f"What is {i}+{i}?"}],
         "answer": str(2 * i), "difficulty": i % 3} for i in range(60)])
    code = _jsonl(tmp_path / "code.jsonl", [
        {"id": f"c{i}", "prompt": f"Print n+{i}.",
         "input_output": json.dumps({"inputs": ["1\n"], "outputs": [f"{1 + i}\n"]}),
         "difficulty": 1} for i in range(40)])
    return RunConfig.model_validate({
        "rl": {"prompts_per_iteration": 8, "eval_problems": 4, **rl},
        "data": {"train": [{"path": math}, {"path": code, "fields": {"tests": "input_output"}}],
                 "heldout_fraction": 0.2}})


def test_each_data_source_is_a_training_pool_and_a_level(tmp_path):
    problems = load_problems(_data_config(tmp_path), tmp_path / "cache")
    math, code = problems.train
    assert isinstance(math, DatasetPool) and (math.level, code.level) == ("math", "code")
    assert 60 < len(math) + len(code) < 100  # the rest is held out (heldout_fraction)
    assert [(p.level, len(p)) for p in problems.heldout] == [("math", 4), ("code", 4)]
    assert problems.verifiers() == {"math", "code"}
    first = math[0]
    assert first.level == "math" and first.messages[0].content.startswith("What is")
    assert code[0].verifier == "code" and json.loads(code[0].answer)["tests"]
    held = {p.id for p in problems.heldout_problems()}
    assert held and not held & set(pool_values(math, "id") + pool_values(code, "id"))


def test_samplers_draw_the_same_way_from_data_pools_and_from_lists(tmp_path):
    problems = load_problems(_data_config(tmp_path, sampler="prioritized"), tmp_path / "c")
    as_lists = [list(pool) for pool in problems.train]
    for name in ("uniform", "prioritized", "curriculum"):
        rl = _data_config(tmp_path, sampler=name).rl
        lazy = samplers.create(rl, problems.train).sample(random.Random(4), 3)
        eager = samplers.create(rl, as_lists).sample(random.Random(4), 3)
        assert lazy == eager and len(lazy) == 8, name


def test_task_weights_weigh_the_data_sources(tmp_path):
    cfg = _data_config(tmp_path, task_weights=[3, 1])
    problems = load_problems(cfg, tmp_path / "c")
    drawn = samplers.create(cfg.rl, problems.train).sample(random.Random(0), 0)
    assert [p.level for p in drawn] == ["math"] * 6 + ["code"] * 2
    with pytest.raises(ValueError, match="2 weights for 3 data.train sources"):
        RunConfig.model_validate({"rl": {"task_weights": [1, 1]}, "data": {"train": [
            {"path": "a.jsonl"}, {"path": "b.jsonl"}, {"path": "c.jsonl"}]}})


def test_curriculum_needs_a_difficulty_on_every_problem(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "answer": "1"}])
    cfg = RunConfig.model_validate({"rl": {"sampler": "curriculum"},
                                    "data": {"train": [{"path": path}]}})
    with pytest.raises(ValueError, match="needs a difficulty for every problem; 1 have"):
        samplers.create(cfg.rl, load_problems(cfg, tmp_path / "c").train)


def test_synthetic_levels_are_pools_of_the_same_problems():
    cfg = RunConfig()
    cfg.rl.tasks = ["add:1", "sub:1"]
    cfg.rl.pool_size = 5
    cfg.rl.eval_problems = 3
    problems = load_problems(cfg)
    assert [[p.level for p in pool] for pool in problems.heldout] == [["add:1"] * 3,
                                                                      ["sub:1"] * 3]
    assert [[p.level for p in pool] for pool in problems.train] == [["add:1"] * 5,
                                                                    ["sub:1"] * 5]
    first = problems.train[0][0]
    assert first.prompt.startswith("Q:") and first.answer.isdigit()
    assert first.response.endswith(f"The answer is {first.answer}.")


def test_a_chained_pool_indexes_across_pools():
    pools = [[Problem(id=f"a{i}", prompt="p", answer="1") for i in range(3)],
             [Problem(id=f"b{i}", prompt="p", answer="1") for i in range(2)]]
    chained = ChainedPool(pools)
    assert len(chained) == 5 and chained[3].id == "b0" and chained[-1].id == "b1"
    assert [p.id for p in chained] == ["a0", "a1", "a2", "b0", "b1"]
    assert pool_values(chained, "id") == ["a0", "a1", "a2", "b0", "b1"]
    with pytest.raises(IndexError):
        chained[5]


def test_a_replay_buffer_saved_with_synthetic_tasks_still_loads():
    from k1rl.data.tasks import generate_tasks

    task = generate_tasks("add", 2, 1, seed=0)[0]
    problem = Problem.model_validate(task.model_dump())
    assert (problem.id, problem.prompt, problem.level) == (task.id, task.prompt, "add:2")


# ------------------------------------------------------------------ prompt rendering


def test_chat_prompts_are_the_token_ids_transformers_gives(chat_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(chat_model_dir))
    cfg = PromptConfig(template="chat", system_prompt="Think step by step.")
    renderer = PromptRenderer(cfg, chat_model_dir)
    chat = Problem(id="1", messages=[{"role": "user", "content": "What is 2+2?"}], answer="4")
    raw = Problem(id="2", prompt="What is 3+3?", answer="6")
    fields = renderer.request_fields([chat, raw])
    expected = [tok.apply_chat_template(
        [{"role": "system", "content": "Think step by step."},
         {"role": "user", "content": text}], add_generation_prompt=True, tokenize=True,
        return_dict=False) for text in ("What is 2+2?", "What is 3+3?")]
    assert fields == {"prompt_token_ids": [list(ids) for ids in expected]}
    assert tok.decode(fields["prompt_token_ids"][0]).endswith("<|assistant|>")


def test_raw_prompts_are_sent_as_text_and_chat_messages_need_the_chat_template(
        chat_model_dir, trainer_model_dir):
    raw = PromptRenderer(PromptConfig(), None)
    problem = Problem(id="1", prompt="Q: 1+1?\nA:", answer="2")
    assert raw.request_fields([problem]) == {"prompts": ["Q: 1+1?\nA:"]}
    chat = Problem(id="2", messages=[{"role": "user", "content": "hi"}], answer="2")
    with pytest.raises(ValueError, match="set data.prompt.template: chat"):
        raw.request_fields([chat])
    with pytest.raises(ValueError, match="has no chat template"):
        PromptRenderer(PromptConfig(template="chat"), trainer_model_dir)
