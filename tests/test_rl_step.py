"""The RL step on real MegatronTrainer ranks: today's iterations reproduced exactly, the
optimizer policies, and losses other than mirror descent through the same step.

Slow: each scenario spawns a TP=1 trainer (~15 s).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from k1rl.protocol import TrainSample
from trainer_svc import MegatronTrainer, run_distributed
from trainer_svc.losses import MirrorDescentConfig, create
from trainer_svc.rl_step import StepSettings, rl_iteration
from trainer_svc.trainer import _torch_optimizer_states

BEFORE = Path(__file__).parent / "data" / "rl_step_before_registry.json"
KEYS = ("loss", "grad_norm", "grad_norm_last", "reward_mean", "uniform_groups",
        "trained_samples", "rollout_logprob_diff", "rollout_logprob_diff_max", "log_ratio_sq",
        "ref_gap_first_step", "policy_version", "steps")


def _batch(trainer: MegatronTrainer, it: int) -> list[tuple]:
    """Six groups of 4 (the last all wrong), rollout log-probs off the trainer's by ±0.02."""
    rng = random.Random(100 + it)
    samples = []
    for group in range(6):
        prompt = [rng.randrange(128) for _ in range(rng.randint(3, 9))]
        for _ in range(4):
            response = [rng.randrange(128) for _ in range(rng.randint(3, 12))]
            reward = float(rng.random() < 0.4) if group != 5 else 0.0
            samples.append((group, prompt, response, reward))
    scores = trainer.logprobs([s[1] for s in samples], [s[2] for s in samples])
    return [(g, p, r, [v + 0.01 * ((k % 5) - 2) for k, v in enumerate(lp)], rew)
            for (g, p, r, rew), lp in zip(samples, scores)]


def _demo_shaped_iterations(rank, world, hf_dir):
    """The demo's trainer settings: lr 1e-4, betas 0.9/0.95, tau 0.05, Adam reset, uniform
    groups skipped; three one-step iterations, then two of two mini-batches."""
    trainer = MegatronTrainer.from_hf(hf_dir, tp=world, lr=1e-4, betas=(0.9, 0.95), seed=0)
    loss = create(MirrorDescentConfig(tau=0.05))
    out = []
    for it in range(5):
        settings = StepSettings(minibatches=1 if it < 3 else 2, skip_uniform_groups=True)
        stats = rl_iteration(trainer, _batch(trainer, it), loss, settings)
        out.append({k: stats[k] for k in KEYS})
    return out


@pytest.mark.slow
def test_the_step_reproduces_the_iterations_of_the_trainer_before_the_registry(tmp_path):
    """Recorded with the pre-registry ``mirror_descent_iteration`` on the same seeded model
    (tests/data): same losses, gradient norms and alarms. The first iteration matches to
    the last bit; after an optimizer step, float rounding follows the CPU's vector unit
    (an AVX-512-FP16 Xeon differs from the recording machine in the last fp32 digits:
    a log-prob of ~5 carries ~5e-7 of rounding), so later iterations match to 1e-5
    relative or 1e-6 absolute, far below what any change of the step moves."""
    from conftest import trainer_write_hf_model

    hf_dir = trainer_write_hf_model(tmp_path / "qwen2", "qwen2", seed=0)
    got = run_distributed(_demo_shaped_iterations, 1, str(hf_dir))[0]
    want = json.loads(BEFORE.read_text())["iterations"]
    assert got[0] == want[0]
    assert got == [pytest.approx(w, rel=1e-5, abs=1e-6) for w in want]


def _samples(trainer: MegatronTrainer, offset: float = 0.0) -> list[TrainSample]:
    rows = _batch(trainer, 7)
    return [TrainSample(group_id=g, prompt_token_ids=p, response_token_ids=r,
                        rollout_logprobs=[v + offset for v in lp], reward=rew,
                        policy_version=trainer.policy_version)
            for g, p, r, lp, rew in rows]


def _seq(trainer, samples) -> torch.Tensor:
    scores = trainer.logprobs([s.prompt_token_ids for s in samples],
                              [s.response_token_ids for s in samples])
    return torch.tensor([sum(lp) for lp in scores], dtype=torch.float64)


def _moments(trainer):
    states = [s for s in _torch_optimizer_states(trainer.optimizer) if "exp_avg" in s]
    return (sum(s["exp_avg"].abs().sum().item() for s in states),
            sum(s["exp_avg_sq"].abs().sum().item() for s in states))


