"""Where a response states its final answer: the last ``\\boxed{...}``, the sentence after
the last "The answer is", or a user's regex (``reward.answer_formats``, tried in order;
the first that finds an answer gives it).

The last one of each form counts: a response may revise an earlier guess, and listing
several answers gains nothing because only the final one is read. An answer longer than
``MAX_ANSWER_CHARS`` counts as none.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from k1rl.data.tasks import ANSWER_PREFIX

# Longer than any real final answer, short enough that the integer path stays far below
# Python's 4300-digit int() limit (extract_answer would raise past it).
MAX_ANSWER_CHARS = 256
# the answer sentence ends at a period followed by a space or the end, or at a line break;
# a period inside a number ("85.5") does not end it
_SENTENCE_END = re.compile(r"\.(?=\s|$)|\n")
_SPACES = re.compile(r"\s*")
_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")


def final_answer(response: str) -> str | None:
    """The text after the last "The answer is", to the end of its sentence; None if absent,
    empty or longer than MAX_ANSWER_CHARS."""
    at = response.rfind(ANSWER_PREFIX)
    if at < 0:
        return None
    start = _SPACES.match(response, at + len(ANSWER_PREFIX)).end()
    # bounded window: a 10^5-digit "answer" costs no more than a short one
    window = response[start : start + MAX_ANSWER_CHARS + 1]
    end = _SENTENCE_END.search(window)
    if end is None and len(window) > MAX_ANSWER_CHARS:
        return None
    answer = (window[: end.start()] if end else window).strip()
    return answer or None


def boxed_answer(response: str) -> str | None:
    """The contents of the last ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces
    included; None without a closed box."""
    boxes = list(_BOX.finditer(response))
    for box in reversed(boxes):  # an unclosed last box: the one before it still counts
        depth, start = 1, box.end()
        for i in range(start, min(len(response), start + MAX_ANSWER_CHARS + 1)):
            if response[i] == "{" and response[i - 1] != "\\":
                depth += 1
            elif response[i] == "}" and response[i - 1] != "\\":
                depth -= 1
                if depth == 0:
                    return response[start:i].strip() or None
    return None


def regex_answer(response: str, pattern: re.Pattern) -> str | None:
    """The last match of ``pattern`` (its first group when it has one)."""
    last = None
    for last in pattern.finditer(response):
        pass
    if last is None:
        return None
    answer = (last.group(1) if pattern.groups else last.group(0)).strip()
    return answer if answer and len(answer) <= MAX_ANSWER_CHARS else None


def extract(response: str, formats: Sequence[str] = ("boxed", "answer_is"),
            pattern: re.Pattern | None = None) -> str | None:
    """The final answer by the first of ``formats`` that finds one."""
    for form in formats:
        if form == "boxed":
            answer = boxed_answer(response)
        elif form == "answer_is":
            answer = final_answer(response)
        elif pattern is not None:
            answer = regex_answer(response, pattern)
        else:
            raise ValueError("answer format 'regex' needs reward.answer_regex")
        if answer is not None:
            return answer
    return None
