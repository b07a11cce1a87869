"""Datasets users bring: JSONL, JSON or Parquet files mapped onto one problem format.

A source is a file or a directory of them plus a field mapping (:class:`FieldMap`) that
says where each part of a problem is in the user's rows; dotted names reach into nested
objects (verl's ``reward_model.ground_truth``). Every row becomes one problem with these
columns:

    id          the row's id field, else ``<source>:<line>`` (``<source>/<file>:<line>`` in
                a directory; a .json or .parquet file counts rows from 0)
    prompt      raw prompt text ("" for a chat prompt)
    messages    the chat prompt: [{role, content}, ...] ([] for a raw prompt)
    answer      math: the reference answer; code: the tests as a CodeTask JSON
    verifier    the reward_svc verifier that judges responses (row, else source, else
                "code" when the row has tests, else "math")
    tags        the row's tags plus the source's
    difficulty  a number, or null
    pass_rate   the share of the SFT model's samples that were right (`k1rl curate`), or null
    response    a reference response (SFT data), or null
    origin      file:line of the row, for messages about it

The problems are written to an Arrow file through Hugging Face ``datasets`` as rows are
read, so a million-row file is never held as Python objects. A bad row (invalid JSON, a
missing or empty field, tests that do not parse) is an error naming the file, the line and
the field, or, with ``on_bad_row: skip``, left out and counted by reason.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from k1rl.data.prompts import PromptConfig
from k1rl.protocol import CodeTask, TestCase
from k1rl.registry import VERIFIERS, UnknownEntryError
from k1rl.yaml_config import Section

SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
OnBadRow = Literal["error", "skip"]


class FieldMap(Section):
    """Where each part of a problem is in a row: a column name, or a dotted path into
    nested objects. A field set to null is not read."""

    prompt: str | None = Field("prompt", description="Raw prompt text, or a chat message "
                               "list (a list of {role, content} here is read as messages).")
    messages: str | None = Field("messages", description="Chat prompt: [{role, content}].")
    answer: str | None = Field("answer", description="Reference answer (math).")
    tests: str | None = Field("tests", description="Code tests: [{stdin, expected}], "
                              "[{input, output}] or APPS/TACO input_output "
                              "{inputs: [...], outputs: [...]} (a JSON string too).")
    response: str | None = Field("response", description="Reference response (SFT).")
    verifier: str | None = Field("verifier", description="The reward_svc verifier's name.")
    tags: str | None = Field("tags", description="A tag or a list of tags.")
    difficulty: str | None = Field("difficulty", description="A number (curriculum).")
    pass_rate: str | None = Field("pass_rate", description="A number in [0, 1]: the "
                                  "curated pass rate (prioritized sampling's prior).")
    id: str | None = Field("id", description="Stable id (hash split, prioritized sampling).")


class DataSource(Section):
    """One file, or a directory of .jsonl / .json / .parquet files, and its mapping."""

    path: str = Field(description="File, or directory read file by file in name order.")
    format: Literal["auto", "jsonl", "json", "parquet"] = Field(
        "auto", description="auto: from each file's suffix.")
    fields: FieldMap = Field(default_factory=FieldMap,
                             description="Where each part of a problem is in a row.")
    verifier: str | None = Field(None, description="For rows that name none.")
    tags: list[str] = Field(default_factory=list, description="Added to every row's tags.")
    name: str | None = Field(None, description="Prefix of generated ids (default: the "
                             "file or directory name without suffix).")
    on_bad_row: OnBadRow | None = Field(None, description="Default: data.on_bad_row.")

    @field_validator("verifier")
    @classmethod
    def _known_verifier(cls, name: str | None) -> str | None:
        return name if name is None else VERIFIERS.check(name)

    def files(self) -> list[Path]:
        root = Path(self.path)
        if root.is_dir():
            found = sorted(p for p in root.rglob("*") if p.suffix in SUFFIXES and p.is_file())
            if not found:
                raise FileNotFoundError(f"data source {root}: no .jsonl, .json or .parquet "
                                        "file in it")
            return found
        if not root.is_file():
            raise FileNotFoundError(f"data source {root}: no such file or directory")
        if self.format == "auto" and root.suffix not in SUFFIXES:
            raise ValueError(f"data source {root}: cannot tell the format from the suffix "
                             f"{root.suffix!r}; set format: jsonl | json | parquet")
        return [root]

    def label(self) -> str:
        return self.name or Path(self.path).stem


class DataConfig(Section):
    """The run's problems: training sources and held-out sources. Without eval sources
    the held-out set is a stable hash split of the training rows by id. Without training
    sources the prompts are the synthetic levels of ``rl.tasks``."""

    train: list[DataSource] = Field(
        default_factory=list, description="Training sources; each is one pool of prompts "
        "(rl.task_weights weighs them) and one level of the per-level metrics.")
    eval: list[DataSource] = Field(default_factory=list, description="Held-out sources.")
    prompt: PromptConfig = Field(default_factory=PromptConfig,
                                 description="How a problem is rendered for the engine.")
    heldout_fraction: float = Field(
        0.05, ge=0.0, lt=1.0, description="Share of training rows (by id hash) held out "
        "when no eval source is given.")
    on_bad_row: OnBadRow = Field(
        "error", description="A row that cannot become a problem: error (naming file, line "
        "and field) or skip (left out, counted by field in the run's metrics).")

    @model_validator(mode="after")
    def _sources(self) -> DataConfig:
        if self.eval and not self.train:
            raise ValueError("data.eval is set but data.train is empty")
        for kind, sources in (("train", self.train), ("eval", self.eval)):
            labels = [s.label() for s in sources]
            twice = sorted({x for x in labels if labels.count(x) > 1})
            if twice:
                raise ValueError(f"data.{kind}: two sources are named {twice[0]!r}: give "
                                 "each a distinct name")
        return self


class BadRow(ValueError):
    """A row that cannot become a problem; ``reason`` is the field at fault."""

    def __init__(self, origin: str, reason: str, message: str) -> None:
        super().__init__(f"{origin}: {reason}: {message}")
        self.origin, self.reason = origin, reason


def _features():
    from datasets import Features, List, Value

    return Features({
        "id": Value("string"), "prompt": Value("string"),
        "messages": List({"role": Value("string"), "content": Value("string")}),
        "answer": Value("string"), "verifier": Value("string"), "tags": List(Value("string")),
        "difficulty": Value("float64"), "pass_rate": Value("float64"),
        "response": Value("string"), "origin": Value("string"),
    })


@dataclass
class Loaded:
    """Problems of one or more sources (an Arrow-backed ``datasets.Dataset``) and the
    rows left out, by reason."""

    problems: Any
    skipped: Counter = field(default_factory=Counter)


def load_sources(sources: list[DataSource], on_bad_row: OnBadRow = "error",
                 cache_dir: Path | None = None) -> Loaded:
    """Every row of ``sources`` as problems, in file and line order. ``cache_dir`` holds
    the Arrow file (default: a temporary directory); it is rebuilt on every call."""
    import datasets
    from datasets import Dataset
    from datasets.exceptions import DatasetGenerationError

    datasets.disable_progress_bars()  # one bar per source and split would flood the logs
    if not sources:
        raise ValueError("no data source to load")
    for source in sources:
        source.files()  # a missing file is reported before anything is read
    cache = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="k1rl-data-"))
    shutil.rmtree(cache, ignore_errors=True)
    skipped: Counter = Counter()
    try:
        problems = Dataset.from_generator(
            _problems, features=_features(), cache_dir=str(cache),
            gen_kwargs={"sources": sources, "on_bad_row": on_bad_row, "skipped": skipped})
    except DatasetGenerationError as e:
        cause = e.__cause__ or e.__context__
        if isinstance(cause, BadRow | FileNotFoundError):
            raise cause from None
        raise
    return Loaded(problems, skipped)


def _problems(sources: list[DataSource], on_bad_row: OnBadRow,
              skipped: Counter) -> Iterator[dict]:
    for source in sources:
        policy = source.on_bad_row or on_bad_row
        in_dir = Path(source.path).is_dir()
        for path in source.files():
            label = f"{source.label()}/{path.stem}" if in_dir else source.label()
            for n, origin, row in _rows(path, source.format):
                try:
                    yield problem(row, source, origin, default_id=f"{label}:{n}")
                except BadRow as bad:
                    if policy == "error":
                        raise
                    skipped[bad.reason] += 1


def _rows(path: Path, fmt: str) -> Iterator[tuple[int, str, dict | BadRow]]:
    """(line or index, origin, row) of each row of one file; a line that is not JSON
    comes as the BadRow to raise or count."""
    fmt = SUFFIXES[path.suffix] if fmt == "auto" else fmt
    if fmt == "jsonl":
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if line.strip():
                    yield n, f"{path}:{n}", _parse_json(line, f"{path}:{n}")
    elif fmt == "json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise BadRow(f"{path}:{e.lineno}", "json", f"invalid JSON ({e.msg})") from None
        if not isinstance(rows, list):
            raise BadRow(str(path), "json", "a .json source must hold a list of rows")
        for n, row in enumerate(rows):
            yield n, f"{path}[{n}]", row
    else:
        import pyarrow.parquet as pq

        n = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                yield n, f"{path}[{n}]", row
                n += 1


def _parse_json(line: str, origin: str) -> dict | BadRow:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        return BadRow(origin, "json", f"invalid JSON ({e.msg}, column {e.colno})")


def problem(row: dict | BadRow, source: DataSource, origin: str, default_id: str) -> dict:
    """One row of ``source`` as a problem (the columns the module docstring lists)."""
    if isinstance(row, BadRow):
        raise row
    if not isinstance(row, dict):
        raise BadRow(origin, "row", f"a row must be a JSON object, not {type(row).__name__}")
    m = source.fields
    prompt, messages = _prompt(row, m, origin)
    tests = _get(row, m.tests)
    verifier = _text(row, m.verifier, origin) or source.verifier or (
        "code" if tests is not None else "math")
    try:
        VERIFIERS.check(verifier)
    except UnknownEntryError as e:
        raise BadRow(origin, m.verifier or "verifier", str(e)) from None
    if verifier == "code":
        if tests is None:
            raise BadRow(origin, m.tests or "tests", "a code problem needs tests")
        answer = code_tests(tests, origin, m.tests or "tests")
    else:
        answer = _text(row, m.answer, origin)
        if not answer:
            raise BadRow(origin, m.answer or "answer", "missing or empty")
    raw_id = _get(row, m.id)
    return {
        "id": str(raw_id) if raw_id not in (None, "") else default_id,
        "prompt": prompt, "messages": messages, "answer": answer, "verifier": verifier,
        "tags": [*_tags(_get(row, m.tags), origin, m.tags), *source.tags],
        "difficulty": _difficulty(_get(row, m.difficulty), origin, m.difficulty),
        "pass_rate": _pass_rate(_get(row, m.pass_rate), origin, m.pass_rate),
        # a response is kept as written: its leading space is part of the tokens
        "response": _text(row, m.response, origin, strip=False) or None, "origin": origin,
    }


def _get(row: dict, path: str | None) -> Any:
    if path is None:
        return None
    value: Any = row
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _text(row: dict, path: str | None, origin: str, strip: bool = True) -> str:
    """The field as text (numbers too: an answer column of ints); "" when absent."""
    value = _get(row, path)
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise BadRow(origin, path, f"must be text or a number, not {type(value).__name__}")
    return str(value).strip() if strip else str(value)


def _prompt(row: dict, m: FieldMap, origin: str) -> tuple[str, list[dict]]:
    value = _get(row, m.messages)
    where = m.messages
    if value is None:
        value, where = _get(row, m.prompt), m.prompt
    if isinstance(value, str):
        if not value.strip():
            raise BadRow(origin, where, "empty prompt")
        return value, []
    if isinstance(value, list) and value:
        messages = []
        for turn in value:
            if not (isinstance(turn, dict) and isinstance(turn.get("role"), str)
                    and isinstance(turn.get("content"), str)):
                raise BadRow(origin, where, "a chat message must be {role, content} strings")
            messages.append({"role": turn["role"], "content": turn["content"]})
        if not any(t["content"].strip() for t in messages):
            raise BadRow(origin, where, "empty prompt")
        return "", messages
    fields = " or ".join(f for f in (m.messages, m.prompt) if f)
    raise BadRow(origin, fields or "prompt", "missing prompt (text or chat messages)")


def code_tests(value: Any, origin: str, where: str) -> str:
    """Tests in any of the shapes datasets use, as a CodeTask JSON: a list of
    {stdin, expected} or {input, output}, APPS/TACO ``{"inputs": [...], "outputs":
    [...]}``, or a whole CodeTask ``{"tests": [...], "time_limit_s": ...}``; each possibly
    a JSON string."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise BadRow(origin, where, f"tests are not valid JSON ({e.msg})") from None
    if isinstance(value, dict) and "tests" in value:  # k1rl's own CodeTask, limits and all
        try:
            return CodeTask.model_validate(value).model_dump_json()
        except ValidationError as e:
            raise BadRow(origin, where, f"tests do not parse: {_first_error(e)}") from None
    if isinstance(value, dict) and "inputs" in value and "outputs" in value:
        if value.get("fn_name"):
            raise BadRow(origin, where, "call-based tests (fn_name) are not supported: "
                         "k1rl runs programs on stdin")
        ins, outs = value["inputs"], value["outputs"]
        if not isinstance(ins, list) or not isinstance(outs, list) or len(ins) != len(outs):
            raise BadRow(origin, where, "inputs and outputs must be lists of equal length")
        pairs = list(zip(ins, outs))
    elif isinstance(value, list):
        pairs = []
        for case in value:
            if not isinstance(case, dict):
                raise BadRow(origin, where, "each test must be an object")
            stdin = case.get("stdin", case.get("input"))
            expected = case.get("expected", case.get("output"))
            pairs.append((stdin, expected))
    else:
        raise BadRow(origin, where, "tests must be a list of {stdin, expected} / "
                     "{input, output}, or {inputs, outputs}")
    try:
        cases = [TestCase(stdin=_io(i), expected=_io(o)) for i, o in pairs]
        return CodeTask(tests=cases).model_dump_json()
    except (ValidationError, TypeError) as e:
        raise BadRow(origin, where, f"tests do not parse: {_first_error(e)}") from None


