"""How often does a CoT reward model trained by `k1rl train-rm` agree with math-verify on
policy responses it never saw, overall and on the hard cases?

The policy is the demo's SFT model (`k1rl demo --sft-only`). It answers the demo's RL
prompts (training examples) and its held-out problems (evaluation examples), --samples
each at T=1. A share of the responses (--hard-share) is cut before the closing sentence
" The answer is N.", as a policy that stops at its result line ("... result 123."): the
answer is right there, in a form the default rule extractor (the last \\boxed{} or "The
answer is") misses. Ground truth is math-verify on the whole response against the
reference (its parser takes the last number).

`k1rl train-rm` labels the training examples with reward_svc's rule verifier given the
broader formats an offline labeller can afford (boxed, "The answer is", and the regex
"result N"), and SFTs a judge from the policy. The judge is then served by
rollout_svc --judge and asked, through reward_svc's cot_rm verifier (judge mode replace),
about every evaluation response. An unreadable verdict counts as a disagreement.

    agreement        judge verdict == math-verify, over all evaluation responses
    agreement_hard   the same on the hard cases (math-verify right, default rules miss it)
    agreement_rule   the default rule verifier's agreement, for comparison (0 on the hard
                     cases by their definition)
    examples         evaluation responses

    python bench/reward_model.py --work runs/rm-seed0    # ~25 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from k1rl.config import RunConfig  # noqa: E402
from k1rl.data.tasks import ANSWER_PREFIX  # noqa: E402
from k1rl.demo import (  # noqa: E402
    BASE_MODEL,
    build_model,
    load_demo_config,
    run_config,
    sft_checkpoint,
    write_problems,
)

ANSWER = " " + ANSWER_PREFIX  # where a synthetic chain states its answer
RESULT_REGEX = r"result (-?[\d,]+)"


def log(msg: str) -> None:
    print(f"[reward_model {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("runs/rm-seed0"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-prompts", type=int, default=1500)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--hard-share", type=float, default=0.25)
    ap.add_argument("--steps", type=int, default=600, help="Judge SFT steps.")
    return ap.parse_args()


def cut_answer_line(text: str) -> str:
    body, sep, _ = text.rpartition(ANSWER)
    return body if sep else text


def draw_examples(cfg: RunConfig, policy: Path, problems, samples: int, hard_share: float,
                  seed: int, work: Path) -> list[dict]:
    from k1rl.master.evaluation import problem_text
    from k1rl.master.responses import Draw, responder

    rng = random.Random(seed)
    with responder(cfg, policy, work, problems) as p:
        drawn = p.draw(problems, Draw(n=samples, temperature=1.0,
                                      max_tokens=cfg.rollout.max_tokens, seed=seed))
    rows = []
    for prob, responses in zip(problems, drawn):
        for k, r in enumerate(responses):
            text = r.text
            cut = rng.random() < hard_share and ANSWER in text
            rows.append({"id": prob.id, "prompt": problem_text(prob), "answer": prob.answer,
                         "response": cut_answer_line(text) if cut else text, "cut": cut,
                         "sample": k})
    return rows


def math_verify_label(response: str, answer: str) -> bool:
    from math_verify import parse, verify

    try:
        return bool(verify(parse(f"${answer}$"), parse(response)))
    except Exception:  # noqa: BLE001 - math-verify's own failures count as "not right"
        return False


def judge_verdicts(cfg: RunConfig, judge: Path, rows: list[dict], work: Path) -> list:
    """(correct, error) of the judge on every row, through reward_svc's cot_rm verifier."""
    from k1rl.launch import LocalCluster, free_tcp_address
    from k1rl.protocol import RewardItem, RewardRequest
    from reward_svc.service import RewardService

    run = cfg.model_copy(deep=True)
    run.reward.judge.mode = "replace"
    run.reward.judge.model = str(judge)
    run.reward.judge.address = free_tcp_address()
    run = RunConfig.model_validate(run.model_dump())
    config = work / "judge.yaml"
    work.mkdir(parents=True, exist_ok=True)
    config.write_text(run.dump_yaml())
    out = []
    with LocalCluster(work / "logs") as cluster, RewardService(run.reward) as service:
        cluster.start("judge", "rollout_svc", ["--config", str(config), "--judge"],
                      run.reward.judge.address)
        cluster.wait_ready(600)
        for start in range(0, len(rows), 256):
            chunk = rows[start:start + 256]
            result = service.score(RewardRequest(items=[
                RewardItem(group_id=i, response=r["response"], answer=r["answer"],
                           prompt=r["prompt"], response_tokens=0) for i, r in enumerate(chunk)],
                length_penalty_weight=0.0))
            errors = result.errors or [""] * len(chunk)
            out += list(zip(result.correct, errors))
    return out


