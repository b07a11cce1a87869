"""Long2short on the demo's task (k1.5 §2.4): does each method cut a long-CoT model's
response length and keep its accuracy?

The long model is made long on purpose: `k1rl sft` of the demo's base model on the demo's
SFT rows whose chains are checked again 0, 1 or 2 times (" Check: <the chain again>",
probabilities --checks-p), so it writes responses of varied length, ~2x the short model's
on average. The short model is the demo's own SFT (`k1rl demo --sft-only`), from the same
base. Then, from the long model:

    merge      `k1rl merge LONG SHORT --weights w 1-w`
    shortest   `k1rl long2short sample` on the demo's RL prompts (n = 8), then `k1rl sft`
               of the long model on the shortest correct responses
    dpo        `k1rl long2short dpo` on the same samples
    rl         `k1rl rl --preset long2short` (the demo's RL config, the length penalty on,
               rollout.max_tokens cut)

Every model is scored by one evaluator (`k1rl eval`'s evaluate_problems) on the demo's
held-out problems: pass@1 of --eval-samples samples at T=1 and mean response tokens. The
last line is one JSON object: per method tokens_before/after, pass1_before/after.

    python bench/long2short.py --work runs/l2s-seed0          # ~40 min on 2 cores
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
from k1rl.data.sources import DataSource  # noqa: E402
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


def log(msg: str) -> None:
    print(f"[long2short {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("runs/long2short-seed0"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checks-p", type=float, nargs=3, default=[0.2, 0.4, 0.4],
                    help="Probabilities of 0, 1 and 2 repeated checks in a long SFT row.")
    ap.add_argument("--max-tokens", type=int, default=224, help="rollout.max_tokens of the "
                    "long model (its longest responses fit).")
    ap.add_argument("--sample-prompts", type=int, default=1000,
                    help="RL prompts `long2short sample` draws 8 responses for.")
    ap.add_argument("--shortest-steps", type=int, default=150,
                    help="`k1rl sft` steps on the shortest correct responses.")
    ap.add_argument("--merge-weight", type=float, default=0.5, help="The long model's.")
    ap.add_argument("--dpo-lr", type=float, default=1e-4)
    ap.add_argument("--dpo-epochs", type=int, default=1)
    ap.add_argument("--rl-iterations", type=int, default=20)
    ap.add_argument("--eval-samples", type=int, default=8)
    ap.add_argument("--methods", nargs="+", default=["merge", "shortest", "dpo", "rl"])
    return ap.parse_args()


def lengthen(response: str, checks: int) -> str:
    """A synthetic chain with its work checked again ``checks`` times before the answer."""
    body, sep, tail = response.rpartition(ANSWER)
    if not sep:
        return response
    return body + "".join(f" Check:{body.rstrip('.')}." for _ in range(checks)) + sep + tail


def write_long_rows(src_dir: Path, out_dir: Path, probabilities: list[float], seed: int) -> int:
    rng = random.Random(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = 0
    for path in sorted(src_dir.glob("*.jsonl")):
        with path.open() as f, (out_dir / path.name).open("w") as out:
            for line in f:
                row = json.loads(line)
                if row.get("verifier", "math") == "math" and row.get("response"):
                    k = rng.choices(range(3), weights=probabilities)[0]
                    row["response"] = lengthen(row["response"], k)
                out.write(json.dumps(row) + "\n")
                n += 1
    return n


def long_run_config(base: RunConfig, args: argparse.Namespace) -> RunConfig:
    cfg = base.model_copy(deep=True)
    cfg.rollout.max_tokens = args.max_tokens
    cfg.rollout.max_model_len = max(cfg.rollout.max_model_len, args.max_tokens + 64)
    cfg.trainer.seq_length = max(cfg.trainer.seq_length, cfg.rollout.max_model_len)
    return RunConfig.model_validate(cfg.model_dump())


def evaluate(cfg: RunConfig, model: Path, work: Path, samples: int) -> dict:
    from k1rl.master.evaluation import evaluate_problems
    from k1rl.master.problems import load_problems

    out = work / "result.json"
    if out.exists():
        return json.loads(out.read_text())
    problems = load_problems(cfg, work / "data").heldout_problems()
    outcomes = evaluate_problems(cfg, model, work, problems, samples)
    flat = [ok for oks in outcomes.correct for ok in oks]
    tokens = [t for ts in outcomes.tokens for t in ts]
    result = {"pass1": round(sum(flat) / len(flat), 4),
              "tokens": round(sum(tokens) / len(tokens), 2), "problems": len(problems),
              "model": str(model)}
    out.write_text(json.dumps(result) + "\n")
    log(f"eval {model}: pass@1 {result['pass1']}, tokens {result['tokens']}")
    return result


def train_long_model(demo, long_cfg: RunConfig, args, work: Path) -> Path:
    from k1rl.sft.run import run_sft

    final = work / "sft_long" / "final"
    if (final / "config.json").exists():
        return final
    rows = write_long_rows(work / "problems" / "sft", work / "problems" / "sft_long",
                           args.checks_p, args.seed)
    log(f"long SFT rows: {rows}")
    cfg = run_config(demo, args.seed, work, work / BASE_MODEL)
    cfg.sft.data.train = [DataSource(path=str((work / "problems" / "sft_long").resolve()))]
    cfg.rollout.max_tokens = long_cfg.rollout.max_tokens
    cfg.rollout.max_model_len = long_cfg.rollout.max_model_len
    cfg.trainer.seq_length = long_cfg.trainer.seq_length
    return run_sft(RunConfig.model_validate(cfg.model_dump()), work / "sft_long",
                   source="long2short bench").checkpoint


def shortest(cfg: RunConfig, long_model: Path, samples: Path, work: Path, steps: int) -> Path:
    from k1rl.sft.run import run_sft

    final = work / "shortest" / "final"
    if (final / "config.json").exists():
        return final
    sft = cfg.model_copy(deep=True)
    sft.model.path = str(long_model)
    sft.sft.data.train = [DataSource(path=str(samples / "sft.jsonl"))]
    sft.sft.data.heldout_fraction = 0.0
    sft.sft.stop_when = None
    sft.sft.stages = [type(cfg.sft.stages[0])(steps=steps, lr=1e-3, warmup_steps=10)]
    return run_sft(RunConfig.model_validate(sft.model_dump()), work / "shortest",
                   source="long2short bench").checkpoint


def main() -> None:
    args = parse_args()
    work = args.work.resolve()
    demo = load_demo_config()
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "problems" / "sft").is_dir():
        write_problems(demo, work, args.seed)
    build_model(work / BASE_MODEL, demo.model, args.seed)
    short = sft_checkpoint(demo, args.seed, work)
    rl_base = run_config(demo, args.seed, work, short)
    long_cfg = long_run_config(rl_base, args)
    long_model = train_long_model(demo, long_cfg, args, work)
    long_cfg.model.path = str(long_model)
    before = evaluate(long_cfg, long_model, work / "eval" / "long", args.eval_samples)
    short_eval = evaluate(long_cfg, short, work / "eval" / "short", args.eval_samples)
    results = {}
    samples = work / "samples"
    for method in args.methods:
        started = time.perf_counter()
        model = run_method(method, long_cfg, long_model, short, samples, work, args)
        after = evaluate(long_cfg, model, work / "eval" / model.parent.name
                         if method == "dpo" else work / "eval" / method, args.eval_samples)
        results[method] = {
            "tokens_before": before["tokens"], "tokens_after": after["tokens"],
            "pass1_before": before["pass1"], "pass1_after": after["pass1"],
            "token_cut": round(1 - after["tokens"] / before["tokens"], 4),
            "pass1_change": round(after["pass1"] - before["pass1"], 4),
            "seconds": round(time.perf_counter() - started, 1)}
        log(f"{method}: {results[method]}")
    met = [m for m, r in results.items()
           if r["token_cut"] >= 0.30 and r["pass1_change"] >= -0.02]
    print(json.dumps({**results, "short_model": short_eval, "target_met_by": met,
                      "heldout_problems": before["problems"],
                      "eval_samples": args.eval_samples}), flush=True)


def run_method(method: str, cfg: RunConfig, long_model: Path, short: Path, samples: Path,
               work: Path, args: argparse.Namespace) -> Path:
    from k1rl import master
    from k1rl.long2short.dpo import run_dpo
    from k1rl.long2short.merge import merge_checkpoints
    from k1rl.long2short.preset import long2short_rl
    from k1rl.long2short.rejection import run_sample

    if method == "merge":
        out = work / "merge"
        if not (out / "config.json").exists():
            merge_checkpoints([long_model, short], [args.merge_weight, 1 - args.merge_weight],
                              out)
        return out
    if method in ("shortest", "dpo") and not (samples / "report.json").exists():
        pools = [DataSource(path=s.path, name=s.name) for s in cfg.data.train
                 if "code" not in (s.name or "")]
        prompts = write_prompt_subset(pools, work / "problems" / "l2s.jsonl",
                                      args.sample_prompts, args.seed)
        sample_cfg = cfg.model_copy(deep=True)
        sample_cfg.long2short.data = [DataSource(path=str(prompts))]
        report = run_sample(sample_cfg, samples, long_model)
        log(f"long2short sample: {report.model_dump()}")
    if method == "shortest":
        return shortest(cfg, long_model, samples, work, args.shortest_steps)
    if method == "dpo":
        run_dir = work / f"dpo-lr{args.dpo_lr:g}-e{args.dpo_epochs}"
        final = run_dir / "final"
        if not (final / "config.json").exists():
            dpo = cfg.model_copy(deep=True)
            dpo.trainer.lr = args.dpo_lr
            dpo.long2short.dpo.epochs = args.dpo_epochs
            run_dpo(RunConfig.model_validate(dpo.model_dump()), samples, run_dir)
        return final
    if method == "rl":
        run_dir = work / "rl"
        if not (run_dir / "final" / "config.json").exists():
            rl = cfg.model_copy(deep=True)
            rl.model.path = str(long_model)
            rl.run_dir = str(run_dir)
            rl.rl.iterations = args.rl_iterations
            rl.rl.eval_every = 0
            master.run(long2short_rl(RunConfig.model_validate(rl.model_dump())), run_dir,
                       source="long2short bench")
        return run_dir / "final"
    raise SystemExit(f"unknown method {method!r}")


def write_prompt_subset(pools: list[DataSource], out: Path, count: int, seed: int) -> Path:
    """``count`` rows drawn evenly from the RL pools (the arithmetic ones)."""
    rows = []
    for source in pools:
        with open(source.path) as f:
            rows.append([line for line in f if line.strip()])
    rng = random.Random(seed)
    picked = [line for lines in rows for line in rng.sample(lines, min(len(lines),
                                                                       count // len(rows)))]
    out.write_text("".join(picked))
    return out


if __name__ == "__main__":
    main()
