"""Verifiers, registered by name: each decides whether a response's final answer is correct.

A verifier lives in its own module, named after what it checks, and registers itself with
:func:`register` (``k1rl.registry.VERIFIERS``, which imports a built-in's module when it
is first asked for). A :class:`k1rl.protocol.RewardItem` names the verifier that scores it
(``verifier="math"`` by default).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from k1rl.config import RewardConfig
from k1rl.protocol import RewardItem
from k1rl.registry import VERIFIERS


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

    # a verifier that judges many items in one go (a model) sets this and check_items
    batched: bool = False

    def check_items(self, items: list[RewardItem]) -> list[Check]:
        """Every item's check in one go (batched verifiers; they also read item.prompt)."""
        return [self.check(item.response, item.answer) for item in items]

    def start(self) -> None:
        """Acquire expensive resources now rather than on the first call."""

    def close(self) -> None:
        """Release what the verifier holds (processes, models)."""


# One registry of names for the whole system (k1rl/registry.py): a config or a data row
# naming an unknown verifier fails where it is loaded, not when reward_svc first scores it.
register = VERIFIERS.register


def available() -> list[str]:
    return VERIFIERS.names()


def create(name: str, config: RewardConfig) -> Verifier:
    """A new verifier of the registered kind ``name``, configured from ``config``."""
    if name not in VERIFIERS:
        raise UnknownVerifierError(
            f"unknown verifier {name!r} (registered: {', '.join(available())})")
    return VERIFIERS.get(name).from_config(config)
