"""The loss registry: every loss's gradient against an independent autograd computation,
the TIS/MIS weights on hand-computed cases, and the registry's contract.

Each loss is called the way the RL step calls it: once per micro-batch (here the samples
split in two), each call returning its share. The sum of the shares' gradients must equal
the gradient of the loss written out plainly over the whole mini-batch, on a toy bigram
policy log π(y|x) = Σ_t log softmax(θ[y_{t-1}])[y_t] with y_0 = x.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from k1rl.config import ConfigError, RunConfig
from k1rl.registry import LOSSES, UnknownEntryError
from trainer_svc.losses import Loss, LossConfig, MiniBatch, MismatchCorrection, Tokens, create
from trainer_svc.losses.base import mismatch_weights
from trainer_svc.losses.dpo import long2short_pairs

VOCAB = 5
# (group, prompt token, response tokens, reward)
TOY = [
    (0, 0, [1, 2], 1.0), (0, 0, [3, 3, 1], 0.0), (0, 0, [2, 4, 4, 1], 1.0),
    (1, 1, [0, 2, 2], 0.0), (1, 1, [1], 1.0), (1, 1, [2, 0], 0.0), (1, 1, [4, 4, 4, 4, 4], 1.0),
    (2, 3, [0, 0, 1], 0.0), (2, 3, [3, 2], 0.5), (2, 3, [1, 1, 1], 0.0),
]
MICRO_BATCHES = ([0, 3, 4, 8], [1, 2, 5, 6, 7, 9])


def _token_logprobs(theta: torch.Tensor) -> list[torch.Tensor]:
    logp = torch.log_softmax(theta, dim=-1)
    return [torch.stack([logp[c, y] for c, y in zip([x, *resp[:-1]], resp)])
            for _, x, resp, _ in TOY]


@pytest.fixture(scope="module")
def policy():
    """θ_i (the reference), θ a step away from it, and rollout log-probs off θ_i's by a
    known, uneven amount."""
    gen = torch.Generator().manual_seed(0)
    theta_i = torch.randn(VOCAB, VOCAB, generator=gen, dtype=torch.float64)
    theta = theta_i + 0.15 * torch.randn(VOCAB, VOCAB, generator=gen, dtype=torch.float64)
    ref = [t.detach() for t in _token_logprobs(theta_i)]
    rollout = [r + 0.3 * torch.randn(r.shape, generator=gen, dtype=torch.float64) for r in ref]
    return theta, ref, rollout


def _batch(current=None, ref_seq=None) -> MiniBatch:
    group = torch.tensor([g for g, *_ in TOY])
    return MiniBatch(
        rewards=torch.tensor([r for *_, r in TOY], dtype=torch.float64), group=group,
        group_size=torch.bincount(group).double()[group],
        tokens=torch.tensor([float(len(resp)) for _, _, resp, _ in TOY], dtype=torch.float64),
        lengths=torch.tensor([float(len(resp)) for _, _, resp, _ in TOY], dtype=torch.float64),
        current=current, ref_seq=ref_seq)


def _step_gradient(loss: Loss, policy) -> tuple[torch.Tensor, float]:
    """Sum of the micro-batch shares' gradients (and values), as the RL step takes them."""
    theta, ref, rollout = policy
    theta = theta.clone().requires_grad_(True)
    logprobs = _token_logprobs(theta)
    seq = torch.stack([lp.sum() for lp in logprobs]).detach()
    batch = _batch(seq, torch.stack([r.sum() for r in ref]))
    total = 0.0
    for members in MICRO_BATCHES:
        sample = torch.cat([torch.full((len(TOY[i][2]),), i) for i in members])
        values = torch.cat([logprobs[i] for i in members])
        r, ro = torch.cat([ref[i] for i in members]), torch.cat([rollout[i] for i in members])
        tokens = Tokens(sample=sample, logprobs=values, ref=r, rollout=ro,
                        weight=loss.token_weights(r, ro, sample, len(TOY)), size=len(TOY))
        share = loss(tokens, batch)
        share.backward(retain_graph=True)  # one toy forward serves both micro-batches
        total += share.item()
    return theta.grad, total


