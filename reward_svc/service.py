"""Batch scoring: task reward from a verifier plus the weighted k1.5 length reward."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from k1rl.config import RewardConfig
from k1rl.protocol import RewardRequest, RewardResult

from reward_svc import verifiers
from reward_svc.length_penalty import length_rewards
from reward_svc.verifiers import Check, Verifier

log = logging.getLogger(__name__)


class RewardService:
    """Scores RewardRequests: ``reward = task + weight * length``.

    ``task`` is 1.0 if the item's verifier accepts the response, else 0.0. ``length`` is the
    k1.5 length reward over the items sharing a ``group_id`` (the k responses to one
    prompt). ``weight`` is ``config.length_penalty_weight`` from iteration
    ``config.length_penalty_warmup_iters`` on (the request's ``ref.iteration``), 0 before,
    unless the request sets its own (the master's ``rl.schedule``). Verifiers are created on first use and kept until :meth:`close`.
    """

    def __init__(self, config: RewardConfig) -> None:
        self.config = config
        self._verifiers: dict[str, Verifier] = {}
        # requests are served on several threads: a verifier is created once
        self._creating = threading.Lock()

    def start(self, names: Iterable[str] = ("math",)) -> None:
        """Create and warm up the named verifiers now instead of on the first request."""
        for name in names:
            self._verifier(name).start()

    def length_penalty_weight(self, iteration: int) -> float:
        if iteration < self.config.length_penalty_warmup_iters:
            return 0.0
        return self.config.length_penalty_weight

    def score(self, request: RewardRequest) -> RewardResult:
        items = request.items
        # resolve every verifier first, so an unknown name fails before any work is done
        checkers = [self._verifier(item.verifier) for item in items]
        checks = self._check_all(items, checkers)
        for i, item in enumerate(items):
            if item.repeated:  # a loop is a failed answer, whatever it says before the loop
                checks[i] = Check(correct=False, score=-self.config.repetition_penalty)
        correct = [c.correct for c in checks]
        length = [0.0] * len(items)
        for members in _groups(item.group_id for item in items).values():
            group_rewards = length_rewards(
                [items[j].response_tokens for j in members], [correct[j] for j in members]
            )
            for j, value in zip(members, group_rewards):
                length[j] = value
        weight = request.length_penalty_weight
        if weight is None:
            weight = self.length_penalty_weight(request.ref.iteration)
        task = [c.score for c in checks]
        errors = [c.error for c in checks]
        return RewardResult(
            rewards=[t + weight * n for t, n in zip(task, length)],
            correct=correct,
            task_rewards=task,
            length_rewards=length,
            length_penalty_weight=weight,
            errors=errors if any(errors) else [],
        )

    def _check_all(self, items, checkers: list[Verifier]) -> list[Check]:
        """Check every item; verifiers that allow it check several items at once."""

        def check(i: int) -> Check:
            try:
                return checkers[i].check(items[i].response, items[i].answer)
            except ValueError as e:  # a bad gold answer: name the item carrying it
                raise ValueError(
                    f"items[{i}] (group {items[i].group_id}): {type(e).__name__}: {e}"
                ) from e

        checks: list[Check | None] = [None] * len(items)
        todo = [i for i in range(len(items)) if not items[i].repeated]
        for checker in {id(checkers[i]): checkers[i] for i in todo}.values():
            if checker.batched:  # one call for all its items (a judge model batches them)
                mine = [i for i in todo if checkers[i] is checker]
                for i, result in zip(mine, checker.check_items([items[i] for i in mine])):
                    checks[i] = result
        todo = [i for i in todo if checks[i] is None]
        parallel = [i for i in todo if checkers[i].concurrency > 1]
        for i in todo:
            if checkers[i].concurrency == 1:
                checks[i] = check(i)
        if parallel:
            width = max(checkers[i].concurrency for i in parallel)
            with ThreadPoolExecutor(max_workers=min(width, len(parallel))) as pool:
                for i, result in zip(parallel, pool.map(check, parallel)):
                    checks[i] = result
        return checks

    def close(self) -> None:
        for checker in self._verifiers.values():
            checker.close()
        self._verifiers.clear()

    def __enter__(self) -> RewardService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _verifier(self, name: str) -> Verifier:
        judge = self.config.judge
        if judge.mode != "off" and name == judge.rule_verifier:
            name = "cot_rm"  # the judge backs up or replaces this rule verifier
        with self._creating:
            if name not in self._verifiers:
                self._verifiers[name] = verifiers.create(name, self.config)
            return self._verifiers[name]


def _groups(group_ids: Iterable[int]) -> dict[int, list[int]]:
    """group_id -> indices of its items, in request order."""
    out: dict[int, list[int]] = {}
    for i, gid in enumerate(group_ids):
        out.setdefault(gid, []).append(i)
    return out
