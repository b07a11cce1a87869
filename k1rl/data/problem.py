"""A problem as the RL loop sees it, whatever it came from: a user's data source
(k1rl/data/sources.py) or the synthetic generator (k1rl/data/tasks.py).

Pools of problems are sequences the samplers draw from: a pool over an Arrow-backed
dataset (:class:`DatasetPool`) builds a :class:`Problem` only for the rows drawn, so a
million-row source is never a million Python objects.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Sequence
from typing import Any, overload

from pydantic import BaseModel, ConfigDict, Field, model_validator

from k1rl.data.tasks import Task


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    role: str
    content: str


class Problem(BaseModel):
    """One prompt with what judges its responses.

    ``level`` names the pool the problem belongs to: a synthetic level (``add:2``) or a
    data source; per-level accuracies are reported under it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    prompt: str = Field("", description="Raw prompt text ('' when messages are given).")
    messages: list[ChatMessage] = Field(default_factory=list, description="Chat prompt.")
    answer: str = Field(description="Math: the reference answer; code: a CodeTask JSON.")
    verifier: str = "math"
    tags: list[str] = Field(default_factory=list)
    difficulty: float | None = None
    pass_rate: float | None = Field(None, description="The share of samples the SFT model "
                                    "got right when the set was curated (`k1rl curate`).")
    response: str | None = Field(None, description="A reference response (SFT).")
    level: str = ""

    @model_validator(mode="before")
    @classmethod
    def _from_synthetic_task(cls, data: Any) -> Any:
        # a synthetic Task is a problem too; replay buffers saved before problems replaced
        # tasks hold Task records
        if isinstance(data, Task):
            return _synthetic_fields(data)
        if isinstance(data, dict) and "family" in data and "target" in data:
            return _synthetic_fields(Task.model_validate(data))
        return data

    @model_validator(mode="after")
    def _one_prompt_form(self) -> Problem:
        if bool(self.prompt) == bool(self.messages):
            raise ValueError(f"problem {self.id}: give exactly one of prompt or messages")
        return self

    @classmethod
    def from_row(cls, row: dict, level: str) -> Problem:
        """A row of a loaded source (k1rl.data.sources) as a problem of pool ``level``."""
        fields = {k: v for k, v in row.items() if k in cls.model_fields and v is not None}
        return cls(**fields, level=level)


class DatasetPool(Sequence[Problem]):
    """The problems of one loaded source, built from its Arrow rows when indexed."""

    def __init__(self, dataset: Any, level: str) -> None:
        self.dataset = dataset
        self.level = level
        self._columns: dict[str, list] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    @overload
    def __getitem__(self, i: int) -> Problem: ...
    @overload
    def __getitem__(self, i: slice) -> list[Problem]: ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return Problem.from_row(self.dataset[i], self.level)

    def column(self, name: str) -> list:
        """One field of every problem, read from its column once (no Problem is built)."""
        if name not in self._columns:
            self._columns[name] = list(self.dataset[name])
        return self._columns[name]


class ChainedPool(Sequence[Problem]):
    """Pools end to end, as one sequence (indexing builds only the problem asked for)."""

    def __init__(self, pools: Sequence[Sequence[Problem]]) -> None:
        self.pools = list(pools)
        self.starts = list(itertools.accumulate((len(p) for p in self.pools), initial=0))

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = bisect.bisect_right(self.starts, i) - 1
        return self.pools[k][i - self.starts[k]]


def synthetic_problems(tasks: Iterable[Task]) -> list[Problem]:
    """Synthetic tasks (k1rl.data.tasks.Task) as problems, each in its level's pool."""
    return [Problem(**_synthetic_fields(t)) for t in tasks]


def _synthetic_fields(task: Task) -> dict:
    # the row gen-tasks writes, with the gold answer as the loop keeps it (code: the
    # CodeTask JSON, not the tests) and the task's level as its pool
    row = {k: v for k, v in task.as_problem().items() if k != "tests"}
    return {**row, "answer": task.answer, "level": f"{task.family}:{task.difficulty}"}


def pool_values(pool: Sequence[Problem], name: str) -> list:
    """Field ``name`` of every problem of ``pool``, read from the column when the pool is
    a dataset's."""
    if isinstance(pool, DatasetPool):
        return pool.column(name)
    if isinstance(pool, ChainedPool):
        return [v for part in pool.pools for v in pool_values(part, name)]
    # a pool of synthetic Tasks (run states of older versions) has no curation fields
    return [getattr(p, name, None) for p in pool]
