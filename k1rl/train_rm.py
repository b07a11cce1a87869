"""`k1rl train-rm`: teach a chain-of-thought reward model (k1.5 §2.3) by SFT on verified
examples.

An example is a problem, its reference answer and a policy response, labelled correct or
not by reward_svc's rule verifier (reward.answer_formats say where it looks: a broad
offline labeller is the point, the judge then carries it to answers the online rules
would miss). Examples come from ``--examples`` (JSONL rows with prompt or messages,
answer, response and optionally ``correct``), or from the policy in model.path sampling
reward_model.data. Each becomes one SFT row: the judge's prompt (k1rl/judge.py) and, as
the response, a chain of thought naming the reference and the response's answer, then the
verdict JSON. Problems whose id hashes into reward_model.heldout_fraction are held out
(validation loss, and the judge's agreement measured on responses it never saw). The
judge is an HF checkpoint in RUN_DIR/sft/final, for reward.judge.model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from k1rl.config import RunConfig
from k1rl.data.sources import DataSource
from k1rl.data.tasks import is_heldout
from k1rl.judge import judge_cot, judge_prompt, verdict_json

TRAIN_ROWS = "judge_train.jsonl"
HELDOUT_ROWS = "judge_heldout.jsonl"
EXAMPLES = "examples.jsonl"
# the policy's responses are drawn with the run seed plus this
RM_SEED_OFFSET = 404


class Example(BaseModel):
    """A verified example: ``problem`` as the policy read it, ``correct`` as labelled."""

    model_config = ConfigDict(extra="forbid")

    id: str
    problem: str
    answer: str
    response: str
    correct: bool | None = None


@dataclass
class TrainRMResult:
    examples: int
    correct: int
    train_rows: int
    heldout_rows: int
    judge: Path
    val_loss: float | None


def read_examples(path: Path) -> list[Example]:
    """Rows of ``path``: prompt (or messages), answer, response, optional correct and id;
    ValueError naming the line of a bad one."""
    out = []
    with Path(path).open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                problem = row.get("prompt") or "\n".join(
                    f"{m['role']}: {m['content']}" for m in row.get("messages", []))
                out.append(Example(id=str(row.get("id", f"{Path(path).stem}:{n}")),
                                   problem=problem, answer=str(row["answer"]),
                                   response=row["response"], correct=row.get("correct")))
            except (json.JSONDecodeError, KeyError, TypeError, ValidationError) as e:
                raise ValueError(f"{path}:{n}: not an example ({type(e).__name__}: {e}); a "
                                 "row needs prompt or messages, answer and response") from None
    return out


def sampled_examples(cfg: RunConfig, work: Path) -> list[Example]:
    """The policy's responses to reward_model.data (else data.train), judged by reward_svc."""
    from k1rl.data.rows import read_problems
    from k1rl.master.evaluation import problem_text
    from k1rl.master.responses import Draw, responder

    rm = cfg.reward_model
    sources = rm.data or cfg.data.train
    if not sources:
        raise ValueError("train-rm: no problems: set reward_model.data (or data.train), or "
                         "give --examples")
    problems, _ = read_problems(sources, cfg.data.on_bad_row, work / "data", "train-rm")
    draw = Draw(n=rm.samples, temperature=rm.temperature, max_tokens=cfg.rollout.max_tokens,
                seed=cfg.seed + RM_SEED_OFFSET)
    with responder(cfg, Path(cfg.model.path), work / "policy", problems) as policy:
        drawn = policy.draw(problems, draw)
    return [Example(id=p.id, problem=problem_text(p), answer=p.answer, response=r.text,
                    correct=r.correct) for p, rs in zip(problems, drawn) for r in rs]


