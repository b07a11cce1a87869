"""The k1.5 iterative synchronous loop: one named call per step.

    sample prompts -> ROLLOUT (checkpoint engine pushes policy v into vLLM)
    -> k samples per prompt -> rewards -> TRAIN (vLLM halted) -> one RL iteration of
    the configured loss -> checkpoint trainer + run state -> metrics

Each iteration ends with the trainer checkpointed, the prompt ledger appended and the
run state written atomically, so a master killed between iterations resumes without
losing one; an iteration a service died in is redone from there (recovery.py).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from k1rl import parity
from k1rl.balance import BalancedClients
from k1rl.config import RunConfig
from k1rl.data.problem import Problem
from k1rl.data.prompts import PromptRenderer
from k1rl.master import samplers
from k1rl.master.engines import EnginePool
from k1rl.master.evaluation import accuracy, by_level, score_responses
from k1rl.master.ledger import LedgerEntry, PromptLedger
from k1rl.master.problems import ProblemSet, load_problems
from k1rl.master.recovery import (
    RECOVERABLE,
    PolicyMismatch,
    RecoveryError,
    align_trainer,
    retried,
    wait_for_services,
)
from k1rl.master.replay import Group, ReplayBuffer
from k1rl.master.state import RunState
from k1rl.master.timing import Stopwatch
from k1rl.metrics import MetricSinks, open_sinks, prometheus
from k1rl.metrics.record import (
    Accuracy,
    DataMetrics,
    IterationMetrics,
    RewardMetrics,
    RolloutMetrics,
    SwitchMetrics,
    Timings,
    TrainMetrics,
)
from k1rl.protocol import (
    CheckpointRequest,
    CheckpointResult,
    Continuation,
    GenerateRequest,
    GenerateResult,
    PhaseCommand,
    PhaseStatus,
    RewardResult,
    RunRef,
    SamplingSpec,
    TrainBatch,
    TrainSample,
    TrainStats,
)
from k1rl.rpc import RPCClient
from k1rl.watch import WatchedClient

log = logging.getLogger(__name__)

FINAL_HF = "final"  # the run's policy after its last iteration, as an HF checkpoint
# trainer verbs that change nothing: re-sent to a restarted trainer (the others change
# the policy or its files, and a restarted trainer holds another version)
TRAINER_IDEMPOTENT = frozenset({"logprobs", "roundtrip"})


@dataclass
class Clients:
    trainer: WatchedClient
    rollout: EnginePool
    reward: BalancedClients
    checkpoint_engine: WatchedClient

    @classmethod
    def connect(cls, cfg: RunConfig) -> Clients:
        """Every call watched (cfg.calls): a service that dies is noticed in seconds."""
        policy = cfg.calls
        return cls(
            trainer=WatchedClient.for_policy(
                cfg.trainer.address, policy, idempotent=TRAINER_IDEMPOTENT,
                max_message_bytes=cfg.trainer.max_message_bytes),
            rollout=EnginePool(cfg.rollout.engine_addresses(), timeout_s=policy.timeout_s,
                               ping_every_s=policy.ping_every_s, misses=policy.misses),
            # a score is safe to repeat: one lost with its replica is sent again
            reward=BalancedClients(cfg.reward.addresses or [cfg.reward.address],
                                   max_in_flight=cfg.reward.handler_threads,
                                   timeout_s=policy.timeout_s, ping_every_s=policy.ping_every_s,
                                   misses=policy.misses, restart_wait_s=policy.restart_wait_s),
            checkpoint_engine=WatchedClient.for_policy(cfg.checkpoint_engine.address, policy),
        )

    def close(self) -> None:
        for c in (self.trainer, self.rollout, self.reward, self.checkpoint_engine):
            c.close()


class Master:
    def __init__(self, cfg: RunConfig, run_dir: Path, clients: Clients, state: RunState,
                 problems: ProblemSet | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.clients = clients
        self.state = state
        self.problems = problems or load_problems(cfg, self.run_dir / "data")
        self.renderer = PromptRenderer(cfg.data.prompt, cfg.model.path)
        self.sinks: MetricSinks | None = None  # where metrics records go: see metric_sinks()
        r = cfg.rollout
        # Without partial rollouts every trajectory ends within its one segment, so
        # each group is done in the iteration that started it.
        self.replay = ReplayBuffer(
            capacity=r.replay_capacity if r.max_response_tokens else 2**62,
            segment_tokens=r.max_tokens,
            max_response_tokens=r.max_response_tokens or r.max_tokens,
            partial=r.max_response_tokens is not None,
        )
        self.ledger = PromptLedger(self.run_dir)
        self.heldout: list[Problem] = []  # built on the first evaluation
        self.trained: TrainBatch | None = None  # the iteration's batch, once sent
        self.restore(state)

    def restore(self, state: RunState) -> None:
        """Continue from ``state``: its random state, sampler, replay buffer and ledger."""
        self.state = state
        self.rng = state.rng(self.cfg.seed)
        self.sampler = samplers.create(self.cfg.rl, self.problems.train)
        self.sampler.load_state_dict(state.sampler_state)
        self.replay.load(state.replay_file)
        self.ledger.rewind(state.iterations_done)

    # ------------------------------------------------------------------ the loop
    def run(self, on_iteration: Callable[[IterationMetrics], None] | None = None) -> RunState:
        """Iterate until rl.iterations are done; ``on_iteration`` gets each metrics record."""
        self.restore_trainer()
        with self.metric_sinks():
            attempts = 0
            while self.state.iterations_done < self.cfg.rl.iterations:
                try:
                    record = self.iteration(self.state.iterations_done)
                except RECOVERABLE as exc:
                    attempts += 1
                    self.recover(exc, attempts)
                    continue
                attempts = 0
                if on_iteration is not None:
                    on_iteration(record)
            if self.cfg.rl.eval_every:
                self.final_evaluation()
        self.export_final()
        return self.state

    def recover(self, exc: BaseException, attempts: int) -> None:
        """Back to the last completed iteration after a service died in this one (see
        recovery.py); the caller redoes it. Gives up after calls.max_recoveries attempts."""
        i = self.state.iterations_done
        if attempts > self.cfg.calls.max_recoveries:
            raise RecoveryError(f"iteration {i} failed {attempts} times; the last: "
                                f"{type(exc).__name__}: {exc}") from exc
        log.warning("iteration %d failed (%s: %s): redoing it from the last completed one",
                    i, type(exc).__name__, exc)
        wait_for_services(self.cfg, self.cfg.calls.restart_wait_s)
        state = (RunState.load(self.run_dir) if (self.run_dir / "state.json").exists()
                 else RunState(run_id=self.cfg.run_id))
        self.restore(state)
        prometheus.RECOVERIES.inc()

    @contextmanager
    def metric_sinks(self) -> Iterator[MetricSinks]:
        """The rl.metrics sinks, open while iterations run (run() opens them; so must a
        caller that drives :meth:`iteration` itself). On resume, the records of an
        iteration that did not complete go as they open."""
        self.sinks = open_sinks(self.cfg, self.run_dir, self.state.iterations_done)
        try:
            with self.sinks:
                yield self.sinks
        finally:
            self.sinks = None

    def iteration(self, i: int) -> IterationMetrics:
        """One k1.5 iteration: sample prompts; in the ROLLOUT phase, evaluate when due and
        generate (parked trajectories go on beside fresh prompts, one batch); score the
        groups whose k trajectories have all finished; in the TRAIN phase, train on them;
        checkpoint. Returns the iteration's metrics record."""
        watch = Stopwatch()
        ref = RunRef(run_id=self.cfg.run_id, iteration=i)
        self.trained = None
        with watch("iteration_s"):
            self.restore_trainer()
            tasks, no_room = self.sample(i)
            to_rollout = self.switch("rollout", ref)
            # the engine now holds policy v_i: evaluating it here needs no extra weight sync
            evaluation = self.evaluate(ref) if self._eval_due(i) else None
            with watch("rollout_s"):
                groups, generated = self.generate(tasks, ref)
            with watch("reward_s"):
                rewards = self.score(groups, ref)
            to_train = self.switch("train", ref)
            with watch("train_s"):
                stats = self.train(groups, rewards, ref)
            fates = self.fates(i, (tasks, no_room), groups, rewards, stats)
        record = IterationMetrics(
            iteration=i,
            policy_version=stats.policy_version if stats else self.state.policy_version,
            max_tokens=self._budget(i), time=Timings(**watch.seconds),
            switch=_switch_metrics(to_rollout, to_train), rollout=generated,
            reward=_reward_metrics(groups, rewards), train=_train_metrics(stats),
            eval=evaluation,
            data=self._data_metrics() if i == 0 and self.cfg.data.train else None)
        self.checkpoint(i, record, fates)
        return record

    def _data_metrics(self) -> DataMetrics:
        p = self.problems
        return DataMetrics(data_train_problems=sum(len(pool) for pool in p.train),
                           data_heldout_problems=sum(len(pool) for pool in p.heldout),
                           skipped=dict(p.skipped))

    # ------------------------------------------------------------------ phases
    def sample(self, i: int) -> tuple[list[Problem], list[Problem]]:
        """This iteration's fresh prompts, as many as the replay buffer has room for, and
        the rest of the draw (dropped, and recorded so in the ledger)."""
        drawn = self.sampler.sample(self.rng, i)
        room = self.replay.room() // self.cfg.rollout.n
        return drawn[:room], drawn[room:]

    def generate(self, tasks: list[Problem], ref: RunRef) -> tuple[list[Group], RolloutMetrics]:
        """k samples of each fresh prompt and one more segment of each parked trajectory (one
        engine batch); returns the groups that are now complete, and rollout metrics."""
        i = ref.iteration
        parked = self.replay.parked()
        continuations = self.replay.continuations()
        request = self.rollout_request(tasks, ref, continuations)
        rollout = retried(self.cfg, "generate",
                          lambda: self.clients.rollout.call("generate", request, GenerateResult),
                          lambda: self.switch("rollout", ref))
        for k, (task, result) in enumerate(zip(tasks, rollout.results, strict=True)):
            self.replay.start(f"{i}-{k}", task, result.prompt_token_ids, result.completions, i)
        self.replay.extend(parked, rollout.continued, i)
        groups = self.replay.pop_done()
        segments = [*(c for r in rollout.results for c in r.completions), *rollout.continued]
        return groups, RolloutMetrics(
            policy_version_rollout=rollout.policy_version,
            groups_trained=len(groups), prompts_started=len(tasks),
            trajectories_continued=len(continuations),
            tokens_reused=sum(len(c.generated_token_ids) for c in continuations),
            # a loop's last few tokens are decoded but not kept
            repetition_stops=sum(c.finish_reason == "repetition" for c in segments),
            decoded_tokens=rollout.decoded_tokens,
            engines=len(self.clients.rollout.live),
            engine_tokens_per_s=self.clients.rollout.tokens_per_s(),
            **self.replay.metrics(i))

    def score(self, groups: list[Group], ref: RunRef) -> RewardResult | None:
        """Rewards of the complete groups' whole trajectories (every segment), group by
        group; the sampler learns their success rates."""
        if not groups:
            return None
        rewards = score_responses(self.clients.reward,
                                  [(g.task, t.text, len(t.token_ids), t.finish_reason)
                                   for g in groups for t in g.trajectories],
                                  len(groups[0].trajectories), ref,
                                  self.cfg.rl.schedule.at(ref.iteration).length_penalty_weight)
        self.sampler.update([g.task for g in groups], rewards.correct, self.cfg.rollout.n)
        return rewards

    def train(self, groups: list[Group], rewards: RewardResult | None,
              ref: RunRef) -> TrainStats | None:
        """One RL iteration of the trainer on the complete groups (None: nothing to train)."""
        if not groups:
            return None
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
        if ref.iteration == 0 and self.cfg.parity.check_first_iteration:
            self.check_parity(samples)
        batch = self.trained = TrainBatch(ref=ref, samples=samples)
        return retried(self.cfg, "train",
                       lambda: self.clients.trainer.call("train", batch, TrainStats),
                       self.restore_trainer)

    def fates(self, i: int, drawn: tuple[list[Problem], list[Problem]], groups: list[Group],
              rewards: RewardResult | None, stats: TrainStats | None) -> list[LedgerEntry]:
        """The ledger lines of iteration ``i``: its groups now complete (trained, with what
        was left out and why, or dropped), those it started that are parked, and the
        prompts drawn (``drawn``: started, no room) that found no room."""
        n = self.cfg.rollout.n
        started, no_room = drawn
        entries = [LedgerEntry(key=f"{i}-{k}", problem=task.id, iteration=i, status="dropped",
                               trajectories=0, reason="replay buffer full")
                   for k, task in enumerate(no_room, start=len(started))]
        errors = (rewards.errors if rewards else None) or [""] * (n * len(groups))
        for g, group in enumerate(groups):
            dropped: dict[str, int] = {}
            for trajectory, error in zip(group.trajectories, errors[g * n:(g + 1) * n],
                                         strict=True):
                # as train() leaves them out
                why = ("empty response" if not trajectory.token_ids
                       else "reward error" if error else None)
                if why:
                    dropped[why] = dropped.get(why, 0) + 1
            trained = len(group.trajectories) - sum(dropped.values())
            entries.append(LedgerEntry(
                key=group.key, problem=group.task.id, iteration=i,
                status="trained" if stats and trained else "dropped",
                trajectories=len(group.trajectories), trained=trained if stats else 0,
                dropped=dropped, reason="" if stats and trained else "nothing to train on"))
        entries += [LedgerEntry(key=g.key, problem=g.task.id, iteration=i, status="parked",
                                trajectories=len(g.trajectories))
                    for g in self.replay.groups if g.started == i]
        return entries

    def check_parity(self, samples: list[TrainSample]) -> None:
        """Before the first step: the trainer must score the engine's samples as the engine
        did (k1rl/parity.py), or the run stops here rather than train the wrong model."""
        fresh = [s for s in samples if s.token_versions is None
                 or set(s.token_versions) == {s.policy_version}][:self.cfg.parity.samples]
        if not fresh:
            return
        tol = parity.tolerance(self.cfg)
        found = parity.against_trainer(self.clients.trainer,
                                       [s.prompt_token_ids for s in fresh],
                                       [s.response_token_ids for s in fresh],
                                       [s.rollout_logprobs for s in fresh])
        if not found.within(tol):
            raise parity.ParityError(
                f"the trainer and the rollout engine disagree on the first iteration's "
                f"samples: {found.describe(tol)}. The trainer would optimise another model "
                f"than the one sampling: run `k1rl doctor --model {self.cfg.model.path}` to "
                "find which check fails (parity.* sets the thresholds)")
        log.info("parity: %s", found.describe(tol))

    # -------------------------------------------------------------- evaluation
    def _eval_due(self, i: int) -> bool:
        return bool(self.cfg.rl.eval_every) and i % self.cfg.rl.eval_every == 0

    def evaluate(self, ref: RunRef) -> Accuracy:
        """Held-out accuracy of the policy in the engine: see :meth:`accuracy`. Needs the
        ROLLOUT phase."""
        if not self.heldout:
            self.heldout = self.problems.heldout_problems()
        return self.accuracy(self.heldout, ref, self.cfg.rl.eval_samples)

    def accuracy(self, tasks: list[Problem], ref: RunRef, samples: int) -> Accuracy:
        """Accuracy of the policy in the engine on ``tasks``: see
        :func:`k1rl.master.evaluation.accuracy`, which a checkpoint evaluated on its own
        goes through too. Needs the ROLLOUT phase."""
        return accuracy(self.cfg, self.clients.rollout, self.clients.reward, tasks, ref,
                        samples, self.renderer)

    def final_evaluation(self) -> IterationMetrics:
        """Evaluate the policy after the last iteration and append it as a metrics record
        (iteration = iterations done, so a resumed run replaces it)."""
        i = self.state.iterations_done
        record = IterationMetrics(iteration=i, policy_version=self.state.policy_version,
                                  eval=self.in_rollout_phase(i, self.evaluate))
        self._write(record)
        return record

    def _write(self, record: IterationMetrics) -> None:
        if self.sinks is None:
            raise RuntimeError("the metric sinks are closed: iterate inside "
                               "`with master.metric_sinks():` (run() does)")
        self.sinks.write(record)

    def measure_in_rollout(self, tasks: list[Problem], samples: int) -> Accuracy:
        """:meth:`accuracy` of the trainer's current weights, outside an iteration (e.g.
        between SFT steps): a round trip TRAIN -> ROLLOUT -> TRAIN."""
        i = self.state.iterations_done
        return self.in_rollout_phase(i, lambda ref: self.accuracy(tasks, ref, samples))

    def in_rollout_phase(self, iteration: int, fn: Callable[[RunRef], Accuracy]) -> Accuracy:
        return in_rollout_phase(self.clients.checkpoint_engine,
                                RunRef(run_id=self.cfg.run_id, iteration=iteration), fn)

    # ------------------------------------------------------------------- steps
    def switch(self, phase: str, ref: RunRef) -> PhaseStatus:
        """The sidecar's switch; into rollout, sampling then uses the engines it updated."""
        status = self._switch(phase, ref)
        if phase == "rollout" and status.policy_version != self.state.policy_version:
            raise PolicyMismatch(f"the engines got policy v{status.policy_version}, the run "
                                 f"is at v{self.state.policy_version}")
        if status.engines:
            self.clients.rollout.use(status.engines)
        return status

    def _switch(self, phase: str, ref: RunRef) -> PhaseStatus:
        cmd = PhaseCommand(ref=ref, phase=phase)
        return self.clients.checkpoint_engine.call("phase", cmd, PhaseStatus)

    def _budget(self, i: int) -> int:
        """Iteration ``i``'s token budget per trajectory (rl.schedule, else rollout's)."""
        return self.cfg.rl.schedule.at(i).max_tokens or self.cfg.rollout.max_tokens

    def rollout_request(self, tasks: list[Problem], ref: RunRef,
                        continuations: list[Continuation] = ()) -> GenerateRequest:
        """k samples of each task, seeded (sent again as it is after an engine died)."""
        r = self.cfg.rollout
        sampling = SamplingSpec(
            n=r.n, temperature=r.temperature, top_p=r.top_p,
            max_tokens=self._budget(ref.iteration),
            seed=self.rng.randrange(2**31),
        )
        return GenerateRequest(ref=ref, sampling=sampling, continuations=list(continuations),
                               **(self.renderer.request_fields(tasks) if tasks else {}))

    def checkpoint(self, i: int, record: IterationMetrics, fates: list[LedgerEntry]) -> None:
        """Trainer weights first, then the metrics record, the ledger and the replay
        buffer, then the state that points at them."""
        path = self.run_dir / "checkpoints" / f"iter_{i:05d}"
        req = CheckpointRequest(action="save", path=str(path.resolve()))
        retried(self.cfg, "checkpoint",
                lambda: self.clients.trainer.call("checkpoint", req, CheckpointResult),
                self.train_again)
        self._write(record)
        self.ledger.append(fates)
        self.state.iterations_done = i + 1
        self.state.policy_version = record.policy_version
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

    def train_again(self) -> None:
        """A trainer that died after this iteration's step lost it: back to the run state's
        policy, and the same batch again."""
        self.restore_trainer()
        if self.trained is not None:
            self.clients.trainer.call("train", self.trained, TrainStats)

    def export_final(self) -> Path:
        """The trainer's policy as an HF checkpoint in ``final/``: what `k1rl eval`, vLLM or
        transformers load, and what the next stage (another RL run, long2short) starts from."""
        path = (self.run_dir / FINAL_HF).resolve()
        req = CheckpointRequest(action="export_hf", path=str(path))
        # a trainer restarted meanwhile exports once it holds the run's last policy again
        retried(self.cfg, "export", lambda: self.clients.trainer.call("checkpoint", req,
                                                                      CheckpointResult),
                self.restore_trainer)
        return path

    def restore_trainer(self) -> None:
        """The trainer holds the last completed iteration's policy (on resume, after a
        failure, and before every iteration: see recovery.py), loaded from its checkpoint
        when it holds another."""
        if done := align_trainer(self.clients.trainer, self.state):
            log.warning("%s", done)

    def _prune_checkpoints(self) -> None:
        ckpts = sorted((self.run_dir / "checkpoints").glob("iter_*"))
        for old in ckpts[: -self.cfg.rl.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)


