"""k1.5 online policy mirror descent: the loss against eq. 3, and one RL iteration on Megatron.

The loss is checked on a toy bigram policy whose gradient has a closed form:
log π(y|x) = Σ_t log softmax(θ[y_{t-1}])[y_t] with y_0 = x, so
∇_{θ[c]} log π(y|x) = Σ_{t: y_{t-1} = c} (onehot(y_t) − softmax(θ[c])), and eq. 3's
τ term -(τ/2) ∇(log π − log π_i)² is -τ (log π − log π_i) ∇ log π. The trainer tests
run real MegatronTrainer ranks (one spawned TP=1 scenario, ~12-17 s) and are slow.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math
import random

import pytest
import torch
from pydantic import ValidationError

from k1rl.protocol import TrainBatch, TrainSample
from trainer_svc import MegatronTrainer, run_distributed
from trainer_svc.groups import as_train_samples, mixed_groups, split_groups, uniform_group_fraction
from trainer_svc.losses import MirrorDescentConfig, create, mirror_descent_loss
from trainer_svc.model import unwrap
from trainer_svc.rl_step import StepSettings, rl_iteration

VOCAB = 4

# (group id, prompt token, response tokens, reward): groups of k = 2, 3 and 4
TOY = [
    (7, 0, [1, 2], 1.0),
    (7, 0, [3, 3, 1], 0.0),
    (2, 1, [0, 2, 2], 0.0),
    (2, 1, [1], 1.0),
    (2, 1, [2, 0], 1.0),
    (5, 3, [0, 0, 1], 0.0),
    (5, 3, [3, 2], 0.5),
    (5, 3, [1, 1, 1], 1.0),
    (5, 3, [2, 3, 0], 0.0),
]


def _bigram_logprob(theta: torch.Tensor, prompt: int, response: list[int]) -> torch.Tensor:
    logp = torch.log_softmax(theta, dim=-1)
    context = [prompt, *response[:-1]]
    return sum(logp[c, y] for c, y in zip(context, response))


def _grad_logprob(theta: torch.Tensor, prompt: int, response: list[int]) -> torch.Tensor:
    """∇θ log π(y|x) of the bigram policy, derived by hand."""
    probs = torch.softmax(theta, dim=-1)
    grad = torch.zeros_like(theta)
    for c, y in zip([prompt, *response[:-1]], response):
        grad[c] -= probs[c]
        grad[c, y] += 1.0
    return grad


def _baseline(rewards: list[float], cfg: MirrorDescentConfig) -> float:
    if cfg.baseline == "mean":
        return sum(rewards) / len(rewards)
    top = max(rewards)  # τ log((1/k) Σ exp(r/τ)), shifted to stay finite
    mass = sum(math.exp((r - top) / cfg.tau) for r in rewards)
    return top + cfg.tau * math.log(mass / len(rewards))


def _eq3_gradient(theta, theta_ref, samples, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 3 averaged over prompts, as its two parts: Σ_g 1/(G k) Σ_j ∇lp_j (r_j − b_g)
    and the τ part Σ_g 1/(G k) Σ_j τ (lp_j − lp_ij) ∇lp_j (eq. 3 = first − second)."""
    groups = {}
    for sample in samples:
        groups.setdefault(sample[0], []).append(sample)
    pg, tau_part = torch.zeros_like(theta), torch.zeros_like(theta)
    for members in groups.values():
        b = _baseline([r for *_, r in members], cfg)
        weight = 1.0 / (len(groups) * len(members))
        for _, x, y, r in members:
            grad = _grad_logprob(theta, x, y)
            ratio = float(_bigram_logprob(theta, x, y) - _bigram_logprob(theta_ref, x, y))
            pg += weight * (r - b) * grad
            tau_part += weight * cfg.tau * ratio * grad
    return pg, tau_part


def _loss_grad(theta, theta_ref, samples, cfg, present=None) -> tuple[torch.Tensor, torch.Tensor]:
    theta = theta.clone().requires_grad_(True)
    logprobs = torch.stack([_bigram_logprob(theta, x, y) for _, x, y, _ in samples])
    with torch.no_grad():
        ref = torch.stack([_bigram_logprob(theta_ref, x, y) for _, x, y, _ in samples])
    rewards = torch.tensor([r for *_, r in samples], dtype=torch.float64)
    groups = torch.tensor([g for g, *_ in samples])
    loss = mirror_descent_loss(logprobs, ref, rewards, groups, cfg, present=present)
    (grad,) = torch.autograd.grad(loss, theta)
    return loss.detach(), grad


