"""Problems read from data sources as one list, and written back as data-source rows:
what the offline stages (`k1rl curate`, `k1rl long2short sample`) read and write, so their
output is a data source for the next command as it stands."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from k1rl.data.problem import DatasetPool, Problem
from k1rl.data.sources import DataSource, OnBadRow


def read_problems(sources: list[DataSource], on_bad_row: OnBadRow, cache_dir: Path,
                  kind: str) -> tuple[list[Problem], Counter]:
    """Every row of ``sources`` (each source a level), and the rows left out by reason.
    Ids must be distinct: the stages track prompts by id."""
    from k1rl.data.sources import load_each

    pools, skipped = load_each(sources, on_bad_row, Path(cache_dir), kind)
    problems = [p for label, ds in pools for p in DatasetPool(ds, label)]
    ids = Counter(p.id for p in problems)
    twice = [i for i, n in ids.items() if n > 1]
    if twice:
        raise ValueError(f"{kind}: problem id {twice[0]!r} occurs {ids[twice[0]]} times: "
                         "give the rows distinct ids (fields.id)")
    return problems, skipped


def problem_row(p: Problem) -> dict:
    """``p`` as a row in the default field names (what `k1rl gen-tasks` writes), read back
    as the same problem."""
    out: dict = {"id": p.id}
    if p.messages:
        out["messages"] = [m.model_dump() for m in p.messages]
    else:
        out["prompt"] = p.prompt
    out["tests" if p.verifier == "code" else "answer"] = p.answer
    out |= {"verifier": p.verifier, "tags": p.tags, "difficulty": p.difficulty,
            "pass_rate": p.pass_rate}
    if p.response is not None:
        out["response"] = p.response
    return out


def write_rows(path: Path, rows: Iterable[dict]) -> int:
    """JSONL, one row per line; returns the number written."""
    n = 0
    with Path(path).open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n
