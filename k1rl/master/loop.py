"""The k1.5 iterative synchronous loop: one named call per step.

    sample prompts -> ROLLOUT (checkpoint engine pushes policy v into vLLM)
    -> k samples per prompt -> rewards -> TRAIN (vLLM halted) -> mirror-descent
    iteration -> checkpoint trainer + run state -> metrics

Each iteration ends with the trainer checkpointed and the run state written
atomically, so a master killed between iterations resumes without losing one.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from k1rl.config import RunConfig, parse_levels
from k1rl.data.tasks import Task, generate_tasks
from k1rl.master.replay import Group, ReplayBuffer
from k1rl.master.sampling import PromptSampler
from k1rl.master.state import RunState
from k1rl.protocol import (
    CheckpointRequest,
    CheckpointResult,
    GenerateRequest,
    GenerateResult,
    PhaseCommand,
    PhaseStatus,
    RewardItem,
    RewardRequest,
    RewardResult,
    RunRef,
    Continuation,
    SamplingSpec,
    TrainBatch,
    TrainStats,
)
from k1rl.rpc import RPCClient

METRICS_FILE = "metrics.jsonl"


@dataclass
class Clients:
    trainer: RPCClient
    rollout: RPCClient
    reward: RPCClient
    checkpoint_engine: RPCClient

    @classmethod
    def connect(cls, cfg: RunConfig, timeout_s: float = 900.0) -> Clients:
        return cls(
            trainer=RPCClient(cfg.trainer.address, timeout_s=timeout_s),
            rollout=RPCClient(cfg.rollout.address, timeout_s=timeout_s),
            reward=RPCClient(cfg.reward.address, timeout_s=timeout_s),
            checkpoint_engine=RPCClient(cfg.checkpoint_engine.address, timeout_s=timeout_s),
        )

    def close(self) -> None:
        for c in (self.trainer, self.rollout, self.reward, self.checkpoint_engine):
            c.close()


def level_pools(cfg: RunConfig) -> list[list[Task]]:
    """The training problems of each rl.tasks level, in order."""
    return [generate_tasks(family, level, cfg.rl.pool_size, seed=cfg.seed, split="train")
            for family, level in parse_levels(cfg.rl.tasks)]


def prompt_pool(cfg: RunConfig) -> list[Task]:
    return [task for pool in level_pools(cfg) for task in pool]


def heldout_set(cfg: RunConfig) -> list[Task]:
    """Problems of the evaluated RL levels (``rl.headline_tasks``) that no training prompt
    can be (the hash-split held-out side)."""
    tasks: list[Task] = []
    for family, level in parse_levels(cfg.rl.headline_tasks):
        tasks += generate_tasks(family, level, cfg.rl.eval_problems, seed=cfg.seed + 1,
                                split="heldout")
    return tasks


class Master:
    def __init__(self, cfg: RunConfig, run_dir: Path, clients: Clients, state: RunState):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.clients = clients
        self.state = state
        self.sampler = PromptSampler(cfg.rl, level_pools(cfg))
        self.sampler.load_state_dict(state.sampler_state)
        r = cfg.rollout
        # Without partial rollouts every trajectory ends within its one segment, so
        # each group is done in the iteration that started it.
        self.replay = ReplayBuffer(
            capacity=r.replay_capacity if r.max_response_tokens else 2**62,
            segment_tokens=r.max_tokens,
            max_response_tokens=r.max_response_tokens or r.max_tokens,
        )
        self.replay.load(state.replay_file)
        self.heldout: list[Task] = []  # built on the first evaluation
        self.rng = state.rng(cfg.seed)

    # ------------------------------------------------------------------ the loop
    def run(self, on_iteration: Callable[[dict], None] | None = None) -> RunState:
        """Iterate until rl.iterations are done; ``on_iteration`` gets each metrics row."""
        self.restore_trainer()
        while self.state.iterations_done < self.cfg.rl.iterations:
            row = self.iteration(self.state.iterations_done)
            if on_iteration is not None:
                on_iteration(row)
        if self.cfg.rl.eval_every:
            self.final_evaluation()
        return self.state

    def iteration(self, i: int) -> dict:
        """One k1.5 iteration: parked trajectories go on and fresh prompts start (one
        batch), groups whose k trajectories have all finished are scored and trained on."""
        started = time.perf_counter()
        ref = RunRef(run_id=self.cfg.run_id, iteration=i)
        n = self.cfg.rollout.n
        parked = self.replay.parked()
        tasks = self.sampler.sample(self.rng, i)[: self.replay.room() // n]
        to_rollout = self.switch("rollout", ref)
        # the engine now holds policy v_i: evaluating it here needs no extra weight sync
        evaluation = self.evaluate(ref) if self._eval_due(i) else {}
        t0 = time.perf_counter()
        continuations = self.replay.continuations()
        rollout = self.rollout(tasks, ref, continuations)
        for k, (task, result) in enumerate(zip(tasks, rollout.results, strict=True)):
            self.replay.start(f"{i}-{k}", task, result.prompt_token_ids, result.completions, i)
        self.replay.extend(parked, rollout.continued, i)
        groups = self.replay.pop_done()
        t1 = time.perf_counter()
        row = {"iteration": i, "policy_version_rollout": rollout.policy_version,
               "policy_version": self.state.policy_version,
               "groups_trained": len(groups), "prompts_started": len(tasks),
               "trajectories_continued": len(continuations),
               "tokens_reused": sum(len(c.generated_token_ids) for c in continuations),
               # segments stopped in the engine because they loop, and all tokens the
               # engine decoded (a loop's last few are decoded but not kept)
               "repetition_stops": sum(c.finish_reason == "repetition" for c in [
                   *(c for r in rollout.results for c in r.completions), *rollout.continued]),
               "decoded_tokens": rollout.decoded_tokens,
               **self.replay.metrics(i)}
        rewards = self.score_groups(groups, ref) if groups else None
        group_tasks = [g.task for g in groups]
        if rewards is not None and self.cfg.rl.sampler == "prioritized":
            self.sampler.update(group_tasks, rewards.correct, n)
        t2 = time.perf_counter()
        to_train = self.switch("train", ref)
        t3 = time.perf_counter()
        stats = self.train_groups(groups, rewards, ref) if groups else None
        t4 = time.perf_counter()
        if rewards is not None:
            lengths = [len(t.token_ids) for g in groups for t in g.trajectories]
            row.update({
                "reward_mean": sum(rewards.rewards) / len(rewards.rewards),
                "accuracy": sum(rewards.correct) / len(rewards.correct),
                **_by_level("accuracy", group_tasks, rewards.correct, n),
                "reward_errors": sum(bool(e) for e in rewards.errors),
                "response_tokens_mean": sum(lengths) / max(1, len(lengths)),
            })
        if stats is not None:
            row.update({"policy_version": stats.policy_version, "train_loss": stats.loss,
                        **{f"train_{k}": v for k, v in stats.metrics.items()}})
        row.update({
            "switch_to_rollout_s": to_rollout.switch_s,
            "switch_to_train_s": to_train.switch_s,
            "engine_start_s": to_rollout.breakdown.get("engine_start_s", 0.0),
            "weight_sync_s": to_rollout.breakdown.get("push_s", 0.0)
            + to_rollout.breakdown.get("update_s", 0.0),
            "rollout_s": t1 - t0,
            "reward_s": t2 - t1,
            "train_s": t4 - t3,
            **evaluation,
        })
        self.checkpoint(i, row["policy_version"], row, time.perf_counter() - started)
        return row

    # -------------------------------------------------------------- evaluation
    def _eval_due(self, i: int) -> bool:
        return bool(self.cfg.rl.eval_every) and i % self.cfg.rl.eval_every == 0

    def evaluate(self, ref: RunRef) -> dict[str, float]:
        """Held-out accuracy of the policy in the engine (``eval_accuracy``, ``eval_greedy``,
        ``eval_s``): see :meth:`accuracy`. Needs the ROLLOUT phase."""
        if not self.heldout:
            self.heldout = heldout_set(self.cfg)
        return self.accuracy(self.heldout, ref, self.cfg.rl.eval_samples, prefix="eval")

    def accuracy(self, tasks: list[Task], ref: RunRef, samples: int,
                 prefix: str) -> dict[str, float]:
        """Accuracy of the policy in the engine on ``tasks``: ``<prefix>_accuracy`` = pass@1
        of ``samples`` samples at the rollout temperature, ``<prefix>_greedy``, the same
        per level (``<prefix>_accuracy@<level>``) when ``tasks`` span several, and the
        seconds it took. Needs the ROLLOUT phase.

        The sampling seed is fixed by the run seed, not drawn from the loop's RNG, so
        evaluating more or less often leaves the training prompts and samples unchanged.
        """
        r = self.cfg.rollout
        started = time.perf_counter()
        result = {}
        for key, n, temperature in ((f"{prefix}_accuracy", samples, r.temperature),
                                    (f"{prefix}_greedy", 1, 0.0)):
            sampling = SamplingSpec(n=n, temperature=temperature, top_p=r.top_p,
                                    max_tokens=r.max_tokens, seed=self.cfg.seed + 7919)
            req = GenerateRequest(ref=ref, prompts=[t.prompt for t in tasks], sampling=sampling)
            generated = self.clients.rollout.call("generate", req, GenerateResult)
            correct = self.score(tasks, generated, ref).correct
            result[key] = sum(correct) / len(correct)
            result.update(_by_level(key, tasks, correct, n))
        result[f"{prefix}_s"] = time.perf_counter() - started
        return result

    def final_evaluation(self) -> dict[str, float]:
        """Evaluate the policy after the last iteration and append it as a metrics row
        (iteration = iterations done, so a resumed run replaces it)."""
        i = self.state.iterations_done
        row = {"iteration": i, "policy_version": self.state.policy_version,
               **self.in_rollout_phase(i, self.evaluate)}
        with open(self.run_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps(row) + "\n")
        return row

    def measure_in_rollout(self, tasks: list[Task], samples: int, prefix: str) -> dict[str, float]:
        """:meth:`accuracy` of the trainer's current weights, outside an iteration (e.g.
        between SFT steps): a round trip TRAIN -> ROLLOUT -> TRAIN."""
        i = self.state.iterations_done
        return self.in_rollout_phase(i, lambda ref: self.accuracy(tasks, ref, samples, prefix))

    def in_rollout_phase(self, iteration: int, fn: Callable[[RunRef], dict]) -> dict:
        ref = RunRef(run_id=self.cfg.run_id, iteration=iteration)
        self.switch("rollout", ref)
        try:
            return fn(ref)
        finally:
            self.switch("train", ref)

    # ------------------------------------------------------------------- steps
    def switch(self, phase: str, ref: RunRef) -> PhaseStatus:
        cmd = PhaseCommand(ref=ref, phase=phase)
        return self.clients.checkpoint_engine.call("phase", cmd, PhaseStatus)

    def rollout(self, tasks: list[Task], ref: RunRef,
                continuations: list[Continuation] = ()) -> GenerateResult:
        r = self.cfg.rollout
        sampling = SamplingSpec(
            n=r.n, temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_tokens,
            seed=self.rng.randrange(2**31),
        )
        req = GenerateRequest(ref=ref, prompts=[t.prompt for t in tasks], sampling=sampling,
                              continuations=list(continuations))
        return self.clients.rollout.call("generate", req, GenerateResult)

    def score(self, tasks: list[Task], rollout: GenerateResult, ref: RunRef) -> RewardResult:
        return self._score([(t, c.text, len(c.token_ids), c.finish_reason)
                            for t, r in zip(tasks, rollout.results) for c in r.completions],
                           len(rollout.results[0].completions) if rollout.results else 1, ref)

    def score_groups(self, groups: list[Group], ref: RunRef) -> RewardResult:
        """Rewards of whole trajectories (every segment), group by group."""
        return self._score([(g.task, t.text, len(t.token_ids), t.finish_reason)
                            for g in groups for t in g.trajectories],
                           len(groups[0].trajectories), ref)

    def _score(self, responses: list[tuple], n: int, ref: RunRef) -> RewardResult:
        """``responses``: (task, text, tokens, finish reason), ``n`` per group in order."""
        items = [
            RewardItem(group_id=j // n, response=text, answer=task.answer,
                       response_tokens=tokens, verifier=task.verifier,
                       repeated=finish == "repetition")
            for j, (task, text, tokens, finish) in enumerate(responses)
        ]
        return self.clients.reward.call("score", RewardRequest(ref=ref, items=items), RewardResult)

    def train_groups(self, groups: list[Group], rewards: RewardResult,
                     ref: RunRef) -> TrainStats | None:
        n = len(groups[0].trajectories)
        errors = rewards.errors or [""] * len(rewards.rewards)
        samples = [
            sample
            for g, group in enumerate(groups)
            for sample, error in zip(
                group.train_samples(g, rewards.rewards[g * n:(g + 1) * n]),
                errors[g * n:(g + 1) * n])
            # an empty response carries no token to learn from; one the reward service
            # could not judge (the sandbox failed) is neither right nor wrong
            if sample.response_token_ids and not error
        ]
        if not samples:
            return None
        batch = TrainBatch(ref=ref, samples=samples)
        return self.clients.trainer.call("train", batch, TrainStats)

    def checkpoint(self, i: int, version: int, row: dict, seconds: float) -> None:
        """Trainer weights first, then the metrics row and the replay buffer, then the state
        that points at them."""
        path = self.run_dir / "checkpoints" / f"iter_{i:05d}"
        req = CheckpointRequest(action="save", path=str(path.resolve()))
        self.clients.trainer.call("checkpoint", req, CheckpointResult)
        row["iteration_s"] = seconds
        with open(self.run_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.state.iterations_done = i + 1
        self.state.policy_version = version
        self.state.trainer_checkpoint = str(path.resolve())
        self.state.remember_rng(self.rng)
        self.state.sampler_state = self.sampler.state_dict()
        replay = self.run_dir / "replay" / f"iter_{i:05d}.json"
        self.replay.save(replay)
        self.state.replay_file = str(replay.resolve())
        self.state.save(self.run_dir)
        self._prune_checkpoints()
        for old in (self.run_dir / "replay").glob("iter_*.json"):
            if old.resolve() != replay.resolve():
                old.unlink()

    def restore_trainer(self) -> None:
        """On resume: the trainer goes back to the last completed iteration's weights, and
        metrics rows of an iteration that did not complete are dropped."""
        _truncate_metrics(self.run_dir / METRICS_FILE, self.state.iterations_done)
        if self.state.trainer_checkpoint:
            req = CheckpointRequest(action="load", path=self.state.trainer_checkpoint)
            self.clients.trainer.call("checkpoint", req, CheckpointResult)

    def _prune_checkpoints(self) -> None:
        ckpts = sorted((self.run_dir / "checkpoints").glob("iter_*"))
        for old in ckpts[: -self.cfg.rl.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)


def _by_level(key: str, tasks: list[Task], correct: list[bool], n: int) -> dict[str, float]:
    """``key@family:level`` accuracy of each level, when ``tasks`` span several; ``correct``
    is task-major (``n`` items per task, in task order)."""
    levels: dict[str, list[bool]] = {}
    for i, ok in enumerate(correct):
        task = tasks[i // n]
        levels.setdefault(f"{task.family}:{task.difficulty}", []).append(ok)
    if len(levels) < 2:
        return {}
    return {f"{key}@{level}": sum(oks) / len(oks) for level, oks in levels.items()}


def _truncate_metrics(path: Path, iterations_done: int) -> None:
    if not path.exists():
        return
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept = [r for r in rows if r["iteration"] < iterations_done]
    if len(kept) != len(rows):
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