def _thetas(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    theta_ref = torch.randn(VOCAB, VOCAB, generator=gen, dtype=torch.float64)
    step = 0.3 * torch.randn(VOCAB, VOCAB, generator=gen, dtype=torch.float64)
    return theta_ref + step, theta_ref


# --------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("baseline", ["mean", "tau_log_z"])
@pytest.mark.parametrize("tau", [0.05, 0.7])
def test_loss_gradient_is_minus_eq3_away_from_the_reference(baseline, tau):
    cfg = MirrorDescentConfig(tau=tau, baseline=baseline)
    theta, theta_ref = _thetas()
    _, grad = _loss_grad(theta, theta_ref, TOY, cfg)
    pg, tau_part = _eq3_gradient(theta, theta_ref, TOY, cfg)
    assert torch.allclose(grad, -(pg - tau_part), rtol=1e-10, atol=1e-12)
    assert tau_part.abs().max() > 1e-3 * tau  # θ != θ_i: the τ term really contributes


@pytest.mark.parametrize("baseline", ["mean", "tau_log_z"])
def test_at_the_reference_the_tau_term_has_exactly_zero_gradient(baseline):
    _, theta_ref = _thetas()
    cfg = MirrorDescentConfig(tau=0.5, baseline=baseline)
    _, grad = _loss_grad(theta_ref, theta_ref, TOY, cfg)
    pg, tau_part = _eq3_gradient(theta_ref, theta_ref, TOY, cfg)
    assert torch.equal(tau_part, torch.zeros_like(tau_part))
    assert torch.allclose(grad, -pg, rtol=1e-10, atol=1e-12)
    assert pg.abs().max() > 1e-2
    if baseline == "mean":  # bit for bit what the loss gives without any τ term
        _, grad_tau0 = _loss_grad(theta_ref, theta_ref, TOY, MirrorDescentConfig(tau=0.0))
        assert torch.equal(grad, grad_tau0)


@pytest.mark.parametrize("baseline", ["mean", "tau_log_z"])
def test_groups_with_equal_rewards_add_no_policy_gradient(baseline):
    theta, theta_ref = _thetas(1)
    cfg = MirrorDescentConfig(tau=0.3, baseline=baseline)
    same = [(1, 2, [0, 1], 0.5), (1, 2, [3], 0.5), (1, 2, [1, 1, 2], 0.5)]
    batch = same + TOY[:2]
    in_same = torch.tensor([True] * 3 + [False] * 2)
    # at the reference the group's share of the gradient vanishes altogether ...
    _, grad = _loss_grad(theta_ref, theta_ref, batch, cfg, present=in_same)
    assert grad.abs().max() < 1e-12
    # ... and away from it only the τ term remains
    _, grad = _loss_grad(theta, theta_ref, batch, cfg, present=in_same)
    tau_only = torch.zeros_like(theta)
    for _, x, y, _ in same:
        ratio = float(_bigram_logprob(theta, x, y) - _bigram_logprob(theta_ref, x, y))
        tau_only += cfg.tau * ratio * _grad_logprob(theta, x, y) / (2 * 3)  # G = 2, k = 3
    assert torch.allclose(grad, tau_only, atol=1e-12)
    assert grad.abs().max() > 1e-3


def test_shares_over_a_partition_of_the_samples_sum_to_the_whole_loss():
    theta, theta_ref = _thetas(2)
    cfg = MirrorDescentConfig(tau=0.2, baseline="tau_log_z")
    loss, grad = _loss_grad(theta, theta_ref, TOY, cfg)
    part = torch.tensor([i % 3 == 0 for i in range(len(TOY))])
    loss_a, grad_a = _loss_grad(theta, theta_ref, TOY, cfg, present=part)
    loss_b, grad_b = _loss_grad(theta, theta_ref, TOY, cfg, present=~part)
    assert loss_a + loss_b == pytest.approx(float(loss), abs=1e-12)
    assert torch.allclose(grad_a + grad_b, grad, atol=1e-12)


def test_absent_samples_are_ignored_even_when_not_finite():
    logprobs = torch.tensor([-1.0, float("nan"), -3.0], requires_grad=True)
    ref, rewards = torch.tensor([-1.5, -2.0, -2.5]), torch.tensor([1.0, 0.0, 0.0])
    present = torch.tensor([True, False, True])
    loss = mirror_descent_loss(logprobs, ref, rewards, torch.tensor([0, 0, 1]),
                               MirrorDescentConfig(tau=1.0), present=present)
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(logprobs.grad).all()
    assert logprobs.grad[1] == 0


def test_tau_log_z_baseline_is_stable_for_large_reward_over_tau():
    """d loss / d log π_j at the reference is −(r_j − b)/(G k): it exposes the baseline."""
    rewards = torch.tensor([0.0, 100.0, 100.0, 100.0], dtype=torch.float64)
    logprobs = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    cfg = MirrorDescentConfig(tau=0.01, baseline="tau_log_z")  # exp(r/τ) = exp(1e4) overflows
    one_group = torch.zeros(4, dtype=torch.long)
    mirror_descent_loss(logprobs, torch.zeros(4), rewards, one_group, cfg).backward()
    baseline = 100.0 + 0.01 * math.log(3 / 4)  # the max, softened by the one miss
    expected = -(rewards - baseline) / 4
    assert torch.allclose(logprobs.grad, expected, atol=1e-9)
    # mean baseline on the same rewards: b = 75
    logprobs.grad = None
    mirror_descent_loss(logprobs, torch.zeros(4), rewards, one_group,
                        MirrorDescentConfig(tau=0.01)).backward()
    assert torch.allclose(logprobs.grad, -(rewards - 75.0) / 4)


def test_config_rejects_bad_values_naming_the_field():
    with pytest.raises(ValidationError, match="tau_log_z' needs tau > 0"):
        MirrorDescentConfig(tau=0.0, baseline="tau_log_z")
    with pytest.raises(ValidationError, match="baseline"):
        MirrorDescentConfig(baseline="median")
    with pytest.raises(ValidationError, match="tau"):
        MirrorDescentConfig(tau=-0.1)
    with pytest.raises(ValidationError, match="tau"):
        MirrorDescentConfig(tau=float("nan"))
    with pytest.raises(ValidationError, match="kl_coef"):
        MirrorDescentConfig(kl_coef=0.1)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"logprobs": torch.zeros(2, 2)}, "logprobs must be 1-D"),
        ({"rewards": torch.zeros(2)}, r"rewards has shape \(2,\), logprobs \(3,\)"),
        ({"group_ids": torch.zeros(3)}, "group_ids must be integers"),
        ({"rewards": torch.tensor([0.0, float("inf"), 1.0])}, "rewards and ref_logprobs must be"),
        ({"present": torch.ones(3)}, "present must be a bool tensor"),
    ],
)
def test_loss_refuses_bad_inputs(override, message):
    args = {
        "logprobs": torch.zeros(3),
        "ref_logprobs": torch.zeros(3),
        "rewards": torch.zeros(3),
        "group_ids": torch.zeros(3, dtype=torch.long),
        "present": None,
    }
    args.update(override)
    with pytest.raises(ValueError, match=message):
        mirror_descent_loss(cfg=MirrorDescentConfig(), **args)


