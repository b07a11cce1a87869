"""The trainer over a TP x PP x DP grid computes what one rank computes.

Each layout runs in real processes over gloo and is compared with a single-rank trainer
loaded from the same checkpoint and given the same batch: log-probs, the weights after
one optimizer step (plain SGD, whose step follows the gradient, so a summation-order
difference stays at float rounding instead of flipping Adam's ~lr*sign step), and the
HF export, which must be bit-identical to the single-rank export of the same weights.
"""

from __future__ import annotations

import pytest
import torch

from trainer_svc.dist import run_distributed
from trainer_svc.trainer import MegatronTrainer

PROMPTS = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [3, 3], [10, 11, 12], [2, 9]]
RESPONSES = [[5, 6, 7, 8], [9, 10], [11, 12, 13], [1, 2, 3, 4, 5], [7], [8, 8, 8]]
SGD_LR = 0.5
TOLERANCE = 1e-5


def _export(trainer: MegatronTrainer) -> dict[str, torch.Tensor]:
    return {n: t.clone() for n, t in trainer.iter_hf_tensors(dst=0)}


def _scenario(rank, world, hf_dir, work_dir, tp, pp, optimizer, distributed_optimizer,
              sequence_parallel=False):
    """Score, export, one SFT step, export and score again; save, reload, one more step."""
    trainer = MegatronTrainer.from_hf(hf_dir, tp=tp, pp=pp, lr=1e-3, seed=0, grad_clip=0.0,
                                      distributed_optimizer=distributed_optimizer,
                                      sequence_parallel=sequence_parallel,
                                      seq_length=12, micro_batch_tokens=16)  # several micro-batches
    if optimizer == "sgd":
        trainer.configure_optimizer("sgd", SGD_LR)
    result = {"layout": trainer.layout, "micro_batches": len(
        trainer.micro_batches(PROMPTS, RESPONSES, pack=True))}
    result["logprobs"] = trainer.logprobs(PROMPTS, RESPONSES)
    result["before"] = _export(trainer)
    result["step"] = trainer.sft_step(list(zip(PROMPTS, RESPONSES, strict=True)))
    result["after"] = _export(trainer)
    result["logprobs_after"] = trainer.logprobs(PROMPTS, RESPONSES)
    trainer.save(f"{work_dir}/ckpt")
    result["continued"] = trainer.sft_step(list(zip(PROMPTS, RESPONSES, strict=True)))
    trainer.load(f"{work_dir}/ckpt")
    result["reloaded"] = trainer.sft_step(list(zip(PROMPTS, RESPONSES, strict=True)))
    return result if rank == 0 else {"exported_here": bool(result["before"])}


@pytest.fixture(scope="module")
def single_rank(trainer_hf_dir, tmp_path_factory):
    runs = {}
    for optimizer in ("sgd", "adam"):
        work = tmp_path_factory.mktemp(f"single-{optimizer}")
        runs[optimizer] = run_distributed(_scenario, 1, str(trainer_hf_dir), str(work), 1, 1,
                                          optimizer, False)[0]
    return runs


def _max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b, strict=True)
               for x, y in zip(ra, rb, strict=True))


LAYOUTS = {
    # name: (world, tp, pp, optimizer, distributed optimizer, sequence parallel)
    "pp2": (2, 1, 2, "sgd", False, False),
    "dp2-distributed-optimizer": (2, 1, 1, "adam", True, False),
    "tp2-pp2": (4, 2, 2, "sgd", False, False),
    # norms and residuals on half the tokens each, odd row widths padded to even
    "tp2-sequence-parallel": (2, 2, 1, "sgd", False, True),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_a_single_rank(name, single_rank, trainer_hf_dir, tmp_path):
    world, tp, pp, optimizer, distributed, sequence_parallel = LAYOUTS[name]
    results = run_distributed(_scenario, world, str(trainer_hf_dir), str(tmp_path), tp, pp,
                              optimizer, distributed, sequence_parallel)
    ours, base = results[0], single_rank[optimizer]
    assert (ours["layout"].tp, ours["layout"].pp, ours["layout"].dp) == (tp, pp, world // tp // pp)
    assert ours["micro_batches"] > 1

    # the export lands on rank 0 only, bit-identical to one rank's export of the same weights
    assert not any(r["exported_here"] for r in results[1:])
    assert list(ours["before"]) == list(base["before"])
    assert all(torch.equal(ours["before"][n], base["before"][n]) for n in base["before"])

    assert _max_diff(ours["logprobs"], base["logprobs"]) < TOLERANCE
    assert ours["step"]["loss"] == pytest.approx(base["step"]["loss"], abs=TOLERANCE)
    assert ours["step"]["grad_norm"] == pytest.approx(base["step"]["grad_norm"], rel=TOLERANCE)
    moved = max((base["after"][n] - base["before"][n]).abs().max().item() for n in base["after"])
    assert moved > 100 * TOLERANCE  # the step really changed the weights
    for n in base["after"]:
        assert (ours["after"][n] - base["after"][n]).abs().max().item() < TOLERANCE, n
    assert _max_diff(ours["logprobs_after"], base["logprobs_after"]) < TOLERANCE

    # a checkpoint of the layout (with its optimizer shards) restores the same state
    assert ours["reloaded"]["loss"] == ours["continued"]["loss"]
    assert ours["reloaded"]["grad_norm"] == ours["continued"]["grad_norm"]


def _mismatched_layout(rank, world, hf_dir, work_dir):
    trainer = MegatronTrainer.from_hf(hf_dir, pp=2)
    trainer.save(f"{work_dir}/pp2")
    return None


def _load_elsewhere(rank, world, hf_dir, work_dir):
    trainer = MegatronTrainer.from_hf(hf_dir, tp=1)
    trainer.load(f"{work_dir}/pp2")


def test_layout_errors_name_the_problem(trainer_hf_dir, tmp_path):
    from trainer_svc.dist import RankError

    with pytest.raises(RankError, match=r"world size 2 is not a multiple of tp × pp = 1 × 3"):
        run_distributed(_bad_pp, 2, str(trainer_hf_dir))
    run_distributed(_mismatched_layout, 2, str(trainer_hf_dir), str(tmp_path))
    with pytest.raises(RankError, match=r"saved with .*'pp': 2.*go through export_hf"):
        run_distributed(_load_elsewhere, 2, str(trainer_hf_dir), str(tmp_path))


def _bad_pp(rank, world, hf_dir):
    MegatronTrainer.from_hf(hf_dir, pp=3)
