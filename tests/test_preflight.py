"""What a config names is checked before any service starts (k1rl/preflight.py): one line
per missing path, saying what to do, and no run directory left behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from k1rl.config import ConfigError, RunConfig
from k1rl.preflight import check_paths


def _model_dir(root: Path, *, weights=True, tokenizer=True, chat_template=None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text("{}")
    if weights:
        (root / "model.safetensors").write_bytes(b"")
    if tokenizer:
        (root / "tokenizer.json").write_text("{}")
        config = {"chat_template": chat_template} if chat_template else {}
        (root / "tokenizer_config.json").write_text(json.dumps(config))
    return root


def _problems(cfg: RunConfig, **kw) -> list[str]:
    with pytest.raises(ConfigError) as err:
        check_paths(cfg, "run.yaml", **kw)
    assert err.value.source == "run.yaml"
    return err.value.problems


def test_a_complete_model_directory_and_existing_data_pass(tmp_path):
    cfg = RunConfig()
    cfg.model.path = str(_model_dir(tmp_path / "m"))
    rows = tmp_path / "train.jsonl"
    rows.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    cfg.data.train = [{"path": str(rows)}]
    check_paths(cfg, "run.yaml")


def test_a_missing_model_says_how_to_build_one(tmp_path):
    cfg = RunConfig()
    cfg.model.path = str(tmp_path / "tiny")
    (problem,) = _problems(cfg)
    assert problem.startswith(f"model.path: {tmp_path / 'tiny'} does not exist")
    assert f"k1rl init-model {tmp_path / 'tiny'}" in problem


def test_a_directory_that_is_not_a_checkpoint_is_named(tmp_path):
    cfg = RunConfig()
    cfg.model.path = str(tmp_path)
    (problem,) = _problems(cfg)
    assert "has no config.json" in problem


def test_missing_weights_and_tokenizer_are_each_a_line(tmp_path):
    cfg = RunConfig()
    cfg.model.path = str(_model_dir(tmp_path / "m", weights=False, tokenizer=False))
    problems = _problems(cfg)
    assert len(problems) == 2
    assert "no weights" in problems[0] and "no tokenizer" in problems[1]


def test_a_chat_prompt_needs_a_chat_template(tmp_path):
    cfg = RunConfig()
    cfg.data.prompt.template = "chat"
    cfg.model.path = str(_model_dir(tmp_path / "plain"))
    (problem,) = _problems(cfg)
    assert problem.startswith("data.prompt.template: chat") and "chat_template.jinja" in problem
    cfg.model.path = str(_model_dir(tmp_path / "chat", chat_template="{{ messages }}"))
    check_paths(cfg, "run.yaml")
    jinja = _model_dir(tmp_path / "jinja")
    (jinja / "chat_template.jinja").write_text("{{ messages }}")
    cfg.model.path = str(jinja)
    check_paths(cfg, "run.yaml")


def test_missing_data_files_name_their_source(tmp_path):
    cfg = RunConfig()
    rows = tmp_path / "train.jsonl"
    rows.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    cfg.data.train = [{"path": str(rows)}]
    cfg.data.eval = [{"path": str(tmp_path / "missing.jsonl")}]
    (problem,) = _problems(cfg, model=False)  # external services: the model is not here
    assert problem.startswith("data.eval[0].path: data source")
    assert "no such file" in problem


def test_k1rl_rl_with_a_missing_model_is_one_readable_error(tmp_path):
    config = tmp_path / "run.yaml"
    cfg = RunConfig(run_dir=str(tmp_path / "run"))
    cfg.model.path = str(tmp_path / "tiny")
    config.write_text(cfg.dump_yaml())
    out = subprocess.run([sys.executable, "-m", "k1rl", "rl", "--config", str(config)],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.startswith(f"error: invalid config {config}:")
    assert f"k1rl init-model {tmp_path / 'tiny'}" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 2  # the source, one problem
    assert not (tmp_path / "run").exists()  # nothing was started or written