def _plain_gradient(fn, policy) -> tuple[torch.Tensor, float]:
    theta, ref, rollout = policy
    theta = theta.clone().requires_grad_(True)
    value = fn(_token_logprobs(theta), ref, rollout)
    value.backward()
    return theta.grad, value.item()


def _groups():
    groups: dict[int, list[int]] = {}
    for i, (g, *_) in enumerate(TOY):
        groups.setdefault(g, []).append(i)
    return groups


def _advantages(scale: str) -> list[float]:
    rewards = [r for *_, r in TOY]
    out = [0.0] * len(TOY)
    for members in _groups().values():
        rs = torch.tensor([rewards[i] for i in members], dtype=torch.float64)
        std = rs.std().item() if len(members) > 1 else 0.0
        for i in members:
            out[i] = (rewards[i] - rs.mean().item()) / ((std + 1e-6) if scale == "group" else 1)
    return out


def _tis(ref, rollout, cap):
    return [torch.clamp((r - ro).exp(), max=cap) for r, ro in zip(ref, rollout)]


def plain_mirror_descent(lp, ref, rollout, tau=0.1, weights=None):
    groups, total = _groups(), 0.0
    adv = _advantages("none")
    for members in groups.values():
        for j in members:
            pg = lp[j].sum() if weights is None else (weights[j] * lp[j]).sum()
            term = -adv[j] * pg + 0.5 * tau * (lp[j].sum() - ref[j].sum()) ** 2
            total = total + term / (len(groups) * len(members))
    return total


def plain_grpo(lp, ref, rollout, aggregation="token_mean", kl=0.0, weights=None):
    adv, terms = _advantages("group"), []
    for j in range(len(TOY)):
        ratio = (lp[j] - ref[j]).exp()
        surrogate = -torch.minimum(ratio * adv[j], ratio.clamp(0.8, 1.28) * adv[j])
        if weights is not None:
            surrogate = surrogate * weights[j]
        x = lp[j] - ref[j]
        terms.append(surrogate + kl * ((-x).exp() + x - 1))
    if aggregation == "token_mean":
        return torch.cat(terms).sum() / sum(len(t) for t in terms)
    return sum(t.mean() for t in terms) / len(terms)


def plain_gspo(lp, ref, rollout, low=3e-4, high=4e-4):
    adv = _advantages("group")
    return sum(-torch.minimum(s * a, s.clamp(1 - low, 1 + high) * a)
               for s, a in (((lp[j] - ref[j]).mean().exp(), adv[j]) for j in range(len(TOY)))
               ) / len(TOY)


def plain_token_clip(lp, ref, rollout, tau=0.1, bound=0.2):
    groups, adv, total = _groups(), _advantages("none"), 0.0
    for members in groups.values():
        for j in members:
            x = lp[j] - ref[j]
            keep = (x.detach().abs() <= bound).double()
            total = total + (keep * (-adv[j] * lp[j] + 0.5 * tau * x ** 2)).sum() / (
                len(groups) * len(members))
    return total


def plain_dpo(lp, ref, rollout, beta=0.1):
    margins = []
    for members in _groups().values():
        correct = [i for i in members if TOY[i][3] >= 0.5]
        if not correct:
            continue
        c = min(correct, key=lambda i: len(TOY[i][2]))
        for r in members:
            if r != c and (TOY[r][3] < 0.5 or len(TOY[r][2]) >= 1.5 * len(TOY[c][2])):
                margins.append((lp[c].sum() - ref[c].sum()) - (lp[r].sum() - ref[r].sum()))
    return -F.logsigmoid(beta * torch.stack(margins)).mean()


