"""MegatronTrainer on CPU/gloo against HF transformers, at TP=1 and TP=2.

Each scenario runs in freshly spawned ranks (``run_distributed``) so the pytest
process never initialises torch.distributed; a module-scoped fixture runs a scenario
once and the tests below assert on what its ranks returned. A scenario takes ~7 s
(mostly importing megatron-core in the fresh ranks); the TP=2 and training ones are
marked slow.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import random

import pytest
import torch

from trainer_svc import MegatronTrainer, build_token_batch, convert, run_distributed
from trainer_svc.dist import RankError
from trainer_svc.model import check_examples, pack_rows, unwrap

LR = 1e-3
TRAIN_LR = 5e-3
SGD_LR = 1e-2


def _examples(seed: int = 0, n: int = 6) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    return [
        ([rng.randrange(128) for _ in range(rng.randint(1, 12))],
         [rng.randrange(128) for _ in range(rng.randint(1, 15))])
        for _ in range(n)
    ]


EXAMPLES = _examples()
PROMPTS = [p for p, _ in EXAMPLES]
RESPONSES = [r for _, r in EXAMPLES]


# ------------------------------------------------------------------ rank functions


def _hf_grads(trainer: MegatronTrainer) -> dict[str, torch.Tensor]:
    """The gradients of the last step, gathered and renamed like HF parameters."""
    from megatron.core import parallel_state

    named = [(n, p.main_grad) for n, p in unwrap(trainer.model).named_parameters()]
    group = parallel_state.get_tensor_model_parallel_group()
    return {n: t.clone() for n, t in convert.iter_export_hf(named, trainer.spec, group)}


def _weights(trainer: MegatronTrainer) -> dict[str, torch.Tensor]:
    return {n: t.clone() for n, t in trainer.iter_hf_tensors()}


def _packed_logprobs(trainer: MegatronTrainer) -> list[list[float]]:
    out = [[] for _ in EXAMPLES]
    with torch.no_grad():
        for batch in trainer.micro_batches(PROMPTS, RESPONSES, pack=True):
            values = trainer.forward_logprobs(batch)
            for i in range(len(EXAMPLES)):
                if (batch.sample_index == i).any():
                    out[i] = values[batch.sample_index == i].tolist()
    return out


def _parity_scenario(rank, world, hf_dir, work_dir, attention="sdpa"):
    """Load, score, take one SFT step (keep its gradients), export to an HF dir."""
    # no clipping, so the gradients left in the model are the raw ones
    trainer = MegatronTrainer.from_hf(hf_dir, tp=world, lr=LR, seed=0, grad_clip=0.0,
                                      attention=attention)
    result = {
        "weights": _weights(trainer),
        "state": {n: t.clone() for n, t in convert.export_hf_state(trainer.model).items()},
        "at_last_rank": {n: t.clone() for n, t in trainer.iter_hf_tensors(dst=world - 1)},
        "logprobs": trainer.logprobs(PROMPTS, RESPONSES),
        "packed_logprobs": _packed_logprobs(trainer),
        "step": trainer.sft_step(EXAMPLES),
        "rows": len(trainer.micro_batches(PROMPTS, RESPONSES, pack=True)[0].input_ids),
        "core_attention": _core_attention(trainer),
    }
    result["grads"] = _hf_grads(trainer)
    result["export_dir"] = trainer.export_hf(f"{work_dir}/export")
    result["logprobs_after"] = trainer.logprobs(PROMPTS, RESPONSES)
    return result


def _core_attention(trainer: MegatronTrainer) -> str:
    """Class of the core attention that really runs (SDPAttention may fall back)."""
    core = unwrap(trainer.model).decoder.layers[0].self_attention.core_attention
    if hasattr(core, "_supported") and not core._supported(None, None):
        return "fallback"
    return type(core).__name__


def _training_scenario(rank, world, hf_dir, work_dir):
    """20 SFT steps, save, one more step; restart from the checkpoint; reset the optimizer."""
    # beta2 0.999 (the run config's default is 0.95): this scenario's trajectory is fixed
    trainer = MegatronTrainer.from_hf(hf_dir, tp=world, lr=TRAIN_LR, betas=(0.9, 0.999), seed=0)
    result = {"losses": [trainer.sft_step(EXAMPLES)["loss"] for _ in range(20)]}
    trainer.save(f"{work_dir}/ckpt")
    result["saved_version"] = trainer.policy_version
    result["continued"] = trainer.sft_step(EXAMPLES[:3])
    result["continued_weights"] = _weights(trainer)

    restarted = MegatronTrainer.from_hf(hf_dir, tp=world, lr=TRAIN_LR, seed=1)
    restarted.load(f"{work_dir}/ckpt")
    result["loaded_version"] = restarted.policy_version
    result["restarted"] = restarted.sft_step(EXAMPLES[:3])
    result["restarted_weights"] = _weights(restarted)

    before = _weights(restarted)
    restarted.sft_step(EXAMPLES)
    result["update_kept_state"] = _update_over_lr(before, _weights(restarted))
    restarted.reset_optimizer()
    before = _weights(restarted)
    restarted.sft_step(EXAMPLES)
    result["update_after_reset"] = _update_over_lr(before, _weights(restarted))
    # fresh state, so SFT momentum does not push against the surrogate's gradient, and a
    # small LR, as Adam's first step moves every weight by the full LR
    restarted.reset_optimizer()
    restarted.set_lr(1e-5)
    result["surrogate"] = _surrogate_step(restarted)
    # plain SGD (an RL option): the step follows the clipped gradient, not its sign
    restarted.configure_optimizer("sgd", SGD_LR)
    before = _weights(restarted)
    stats = restarted.sft_step(EXAMPLES)
    after = _weights(restarted)
    result["sgd"] = {
        "grad_norm": stats["grad_norm"],
        "delta_norm": torch.cat([(after[n] - before[n]).flatten() for n in _unique(before)]).norm(),
        "update_over_lr": _update_over_lr(before, after),
    }
    return result


def _unique(weights: dict[str, torch.Tensor]) -> list[str]:
    """Names without the tied lm_head (the same tensor as the embedding)."""
    tied = "lm_head.weight" in weights and torch.equal(
        weights["lm_head.weight"], weights["model.embed_tokens.weight"])
    return [n for n in weights if not (tied and n == "lm_head.weight")]


def _surrogate_step(trainer: MegatronTrainer) -> dict:
    """A sequence-level loss through the train_step hook, as k1.5's mirror descent needs.

    Target = each sequence's current log-prob minus 1, so if the hook sums token
    log-probs per sample correctly the squared error before the step is exactly 1.
    """
    reference = torch.tensor([sum(lp) for lp in trainer.logprobs(PROMPTS, RESPONSES)])
    target = reference - 1.0

    def squared_error(logprobs, batch):
        mask = batch.sample_index >= 0
        seq = torch.zeros(len(EXAMPLES)).index_add(0, batch.sample_index[mask], logprobs[mask])
        present = torch.zeros(len(EXAMPLES), dtype=torch.bool)
        present[batch.sample_index[mask]] = True
        return ((seq - target)[present] ** 2).sum() / len(EXAMPLES)

    stats = trainer.train_step(squared_error, trainer.micro_batches(PROMPTS, RESPONSES, pack=True))
    after = torch.tensor([sum(lp) for lp in trainer.logprobs(PROMPTS, RESPONSES)])
    return {"stats": stats, "gap_after": (after - target).abs().mean().item()}


def _update_over_lr(before, after) -> torch.Tensor:
    """|delta weight| / lr of every element that moved."""
    delta = torch.cat([(after[n] - before[n]).abs().flatten() for n in before])
    return delta[delta > 0] / TRAIN_LR


def _rank_and_sum(rank, world, fail_rank):
    if rank == fail_rank:
        raise ValueError(f"rank {rank} refuses")
    value = torch.tensor([float(rank + 1)])
    torch.distributed.all_reduce(value)
    return {"rank": rank, "sum": value.item()}


# --------------------------------------------------------------------- HF reference


def _hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _hf_logprobs(model, prompts=PROMPTS, responses=RESPONSES) -> list[torch.Tensor]:
    out = []
    for prompt, response in zip(prompts, responses):
        logits = model(torch.tensor([prompt + response])).logits[0].float()
        logprobs = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
        out.append(logprobs.gather(-1, torch.tensor(response)[:, None])[:, 0])
    return out


def _hf_sft_grads(model) -> tuple[float, dict[str, torch.Tensor]]:
    """Mean NLL over response tokens only, and its gradients."""
    model.zero_grad()
    logprobs = _hf_logprobs(model)
    loss = -torch.cat(logprobs).sum() / sum(len(r) for r in RESPONSES)
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


def _max_diff(a, b) -> float:
    return max(float((torch.as_tensor(x) - torch.as_tensor(y)).abs().max()) for x, y in zip(a, b))


# ------------------------------------------------------------------------ fixtures


def _run(fn, tp, hf_dir, work_dir, *args):
    return run_distributed(fn, tp, str(hf_dir), str(work_dir), *args)


@pytest.fixture(scope="module")
def qwen2_tp1(trainer_hf_dir, tmp_path_factory):
    return _run(_parity_scenario, 1, trainer_hf_dir, tmp_path_factory.mktemp("q1"))


@pytest.fixture(scope="module")
def qwen2_tp2(trainer_hf_dir, tmp_path_factory):
    return _run(_parity_scenario, 2, trainer_hf_dir, tmp_path_factory.mktemp("q2"))


@pytest.fixture(scope="module")
def qwen2_tp1_megatron_attention(trainer_hf_dir, tmp_path_factory):
    return _run(_parity_scenario, 1, trainer_hf_dir, tmp_path_factory.mktemp("qm"), "megatron")


@pytest.fixture(scope="module")
def llama_tp2(trainer_hf_dirs, tmp_path_factory):
    return _run(_parity_scenario, 2, trainer_hf_dirs["llama"], tmp_path_factory.mktemp("l2"))


@pytest.fixture(scope="module")
def tied_tp2(trainer_hf_dirs, tmp_path_factory):
    return _run(_parity_scenario, 2, trainer_hf_dirs["qwen2_tied"], tmp_path_factory.mktemp("e2"))


@pytest.fixture(scope="module")
def training_tp1(trainer_hf_dir, tmp_path_factory):
    return _run(_training_scenario, 1, trainer_hf_dir, tmp_path_factory.mktemp("t1"))


@pytest.fixture(scope="module")
def training_tp2(trainer_hf_dir, tmp_path_factory):
    return _run(_training_scenario, 2, trainer_hf_dir, tmp_path_factory.mktemp("t2"))


@pytest.fixture(params=["training_tp1", "training_tp2"])
def training(request):
    return request.getfixturevalue(request.param)


# ------------------------------------------------------------- inputs (no process group)


def test_pack_rows_fills_rows_first_fit_by_decreasing_length():
    rows = pack_rows([5, 3, 4, 2, 6], row_length=8)
    assert rows == [[3, 4], [0, 1], [2]]
    with pytest.raises(ValueError, match="example 1 has 9 tokens, more than 8"):
        pack_rows([2, 9], row_length=8)


def test_packed_row_has_block_diagonal_causal_mask_and_per_document_positions():
    batch = build_token_batch([[1, 2], [5]], [[3], [6, 7]], rows=[[0, 1]])
    assert batch.input_ids.tolist() == [[1, 2, 3, 5, 6, 7]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 2]]
    # position t predicts labels[t]; only response tokens count, each tagged with its sample
    assert batch.labels.tolist() == [[2, 3, 0, 6, 7, 0]]
    assert batch.loss_mask.tolist() == [[0, 1, 0, 1, 1, 0]]
    assert batch.sample_index.tolist() == [[-1, 0, -1, 1, 1, -1]]
    allowed = (~batch.attention_mask[0, 0]).int()
    assert allowed.tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 1, 1, 1],
    ]


def test_padded_rows_keep_padding_out_of_documents_and_loss():
    batch = build_token_batch([[1], [4, 5]], [[2, 3], [6]], rows=[[0], [1]])
    assert batch.input_ids.tolist() == [[1, 2, 3], [4, 5, 6]]
    padded = build_token_batch([[1], [4]], [[2, 3], [6]], rows=[[0], [1]])
    assert padded.loss_mask.tolist() == [[1, 1, 0], [1, 0, 0]]
    # the padding token (row 1, position 2) sees only itself; real tokens never see it
    assert (~padded.attention_mask[1, 0]).int().tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]


def test_masked_response_tokens_condition_the_rest_but_belong_to_no_sample():
    # example 0: prompt [1], response [2, 3, 4] with token 3 masked; example 1 unmasked
    batch = build_token_batch([[1], [5]], [[2, 3, 4], [6]], rows=[[0, 1]],
                              masks=[[True, False, True], None])
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5, 6]]
    # labels 2, 3, 4 sit at positions 0, 1, 2; label 6 at position 4
    assert batch.sample_index.tolist() == [[0, -1, 0, -1, 1, -1]]
    assert (~batch.attention_mask[0, 0, 2]).int().tolist()[:3] == [1, 1, 1]  # 4 sees 3


def test_segment_selection_for_partial_rollouts():
    from k1rl.protocol import TrainSample
    from trainer_svc.groups import segment_mask

    sample = TrainSample(group_id=0, prompt_token_ids=[1], response_token_ids=[2, 3, 4, 5, 6],
                         rollout_logprobs=[0.0] * 5, reward=1.0, policy_version=9,
                         token_segments=[0, 0, 1, 1, 2], token_versions=[7, 7, 8, 8, 9])
    assert segment_mask(sample, "all", 9) is None
    assert segment_mask(sample, "latest", 9) == [False, False, False, False, True]
    assert segment_mask(sample, "recent", 9, max_age=1) == [False, False, True, True, True]
    assert segment_mask(sample, "recent", 9, max_age=0) == segment_mask(sample, "latest", 9)
    plain = sample.model_copy(update={"token_segments": None, "token_versions": None})
    assert segment_mask(plain, "latest", 9) is None  # one segment: every token
    with pytest.raises(ValueError, match="segments must be"):
        segment_mask(sample, "oldest", 9)


@pytest.mark.parametrize(
    ("prompts", "responses", "message"),
    [
        ([[1]], [[2], [3]], "1 prompts but 2 responses"),
        ([[1], []], [[2], [3]], "example 1: empty prompt"),
        ([[1]], [[]], "example 0: empty response"),
        ([[1, 128]], [[2]], "example 0: token id 128 outside"),
        ([[1] * 10], [[2]], "example 0: 11 tokens, more than the model's"),
    ],
)
def test_bad_examples_are_refused_naming_the_example(prompts, responses, message):
    with pytest.raises(ValueError, match=message):
        check_examples(prompts, responses, vocab_size=128, max_length=10)


def test_from_hf_needs_an_initialised_process_group(trainer_hf_dir):
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        MegatronTrainer.from_hf(trainer_hf_dir)


def test_from_hf_names_a_dir_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        MegatronTrainer.from_hf(tmp_path)


# ------------------------------------------------------------------ launcher


def test_run_distributed_returns_every_ranks_value():
    assert run_distributed(_rank_and_sum, 2, -1) == [
        {"rank": 0, "sum": 3.0},
        {"rank": 1, "sum": 3.0},
    ]


def test_run_distributed_reraises_a_rank_failure_with_its_traceback():
    with pytest.raises(RankError, match=r"(?s)rank 1 ---.*ValueError: rank 1 refuses"):
        run_distributed(_rank_and_sum, 2, 1, timeout_s=60)


# ------------------------------------------------------------------ parity with HF


def _check_parity_with_hf(rank_result, hf_dir, tol=1e-4):
    """Weights round-trip, logprobs, the SFT loss and its gradients all match HF.

    HF's loss here counts response tokens only, so a prompt token leaking into the
    trainer's loss mask would show up in both the loss and the gradients.
    """
    from safetensors.torch import load_file

    source = load_file(str(hf_dir / "model.safetensors"))
    for name, tensor in source.items():
        assert torch.equal(rank_result["weights"][name], tensor), name
        assert torch.equal(rank_result["state"][name], tensor), name
    hf = _hf_model(hf_dir)
    assert _max_diff(rank_result["logprobs"], _hf_logprobs(hf)) <= tol
    assert _max_diff(rank_result["packed_logprobs"], rank_result["logprobs"]) <= 1e-5
    hf_loss, hf_grads = _hf_sft_grads(hf)
    assert rank_result["step"]["loss"] == pytest.approx(hf_loss, abs=1e-5)
    hf_norm = torch.cat([g.flatten() for g in hf_grads.values()]).norm().item()
    assert rank_result["step"]["grad_norm"] == pytest.approx(hf_norm, rel=1e-4)
    for name, grad in hf_grads.items():
        torch.testing.assert_close(rank_result["grads"][name], grad, rtol=1e-4, atol=1e-6)


def test_tp1_loads_hf_weights_and_matches_hf_logprobs_loss_and_grads(qwen2_tp1, trainer_hf_dir):
    (result,) = qwen2_tp1
    _check_parity_with_hf(result, trainer_hf_dir)
    assert result["rows"] == 1  # six short examples pack into one row
    assert result["step"]["policy_version"] == 1


def test_both_core_attentions_match_hf_and_each_other_on_packed_gqa_rows(
    qwen2_tp1, qwen2_tp1_megatron_attention, trainer_hf_dir
):
    (sdpa,), (megatron,) = qwen2_tp1, qwen2_tp1_megatron_attention
    assert (sdpa["core_attention"], megatron["core_attention"]) == ("SDPAttention", "DotProductAttention")
    _check_parity_with_hf(megatron, trainer_hf_dir)
    assert sdpa["rows"] == 1  # all six documents share one row: the mask separates them
    assert _max_diff(sdpa["packed_logprobs"], megatron["packed_logprobs"]) <= 1e-5
    for name, grad in megatron["grads"].items():
        torch.testing.assert_close(sdpa["grads"][name], grad, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_tp2_matches_hf_on_every_rank_and_tp1(qwen2_tp1, qwen2_tp2, trainer_hf_dir):
    for result in qwen2_tp2:
        _check_parity_with_hf(result, trainer_hf_dir)
    assert _max_diff(qwen2_tp2[0]["logprobs"], qwen2_tp1[0]["logprobs"]) <= 1e-5
    assert _max_diff(qwen2_tp2[1]["logprobs_after"], qwen2_tp1[0]["logprobs_after"]) <= 1e-5
    # gathering to one rank: it gets every tensor, the other rank none
    assert qwen2_tp2[0]["at_last_rank"] == {}
    last = qwen2_tp2[1]["at_last_rank"]
    assert list(last) == list(qwen2_tp2[1]["weights"])
    assert all(torch.equal(last[n], t) for n, t in qwen2_tp2[1]["weights"].items())
    assert qwen2_tp2[0]["step"]["grad_norm"] == pytest.approx(qwen2_tp1[0]["step"]["grad_norm"])


@pytest.mark.slow
@pytest.mark.parametrize(("fixture", "kind"), [("llama_tp2", "llama"), ("tied_tp2", "qwen2_tied")])
def test_llama_and_tied_embeddings_match_hf_at_tp2(fixture, kind, trainer_hf_dirs, request):
    ranks = request.getfixturevalue(fixture)
    for result in ranks:
        _check_parity_with_hf(result, trainer_hf_dirs[kind])
    if kind == "qwen2_tied":
        weights = ranks[0]["weights"]
        assert torch.equal(weights["lm_head.weight"], weights["model.embed_tokens.weight"])


@pytest.mark.parametrize(
    "fixture",
    ["qwen2_tp1", *(pytest.param(f, marks=pytest.mark.slow)
                    for f in ("qwen2_tp2", "llama_tp2", "tied_tp2"))],
)
def test_exported_dir_loads_in_transformers_with_the_trained_weights(fixture, request):
    from safetensors import safe_open
    from transformers import PreTrainedTokenizerFast

    ranks = request.getfixturevalue(fixture)
    export_dir = ranks[0]["export_dir"]
    assert all(r["export_dir"] is None for r in ranks[1:])  # only TP rank 0 writes
    hf = _hf_model(export_dir)
    assert _max_diff(ranks[0]["logprobs_after"], _hf_logprobs(hf)) <= 1e-4
    assert _max_diff(ranks[0]["logprobs_after"], ranks[0]["logprobs"]) > 1e-3  # it trained
    # the tokenizer files came along (the fixture's word-level tokenizer is not a Qwen2
    # BPE, so it is loaded by its own class rather than through AutoTokenizer)
    assert PreTrainedTokenizerFast.from_pretrained(export_dir).encode("t5 t7") == [5, 7]
    with safe_open(f"{export_dir}/model.safetensors", "pt") as f:
        names = set(f.keys())
    assert ("lm_head.weight" in names) != hf.config.tie_word_embeddings


# ------------------------------------------------------------------------ training


@pytest.mark.slow
def test_sft_steps_reduce_the_loss_on_a_repeated_batch(training):
    ranks = training
    losses = ranks[0]["losses"]
    assert all(b < a for a, b in zip(losses, losses[1:]))
    assert losses[-1] < 0.5 * losses[0]
    assert ranks[-1]["losses"] == losses  # TP ranks agree on the (reduced) loss


@pytest.mark.slow
def test_tp2_training_follows_the_tp1_trajectory_with_clipping_active(training_tp1, training_tp2):
    tp1, tp2 = training_tp1[0]["losses"], training_tp2[0]["losses"]
    assert max(abs(a - b) for a, b in zip(tp1, tp2)) <= 1e-4


@pytest.mark.slow
def test_restart_from_checkpoint_continues_bit_exactly(training):
    ranks = training
    for result in ranks:
        assert result["saved_version"] == result["loaded_version"] == 20
        assert result["restarted"] == result["continued"]
        assert result["restarted"]["policy_version"] == 21
        for name, tensor in result["continued_weights"].items():
            assert torch.equal(result["restarted_weights"][name], tensor), name


@pytest.mark.slow
def test_train_step_hook_sums_token_logprobs_per_sample(training):
    for result in training:
        surrogate = result["surrogate"]
        assert surrogate["stats"]["loss"] == pytest.approx(1.0, abs=1e-4)
        assert surrogate["stats"]["policy_version"] == 24
        assert surrogate["gap_after"] < 1.0  # the step moved sequences towards the target


@pytest.mark.slow
def test_sgd_moves_the_weights_along_the_clipped_gradient(training):
    """SGD: |delta| = lr * min(|grad|, clip), element sizes vary (unlike Adam's first step)."""
    sgd = training[0]["sgd"]
    expected = min(sgd["grad_norm"], 1.0)  # grad_clip defaults to 1.0
    assert sgd["delta_norm"] / SGD_LR == pytest.approx(expected, rel=1e-3)
    assert ((sgd["update_over_lr"] - 1).abs() < 0.01).float().mean() < 0.1


@pytest.mark.slow
def test_reset_optimizer_makes_the_next_step_a_first_adam_step(training):
    """Adam's first step moves every weight by lr * sign(grad): |delta| / lr == 1."""
    ranks = training
    after_reset, kept = ranks[0]["update_after_reset"], ranks[0]["update_kept_state"]
    assert ((after_reset - 1).abs() < 0.01).float().mean() > 0.99
    assert ((kept - 1).abs() < 0.01).float().mean() < 0.5
