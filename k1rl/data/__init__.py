"""Synthetic verifiable tasks, their tokenizer and the offline tiny model.

The task API is imported eagerly (it is pure Python and the reward verifier uses
`extract_answer`); the tokenizer and model builders pull in transformers and torch, so they
load on first use.
"""

from k1rl.data.tasks import (
    ANSWER_PREFIX,
    DIFFICULTIES,
    FAMILIES,
    Task,
    all_levels,
    answer_line,
    extract_answer,
    generate_suite,
    generate_tasks,
    is_heldout,
    read_jsonl,
    write_jsonl,
)

_LAZY = {
    "train_tokenizer": "k1rl.data.tokenizer",
    "save_tokenizer": "k1rl.data.tokenizer",
    "load_tokenizer": "k1rl.data.tokenizer",
    "init_model": "k1rl.data.tiny_model",
    "ModelSummary": "k1rl.data.tiny_model",
}

__all__ = [
    "ANSWER_PREFIX", "DIFFICULTIES", "FAMILIES", "Task", "all_levels", "answer_line",
    "extract_answer", "generate_suite", "generate_tasks", "is_heldout", "read_jsonl",
    "write_jsonl", *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'k1rl.data' has no attribute {name!r}")