CASES = {
    "mirror_descent": ({"name": "mirror_descent", "tau": 0.1}, plain_mirror_descent),
    "mirror_descent+tis": (
        {"name": "mirror_descent", "mismatch": {"mode": "tis", "cap": 1.5}},
        lambda lp, ref, ro: plain_mirror_descent(lp, ref, ro, weights=_tis(ref, ro, 1.5))),
    "grpo": ({"name": "grpo"}, plain_grpo),
    "grpo sequence_mean + kl": (
        {"name": "grpo", "aggregation": "sequence_mean", "kl_coef": 0.05},
        lambda lp, ref, ro: plain_grpo(lp, ref, ro, "sequence_mean", kl=0.05)),
    "grpo+tis": ({"name": "grpo", "mismatch": {"mode": "tis", "cap": 1.2}},
                 lambda lp, ref, ro: plain_grpo(lp, ref, ro, weights=_tis(ref, ro, 1.2))),
    "gspo": ({"name": "gspo", "clip_low": 0.05, "clip_high": 0.06},
             lambda lp, ref, ro: plain_gspo(lp, ref, ro, 0.05, 0.06)),
    "token_clip": ({"name": "token_clip"}, plain_token_clip),
    "dpo": ({"name": "dpo"}, plain_dpo),
}


@pytest.mark.parametrize("case", list(CASES))
def test_loss_gradient_matches_the_plain_formula(case, policy):
    section, plain = CASES[case]
    grad, value = _step_gradient(create(section), policy)
    expected_grad, expected_value = _plain_gradient(plain, policy)
    assert expected_grad.abs().max() > 1e-3  # the case moves the policy at all
    assert torch.allclose(grad, expected_grad, rtol=1e-9, atol=1e-12)
    assert value == pytest.approx(expected_value, rel=1e-9, abs=1e-12)


def test_clipping_acts_in_the_toy_cases(policy):
    """The clip ranges are tight enough that some tokens are clipped: otherwise the GRPO,
    GSPO and token_clip cases above would not test their clipping at all."""
    theta, ref, _ = policy
    x = torch.cat(_token_logprobs(theta)).detach() - torch.cat(ref)
    assert ((x.exp() > 1.28) | (x.exp() < 0.8)).any()
    assert (x.abs() > 0.2).any() and (x.abs() <= 0.2).any()


# ---------------------------------------------------------------------- TIS / MIS


def _weights(mode, level, cap=2.0, lower=0.0):
    # trainer (θ_i) vs rollout log-probs of two samples: tokens 0-1 and 2-4
    ref = torch.log(torch.tensor([0.5, 0.2, 0.9, 0.3, 0.6], dtype=torch.float64))
    rollout = torch.log(torch.tensor([0.25, 0.4, 0.3, 0.3, 0.1], dtype=torch.float64))
    sample = torch.tensor([0, 0, 1, 1, 1])
    cfg = MismatchCorrection(mode=mode, level=level, cap=cap, lower=lower)
    return mismatch_weights(ref, rollout, sample, 2, cfg).tolist()


def test_tis_and_mis_weights_on_hand_computed_cases():
    # token ratios πθi/π_rollout: 2, 0.5, 3, 1, 6; sequence ratios 2·0.5 = 1 and 3·1·6 = 18
    assert _weights("none", "token") == [1, 1, 1, 1, 1]
    assert _weights("tis", "token", cap=2.5) == pytest.approx([2, 0.5, 2.5, 1, 2.5])
    assert _weights("mis", "token", cap=2.5) == pytest.approx([2, 0.5, 0, 1, 0])
    assert _weights("mis", "token", cap=2.5, lower=0.6) == pytest.approx([2, 0, 0, 1, 0])
    assert _weights("tis", "sequence", cap=4) == pytest.approx([1, 1, 4, 4, 4])
    assert _weights("mis", "sequence", cap=4) == pytest.approx([1, 1, 0, 0, 0])


def test_long2short_pairs_follow_k15():
    """Positive: the shortest correct; negatives: the wrong ones and correct ones at least
    1.5x longer. Group 0: correct [1,2] (2 tokens) and [2,4,4,1] (4 >= 3); group 2's
    shortest correct is [3,2] (reward 0.5)."""
    assert long2short_pairs(_batch(), 0.5, 1.5) == [
        (0, 1), (0, 2), (4, 3), (4, 5), (4, 6), (8, 7), (8, 9)]


# ---------------------------------------------------------------------- the registry