def test_mirror_descent_is_built_by_name_from_a_config_section():
    loss = create({"name": "mirror_descent", "tau": 0.2})
    assert loss.name == "mirror_descent" and loss.cfg == MirrorDescentConfig(tau=0.2)
    assert create("mirror_descent").cfg == MirrorDescentConfig()


# ------------------------------------------------------------------ batches of groups


def test_split_groups_keeps_groups_whole_in_order_of_appearance():
    ids = [4, 4, 9, 1, 9, 1, 4, 6]
    assert split_groups(ids, 1) == [list(range(8))]
    assert split_groups(ids, 2) == [[0, 1, 2, 4, 6], [3, 5, 7]]
    assert split_groups(ids, 4) == [[0, 1, 6], [2, 4], [3, 5], [7]]
    with pytest.raises(ValueError, match="minibatches=5 but the batch has 4 groups"):
        split_groups(ids, 5)


def test_samples_come_as_messages_or_tuples_and_bad_ones_are_named():
    message = TrainSample(group_id=3, prompt_token_ids=[1], response_token_ids=[2, 3],
                          rollout_logprobs=[-0.1, -0.2], reward=1.0, policy_version=4)
    as_tuple = (3, [1], [2, 3], [-0.1, -0.2], 1.0)
    assert as_train_samples(TrainBatch(samples=[message]), 4) == [message]
    assert as_train_samples([as_tuple], 4) == [message]
    assert as_train_samples([(*as_tuple, 2)], 4)[0].policy_version == 2
    with pytest.raises(ValueError, match="sample 1: 1 rollout_logprobs for 2 response tokens"):
        as_train_samples([as_tuple, (3, [1], [2, 3], [-0.1], 0.0)], 4)
    with pytest.raises(ValueError, match="sample 0: reward nan is not finite"):
        as_train_samples([(3, [1], [2], [-0.1], float("nan"))], 4)
    with pytest.raises(TypeError, match="sample 0: expected a TrainSample"):
        as_train_samples([{"group_id": 3}], 4)
    with pytest.raises(ValueError, match="no samples"):
        as_train_samples([], 4)
    rewards = [(g, [1], [2], [0.0], r) for g, r in [(0, 1.0), (0, 1.0), (1, 0.0), (1, 1.0)]]
    assert uniform_group_fraction(as_train_samples(rewards, 0)) == 0.5
    assert [s.group_id for s in mixed_groups(as_train_samples(rewards, 0))] == [1, 1]


