"""Held-out evaluation: pass@1 at the rollout temperature and greedy accuracy of a policy
in a rollout engine, judged by reward_svc.

One implementation serves the loop (``Master.evaluate``, the demo's SFT stop) and any HF
checkpoint on its own (:func:`evaluate_checkpoint`, ``k1rl eval``), so numbers from both
are comparable: the same problems (``heldout_set``), the same sampling seed, the same
verifiers. A checkpoint evaluated alone is loaded by vLLM from disk (policy version 0);
no trainer and no weight push are involved.
"""

from __future__ import annotations

import time
from pathlib import Path

from k1rl.config import RunConfig, parse_levels
from k1rl.data.tasks import Task, generate_tasks
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


def heldout_set(cfg: RunConfig) -> list[Task]:
    """Problems of the evaluated RL levels (``rl.headline_tasks``) that no training prompt
    can be (the hash-split held-out side)."""
    tasks: list[Task] = []
    for family, level in parse_levels(cfg.rl.headline_tasks):
        tasks += generate_tasks(family, level, cfg.rl.eval_problems, seed=cfg.seed + 1,
                                split="heldout")
    return tasks


def accuracy(cfg: RunConfig, rollout: RPCClient, reward: RPCClient, tasks: list[Task],
             ref: RunRef, samples: int) -> Accuracy:
    """Accuracy of the policy in the engine on ``tasks``: pass@1 of ``samples`` samples at
    the rollout temperature and greedy, each per level when ``tasks`` span several, and
    the seconds it took."""
    r = cfg.rollout
    started = time.perf_counter()
    result = {}
    for kind, n, temperature in (("accuracy", samples, r.temperature), ("greedy", 1, 0.0)):
        sampling = SamplingSpec(n=n, temperature=temperature, top_p=r.top_p,
                                max_tokens=r.max_tokens, seed=cfg.seed + EVAL_SEED_OFFSET)
        req = GenerateRequest(ref=ref, prompts=[t.prompt for t in tasks], sampling=sampling)
        generated = rollout.call("generate", req, GenerateResult)
        correct = score_completions(reward, tasks, generated, ref).correct
        result[kind] = sum(correct) / len(correct)
        result[f"{kind}_by_level"] = by_level(tasks, correct, n)
    return Accuracy(**result, seconds=time.perf_counter() - started)


def score_completions(reward: RPCClient, tasks: list[Task], generated: GenerateResult,
                      ref: RunRef) -> RewardResult:
    """Rewards of every completion of ``generated`` (one result per task, in order)."""
    return score_responses(
        reward, [(t, c.text, len(c.token_ids), c.finish_reason)
                 for t, r in zip(tasks, generated.results) for c in r.completions],
        len(generated.results[0].completions) if generated.results else 1, ref)


def score_responses(reward: RPCClient, responses: list[tuple], n: int, ref: RunRef,
                    length_penalty_weight: float | None = None) -> RewardResult:
    """``responses``: (task, text, tokens, finish reason), ``n`` per group in order;
    ``length_penalty_weight`` overrides the reward service's (rl.schedule)."""
    items = [
        RewardItem(group_id=j // n, response=text, answer=task.answer,
                   response_tokens=tokens, verifier=task.verifier,
                   repeated=finish == "repetition")
        for j, (task, text, tokens, finish) in enumerate(responses)
    ]
    request = RewardRequest(ref=ref, items=items, length_penalty_weight=length_penalty_weight)
    return reward.call("score", request, RewardResult)


def by_level(tasks: list[Task], correct: list[bool], n: int) -> dict[str, float]:
    """The accuracy of each level (``family:level``) when ``tasks`` span several (else
    none); ``correct`` is task-major (``n`` items per task, in task order)."""
    levels: dict[str, list[bool]] = {}
    for i, ok in enumerate(correct):
        task = tasks[i // n]
        levels.setdefault(f"{task.family}:{task.difficulty}", []).append(ok)
    if len(levels) < 2:
        return {}
    return {level: sum(oks) / len(oks) for level, oks in levels.items()}


# ------------------------------------------------------------- a checkpoint on its own


def needs_local_sandbox(cfg: RunConfig) -> bool:
    """A code level is evaluated and reward_svc is to call this config's own sandbox (any
    other address is a sandbox service running elsewhere)."""
    code = any(family == "code" for family, _ in parse_levels(cfg.rl.headline_tasks))
    return code and cfg.reward.sandbox_address == cfg.sandbox.address


def evaluation_config(cfg: RunConfig, model_dir: Path) -> RunConfig:
    """``cfg`` with ``model.path`` = ``model_dir`` and fresh local ports for the services
    an evaluation starts, so it runs beside anything else on the machine."""
    from k1rl.launch import free_tcp_address

    out = cfg.model_copy(deep=True)
    out.model.path = str(Path(model_dir).resolve())
    out.rollout.address = free_tcp_address()
    out.reward.address = free_tcp_address()
    if needs_local_sandbox(cfg):
        out.sandbox.address = out.reward.sandbox_address = free_tcp_address()
        out.sandbox.http_port = None  # ZMQ only: parallel evaluations must not share a port
    return RunConfig.model_validate(out.model_dump())  # re-validate the edited copy


def evaluate_checkpoint(cfg: RunConfig, model_dir: Path, work_dir: Path, *,
                        ready_timeout_s: float = 900.0) -> Accuracy:
    """``Master.evaluate``'s accuracy of the HF checkpoint in ``model_dir`` on ``heldout_set(cfg)``, with the
    run's rollout settings and seed. Starts rollout_svc (vLLM reads the checkpoint itself),
    reward_svc and, for code levels, the sandbox as local processes (logs and the config
    they read in ``work_dir``), and stops them before returning."""
    from k1rl.launch import LocalCluster

    cfg = evaluation_config(cfg, model_dir)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    config_path = (work_dir / "eval.yaml").resolve()
    config_path.write_text(cfg.dump_yaml())
    args = ["--config", str(config_path)]
    with LocalCluster(work_dir / "logs") as cluster:
        if needs_local_sandbox(cfg):
            cluster.start("sandbox", "sandbox", ["serve", *args], cfg.sandbox.address)
        # no --dummy-weights: the engine loads model.path and serves it as policy 0
        cluster.start("rollout", "rollout_svc", args, cfg.rollout.address)
        cluster.start("reward", "reward_svc", args, cfg.reward.address)
        cluster.wait_ready(ready_timeout_s)
        with RPCClient(cfg.rollout.address, timeout_s=ready_timeout_s) as rollout, \
                RPCClient(cfg.reward.address, timeout_s=ready_timeout_s) as reward:
            ref = RunRef(run_id=cfg.run_id, iteration=0)
            return accuracy(cfg, rollout, reward, heldout_set(cfg), ref, cfg.rl.eval_samples)
