"""Data sources: a user's JSONL / JSON / Parquet rows become problems through a field
mapping; bad rows are errors naming the file, line and field, or skipped and counted."""

from __future__ import annotations

import json

import pytest

from k1rl.data.sources import (
    BadRow,
    DataConfig,
    DataSource,
    load_data,
    load_sources,
)
from k1rl.protocol import CodeTask


def _jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _load(tmp_path, rows, name="data.jsonl", **source) -> list[dict]:
    src = DataSource(path=_jsonl(tmp_path / name, rows), **source)
    return list(load_sources([src], cache_dir=tmp_path / "cache").problems)


def _tests(problem: dict) -> list[tuple[str, str]]:
    return [(t.stdin, t.expected) for t in CodeTask.model_validate_json(problem["answer"]).tests]


# ------------------------------------------------------------------ field mappings


def test_a_plain_prompt_row_with_the_default_field_names(tmp_path):
    [p] = _load(tmp_path, [{"id": "q1", "prompt": "What is 2+3?", "answer": 5,
                            "tags": ["add", "easy"], "difficulty": 1, "response": " 5"}])
    assert p == {"id": "q1", "prompt": "What is 2+3?", "messages": [], "answer": "5",
                 "verifier": "math", "tags": ["add", "easy"], "difficulty": 1.0,
                 "pass_rate": None, "response": " 5",
                 "origin": f"{tmp_path / 'data.jsonl'}:1"}


def test_chat_messages_and_a_nested_answer_as_verl_stores_them(tmp_path):
    row = {"data_source": "gsm8k",
           "prompt": [{"role": "system", "content": "Reason step by step."},
                      {"role": "user", "content": "Natalia sold 48 clips..."}],
           "reward_model": {"style": "rule", "ground_truth": "72"}}
    [p] = _load(tmp_path, [row], fields={"answer": "reward_model.ground_truth",
                                         "tags": "data_source"})
    assert p["prompt"] == "" and p["messages"] == row["prompt"]
    assert (p["answer"], p["tags"], p["verifier"]) == ("72", ["gsm8k"], "math")


def test_renamed_fields_source_tags_and_generated_ids(tmp_path):
    rows = [{"question": "1+1?", "solution": "2"}, {"question": "2+2?", "solution": "4"}]
    problems = _load(tmp_path, rows, name="arith.jsonl", tags=["mine"],
                     fields={"prompt": "question", "answer": "solution"})
    assert [(p["id"], p["prompt"], p["answer"], p["tags"]) for p in problems] == [
        ("arith:1", "1+1?", "2", ["mine"]), ("arith:2", "2+2?", "4", ["mine"])]


@pytest.mark.parametrize("tests", [
    [{"stdin": "1\n", "expected": "2\n"}, {"stdin": "5\n", "expected": "6\n"}],
    [{"input": "1\n", "output": "2\n"}, {"input": "5\n", "output": "6\n"}],
    {"inputs": ["1\n", "5\n"], "outputs": ["2\n", "6\n"]},
    json.dumps({"inputs": ["1\n", "5\n"], "outputs": ["2\n", "6\n"]}),  # APPS: a string
])
def test_code_tests_in_every_shape_datasets_use(tmp_path, tests):
    [p] = _load(tmp_path, [{"prompt": "Read n, print n+1.", "input_output": tests}],
                fields={"tests": "input_output"})
    assert p["verifier"] == "code"  # a row with tests is a code problem
    assert _tests(p) == [("1\n", "2\n"), ("5\n", "6\n")]


def test_apps_inputs_given_as_lists_of_lines_are_joined(tmp_path):
    tests = {"inputs": [["3", "1 2 3"]], "outputs": [["6"]]}
    [p] = _load(tmp_path, [{"prompt": "Sum them.", "tests": tests}])
    assert _tests(p) == [("3\n1 2 3", "6")]


def test_json_parquet_and_directory_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "set"
    folder.mkdir()
    (folder / "a.json").write_text(json.dumps([{"prompt": "p0", "answer": "0"},
                                               {"prompt": "p1", "answer": "1"}]))
    pq.write_table(pa.Table.from_pylist([{"prompt": "p2", "answer": "2"}]), folder / "b.parquet")
    (folder / "notes.txt").write_text("not data")
    problems = list(load_sources([DataSource(path=str(folder))]).problems)
    assert [(p["id"], p["prompt"]) for p in problems] == [
        ("set/a:0", "p0"), ("set/a:1", "p1"), ("set/b:0", "p2")]


def test_a_hash_split_holds_out_the_same_rows_every_time_and_never_trains_on_them(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"id": f"q{i}", "prompt": "p", "answer": "1"}
                                         for i in range(400)])
    cfg = DataConfig(train=[DataSource(path=path)], heldout_fraction=0.1)
    pools = load_data(cfg, tmp_path / "c1")
    [(label, train)], [(_, held)] = pools.train, pools.heldout
    again = load_data(cfg, tmp_path / "c2").heldout[0][1]
    held_ids = set(held["id"])
    assert label == "d" and 20 < len(held_ids) < 60 and held_ids == set(again["id"])
    assert not held_ids & set(train["id"])
    assert len(train) + len(held) == 400


