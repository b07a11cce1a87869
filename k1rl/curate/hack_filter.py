"""The hack filter (k1.5 §2.1): asked to answer with no chain of thought, a policy that gets
a prompt right within N tries could be rewarded for a guess, so the prompt is dropped."""

from __future__ import annotations

from collections.abc import Sequence

from k1rl.curate.config import HackFilter
from k1rl.data.problem import Problem


def guessed(correct: Sequence[bool], tries: int) -> bool:
    """Whether one of the first ``tries`` answers (in the order drawn) was right."""
    if len(correct) < tries:
        raise ValueError(f"the hack filter needs {tries} tries, got {len(correct)}")
    return any(correct[:tries])


def no_thinking(problem: Problem, cfg: HackFilter) -> Problem:
    """``problem`` asking for the answer alone: ``cfg.suffix`` after the prompt (after the
    last user turn of a chat prompt). The prefill is the renderer's (it follows the chat
    template's generation prompt)."""
    if problem.prompt:
        return problem.model_copy(update={"prompt": problem.prompt + cfg.suffix})
    turns = list(problem.messages)
    last = max(i for i, m in enumerate(turns) if m.role == "user") if any(
        m.role == "user" for m in turns) else len(turns) - 1
    turns[last] = turns[last].model_copy(update={"content": turns[last].content + cfg.suffix})
    return problem.model_copy(update={"messages": turns})
