"""Registries: the names a run config picks implementations by.

RL losses (``trainer.loss``), prompt samplers (``rl.sampler``), sandbox runners
(``sandbox.runner``), metric sinks (``rl.metrics``) and reward_svc's verifiers (a
problem's ``verifier``) are each chosen by name. An entry
lives in a module of its own and registers its class with ``@REGISTRY.register(name)``,
the way reward_svc's verifiers do; an entry with parameters carries them as a pydantic
``Config`` class (with a ``name`` field), which :meth:`Registry.config` validates.

The built-in entries are listed here by name and module, so a config names a known entry
or fails at load time listing the known ones, without importing any entry: every service
loads the whole config, and none should import the others' code (the sandbox image holds
no master, the master needs no sandbox runner) or packages only some runs install
(tensorboard, wandb). An entry's module is imported the first time the entry itself is
asked for. An entry registered by other code (a plugin module named in
``RunConfig.plugins``, a test) is a valid name from then on.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict

T = TypeVar("T", bound=type)


class UnknownEntryError(ValueError):
    """A config or a caller named an entry no registry holds."""


class Unchecked(BaseModel):
    """An entry's section in a process without the entry's packages (the sandbox image has
    no trainer): kept as given; the process that uses the entry validates it."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str


class Registry(Generic[T]):
    def __init__(self, kind: str, builtins: dict[str, str]) -> None:
        self.kind = kind
        self._modules = dict(builtins)  # name -> module that defines and registers it
        self._classes: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator: make ``cls`` available under ``name`` (sets ``cls.name``)."""

        def add(cls: T) -> T:
            owner = self._modules.get(name, cls.__module__)
            if name in self._classes or owner != cls.__module__:
                raise ValueError(f"{self.kind} {name!r} is already registered "
                                 f"({self._classes.get(name) or owner})")
            cls.name = name
            self._classes[name] = cls
            return cls

        return add

    def names(self) -> list[str]:
        return sorted({*self._modules, *self._classes})

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __contains__(self, name: object) -> bool:
        return name in self._modules or name in self._classes

    def __len__(self) -> int:
        return len(self.names())

    def check(self, name: str) -> str:
        """``name`` if an entry has it, else UnknownEntryError listing the known ones."""
        if name not in self:
            raise UnknownEntryError(
                f"unknown {self.kind} {name!r} (registered: {', '.join(self.names())})")
        return name

    def get(self, name: str) -> T:
        """The class registered as ``name``, importing a built-in entry's module first."""
        self.check(name)
        if name not in self._classes:
            importlib.import_module(self._modules[name])
        return self._classes[name]

    def config(self, value: Any) -> Any:
        """An entry's validated ``Config`` from its name alone (defaults), a mapping with a
        ``name`` key and parameters, or a config object."""
        name = value if isinstance(value, str) else (
            value.get("name") if isinstance(value, dict) else getattr(value, "name", None))
        if not isinstance(name, str):
            raise ValueError(f"a {self.kind} is a name or a mapping with a 'name' key")
        try:
            schema = self.get(name).Config
        except ModuleNotFoundError:
            # the entry's packages are not in this process (the sandbox image has no torch
            # and no trainer): keep the section as given for the process that uses it
            self.check(name)
            return Unchecked.model_validate(value if isinstance(value, dict) else {"name": name})
        if isinstance(value, schema):
            return value
        if isinstance(value, str):
            value = {"name": name}
        elif not isinstance(value, dict):
            value = value.model_dump()
        return schema.model_validate(value)


def import_plugins(modules: list[str]) -> None:
    """Import modules that register entries of their own (``RunConfig.plugins``)."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ValueError(f"plugin {module!r} cannot be imported: {e}") from e


LOSSES: Registry = Registry("loss", {
    name: f"trainer_svc.losses.{name}"
    for name in ("mirror_descent", "grpo", "gspo", "token_clip", "dpo")
})
SAMPLERS: Registry = Registry("sampler", {
    name: f"k1rl.master.samplers.{name}" for name in ("uniform", "curriculum", "prioritized")
})
SANDBOX_RUNNERS: Registry = Registry("sandbox runner", {
    "bwrap": "sandbox.bubblewrap",
    "podman": "sandbox.podman",
    "docker": "sandbox.docker_api",
})
METRIC_SINKS: Registry = Registry("metric sink", {
    name: f"k1rl.metrics.{name}" for name in ("jsonl", "tensorboard", "wandb", "prometheus")
})
VERIFIERS: Registry = Registry("verifier", {
    name: f"reward_svc.verifiers.{name}" for name in ("math", "code", "cot_rm")
})
