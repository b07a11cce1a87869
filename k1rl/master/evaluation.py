"""Evaluation: pass@1 at the rollout temperature and greedy accuracy of a policy in a
rollout engine, judged by reward_svc; for `k1rl eval` also pass@k, response length and
the scores per level and per tag (:func:`report`).

One implementation serves the loop (``Master.evaluate``, the demo's SFT stop) and any HF
checkpoint on its own (:func:`evaluate_checkpoint`, :func:`evaluate_problems`, ``k1rl
eval``), so numbers from both are comparable: the same problems (the run's held-out set,
k1rl/master/problems.py), the same sampling seed, the same verifiers. A checkpoint
evaluated alone is loaded by vLLM from disk (policy version 0); no trainer and no weight
push are involved.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from k1rl.config import RunConfig
from k1rl.data.problem import Problem
from k1rl.data.prompts import PromptRenderer
from k1rl.master.problems import ProblemSet, load_problems
from k1rl.metrics.record import Accuracy, EvalReport, EvalScores
from k1rl.protocol import (
    GenerateRequest,
    GenerateResult,
    RewardItem,
    RewardRequest,
    RewardResult,
    RunRef,
    SamplingSpec,
)
from k1rl.rpc import RPCClient

# Evaluation samples are seeded by the run seed plus this, not drawn from the loop's RNG:
# evaluating more or less often leaves the training prompts and samples unchanged.
EVAL_SEED_OFFSET = 7919


@dataclass
class Outcomes:
    """What a policy did on each problem: per sample, whether it was right and how many
    tokens it took; whether the greedy response was right; the seconds it took."""

    problems: list[Problem]
    correct: list[list[bool]]
    tokens: list[list[int]]
    greedy: list[bool]
    seconds: float

    def accuracy(self) -> Accuracy:
        n = len(self.correct[0]) if self.correct else 1
        flat = [ok for oks in self.correct for ok in oks]
        return Accuracy(accuracy=sum(flat) / len(flat), greedy=sum(self.greedy) / len(self.greedy),
                        accuracy_by_level=by_level(self.problems, flat, n),
                        greedy_by_level=by_level(self.problems, self.greedy, 1),
                        seconds=self.seconds)


def sample_outcomes(cfg: RunConfig, rollout: RPCClient, reward: RPCClient,
                    tasks: list[Problem], ref: RunRef, samples: int,
                    renderer: PromptRenderer | None = None) -> Outcomes:
    """``samples`` samples per problem at the rollout temperature and one greedy response,
    scored by reward_svc. ``renderer``: how prompts reach the engine (default: data.prompt)."""
    r = cfg.rollout
    renderer = renderer or PromptRenderer(cfg.data.prompt, cfg.model.path)
    prompts = renderer.request_fields(tasks)
    started = time.perf_counter()
    scored = {}
    for kind, n, temperature in (("sampled", samples, r.temperature), ("greedy", 1, 0.0)):
        sampling = SamplingSpec(n=n, temperature=temperature, top_p=r.top_p,
                                max_tokens=r.max_tokens, seed=cfg.seed + EVAL_SEED_OFFSET)
        req = GenerateRequest(ref=ref, sampling=sampling, **prompts)
        generated = rollout.call("generate", req, GenerateResult)
        correct = score_completions(reward, tasks, generated, ref).correct
        tokens = [len(c.token_ids) for res in generated.results for c in res.completions]
        scored[kind] = ([correct[i:i + n] for i in range(0, len(correct), n)],
                        [tokens[i:i + n] for i in range(0, len(tokens), n)])
    (correct, tokens), (greedy, _) = scored["sampled"], scored["greedy"]
    return Outcomes(list(tasks), correct, tokens, [oks[0] for oks in greedy],
                    time.perf_counter() - started)


def accuracy(cfg: RunConfig, rollout: RPCClient, reward: RPCClient, tasks: list[Problem],
             ref: RunRef, samples: int, renderer: PromptRenderer | None = None) -> Accuracy:
    """Accuracy of the policy in the engine on ``tasks``: pass@1 of ``samples`` samples at
    the rollout temperature and greedy, each per level when ``tasks`` span several, and
    the seconds it took."""
    return sample_outcomes(cfg, rollout, reward, tasks, ref, samples, renderer).accuracy()


def pass_at_k(n: int, c: int, k: int) -> float:
    """The chance that at least one of ``k`` samples drawn without replacement from ``n``
    (``c`` of them right) is right: the unbiased pass@k estimate from ``n`` >= ``k``
    samples (Chen et al. 2021)."""
    if not 0 < k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n samples (n = {n})")
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def scores(outcomes: Outcomes, indices: list[int], k: int) -> EvalScores:
    """The scores of the problems at ``indices`` of ``outcomes``."""
    correct = [outcomes.correct[i] for i in indices]
    tokens = [t for i in indices for t in outcomes.tokens[i]]
    return EvalScores(
        problems=len(indices),
        pass1=sum(map(sum, correct)) / sum(map(len, correct)),
        pass_k=sum(pass_at_k(len(oks), sum(oks), k) for oks in correct) / len(correct),
        greedy=sum(outcomes.greedy[i] for i in indices) / len(indices),
        response_tokens=sum(tokens) / len(tokens))


def report(outcomes: Outcomes, k: int, **about) -> EvalReport:
    """Overall, per level (pool or source) and per tag (a problem counts under each of
    its tags) scores of ``outcomes``; ``about``: the report's model, data and sampling."""
    groups: dict[str, dict[str, list[int]]] = {"level": {}, "tag": {}}
    for i, p in enumerate(outcomes.problems):
        groups["level"].setdefault(p.level, []).append(i)
        for tag in dict.fromkeys(p.tags):
            groups["tag"].setdefault(tag, []).append(i)
    return EvalReport(
        **about, k=k, seconds=outcomes.seconds,
        overall=scores(outcomes, list(range(len(outcomes.problems))), k),
        by_level={name: scores(outcomes, ix, k) for name, ix in sorted(groups["level"].items())},
        by_tag={name: scores(outcomes, ix, k) for name, ix in sorted(groups["tag"].items())})