def in_rollout_phase(checkpoint_engine: RPCClient | WatchedClient, ref: RunRef,
                     fn: Callable[[RunRef], Accuracy]) -> Accuracy:
    """``fn(ref)`` with the trainer's current weights in the rollout engine: the sidecar
    switches TRAIN -> ROLLOUT (pushing the weights), and back to TRAIN after, also when
    ``fn`` fails."""
    checkpoint_engine.call("phase", PhaseCommand(ref=ref, phase="rollout"), PhaseStatus)
    try:
        return fn(ref)
    finally:
        checkpoint_engine.call("phase", PhaseCommand(ref=ref, phase="train"), PhaseStatus)


def _reward_metrics(groups: list[Group], rewards: RewardResult | None) -> RewardMetrics | None:
    if rewards is None:
        return None
    n = len(groups[0].trajectories)
    lengths = [len(t.token_ids) for g in groups for t in g.trajectories]
    return RewardMetrics(
        reward_mean=sum(rewards.rewards) / len(rewards.rewards),
        accuracy=sum(rewards.correct) / len(rewards.correct),
        accuracy_by_level=by_level([g.task for g in groups], rewards.correct, n),
        reward_errors=sum(bool(e) for e in rewards.errors),
        length_penalty_weight=rewards.length_penalty_weight,
        response_tokens_mean=sum(lengths) / max(1, len(lengths)),
    )


def _train_metrics(stats: TrainStats | None) -> TrainMetrics | None:
    if stats is None:
        return None
    values = {k: v for k, v in stats.metrics.items() if k != "policy_version"}
    return TrainMetrics(train_loss=stats.loss, train_steps=stats.steps, values=values)


def _switch_metrics(to_rollout: PhaseStatus, to_train: PhaseStatus) -> SwitchMetrics:
    pushed = to_rollout.breakdown
    return SwitchMetrics(switch_to_rollout_s=to_rollout.switch_s,
                         switch_to_train_s=to_train.switch_s,
                         engine_start_s=pushed.get("engine_start_s", 0.0),
                         weight_sync_s=pushed.get("push_s", 0.0) + pushed.get("update_s", 0.0))