def test_each_source_is_a_pool_and_eval_sources_are_the_heldout_set(tmp_path):
    cfg = DataConfig(
        train=[DataSource(path=_jsonl(tmp_path / "t1.jsonl", [{"prompt": "a", "answer": "1"}])),
               DataSource(path=_jsonl(tmp_path / "t2.jsonl", [{"prompt": "b", "answer": "2"}]),
                          name="second")],
        eval=[DataSource(path=_jsonl(tmp_path / "e.jsonl", [{"prompt": "c", "answer": "3"}]))])
    pools = load_data(cfg, tmp_path / "c")
    assert [(label, d["prompt"]) for label, d in pools.train] == [("t1", ["a"]),
                                                                  ("second", ["b"])]
    assert [(label, d["prompt"]) for label, d in pools.heldout] == [("e", ["c"])]


def test_sources_need_distinct_names_and_eval_needs_train(tmp_path):
    with pytest.raises(ValueError, match="two sources are named 'd'"):
        DataConfig(train=[DataSource(path="a/d.jsonl"), DataSource(path="b/d.jsonl")])
    with pytest.raises(ValueError, match="data.eval is set but data.train is empty"):
        DataConfig(eval=[DataSource(path="e.jsonl")])


def test_generated_tasks_are_a_data_source_read_with_the_default_field_names(tmp_path):
    from k1rl.data.tasks import generate_tasks

    tasks = generate_tasks("add", 2, 5, seed=0) + generate_tasks("code", 1, 3, seed=0)
    path = _jsonl(tmp_path / "gen.jsonl", [t.as_problem() for t in tasks])
    problems = list(load_sources([DataSource(path=path)]).problems)
    assert [(p["id"], p["prompt"], p["verifier"], p["response"], p["difficulty"])
            for p in problems] == [(t.id, t.prompt, t.verifier, t.target, t.difficulty)
                                   for t in tasks]
    assert [p["answer"] for p in problems[:5]] == [t.answer for t in tasks[:5]]
    for p, t in zip(problems[5:], tasks[5:]):  # the tests, limits and checker, whole
        assert CodeTask.model_validate_json(p["answer"]) == CodeTask.model_validate_json(t.answer)
    assert problems[5]["tags"] == ["code", "code:1"]


# ------------------------------------------------------------------ bad rows

BAD_ROWS = [
    ('{"prompt": "p", "answer": ', "json", "invalid JSON"),
    ({"answer": "1"}, "messages or prompt", "missing prompt"),
    ({"prompt": "   ", "answer": "1"}, "prompt", "empty prompt"),
    ({"prompt": "p"}, "answer", "missing or empty"),
    ({"prompt": "p", "answer": {"x": 1}}, "answer", "must be text or a number"),
    ({"prompt": [{"role": "user"}], "answer": "1"}, "prompt", "{role, content}"),
    ({"prompt": "p", "tests": "[{"}, "tests", "not valid JSON"),
    ({"prompt": "p", "tests": {"inputs": ["1"], "outputs": []}}, "tests", "equal length"),
    ({"prompt": "p", "tests": {"inputs": [[1]], "outputs": ["2"], "fn_name": "f"}}, "tests",
     "call-based"),
    ({"prompt": "p", "tests": [{"stdin": "1"}]}, "tests", "do not parse"),
    ({"prompt": "p", "verifier": "code"}, "tests", "needs tests"),
    ({"prompt": "p", "answer": "1", "difficulty": "hard"}, "difficulty", "must be a number"),
    ({"prompt": "p", "answer": "1", "tags": [1]}, "tags", "list of strings"),
    ({"prompt": "p", "answer": "1", "pass_rate": 1.5}, "pass_rate", "in \\[0, 1\\]"),
    ({"prompt": "p", "answer": "1", "pass_rate": "0.5"}, "pass_rate", "in \\[0, 1\\]"),
    ({"prompt": "p", "answer": "1", "verifier": "chess"}, "verifier",
     "unknown verifier 'chess' \\(registered: code, cot_rm, math\\)"),
]


@pytest.mark.parametrize("row,field,message", BAD_ROWS)
def test_a_bad_row_is_an_error_naming_file_line_and_field(tmp_path, row, field, message):
    good = {"prompt": "fine", "answer": "1"}
    with pytest.raises(BadRow, match=rf"data.jsonl:2: {field}: .*{message}") as caught:
        _load(tmp_path, [good, row])
    assert caught.value.reason == field


def test_bad_rows_are_skipped_and_counted_by_reason_when_configured(tmp_path):
    rows = [{"prompt": "fine", "answer": "1"}, *(r for r, _, _ in BAD_ROWS),
            {"prompt": "also fine", "answer": "2"}]
    src = DataSource(path=_jsonl(tmp_path / "d.jsonl", rows))
    loaded = load_sources([src], on_bad_row="skip", cache_dir=tmp_path / "c")
    assert loaded.problems["prompt"] == ["fine", "also fine"]
    assert sum(loaded.skipped.values()) == len(BAD_ROWS)
    assert loaded.skipped["tests"] == 5 and loaded.skipped["json"] == 1
    assert loaded.skipped["verifier"] == 1


def test_a_source_naming_an_unknown_verifier_fails_at_config_load():
    from k1rl.config import ConfigError, RunConfig

    with pytest.raises(ConfigError, match=r"data.train.0.verifier: 'chess' — unknown verifier"):
        RunConfig.from_yaml_text("data: {train: [{path: x.jsonl, verifier: chess}]}")


def test_a_missing_or_unreadable_source_is_reported_before_anything_is_read(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_sources([DataSource(path=str(tmp_path / "nope.jsonl"))])
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="set format: jsonl"):
        load_sources([DataSource(path=str(tmp_path / "d.csv"))])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .jsonl, .json or .parquet"):
        load_sources([DataSource(path=str(tmp_path / "empty"))])
    with pytest.raises(ValueError, match="fields.promt"):
        DataSource.model_validate({"path": "x", "fields": {"promt": "q"}})
