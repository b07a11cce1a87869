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
    SamplingSpec,
    TrainBatch,
    TrainSample,
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
        started = time.perf_counter()
        ref = RunRef(run_id=self.cfg.run_id, iteration=i)
        tasks = self.sampler.sample(self.rng, i)
        to_rollout = self.switch("rollout", ref)
        # the engine now holds policy v_i: evaluating it here needs no extra weight sync
        evaluation = self.evaluate(ref) if self._eval_due(i) else {}
        t0 = time.perf_counter()
        rollout = self.rollout(tasks, ref)
        t1 = time.perf_counter()
        rewards = self.score(tasks, rollout, ref)
        if self.cfg.rl.sampler == "prioritized":
            self.sampler.update(tasks, rewards.correct, self.cfg.rollout.n)
        t2 = time.perf_counter()
        to_train = self.switch("train", ref)
        t3 = time.perf_counter()
        stats = self.train(rollout, rewards, ref)
        t4 = time.perf_counter()
        row = {
            "iteration": i,
            "policy_version_rollout": rollout.policy_version,
            "policy_version": stats.policy_version,
            "reward_mean": sum(rewards.rewards) / len(rewards.rewards),
            "accuracy": sum(rewards.correct) / len(rewards.correct),
            **_by_level("accuracy", tasks, rewards.correct, self.cfg.rollout.n),
            "reward_errors": sum(bool(e) for e in rewards.errors),
            "response_tokens_mean": _mean_len(rollout),
            "switch_to_rollout_s": to_rollout.switch_s,
            "switch_to_train_s": to_train.switch_s,
            "engine_start_s": to_rollout.breakdown.get("engine_start_s", 0.0),
            "weight_sync_s": to_rollout.breakdown.get("push_s", 0.0)
            + to_rollout.breakdown.get("update_s", 0.0),
            "rollout_s": t1 - t0,
            "reward_s": t2 - t1,
            "train_s": t4 - t3,
            "train_loss": stats.loss,
            **{f"train_{k}": v for k, v in stats.metrics.items()},
            **evaluation,
        }
        self.checkpoint(i, stats.policy_version, row, time.perf_counter() - started)
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

    def rollout(self, tasks: list[Task], ref: RunRef) -> GenerateResult:
        r = self.cfg.rollout
        sampling = SamplingSpec(
            n=r.n, temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_tokens,
            seed=self.rng.randrange(2**31),
        )
        req = GenerateRequest(ref=ref, prompts=[t.prompt for t in tasks], sampling=sampling)
        return self.clients.rollout.call("generate", req, GenerateResult)

    def score(self, tasks: list[Task], rollout: GenerateResult, ref: RunRef) -> RewardResult:
        items = [
            RewardItem(group_id=g, response=c.text, answer=t.answer,
                       response_tokens=len(c.token_ids), verifier=t.verifier,
                       repeated=c.finish_reason == "repetition")
            for g, (t, r) in enumerate(zip(tasks, rollout.results))
            for c in r.completions
        ]
        return self.clients.reward.call("score", RewardRequest(ref=ref, items=items), RewardResult)

    def train(self, rollout: GenerateResult, rewards: RewardResult, ref: RunRef) -> TrainStats:
        completions = [(g, r, c) for g, r in enumerate(rollout.results) for c in r.completions]
        errors = rewards.errors or [""] * len(completions)
        samples = [
            TrainSample(
                group_id=g,
                prompt_token_ids=r.prompt_token_ids,
                response_token_ids=c.token_ids,
                rollout_logprobs=c.logprobs,
                reward=reward,
                policy_version=c.policy_version,
            )
            for (g, r, c), reward, error in zip(completions, rewards.rewards, errors)
            # an empty response carries no token to learn from; one the reward service
            # could not judge (the sandbox failed) is neither right nor wrong
            if c.token_ids and not error
        ]
        batch = TrainBatch(ref=ref, samples=samples)
        return self.clients.trainer.call("train", batch, TrainStats)

    def checkpoint(self, i: int, version: int, row: dict, seconds: float) -> None:
        """Trainer weights first, then the metrics row, then the state that points at both."""
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
        self.state.save(self.run_dir)
        self._prune_checkpoints()

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


def _mean_len(rollout: GenerateResult) -> float:
    lengths = [len(c.token_ids) for r in rollout.results for c in r.completions]
    return sum(lengths) / max(1, len(lengths))


def _truncate_metrics(path: Path, iterations_done: int) -> None:
    if not path.exists():
        return
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept = [r for r in rows if r["iteration"] < iterations_done]
    if len(kept) != len(rows):
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