# ------------------------------------------------------------------ MegatronTrainer

LR = 2e-3
ROLLOUT_OFFSET = 0.25  # rollout log-probs are the trainer's shifted by this much


def _toy_batch(trainer: MegatronTrainer) -> list[TrainSample]:
    """Two groups of k = 4 with one rewarded response each, and one all-wrong group."""
    rng = random.Random(0)
    samples = []
    for group, k in ((0, 4), (1, 4), (2, 3)):
        prompt = [rng.randrange(128) for _ in range(5)]
        for j in range(k):
            response = [rng.randrange(128) for _ in range(rng.randint(4, 8))]
            samples.append((group, prompt, response, 1.0 if j == 1 and group < 2 else 0.0))
    scores = trainer.logprobs([s[1] for s in samples], [s[2] for s in samples])
    return [
        TrainSample(group_id=g, prompt_token_ids=p, response_token_ids=r, reward=rew,
                    rollout_logprobs=[v + ROLLOUT_OFFSET for v in lp],
                    policy_version=trainer.policy_version)
        for (g, p, r, rew), lp in zip(samples, scores)
    ]


def _weights(trainer: MegatronTrainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in unwrap(trainer.model).named_parameters()}


def _update_over_lr(before, after) -> torch.Tensor:
    delta = torch.cat([(after[n] - before[n]).abs().flatten() for n in before])
    return delta[delta > 0] / LR


def _sequence_logprobs(trainer, samples) -> torch.Tensor:
    scores = trainer.logprobs([s.prompt_token_ids for s in samples],
                              [s.response_token_ids for s in samples])
    return torch.tensor([sum(lp) for lp in scores], dtype=torch.float64)


def _iteration_scenario(rank, world, hf_dir):
    trainer = MegatronTrainer.from_hf(hf_dir, tp=world, lr=LR, seed=0)
    loss = create(MirrorDescentConfig(tau=0.1))
    # optimizer state from earlier steps, which the iteration must drop
    for _ in range(2):
        trainer.sft_step([([3, 4, 5], [6, 7, 8, 9]), ([10, 11], [12, 13, 14])])
    samples = _toy_batch(trainer)
    start = _sequence_logprobs(trainer, samples)

    before = _weights(trainer)
    first = rl_iteration(trainer, samples, loss)  # one step: a fresh Adam's first
    result = {"first": first, "after_reset": _update_over_lr(before, _weights(trainer))}
    before = _weights(trainer)
    rl_iteration(trainer, samples, loss, StepSettings(optimizer="keep"))
    result["kept_state"] = _update_over_lr(before, _weights(trainer))

    samples = [s.model_copy(update={"policy_version": trainer.policy_version}) for s in samples]
    result["second"] = rl_iteration(trainer, TrainBatch(samples=samples), loss,
                                    StepSettings(minibatches=3, epochs=2))
    result["gain"] = (_sequence_logprobs(trainer, samples) - start).tolist()
    result["rewarded"] = [s.reward == 1.0 for s in samples]
    result["groups"] = [s.group_id for s in samples]
    return result