def labelled(cfg: RunConfig, examples: list[Example], work: Path) -> list[Example]:
    """``examples`` with every missing label given by reward_svc's rule verifier."""
    from k1rl.launch import LocalCluster, free_tcp_address
    from k1rl.protocol import RewardItem, RewardRequest, RewardResult
    from k1rl.rpc import RPCClient

    todo = [i for i, e in enumerate(examples) if e.correct is None]
    if not todo:
        return examples
    run = cfg.model_copy(deep=True)
    run.reward.address, run.reward.addresses = free_tcp_address(), []
    run.reward.judge.mode = "off"  # the labels are the rules'
    work.mkdir(parents=True, exist_ok=True)
    config = (work / "label.yaml").resolve()
    config.write_text(run.dump_yaml())
    items = [RewardItem(group_id=k, response=examples[i].response, answer=examples[i].answer,
                        prompt=examples[i].problem, response_tokens=0)
             for k, i in enumerate(todo)]
    with LocalCluster(work / "logs") as cluster:
        cluster.start("reward", "reward_svc", ["--config", str(config)], run.reward.address)
        cluster.wait_ready(300)
        with RPCClient(run.reward.address, timeout_s=900) as reward:
            result = reward.call("score", RewardRequest(items=items, length_penalty_weight=0.0),
                                 RewardResult)
    out = list(examples)
    for i, ok in zip(todo, result.correct):
        out[i] = out[i].model_copy(update={"correct": ok})
    return out


def judge_row(example: Example, k: int, cfg: RunConfig) -> dict:
    j = cfg.reward.judge
    return {"id": f"{example.id}#{k}",
            "prompt": judge_prompt(example.problem, example.answer, example.response,
                                   j.rubric, j.max_response_chars),
            "answer": verdict_json(bool(example.correct)),
            "response": judge_cot(example.answer, example.response, bool(example.correct))}


def run_train_rm(cfg: RunConfig, run_dir: Path, examples_path: Path | None = None,
                 source: str = "run config") -> TrainRMResult:
    """SFT a judge into ``run_dir`` (see the module docstring)."""
    from k1rl.sft.run import run_sft

    run_dir = Path(run_dir)
    if (run_dir / EXAMPLES).exists():
        raise FileExistsError(f"{run_dir} holds a train-rm run already: pick another --run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    examples = (read_examples(examples_path) if examples_path
                else sampled_examples(cfg, run_dir / "sampling"))
    examples = labelled(cfg, examples, run_dir / "labelling")
    (run_dir / EXAMPLES).write_text("".join(e.model_dump_json() + "\n" for e in examples))
    rm = cfg.reward_model
    train, held = [], []
    for k, e in enumerate(examples):
        # salted: a data set split with the same hash (gen-tasks' train side) has no ids
        # below the plain hash's fraction, and would hold nothing out
        held_out = is_heldout(f"train-rm:{e.id}", rm.heldout_fraction)
        (held if held_out else train).append(judge_row(e, k, cfg))
    if not train:
        raise ValueError("train-rm: every example is held out: lower "
                         "reward_model.heldout_fraction")
    for name, rows in ((TRAIN_ROWS, train), (HELDOUT_ROWS, held)):
        (run_dir / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    sft = cfg.model_copy(deep=True)
    sft.model.path = rm.base or cfg.model.path
    sft.sft.data.train = [DataSource(path=str((run_dir / TRAIN_ROWS).resolve()))]
    sft.sft.data.eval = ([DataSource(path=str((run_dir / HELDOUT_ROWS).resolve()))]
                         if held else [])
    sft.sft.data.heldout_fraction = 0.0
    sft.sft.data.prompt.template = "raw"  # the judge's prompt is written out in full
    sft.sft.stop_when = None
    sft.sft.stages = rm.stages or cfg.sft.stages
    if not sft.sft.stages:
        raise ValueError("train-rm: no SFT schedule: set reward_model.stages (or sft.stages)")
    result = run_sft(RunConfig.model_validate(sft.model_dump()), run_dir / "sft", source)
    return TrainRMResult(len(examples), sum(bool(e.correct) for e in examples), len(train),
                         len(held), result.checkpoint, result.val_loss)