def score_completions(reward: RPCClient, tasks: list[Problem], generated: GenerateResult,
                      ref: RunRef) -> RewardResult:
    """Rewards of every completion of ``generated`` (one result per task, in order)."""
    return score_responses(
        reward, [(t, c.text, len(c.token_ids), c.finish_reason)
                 for t, r in zip(tasks, generated.results) for c in r.completions],
        len(generated.results[0].completions) if generated.results else 1, ref)


def score_responses(reward: RPCClient, responses: list[tuple], n: int, ref: RunRef,
                    length_penalty_weight: float | None = None) -> RewardResult:
    """``responses``: (problem, text, tokens, finish reason), ``n`` per group in order;
    ``length_penalty_weight`` overrides the reward service's (rl.schedule)."""
    items = [
        RewardItem(group_id=j // n, response=text, answer=task.answer,
                   prompt=problem_text(task), response_tokens=tokens, verifier=task.verifier,
                   repeated=finish == "repetition")
        for j, (task, text, tokens, finish) in enumerate(responses)
    ]
    request = RewardRequest(ref=ref, items=items, length_penalty_weight=length_penalty_weight)
    return reward.call("score", request, RewardResult)


def problem_text(problem: Problem) -> str:
    """The problem as a judge reads it: the raw prompt, or the chat turns one per line."""
    return problem.prompt or "\n".join(f"{m.role}: {m.content}" for m in problem.messages)