@pytest.fixture(scope="module")
def iteration_tp1(trainer_hf_dir):
    return run_distributed(_iteration_scenario, 1, str(trainer_hf_dir))


@pytest.mark.slow
def test_iteration_raises_rewarded_responses_relative_to_their_group(iteration_tp1):
    result = iteration_tp1[0]
    gain = torch.tensor(result["gain"])
    groups, rewarded = torch.tensor(result["groups"]), torch.tensor(result["rewarded"])
    for g in (0, 1):
        in_group = groups == g
        winner = gain[in_group & rewarded]
        others = gain[in_group & ~rewarded]
        assert winner.item() > others.max().item(), (g, winner, others)
        assert winner.item() - others.mean().item() > 0.5


@pytest.mark.slow
def test_iteration_starts_with_a_fresh_optimizer(iteration_tp1):
    """Adam's first step moves every weight by lr * sign(grad): |delta| / lr == 1."""
    result = iteration_tp1[0]
    # (weights whose gradient is below Adam's eps move a little less)
    assert ((result["after_reset"] - 1).abs() < 0.01).float().mean() > 0.9
    assert result["after_reset"].median().item() == pytest.approx(1.0, abs=1e-3)
    # the control: without the reset the update is not a first Adam step
    assert ((result["kept_state"] - 1).abs() < 0.01).float().mean() < 0.5


@pytest.mark.slow
def test_iteration_metrics(iteration_tp1):
    first, second = iteration_tp1[0]["first"], iteration_tp1[0]["second"]
    assert first["steps"] == 1 and second["steps"] == 6
    assert first["policy_version"] == 3 and second["policy_version"] == 10
    assert first["samples"] == 11 and first["reward_mean"] == pytest.approx(2 / 11)
    assert first["uniform_groups"] == pytest.approx(1 / 3)
    # the rollout log-probs were shifted by a known amount: the alarm reads it back
    assert first["rollout_logprob_diff"] == pytest.approx(ROLLOUT_OFFSET, abs=1e-4)
    assert first["rollout_logprob_diff_max"] == pytest.approx(ROLLOUT_OFFSET, abs=1e-4)
    assert first["response_tokens"] >= 11 * 4  # responses of 4-8 tokens
    # the first step sees θ == θ_i: the reference matches the policy exactly
    assert first["ref_gap_first_step"] == 0.0 and second["ref_gap_first_step"] == 0.0
    assert first["log_ratio_sq"] == 0.0
    assert second["log_ratio_sq"] > 0 and second["kl_term"] == pytest.approx(
        0.05 * second["log_ratio_sq"])
    assert second["stale_samples"] == 0 and first["stale_samples"] == 0
    assert first["grad_norm"] > 0 and math.isfinite(second["loss"])


def _one_step_scenario(rank, world, hf_dir, skip):
    trainer = MegatronTrainer.from_hf(hf_dir, tp=world, lr=LR, seed=0)
    stats = rl_iteration(trainer, _toy_batch(trainer), create(MirrorDescentConfig(tau=0.1)),
                         StepSettings(skip_uniform_groups=skip))
    return stats, _weights(trainer)


@pytest.mark.slow
def test_skipping_uniform_groups_is_exact_for_a_one_step_iteration(trainer_hf_dir):
    """An all-wrong group has zero advantage and, on the first step, a zero tau term: leaving
    it out changes neither the step (Adam's first step ignores the gradient's scale) nor the
    reported batch statistics, only how many samples were trained on."""
    full, w_full = run_distributed(_one_step_scenario, 1, str(trainer_hf_dir), False)[0]
    skip, w_skip = run_distributed(_one_step_scenario, 1, str(trainer_hf_dir), True)[0]
    assert full["trained_samples"] == 11 and skip["trained_samples"] == 8
    for key in ("samples", "reward_mean", "uniform_groups", "policy_version"):
        assert skip[key] == full[key], key
    diff = torch.cat([(w_full[n] - w_skip[n]).abs().flatten() for n in w_full]) / LR
    # 2 groups instead of 3 rescale the gradient by 3/2, which Adam's first step divides out
    # except where a gradient is within reach of Adam's eps
    assert diff.max().item() < 0.01
    assert (diff < 1e-4).float().mean().item() > 0.99
