"""Held-out evaluation: pass@1 at the rollout temperature and greedy accuracy of a policy
in a rollout engine, judged by reward_svc.

One implementation serves the loop (``Master.evaluate``, the demo's SFT stop) and any HF
checkpoint on its own (:func:`evaluate_checkpoint`, ``k1rl eval``), so numbers from both
are comparable: the same problems (the run's held-out set, k1rl/master/problems.py), the
same sampling seed, the same verifiers. A checkpoint evaluated alone is loaded by vLLM from disk (policy version 0);
no trainer and no weight push are involved.
"""

from __future__ import annotations

import time
from pathlib import Path

from k1rl.config import RunConfig
from k1rl.data.problem import Problem
from k1rl.data.prompts import PromptRenderer
from k1rl.master.problems import ProblemSet, load_problems
from k1rl.metrics.record import Accuracy
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


def accuracy(cfg: RunConfig, rollout: RPCClient, reward: RPCClient, tasks: list[Problem],
             ref: RunRef, samples: int, renderer: PromptRenderer | None = None) -> Accuracy:
    """Accuracy of the policy in the engine on ``tasks``: pass@1 of ``samples`` samples at
    the rollout temperature and greedy, each per level when ``tasks`` span several, and
    the seconds it took. ``renderer``: how prompts reach the engine (default: data.prompt)."""
    r = cfg.rollout
    renderer = renderer or PromptRenderer(cfg.data.prompt, cfg.model.path)
    prompts = renderer.request_fields(tasks)
    started = time.perf_counter()
    result = {}
    for kind, n, temperature in (("accuracy", samples, r.temperature), ("greedy", 1, 0.0)):
        sampling = SamplingSpec(n=n, temperature=temperature, top_p=r.top_p,
                                max_tokens=r.max_tokens, seed=cfg.seed + EVAL_SEED_OFFSET)
        req = GenerateRequest(ref=ref, sampling=sampling, **prompts)
        generated = rollout.call("generate", req, GenerateResult)
        correct = score_completions(reward, tasks, generated, ref).correct
        result[kind] = sum(correct) / len(correct)
        result[f"{kind}_by_level"] = by_level(tasks, correct, n)
    return Accuracy(**result, seconds=time.perf_counter() - started)


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
                   response_tokens=tokens, verifier=task.verifier,
                   repeated=finish == "repetition")
        for j, (task, text, tokens, finish) in enumerate(responses)
    ]
    request = RewardRequest(ref=ref, items=items, length_penalty_weight=length_penalty_weight)
    return reward.call("score", request, RewardResult)


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
    """Some of the problems are code and reward_svc is to call this config's own sandbox
    (any other address is a sandbox service running elsewhere)."""
    code = "code" in problems.verifiers(heldout_only)
    return code and cfg.reward.sandbox_address == cfg.sandbox.address


def evaluation_config(cfg: RunConfig, model_dir: Path, sandbox: bool) -> RunConfig:
    """``cfg`` with ``model.path`` = ``model_dir`` and fresh local ports for the services
    an evaluation starts (the sandbox's too when ``sandbox``), so it runs beside anything
    else on the machine."""
    from k1rl.launch import free_tcp_address

    out = cfg.model_copy(deep=True)
    out.model.path = str(Path(model_dir).resolve())
    out.rollout.address = free_tcp_address()
    out.reward.address = free_tcp_address()
    if sandbox:
        out.sandbox.address = out.reward.sandbox_address = free_tcp_address()
        out.sandbox.http_port = None  # ZMQ only: parallel evaluations must not share a port
    return RunConfig.model_validate(out.model_dump())  # re-validate the edited copy


def evaluate_checkpoint(cfg: RunConfig, model_dir: Path, work_dir: Path, *,
                        ready_timeout_s: float = 900.0) -> Accuracy:
    """``Master.evaluate``'s accuracy of the HF checkpoint in ``model_dir`` on the run's
    held-out problems, with the run's rollout settings and seed. Starts rollout_svc (vLLM
    reads the checkpoint itself), reward_svc and, for code problems, the sandbox as local
    processes (logs, the config they read and the loaded data in ``work_dir``), and stops
    them before returning."""
    from k1rl.launch import LocalCluster

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    problems = load_problems(cfg, work_dir / "data")
    sandbox = needs_local_sandbox(cfg, problems, heldout_only=True)
    cfg = evaluation_config(cfg, model_dir, sandbox)
    config_path = (work_dir / "eval.yaml").resolve()
    config_path.write_text(cfg.dump_yaml())
    args = ["--config", str(config_path)]
    with LocalCluster(work_dir / "logs") as cluster:
        if sandbox:
            cluster.start("sandbox", "sandbox", ["serve", *args], cfg.sandbox.address)
        # no --dummy-weights: the engine loads model.path and serves it as policy 0
        cluster.start("rollout", "rollout_svc", args, cfg.rollout.address)
        cluster.start("reward", "reward_svc", args, cfg.reward.address)
        cluster.wait_ready(ready_timeout_s)
        with RPCClient(cfg.rollout.address, timeout_s=ready_timeout_s) as rollout, \
                RPCClient(cfg.reward.address, timeout_s=ready_timeout_s) as reward:
            ref = RunRef(run_id=cfg.run_id, iteration=0)
            return accuracy(cfg, rollout, reward, problems.heldout_problems(), ref,
                            cfg.rl.eval_samples)
