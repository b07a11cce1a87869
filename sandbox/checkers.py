"""Comparing a program's output with the expected one.

exact, whitespace and float run in the service process (pure functions below); a
custom checker is a program run in the sandbox like any other (see sandbox/judge.py).
"""

from __future__ import annotations

import math

from k1rl.protocol import Checker


def compare(checker: Checker, output: str, expected: str) -> tuple[bool, str]:
    """(accepted, why not) for the built-in checkers."""
    if checker.name == "exact":
        if output == expected:
            return True, ""
        return False, _first_difference(output, expected)
    got, want = output.split(), expected.split()
    if checker.name == "whitespace":
        if got == want:
            return True, ""
        return False, _token_difference(got, want)
    if checker.name == "float":
        return _floats_match(got, want, checker.abs_tol, checker.rel_tol)
    raise ValueError(f"checker {checker.name!r} is not built in")


def _floats_match(got: list[str], want: list[str], abs_tol: float,
                  rel_tol: float) -> tuple[bool, str]:
    if len(got) != len(want):
        return False, f"{len(got)} tokens, expected {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        if g == w:
            continue
        try:
            a, b = float(g), float(w)
        except ValueError:
            return False, f"token {i + 1}: {_clip(g)!r}, expected {_clip(w)!r}"
        if math.isnan(a) or math.isnan(b) or not math.isclose(a, b, rel_tol=rel_tol,
                                                               abs_tol=abs_tol):
            return False, f"token {i + 1}: {_clip(g)}, expected {_clip(w)} " \
                          f"(abs_tol {abs_tol}, rel_tol {rel_tol})"
    return True, ""


def _token_difference(got: list[str], want: list[str]) -> str:
    for i, (g, w) in enumerate(zip(got, want)):
        if g != w:
            return f"token {i + 1}: {_clip(g)!r}, expected {_clip(w)!r}"
    return f"{len(got)} tokens, expected {len(want)}"


def _first_difference(got: str, want: str) -> str:
    for i, (g, w) in enumerate(zip(got, want)):
        if g != w:
            return f"differs at character {i}: {_clip(got[i:i + 20])!r}, " \
                   f"expected {_clip(want[i:i + 20])!r}"
    return f"{len(got)} characters, expected {len(want)}"


def _clip(s: str, n: int = 40) -> str:
    return s if len(s) <= n else s[:n] + "..."