def _io(value: Any) -> str:
    """A test's stdin or stdout: text, or a list of lines (APPS stores some that way)."""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "\n".join(value)
    if not isinstance(value, str):
        raise TypeError(f"test input/output must be text, not {type(value).__name__}")
    return value


def _first_error(e: Exception) -> str:
    if isinstance(e, ValidationError):
        first = e.errors()[0]
        return f"{'.'.join(map(str, first['loc']))}: {first['msg']}"
    return str(e)


def _tags(value: Any, origin: str, where: str | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(t, str) for t in value):
        return list(value)
    raise BadRow(origin, where, "tags must be a string or a list of strings")


def _difficulty(value: Any, origin: str, where: str | None) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise BadRow(origin, where, f"difficulty must be a number, not {value!r}") from None


def _pass_rate(value: Any, origin: str, where: str | None) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise BadRow(origin, where, f"pass_rate must be a number in [0, 1], not {value!r}")
    return float(value)


@dataclass
class DataPools:
    """The problems of ``data``: one training pool per train source, in order, and the
    held-out pools (one per eval source, or per train source's hash-split side)."""

    train: list[tuple[str, Any]]  # (source label, datasets.Dataset)
    heldout: list[tuple[str, Any]]
    skipped: Counter = field(default_factory=Counter)


