"""What a config names on this machine, checked before any service starts: the model
directory, its tokenizer and chat template, the data files.

A config is valid on its own (k1rl/config.py); whether the files it names exist depends
on where it runs (a Kubernetes render needs none of them, a local run all). A missing
model found here is one line saying what to do, not a trainer rank's traceback minutes
later.
"""

from __future__ import annotations

import json
from pathlib import Path

from k1rl.config import RunConfig
from k1rl.yaml_config import ConfigError

WEIGHT_SUFFIXES = (".safetensors", ".bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def check_paths(cfg: RunConfig, source: str, *, model: bool = True,
                sections: tuple[str, ...] = ("data",)) -> None:
    """Raise ConfigError (``source``: where the config came from) with one line per path
    of ``cfg`` that is missing or unusable: model.path when ``model`` (the services that
    read it run here), the data files of ``sections`` (``data`` for RL, ``sft.data`` for
    SFT: a command checks what it reads)."""
    problems = [*(model_problems(cfg, sections) if model else []),
                *data_problems(cfg, sections)]
    if problems:
        raise ConfigError(source, problems)


def _data(cfg: RunConfig, section: str):
    return cfg.sft.data if section == "sft.data" else cfg.data


def model_problems(cfg: RunConfig, sections: tuple[str, ...] = ("data",)) -> list[str]:
    path = Path(cfg.model.path)
    build = (f"build a tiny one with `k1rl init-model {path}`, or set model.path to an HF "
             "checkpoint directory")
    if not path.is_dir():
        return [f"model.path: {path} does not exist: {build}"]
    if not (path / "config.json").is_file():
        return [f"model.path: {path} has no config.json, so it is not an HF checkpoint: "
                f"{build}"]
    problems = []
    if not any(p.suffix in WEIGHT_SUFFIXES for p in path.iterdir()):
        problems.append(f"model.path: {path} has no weights (*.safetensors)")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        problems.append(f"model.path: {path} has no tokenizer ({', '.join(TOKENIZER_FILES)})")
    else:
        for section in sections:
            if _data(cfg, section).prompt.template == "chat" and not has_chat_template(path):
                problems.append(f"{section}.prompt.template: chat, but the tokenizer in {path} "
                                "has no chat template: add chat_template.jinja there, or set "
                                f"{section}.prompt.template: raw")
    return problems


def has_chat_template(path: Path) -> bool:
    """The tokenizer files in ``path`` carry a chat template (where transformers looks:
    chat_template.jinja, chat_template.json, or tokenizer_config.json's key)."""
    if (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file():
        return True
    config = path / "tokenizer_config.json"
    try:
        return bool(json.loads(config.read_text()).get("chat_template"))
    except (OSError, ValueError):
        return False


def data_problems(cfg: RunConfig, sections: tuple[str, ...] = ("data",)) -> list[str]:
    named = []
    for section in sections:
        data = _data(cfg, section)
        named += [(f"{section}.{kind}", sources)
                  for kind, sources in (("train", data.train), ("eval", data.eval))]
    if "sft.data" in sections and cfg.sft.stop_when:
        named.append(("sft.stop_when.data", cfg.sft.stop_when.data))
    problems = []
    for name, sources in named:
        for k, source in enumerate(sources):
            try:
                source.files()
            except (OSError, ValueError) as e:
                problems.append(f"{name}[{k}].path: {e}")
    return problems
