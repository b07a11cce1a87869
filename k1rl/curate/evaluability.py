"""Evaluability (k1.5 §2.1): multiple-choice, true/false and proof questions are dropped,
as ``curate.drop``'s rules find them. A rule verifier cannot tell a right answer to a
choice or a yes/no from a lucky one, and cannot check a proof at all."""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

from k1rl.curate.config import MatchRule
from k1rl.data.problem import Problem


def field_text(problem: Problem, field: str) -> str:
    """The text a rule searches: the answer, or the prompt (every chat turn, one per line)."""
    if field == "answer":
        return problem.answer
    return problem.prompt or "\n".join(m.content for m in problem.messages)


@lru_cache(maxsize=256)
def _compiled(pattern: str, ignore_case: bool) -> re.Pattern:
    return re.compile(pattern, re.IGNORECASE if ignore_case else 0)


def finds(rule: MatchRule, problem: Problem) -> bool:
    return _compiled(rule.pattern, rule.ignore_case).search(
        field_text(problem, rule.field)) is not None


def not_evaluable(problem: Problem, rules: Sequence[MatchRule]) -> str | None:
    """The name of the first rule that finds ``problem`` (why it is dropped), or None.
    Code problems are judged by their tests, so only prompt rules apply to them."""
    for rule in rules:
        if rule.field == "answer" and problem.verifier == "code":
            continue
        if finds(rule, problem):
            return rule.name
    return None