def _policies_and_losses(rank, world, hf_dir):
    trainer = MegatronTrainer.from_hf(hf_dir, tp=world, lr=1e-3, betas=(0.9, 0.95), seed=0)
    out = {}
    rl_iteration(trainer, _samples(trainer), create("grpo"))
    m1, v1 = _moments(trainer)
    trainer.prepare_optimizer("keep")
    out["keep"] = _moments(trainer) == (m1, v1)
    trainer.prepare_optimizer("reset_first_moment")
    out["first_moment"] = _moments(trainer)[0] == 0 and _moments(trainer)[1] == v1
    trainer.prepare_optimizer("reset")
    out["reset"] = _moments(trainer) == (0, 0)

    # GRPO over 3 mini-batches with the rollout's log-probs as θ_i (off by 0.05 per token)
    samples = _samples(trainer, offset=0.05)
    before = _seq(trainer, samples)
    stats = rl_iteration(trainer, samples, create({"name": "grpo", "mismatch": {"mode": "tis"}}),
                         StepSettings(optimizer="keep", minibatches=3, reference="rollout"))
    out["grpo"] = stats
    out["grpo_gain"] = (_seq(trainer, samples) - before).tolist()
    out["rewards"] = [s.reward for s in samples]
    out["groups"] = [s.group_id for s in samples]

    # more mini-batches than the iteration has groups: one step per group
    samples = _samples(trainer)
    out["few_groups"] = (len({s.group_id for s in samples}), rl_iteration(
        trainer, samples, create("grpo"), StepSettings(optimizer="keep", minibatches=99)))

    samples = _samples(trainer)
    before = _seq(trainer, samples)
    out["dpo"] = rl_iteration(trainer, samples, create({"name": "dpo", "beta": 0.5}),
                              StepSettings(minibatches=2))
    out["dpo_gain"] = (_seq(trainer, samples) - before).tolist()
    return out


@pytest.fixture(scope="module")
def policies_and_losses(trainer_hf_dir):
    return run_distributed(_policies_and_losses, 1, str(trainer_hf_dir))[0]


@pytest.mark.slow
def test_optimizer_policies(policies_and_losses):
    assert policies_and_losses["keep"]
    assert policies_and_losses["first_moment"]  # momentum zeroed, second moment kept
    assert policies_and_losses["reset"]


@pytest.mark.slow
def test_grpo_with_the_rollout_reference_steps_every_mini_batch(policies_and_losses):
    stats = policies_and_losses["grpo"]
    assert stats["steps"] == 3
    # θ_i's first forward pass reads the rollout's offset back (first mini-batch): 0.05 a
    # token, with _batch's own ±0.02 pattern around it
    assert stats["rollout_logprob_diff"] == pytest.approx(0.05, abs=0.005)
    assert stats["rollout_logprob_diff_max"] == pytest.approx(0.07, abs=1e-4)
    # the reference is the rollout's, so the first step already sees a gap of 0.05 a token
    assert stats["ref_gap_first_step"] > 0.1
    assert stats["mismatch_weight_mean"] == 1.0  # θ_i's log-probs *are* the rollout's
    gain = torch.tensor(policies_and_losses["grpo_gain"])
    rewards = torch.tensor(policies_and_losses["rewards"])
    groups = torch.tensor(policies_and_losses["groups"])
    mixed = [g for g in groups.unique() if rewards[groups == g].unique().numel() > 1]
    assert mixed
    for g in mixed:
        in_group = groups == g
        assert gain[in_group & (rewards == 1)].mean() > gain[in_group & (rewards == 0)].mean()


@pytest.mark.slow
def test_an_iteration_with_fewer_groups_than_mini_batches_steps_once_per_group(
        policies_and_losses):
    groups, stats = policies_and_losses["few_groups"]
    assert stats["steps"] == groups < 99


@pytest.mark.slow
def test_dpo_prefers_the_shortest_correct_response_in_each_group(policies_and_losses):
    stats = policies_and_losses["dpo"]
    assert stats["steps"] == 2 and stats["loss"] > 0
    gain = torch.tensor(policies_and_losses["dpo_gain"])
    rewards = torch.tensor(policies_and_losses["rewards"])
    groups = torch.tensor(policies_and_losses["groups"])
    moved = 0
    for g in groups.unique():
        if (rewards[groups == g] == 1).any() and (rewards[groups == g] == 0).any():
            in_group = groups == g
            assert gain[in_group & (rewards == 1)].max() > gain[in_group & (rewards == 0)].max()
            moved += 1
    assert moved