def load_each(sources: list[DataSource], on_bad_row: OnBadRow, base: Path,
              kind: str) -> tuple[list[tuple[str, Any]], Counter]:
    """Each source loaded on its own (into ``base/<kind>-<k>``): (label, dataset) pairs in
    order, and the rows left out, by reason."""
    pools, skipped = [], Counter()
    for k, source in enumerate(sources):
        one = load_sources([source], on_bad_row, base / f"{kind}-{k}")
        skipped.update(one.skipped)
        pools.append((source.label(), one.problems))
    return pools, skipped


def load_data(cfg: DataConfig, cache_dir: Path | None = None) -> DataPools:
    """Every source of ``cfg``, each loaded on its own. Without eval sources, the rows of
    each training source whose id hashes into ``cfg.heldout_fraction`` are held out
    (stable across runs, seeds and machines) and never trained on."""
    from k1rl.data.tasks import is_heldout

    base = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="k1rl-data-"))
    loaded, skipped = load_each(cfg.train, cfg.on_bad_row, base, "train")
    if cfg.eval:
        heldout, more = load_each(cfg.eval, cfg.on_bad_row, base, "eval")
        return DataPools(loaded, heldout, skipped + more)
    fraction = cfg.heldout_fraction
    train, heldout = [], []
    for label, problems in loaded:
        flags = problems.map(lambda ids: {"held": [is_heldout(i, fraction) for i in ids]},
                             input_columns="id", batched=True)
        train.append((label, flags.filter(lambda held: [not h for h in held],
                                          input_columns="held", batched=True)
                      .remove_columns("held")))
        heldout.append((label, flags.filter(lambda held: held, input_columns="held",
                                            batched=True).remove_columns("held")))
    return DataPools(train, heldout, skipped)
