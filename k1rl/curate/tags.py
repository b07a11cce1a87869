"""Tags and balance (k1.5 §2.1: coverage balanced by a domain and discipline tag system).

Tag rules add tags to the prompts they find; the balance then keeps, of each tag that
``cap`` or ``weights`` names, as many prompts as the cap and the proportions allow. A prompt
is balanced under its first tag so named (a prompt counts once); prompts of no such tag
are kept as they are. Which prompts of a tag stay is drawn with the run seed.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence

from k1rl.curate.config import TagBalance
from k1rl.curate.evaluability import finds
from k1rl.data.problem import Problem


def tagged(problem: Problem, cfg: TagBalance) -> Problem:
    """``problem`` with the tags of the rules that find it added (each tag once)."""
    extra = [r.name for r in cfg.rules if r.name not in problem.tags and finds(r, problem)]
    if not extra:
        return problem
    return problem.model_copy(update={"tags": [*problem.tags, *dict.fromkeys(extra)]})


def tag_counts(problems: Sequence[Problem]) -> dict[str, int]:
    """How many prompts carry each tag (a prompt counts under each of its tags)."""
    return dict(sorted(Counter(t for p in problems for t in dict.fromkeys(p.tags)).items()))


def balance_tag(problem: Problem, cfg: TagBalance) -> str | None:
    return next((t for t in problem.tags if t in cfg.cap or t in cfg.weights), None)


def quotas(counts: dict[str, int], cfg: TagBalance) -> dict[str, int]:
    """Prompts kept per balanced tag: the largest counts in the ``weights`` proportions
    that every weighted tag's count allows, then at most its ``cap``."""
    keep = dict(counts)
    weighted = {t: w for t, w in cfg.weights.items() if t in counts}
    if weighted:
        unit = min(counts[t] / w for t, w in weighted.items())
        for t, w in weighted.items():
            # the epsilon keeps a float product such as 3.0000000004 from losing a prompt
            keep[t] = min(counts[t], math.floor(unit * w + 1e-9))
    for t, cap in cfg.cap.items():
        if t in keep:
            keep[t] = min(keep[t], cap)
    return keep


def balance(problems: Sequence[Problem], cfg: TagBalance,
            seed: int) -> tuple[list[Problem], list[tuple[Problem, str]]]:
    """(kept, dropped with reason ``over_quota:<tag>``), both in input order."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(problems):
        tag = balance_tag(p, cfg)
        if tag is not None:
            groups.setdefault(tag, []).append(i)
    limits = quotas({t: len(ix) for t, ix in groups.items()}, cfg)
    rng = random.Random(seed)
    out: dict[int, str] = {}
    for tag in sorted(groups):
        members = groups[tag]
        for i in rng.sample(members, len(members) - limits[tag]):
            out[i] = f"over_quota:{tag}"
    kept = [p for i, p in enumerate(problems) if i not in out]
    return kept, [(problems[i], out[i]) for i in sorted(out)]