def by_level(tasks: list[Problem], correct: list[bool], n: int) -> dict[str, float]:
    """The accuracy of each level (a synthetic ``family:level`` or a data source) when
    ``tasks`` span several (else none); ``correct`` is task-major (``n`` items per task,
    in task order)."""
    levels: dict[str, list[bool]] = {}
    for i, ok in enumerate(correct):
        levels.setdefault(tasks[i // n].level, []).append(ok)
    if len(levels) < 2:
        return {}
    return {level: sum(oks) / len(oks) for level, oks in levels.items()}


# ------------------------------------------------------------- a checkpoint on its own


def needs_local_sandbox(cfg: RunConfig, problems: ProblemSet, heldout_only: bool) -> bool:
    """Some of the problems are code and reward_svc is to call this config's own sandbox."""
    return own_sandbox(cfg, problems.verifiers(heldout_only))


def own_sandbox(cfg: RunConfig, verifiers: set[str]) -> bool:
    """Problems judged by ``verifiers`` need the sandbox of ``cfg`` (any other address in
    reward.sandbox_address, or sandbox replicas in reward.sandbox_addresses, is a sandbox
    service running elsewhere)."""
    return ("code" in verifiers and not cfg.reward.sandbox_addresses
            and cfg.reward.sandbox_address == cfg.sandbox.address)


def evaluation_config(cfg: RunConfig, model_dir: Path, sandbox: bool) -> RunConfig:
    """``cfg`` with ``model.path`` = ``model_dir`` and fresh local ports for the services
    an evaluation starts (the sandbox's too when ``sandbox``), so it runs beside anything
    else on the machine."""
    from k1rl.launch import free_tcp_address

    out = cfg.model_copy(deep=True)
    out.model.path = str(Path(model_dir).resolve())
    # one engine and one reward_svc of its own: the run's replica lists do not apply
    out.rollout.address, out.rollout.addresses = free_tcp_address(), []
    out.reward.address, out.reward.addresses = free_tcp_address(), []
    if sandbox:
        out.sandbox.address = out.reward.sandbox_address = free_tcp_address()
        out.sandbox.http_port = None  # ZMQ only: parallel evaluations must not share a port
    if serves_judge(out):
        out.reward.judge.address, out.reward.judge.addresses = free_tcp_address(), []
    return RunConfig.model_validate(out.model_dump())  # re-validate the edited copy


def serves_judge(cfg: RunConfig) -> bool:
    """The reward judges with a CoT model whose checkpoint this config names: local runs
    start its engine themselves (without reward.judge.model it is served elsewhere)."""
    return cfg.reward.judge.mode != "off" and bool(cfg.reward.judge.model)


def start_judge(cluster, cfg: RunConfig, args: list[str]) -> None:
    """rollout_svc --judge in ``cluster`` when :func:`serves_judge`."""
    if serves_judge(cfg):
        cluster.start("judge", "rollout_svc", [*args, "--judge"], cfg.reward.judge.address)


def evaluate_checkpoint(cfg: RunConfig, model_dir: Path, work_dir: Path, *,
                        ready_timeout_s: float = 900.0) -> Accuracy:
    """``Master.evaluate``'s accuracy of the HF checkpoint in ``model_dir`` on the run's
    held-out problems, with the run's rollout settings and seed."""
    problems = load_problems(cfg, Path(work_dir) / "data").heldout_problems()
    return evaluate_problems(cfg, model_dir, work_dir, problems, cfg.rl.eval_samples,
                             ready_timeout_s=ready_timeout_s).accuracy()


def evaluate_problems(cfg: RunConfig, model_dir: Path, work_dir: Path,
                      problems: list[Problem], samples: int, *,
                      ready_timeout_s: float = 900.0) -> Outcomes:
    """The outcomes of the HF checkpoint in ``model_dir`` on ``problems``, with ``cfg``'s
    rollout, reward and prompt settings and seed (see :func:`serving`)."""
    sandbox = own_sandbox(cfg, {p.verifier for p in problems})
    with serving(cfg, model_dir, work_dir, sandbox, ready_timeout_s) as (cfg, rollout, reward):
        return sample_outcomes(cfg, rollout, reward, problems, RunRef(run_id=cfg.run_id),
                               samples)


@contextmanager
def serving(cfg: RunConfig, model_dir: Path, work_dir: Path, sandbox: bool,
            ready_timeout_s: float) -> Iterator[tuple[RunConfig, RPCClient, RPCClient]]:
    """rollout_svc serving the checkpoint in ``model_dir`` (vLLM reads it itself, as
    policy 0: no trainer, no weight push), reward_svc and, when ``sandbox``, the sandbox,
    as local processes on fresh ports (logs and the config they read in ``work_dir``);
    yields the config they run with and clients of the engine and the reward service,
    and stops them after."""
    from k1rl.launch import LocalCluster

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    cfg = evaluation_config(cfg, model_dir, sandbox)
    config_path = (work_dir / "eval.yaml").resolve()
    config_path.write_text(cfg.dump_yaml())
    args = ["--config", str(config_path)]
    with LocalCluster(work_dir / "logs") as cluster:
        if sandbox:
            cluster.start("sandbox", "sandbox", ["serve", *args], cfg.sandbox.address)
        # no --dummy-weights: the engine loads model.path and serves it as policy 0
        cluster.start("rollout", "rollout_svc", args, cfg.rollout.address)
        start_judge(cluster, cfg, args)
        cluster.start("reward", "reward_svc", args, cfg.reward.address)
        cluster.wait_ready(ready_timeout_s)
        with RPCClient(cfg.rollout.address, timeout_s=ready_timeout_s) as rollout, \
                RPCClient(cfg.reward.address, timeout_s=ready_timeout_s) as reward:
            yield cfg, rollout, reward