def test_every_registered_loss_builds_with_its_defaults():
    assert set(LOSSES.names()) >= {"mirror_descent", "grpo", "gspo", "token_clip", "dpo"}
    for name in LOSSES.names():
        loss = create(name)
        assert loss.name == name and loss.cfg.name == name


def test_unknown_loss_is_refused_at_config_load_listing_the_known_ones():
    with pytest.raises(ConfigError) as err:
        RunConfig.from_yaml_text("trainer:\n  loss: {name: ppo}\n")
    assert "trainer.loss" in str(err.value)
    assert "unknown loss 'ppo' (registered: dpo, grpo, gspo, mirror_descent, token_clip" in str(
        err.value)
    with pytest.raises(UnknownEntryError):
        create("ppo")


def test_bad_loss_parameters_and_moved_keys_are_named():
    with pytest.raises(ConfigError, match=r"trainer.loss.*clip_low.*less than 1"):
        RunConfig.from_yaml_text("trainer:\n  loss: {name: grpo, clip_low: 1.5}\n")
    with pytest.raises(ConfigError, match=r"trainer.tau moved into the loss section"):
        RunConfig.from_yaml_text("trainer:\n  tau: 0.1\n")


def test_a_loss_from_outside_the_package_registers_and_is_selected_by_config(tmp_path):
    """The "swap implementations" promise: a module of the user's, named in plugins."""
    (tmp_path / "my_losses.py").write_text(
        "from typing import Literal\n"
        "from k1rl.registry import LOSSES\n"
        "from trainer_svc.losses import Loss, LossConfig\n\n"
        "class HalfConfig(LossConfig):\n"
        "    name: Literal['half_nll'] = 'half_nll'\n"
        "    scale: float = 0.5\n\n"
        "@LOSSES.register('half_nll')\n"
        "class HalfNLL(Loss):\n"
        "    Config = HalfConfig\n"
        "    def __call__(self, tokens, batch):\n"
        "        return -self.cfg.scale * tokens.logprobs.sum()\n")
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        cfg = RunConfig.from_yaml_text(
            "plugins: [my_losses]\ntrainer:\n  loss: {name: half_nll, scale: 0.25}\n")
    finally:
        sys.path.remove(str(tmp_path))
    loss = create(cfg.trainer.loss)
    assert type(loss).__name__ == "HalfNLL" and loss.cfg.scale == 0.25
    tokens = Tokens(sample=torch.tensor([0, 0]), logprobs=torch.tensor([-1.0, -3.0]),
                    ref=torch.zeros(2), rollout=torch.zeros(2), weight=torch.ones(2), size=1)
    assert loss(tokens, _batch()).item() == 1.0
    assert RunConfig.from_yaml_text(cfg.dump_yaml()) == cfg  # the section round-trips
    with pytest.raises(ConfigError, match="plugin.*'not_there'.*cannot be imported"):
        RunConfig.from_yaml_text("plugins: [not_there]\n")


def test_loss_config_base_needs_a_name():
    with pytest.raises(Exception):
        LossConfig()
    assert math.isfinite(create("grpo").cfg.clip_high)


def test_a_process_without_the_trainer_loads_the_config_and_keeps_the_loss_as_given():
    """The sandbox image holds k1rl's config but neither torch nor trainer_svc: the loss name
    is still checked, its parameters are left for the trainer to validate."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'trainer_svc'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from k1rl.config import RunConfig, ConfigError\n"
        "cfg = RunConfig.from_yaml_text('trainer: {loss: {name: grpo, clip_low: 0.1}}')\n"
        "assert RunConfig.from_yaml_text(cfg.dump_yaml()) == cfg\n"
        "print(cfg.trainer.loss.model_dump())\n"
        "try:\n"
        "    RunConfig.from_yaml_text('trainer: {loss: ppo}')\n"
        "except ConfigError as e:\n"
        "    print('refused:', 'unknown loss' in str(e))\n"
        "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, check=True).stdout.split("\n")
    assert out[:3] == ["{'name': 'grpo', 'clip_low': 0.1}", "refused: True", "False"]
