"""`k1rl long2short sample`: shortest rejection sampling and DPO pairs (k1.5 §2.4).

The model samples n = 8 responses per prompt (rollout_svc, judged by reward_svc); the
output directory gets

    sft.jsonl     the shortest correct response of each prompt that has one, as a data
                  source with ``response`` (`k1rl sft`'s data, sft.data.train)
    pairs.jsonl   DPO pairs as text: prompt, chosen (the shortest correct), rejected (a
                  wrong answer, or a correct one >= 1.5x longer) and their token counts
    groups.jsonl  every prompt with a pair: its samples' token ids, the sampling model's
                  log-probs and verdicts (`k1rl long2short dpo` trains on these)
    report.json   counts and mean response tokens (all samples, the kept ones)
"""

from __future__ import annotations

import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from k1rl.config import RunConfig
from k1rl.data.problem import Problem
from k1rl.data.rows import problem_row, read_problems, write_rows
from k1rl.long2short.pairs import dpo_pairs, shortest_correct
from k1rl.master.responses import Draw, Response, responder, stage_inputs

SFT_ROWS = "sft.jsonl"
PAIRS = "pairs.jsonl"
GROUPS = "groups.jsonl"
REPORT = "report.json"
# sampling draws with the run seed plus this (curation's stages use their own offsets)
SAMPLE_SEED_OFFSET = 303


class SampleReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    prompts: int
    samples_per_prompt: int
    pass1: float
    prompts_with_correct: int
    sft_rows: int
    pairs: int
    pairs_wrong: int
    pairs_long: int
    groups: int
    length_ratio: float
    mean_tokens: float
    mean_tokens_correct: float
    mean_tokens_kept: float
    seconds: float


def run_sample(cfg: RunConfig, out_dir: Path, model: Path | None = None) -> SampleReport:
    """Sample long2short.data (else data.train) with ``model`` (default model.path) and
    write the files of the module docstring into ``out_dir``."""
    started = time.perf_counter()
    out_dir, model, cfg = stage_inputs(cfg, out_dir, REPORT, model, "long2short samples")
    c = cfg.long2short
    sources = c.data or cfg.data.train
    if not sources:
        raise ValueError("long2short: no prompts: set long2short.data (or data.train)")
    problems, _ = read_problems(sources, cfg.data.on_bad_row, out_dir / "data", "long2short")
    draw = Draw(n=c.samples, temperature=cfg.rollout.temperature if c.temperature is None
                else c.temperature, max_tokens=c.max_tokens or cfg.rollout.max_tokens,
                seed=cfg.seed + SAMPLE_SEED_OFFSET)
    with responder(cfg, model, out_dir / "services", problems) as policy:
        sampled = policy.draw(problems, draw)
    report = write_outputs(out_dir, problems, sampled, c.length_ratio)
    report = report.model_copy(update={"model": str(model),
                                       "seconds": round(time.perf_counter() - started, 1)})
    (out_dir / REPORT).write_text(report.model_dump_json(indent=2) + "\n")
    return report


def write_outputs(out_dir: Path, problems: list[Problem], sampled: list[list[Response]],
                  length_ratio: float) -> SampleReport:
    """sft.jsonl, pairs.jsonl and groups.jsonl from each problem's judged samples; the
    report's counts (model and seconds left to the caller)."""
    sft, pairs, groups = [], [], []
    kinds = {"wrong": 0, "long": 0}
    for p, responses in zip(problems, sampled):
        correct = [r.correct for r in responses]
        lengths = [r.tokens for r in responses]
        best = shortest_correct(correct, lengths)
        if best is None:
            continue
        sft.append(problem_row(p.model_copy(update={"response": responses[best].text})))
        chosen_pairs = dpo_pairs(correct, lengths, length_ratio)
        for c, r in chosen_pairs:
            kind = "long" if correct[r] else "wrong"
            kinds[kind] += 1
            pairs.append(pair_row(p, responses[c], responses[r], kind))
        if chosen_pairs:
            groups.append(group_row(p, responses))
    write_rows(out_dir / SFT_ROWS, sft)
    write_rows(out_dir / PAIRS, pairs)
    write_rows(out_dir / GROUPS, groups)
    every = [r for rs in sampled for r in rs]
    right = [r.tokens for r in every if r.correct]
    kept = [min(r.tokens for r in rs if r.correct) for rs in sampled
            if any(r.correct for r in rs)]
    return SampleReport(
        model="", prompts=len(problems), samples_per_prompt=len(sampled[0]) if sampled else 0,
        pass1=sum(r.correct for r in every) / max(1, len(every)),
        prompts_with_correct=len(sft), sft_rows=len(sft), pairs=len(pairs),
        pairs_wrong=kinds["wrong"], pairs_long=kinds["long"], groups=len(groups),
        length_ratio=length_ratio, mean_tokens=_mean([r.tokens for r in every]),
        mean_tokens_correct=_mean(right), mean_tokens_kept=_mean(kept), seconds=0.0)


def _mean(values: list[int]) -> float:
    return round(sum(values) / len(values), 2) if values else 0.0


def pair_row(p: Problem, chosen: Response, rejected: Response, kind: str) -> dict:
    prompt = ({"messages": [m.model_dump() for m in p.messages]} if p.messages
              else {"prompt": p.prompt})
    return {"id": p.id, **prompt, "chosen": chosen.text, "rejected": rejected.text,
            "chosen_tokens": chosen.tokens, "rejected_tokens": rejected.tokens,
            "rejected_is": kind}


def group_row(p: Problem, responses: list[Response]) -> dict:
    return {"id": p.id, "prompt_token_ids": responses[0].prompt_token_ids,
            "samples": [{"token_ids": r.token_ids, "logprobs": r.logprobs,
                         "correct": r.correct} for r in responses]}