def main() -> None:
    from k1rl.config import RewardConfig
    from k1rl.master.problems import load_files
    from k1rl.train_rm import run_train_rm
    from reward_svc.verifiers import create

    args = parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    demo = load_demo_config()
    if not (work / "problems" / "sft").is_dir():
        write_problems(demo, work, args.seed)
    build_model(work / BASE_MODEL, demo.model, args.seed)
    policy = sft_checkpoint(demo, args.seed, work)
    cfg = run_config(demo, args.seed, work, policy)
    cfg.rollout.max_model_len = 512  # the judge's prompt holds the problem and a response
    cfg.reward.judge.max_model_len = 512
    cfg.reward.judge.max_tokens = 128  # the teacher chain and verdict: ~75 tokens here
    cfg.trainer.seq_length = 512
    rows_file = work / "rm" / "train_examples.jsonl"
    heldout_file = work / "rm" / "heldout_examples.jsonl"
    if not heldout_file.exists():
        rows_file.parent.mkdir(parents=True, exist_ok=True)
        rl_files = [work / "problems" / "rl" / f for f in ("add2.jsonl", "sub2.jsonl")]
        train, _ = load_files(rl_files, cfg, work / "rm" / "data", args.train_prompts // 2)
        held, _ = load_files(sorted((work / "problems" / "heldout").glob("*.jsonl")), cfg,
                             work / "rm" / "data-heldout")
        for problems, path, seed in ((train, rows_file, args.seed),
                                     (held, heldout_file, args.seed + 1)):
            rows = draw_examples(cfg, policy, problems, args.samples, args.hard_share, seed,
                                 work / "rm" / f"policy-{path.stem}")
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            log(f"{len(rows)} responses -> {path}")
    judge = work / "rm" / "judge" / "sft" / "final"
    if not (judge / "config.json").exists():
        data = cfg.model_dump()
        # the offline labeller's broader rules: the result line counts as an answer too
        data["reward"] |= {"answer_formats": ["boxed", "answer_is", "regex"],
                           "answer_regex": RESULT_REGEX}
        # the judge starts from the policy (reward_model.base's default), which reads the
        # task's text already
        data["reward_model"] |= {
            "heldout_fraction": 0.05,
            "stages": [{"steps": args.steps, "lr": 3e-3, "warmup_steps": 30}]}
        result = run_train_rm(RunConfig.model_validate(data), work / "rm" / "judge",
                              rows_file, source="reward_model bench")
        log(f"train-rm: {result}")
    held = [json.loads(line) for line in heldout_file.read_text().splitlines()]
    truth = [math_verify_label(r["response"], r["answer"]) for r in held]
    rule = create("math", RewardConfig())
    try:
        ruled = [rule.verify(r["response"], r["answer"]) for r in held]
    finally:
        rule.close()
    verdicts = judge_verdicts(cfg, judge, held, work / "rm" / "eval")
    agree = [ok == t and not err for (ok, err), t in zip(verdicts, truth)]
    hard = [i for i, (t, r) in enumerate(zip(truth, ruled)) if t and not r]
    print(json.dumps({
        "agreement": round(sum(agree) / len(agree), 4),
        "agreement_hard": round(sum(agree[i] for i in hard) / len(hard), 4) if hard else None,
        "agreement_rule": round(sum(r == t for r, t in zip(ruled, truth)) / len(truth), 4),
        "examples": len(held), "hard_examples": len(hard),
        "unreadable_verdicts": sum(bool(err) for _, err in verdicts),
        "right_by_math_verify": sum(truth),
    }), flush=True)


if __name__ == "__main__":
    main()
