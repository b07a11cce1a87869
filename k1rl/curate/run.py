"""`k1rl curate`: an RL prompt set as k1.5 builds one (§2.1), from any data source.

    loaded        every row of curate.data (default: data.train); tag rules add tags
    evaluable     multiple-choice, true/false and proof questions dropped (curate.drop)
    not guessable the hack filter: answered with no chain of thought, right within N tries
    difficulty    pass rate of 10 samples at a high temperature from the SFT model
                  (model.path); optionally a pass-rate band
    balanced      per-tag caps and proportions (curate.tags)

The SFT model is served by rollout_svc and judged by reward_svc, the services and verifiers
of the RL loop. The output directory gets ``curated.jsonl`` (a data source in the default
field names, with ``difficulty`` and ``pass_rate`` for the curriculum and prioritized
samplers), ``dropped.jsonl`` (every prompt left out, with the reason: nothing is lost),
``funnel.json`` and the services' logs.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from k1rl.config import RunConfig
from k1rl.curate.difficulty import difficulty, pass_rate
from k1rl.curate.evaluability import not_evaluable
from k1rl.curate.hack_filter import guessed, no_thinking
from k1rl.curate.tags import balance, tag_counts, tagged
from k1rl.data.problem import Problem
from k1rl.data.rows import problem_row, read_problems, write_rows
from k1rl.master.responses import Draw, Responder, responder, stage_inputs

CURATED = "curated.jsonl"
DROPPED = "dropped.jsonl"
FUNNEL = "funnel.json"
# the two sampling stages draw with the run seed plus these: independent of each other
HACK_SEED_OFFSET = 101
DIFFICULTY_SEED_OFFSET = 202


class FunnelStage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stage: str
    prompts: int


class Funnel(BaseModel):
    """What `k1rl curate` kept at each stage and why it dropped the rest."""

    model_config = ConfigDict(extra="forbid")

    model: str
    stages: list[FunnelStage]
    dropped: dict[str, int]
    skipped_rows: dict[str, int]
    tags_before: dict[str, int]
    tags_after: dict[str, int]
    pass_rates: dict[str, int]
    seconds: float

    def line(self) -> str:
        """The report's form: ``1000 → 614 → 463 → 323``."""
        return " → ".join(str(s.prompts) for s in self.stages)


def run_curate(cfg: RunConfig, out_dir: Path, model: Path | None = None) -> Funnel:
    """Curate ``cfg.curate.data`` with the policy in ``model`` (default ``model.path``) into
    ``out_dir`` (see the module docstring)."""
    started = time.perf_counter()
    out_dir, model, cfg = stage_inputs(cfg, out_dir, CURATED, model, "a curated set")
    c = cfg.curate
    problems, skipped = candidates(cfg, out_dir / "data")
    problems = [tagged(p, c.tags) for p in problems]
    stages = [FunnelStage(stage="loaded", prompts=len(problems))]
    dropped: list[tuple[Problem, str]] = []
    kept = _keep(problems, lambda p: not_evaluable(p, c.drop), dropped)
    stages.append(FunnelStage(stage="evaluable", prompts=len(kept)))
    rates: dict[str, float] = {}
    if kept and (c.hack_filter.enabled or c.difficulty.enabled):
        with responder(cfg, model, out_dir / "services", kept) as policy:
            kept = sampled_stages(policy, kept, cfg, dropped, stages, rates)
    kept = [p.model_copy(update={"pass_rate": rates[p.id], "difficulty": difficulty(rates[p.id])})
            if p.id in rates else p for p in kept]
    balanced, over = balance(kept, c.tags, cfg.seed)
    dropped += over
    stages.append(FunnelStage(stage="balanced", prompts=len(balanced)))
    funnel = Funnel(
        model=str(model), stages=stages, dropped=dict(Counter(r for _, r in dropped)),
        skipped_rows=dict(skipped), tags_before=tag_counts(problems),
        tags_after=tag_counts(balanced),
        pass_rates=dict(sorted(Counter(f"{r:.2f}" for r in rates.values()).items())),
        seconds=round(time.perf_counter() - started, 1))
    write_rows(out_dir / CURATED, (problem_row(p) for p in balanced))
    write_rows(out_dir / DROPPED, ({"id": p.id, "level": p.level, "reason": reason,
                                    "pass_rate": rates.get(p.id)} for p, reason in dropped))
    (out_dir / FUNNEL).write_text(funnel.model_dump_json(indent=2) + "\n")
    return funnel


def sampled_stages(policy: Responder, kept: list[Problem], cfg: RunConfig, dropped: list,
                   stages: list[FunnelStage], rates: dict[str, float]) -> list[Problem]:
    """The hack filter and the difficulty stage, with the policy in the engine."""
    c = cfg.curate
    if c.hack_filter.enabled:
        h = c.hack_filter
        asked = [p for p in kept if p.verifier in h.verifiers]
        tries = policy.draw([no_thinking(p, h) for p in asked], Draw(
            n=h.tries, temperature=h.temperature, max_tokens=h.max_tokens, prefill=h.prefill,
            seed=cfg.seed + HACK_SEED_OFFSET)) if asked else []
        hackable = {p.id for p, rs in zip(asked, tries)
                    if guessed([r.correct for r in rs], h.tries)}
        kept = _keep(kept, lambda p: "guessable" if p.id in hackable else None, dropped)
        stages.append(FunnelStage(stage="not guessable", prompts=len(kept)))
    if c.difficulty.enabled and kept:
        d = c.difficulty
        samples = policy.draw(kept, Draw(
            n=d.samples, temperature=d.temperature,
            max_tokens=d.max_tokens or cfg.rollout.max_tokens,
            seed=cfg.seed + DIFFICULTY_SEED_OFFSET))
        rates.update((p.id, pass_rate([r.correct for r in rs])) for p, rs in zip(kept, samples))

        def out_of_band(p: Problem) -> str | None:
            if rates[p.id] < d.min_pass_rate:
                return "pass_rate_below_min"
            return "pass_rate_above_max" if rates[p.id] > d.max_pass_rate else None

        kept = _keep(kept, out_of_band, dropped)
        stages.append(FunnelStage(stage="difficulty", prompts=len(kept)))
    return kept


def _keep(problems: list[Problem], reason_to_drop, dropped: list) -> list[Problem]:
    kept = []
    for p in problems:
        reason = reason_to_drop(p)
        if reason is None:
            kept.append(p)
        else:
            dropped.append((p, reason))
    return kept


def candidates(cfg: RunConfig, cache_dir: Path) -> tuple[list[Problem], Counter]:
    """The prompts to curate: every row of curate.data (else data.train), each source a
    level, read with data.on_bad_row; and the rows left out, by reason."""
    sources = cfg.curate.data or cfg.data.train
    if not sources:
        raise ValueError("curate: no prompts: set curate.data (or data.train)")
    return read_problems(sources, cfg.data.on_bad_row, cache_dir, "curate")
