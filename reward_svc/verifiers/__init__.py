"""Verifiers, registered by name: each decides whether a response's final answer is correct.

A verifier lives in its own module, named after what it checks, and registers itself with
:func:`register`. A :class:`k1rl.protocol.RewardItem` names the verifier that scores it
(``verifier="math"`` by default).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from k1rl.config import RewardConfig


class UnknownVerifierError(ValueError):
    """A request named a verifier that is not registered."""


@dataclass(frozen=True)
class Check:
    """A verifier's judgement of one response.

    ``score`` is the task reward (1/0, or a fraction of tests passed); ``error`` is set
    when the response could not be judged (the code sandbox failed): such an item is
    neither right nor wrong, and the trainer leaves it out.
    """

    correct: bool
    score: float
    error: str = ""


class Verifier(ABC):
    """Turns (response text, gold answer) into correct / not correct.

    ``verify`` must return False, never raise, for any response a policy can produce; it
    raises ValueError only for a bad gold answer, which is a data bug to surface.
    """

    name: str = ""

    @classmethod
    @abstractmethod
    def from_config(cls, config: RewardConfig) -> Verifier: ...

    # how many responses the service may check at once with this verifier
    concurrency: int = 1

    @abstractmethod
    def verify(self, response: str, answer: str) -> bool: ...

    def check(self, response: str, answer: str) -> Check:
        ok = self.verify(response, answer)
        return Check(correct=ok, score=float(ok))

    def start(self) -> None:
        """Acquire expensive resources now rather than on the first call."""

    def close(self) -> None:
        """Release what the verifier holds (processes, models)."""


_REGISTRY: dict[str, type[Verifier]] = {}


def register(name: str) -> Callable[[type[Verifier]], type[Verifier]]:
    """Class decorator: make a Verifier subclass available under ``name``."""

    def add(cls: type[Verifier]) -> type[Verifier]:
        if name in _REGISTRY:
            raise ValueError(f"verifier {name!r} is already registered ({_REGISTRY[name]})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return add


def available() -> list[str]:
    return sorted(_REGISTRY)


def create(name: str, config: RewardConfig) -> Verifier:
    """A new verifier of the registered kind ``name``, configured from ``config``."""
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise UnknownVerifierError(
            f"unknown verifier {name!r} (registered: {', '.join(available())})"
        ) from None
    return cls.from_config(config)


# Imported for their registration side effect; they need the names above, so they come last.
from reward_svc.verifiers import code as _code  # noqa: E402, F401
from reward_svc.verifiers import math as _math  # noqa: E402, F401
