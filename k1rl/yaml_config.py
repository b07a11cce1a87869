"""YAML into pydantic models: duplicate keys refused, YAML 1.2 floats, and every problem
reported as ``dotted.path: value — reason`` in one :class:`ConfigError`."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError


class ConfigError(ValueError):
    """A config that cannot be used; ``problems`` holds one line per bad field."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"invalid config {source}:\n{lines}")


class Section(BaseModel):
    """A config section."""

    # strict: YAML already types values, so "2" for an int is a mistake, not a number
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)


M = TypeVar("M", bound=BaseModel)


def parse_yaml_model(model: type[M], text: str, source: str = "<text>",
                     overrides: Sequence[str] = ()) -> M:
    """Parse YAML (duplicate keys refused) into ``model``, with ``dotted.key=value``
    ``overrides`` set on the parsed mapping first (see :func:`set_pairs`); ConfigError names
    every bad field."""
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as e:
        raise ConfigError(source, [_yaml_problem(e)]) from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, [f"top level must be a mapping, got {type(data).__name__}"])
    return _validate(model, set_pairs(data, overrides), source)


def set_pairs(data: dict, pairs: Sequence[str], source: str = "--set") -> dict:
    """Set ``dotted.key=value`` pairs in a config mapping (values read as YAML, so
    ``2e-4``, ``[a, b]`` and ``{name: grpo}`` work); a malformed pair is a ConfigError."""
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(source, [f"{pair!r}: want KEY=VALUE (e.g. rl.iterations=2)"])
        *path, leaf = key.strip().split(".")
        node = data
        for part in path:
            if not isinstance(node.setdefault(part, {}), dict):
                raise ConfigError(source, [f"{key}: {part} is a value, not a section"])
            node = node[part]
        try:
            node[leaf] = yaml.load(raw, Loader=_StrictLoader)
        except yaml.YAMLError as e:
            raise ConfigError(source, [f"{key}: {_yaml_problem(e)}"]) from e
    return data


def with_overrides(config: M, pairs: Sequence[str], source: str = "--set") -> M:
    """A copy of a built ``config`` with ``pairs`` set (:func:`set_pairs`), validated
    again. Values the validators filled in are kept as if written: a config read from a
    file takes its overrides through :func:`parse_yaml_model` instead."""
    return _validate(type(config), set_pairs(config.model_dump(), pairs, source), source)


def _validate(model: type[M], data: dict, source: str) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(source, _problems(e, model)) from e


# ------------------------------------------------------------------ YAML parsing


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    out: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in out:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                f"found duplicate key {key!r}",
                key_node.start_mark,
            )
        out[key] = loader.construct_object(value_node, deep=True)
    return out


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
# PyYAML follows YAML 1.1, where 1e-3 (no dot) is a string; people write learning rates
# that way, so resolve YAML 1.2 style exponent floats too.
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    kind = "YAML error" if isinstance(e, yaml.constructor.ConstructorError) else "YAML syntax error"
    if mark is None:
        return f"{kind}: {problem}"
    return f"{kind} at line {mark.line + 1}, column {mark.column + 1}: {problem}"


def _problems(exc: ValidationError, root: type[BaseModel]) -> list[str]:
    """``dotted.path: value — reason`` for each pydantic error."""
    out = []
    for err in exc.errors(include_url=False):
        path = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if not path:  # model-level validators already name their fields
            out.append(msg)
        elif err["type"] == "extra_forbidden":
            out.append(f"{path}: unknown key (allowed: {_allowed_keys(err['loc'], root)})")
        else:
            msg = msg[:1].lower() + msg[1:]
            out.append(f"{path}: {err['input']!r} — {msg}")
    return out


def _allowed_keys(loc: tuple[int | str, ...], root: type[BaseModel]) -> str:
    model: type[BaseModel] = root
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return "?"
        model = ann
    return ", ".join(model.model_fields)
