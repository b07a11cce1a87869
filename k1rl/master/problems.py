"""A run's problems: the training pools the sampler draws from and the held-out set the
evaluation measures, from the user's data sources (``data``) or the synthetic levels
(``rl.tasks``), one code path either way.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path

from k1rl.config import RunConfig
from k1rl.data.problem import DatasetPool, Problem, synthetic_problems
from k1rl.data.tasks import generate_tasks
from k1rl.rl_config import parse_levels

# Evaluation problems are generated with the run seed plus this, training ones with the
# run seed: the held-out split keeps them apart, the seeds keep the draws independent.
HELDOUT_SEED_OFFSET = 1


class ProblemSet:
    """``train``: one pool per rl.tasks level or data.train source, in config order;
    ``heldout``: one per evaluated level or held-out source, each at most
    rl.eval_problems long; each built when first asked for (a run that never evaluates
    needs no held-out set, an evaluation no training pools); ``skipped``: data rows left
    out, by reason."""

    def __init__(self, train: Callable[[], list[Sequence[Problem]]],
                 heldout: Callable[[], list[Sequence[Problem]]],
                 skipped: Counter | None = None) -> None:
        self._train = train
        self._heldout = heldout
        self.skipped = skipped or Counter()

    @cached_property
    def train(self) -> list[Sequence[Problem]]:
        return self._train()

    @cached_property
    def heldout(self) -> list[Sequence[Problem]]:
        return self._heldout()

    def heldout_problems(self) -> list[Problem]:
        return [p for pool in self.heldout for p in pool]

    def verifiers(self, heldout_only: bool = False) -> set[str]:
        """The verifiers the problems name (read from the column for data sources). The
        training pools' unless ``heldout_only``, and the held-out set's once it is built
        (synthetic held-out levels are training levels too)."""
        built = "heldout" in self.__dict__
        pools = [*([] if heldout_only else self.train),
                 *(self.heldout if heldout_only or built else [])]
        found: set[str] = set()
        for pool in pools:
            if isinstance(pool, DatasetPool):
                found.update(pool.dataset.unique("verifier"))
            else:
                found.update(p.verifier for p in pool)
        return found


def load_problems(cfg: RunConfig, cache_dir: Path | None = None) -> ProblemSet:
    """The problems of ``cfg``; data sources are loaded into ``cache_dir`` (Arrow)."""
    n = cfg.rl.eval_problems
    if cfg.data.train:
        from k1rl.data.sources import load_data

        data = load_data(cfg.data, cache_dir)
        heldout = [DatasetPool(ds.select(range(min(n, len(ds)))), label)
                   for label, ds in data.heldout]
        train = [DatasetPool(ds, label) for label, ds in data.train]
        return ProblemSet(lambda: train, lambda: heldout, data.skipped)
    return ProblemSet(
        lambda: [synthetic_problems(generate_tasks(family, level, cfg.rl.pool_size,
                                                   seed=cfg.seed, split="train"))
                 for family, level in parse_levels(cfg.rl.tasks)],
        lambda: [synthetic_problems(generate_tasks(family, level, n,
                                                   seed=cfg.seed + HELDOUT_SEED_OFFSET,
                                                   split="heldout"))
                 for family, level in parse_levels(cfg.rl.headline_tasks)])


def load_files(paths: list[Path], cfg: RunConfig, cache_dir: Path,
               limit: int | None = None) -> tuple[list[Problem], Counter]:
    """Every row (at most ``limit`` per path) of data files in the default field names
    (the format `k1rl gen-tasks` writes), each path one level named after it, read with
    ``cfg.data.on_bad_row``; and the rows left out, by reason."""
    from k1rl.data.sources import DataSource, load_each

    pools, skipped = load_each([DataSource(path=str(p)) for p in paths], cfg.data.on_bad_row,
                               Path(cache_dir), "eval")
    problems: list[Problem] = []
    for label, ds in pools:
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        problems.extend(DatasetPool(ds, label))
    return problems, skipped
