"""Does k1rl's RL learn as much as TRL's GRPOTrainer in the same training wall time?

Both start from one SFT checkpoint (the demo's `k1rl sft` result), train on the same
prompts (the demo's RL prompt pool, drawn the way k1rl's sampler draws it, so the
rl.task_weights mix holds), optimise the same reward (both call one reward_svc
implementation; code tasks run in the sandbox) for ``--budget-s`` seconds of training,
and are scored by one evaluator (``k1rl.master.evaluation.evaluate_checkpoint``: vLLM
loads the checkpoint, held-out problems, pass@1 of ``rl.eval_samples`` samples at T=1 and
greedy, the run's sampling seed). Lift = held-out pass@1 after - before.

    k1rl: the demo's RunConfig (+ --k1rl-set overrides), model.path = the SFT; services
          as `k1rl run` starts them; Master.iteration until sum(iteration_s - eval_s)
          reaches the budget; the policy exported with the trainer's export_hf.
    TRL:  bench/trl_grpo_worker.py in .venv-trl (installed on first use, exact pins in
          bench/trl_env.py), one run per --trl-lr; the best lift is TRL's.

The evaluation config is the demo's (seed, held-out levels and samples, rollout
settings; --eval-problems per level), never the k1rl overrides: changing k1rl's knobs
must not move the yardstick. Sides run one after the other, never together. Progress
goes to stdout; the last line is one JSON object.

    python bench/peer_trl.py --seed 0              # builds runs/peer-seed0/sft/final first
    python bench/peer_trl.py --trl-lr 3e-5 1e-4 3e-4 --k1rl-set trainer.lr=2e-4
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import trl_env  # noqa: E402

from k1rl.config import RunConfig  # noqa: E402
from k1rl.demo import load_demo_config, run_config, write_problems  # noqa: E402
from k1rl.master.evaluation import evaluate_checkpoint  # noqa: E402
from k1rl.metrics.record import Accuracy  # noqa: E402
from k1rl.yaml_config import with_overrides  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().with_name("trl_grpo_worker.py")
PROMPTS_PER_STEP = 16  # TRL: prompts per optimizer step (x num_generations completions)
# TRL's prompt list: this many k1rl iterations' worth of draws. At ~1 TRL step (16 prompts)
# every few seconds on CPU, 720 s never uses them up; past the end TRL starts a new epoch.
PROMPT_ITERATIONS = 400


def log(msg: str) -> None:
    print(f"[peer_trl {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-s", type=float, default=720.0, help="training wall seconds, each")
    ap.add_argument("--sft", type=Path, help="SFT HF checkpoint (default: runs/peer-seed<N>/"
                    "sft/final, built with `k1rl demo --sft-only` when missing)")
    ap.add_argument("--trl-lr", type=float, nargs="+", default=[1e-4],
                    help="TRL learning rate(s); the best lift counts")
    ap.add_argument("--k1rl-set", action="append", default=[], metavar="KEY=VALUE",
                    help="dotted RunConfig override of the k1rl side (repeatable), e.g. "
                    "trainer.lr=2e-4")
    ap.add_argument("--length-penalty-weight", type=float, default=0.0,
                    help="the reward both sides optimise: 0/1 plus this times k1.5's length "
                    "reward (default 0, the plain reward: TRL's GRPO collapsed with the "
                    "demo's 0.1, README 'Learning against the peer')")
    ap.add_argument("--heldout-per-level", type=int, default=400,
                    help="held-out problems written per level (the demo writes 100; "
                    "sub:2 has 427 in the held-out split)")
    ap.add_argument("--eval-problems", type=int, help="held-out problems per level "
                    "(default: the demo's rl.eval_problems)")
    ap.add_argument("--out-dir", type=Path, help="default: runs/peer-seed<N>/bench-<time>")
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--skip-k1rl", action="store_true")
    return ap.parse_args()


# ------------------------------------------------------------------------ configs


def configs(args: argparse.Namespace, sft: Path, out_dir: Path) -> tuple[RunConfig, RunConfig]:
    """(evaluation config: the demo's run, model = the SFT; k1rl training config: that
    plus the overrides, no in-run evaluation, no iteration limit)."""
    demo = load_demo_config()
    for item in demo.problems:
        # The demo's 100 held-out problems per level give a lift a standard error of
        # ~0.017 and a margin ~0.025: as large as the margins measured. The same held-out
        # levels, split and seed, with up to --heldout-per-level problems each.
        if item.split == "heldout":
            item.count, item.up_to = args.heldout_per_level, True
    write_problems(demo, out_dir, args.seed)  # the demo's problem files, as it writes them
    base = run_config(demo, args.seed, out_dir, sft)
    base.run_dir = str(out_dir / "k1rl")
    base.reward.length_penalty_weight = args.length_penalty_weight
    base.rl.eval_problems = args.eval_problems or args.heldout_per_level
    train = with_overrides(base, args.k1rl_set, source="--k1rl-set")
    train.rl.eval_every = 0  # evaluated afterwards, by the same evaluator as the peer
    train.rl.iterations = 1_000_000  # the wall budget ends the run
    train.run_id = "peer-k1rl"
    return base, RunConfig.model_validate(train.model_dump())


def ensure_sft(args: argparse.Namespace) -> Path:
    if args.sft is not None:
        if not (args.sft / "config.json").is_file():
            raise SystemExit(f"--sft {args.sft}: no HF checkpoint there")
        return args.sft.resolve()
    run_dir = REPO / "runs" / f"peer-seed{args.seed}"
    sft = run_dir / "sft" / "final"
    if not (sft / "config.json").is_file():
        log(f"building the SFT checkpoint: k1rl demo --seed {args.seed} --sft-only "
            f"--run-dir {run_dir} (~4 min)")
        subprocess.run([sys.executable, "-m", "k1rl", "demo", "--seed", str(args.seed),
                        "--sft-only", "--run-dir", str(run_dir)], check=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return sft.resolve()


def evaluate(cfg: RunConfig, model: Path, work: Path, name: str) -> Accuracy:
    log(f"evaluating {name} ({model})")
    measured = evaluate_checkpoint(cfg, model, work)
    log(f"{name}: held-out pass@1 {measured.accuracy:.3f}, "
        f"greedy {measured.greedy:.3f} ({measured.seconds:.0f} s)")
    return measured


# --------------------------------------------------------------------------- k1rl


def run_k1rl(cfg: RunConfig, budget_s: float, run_dir: Path) -> dict:
    """k1.5 iterations from the SFT until the training wall time reaches ``budget_s``; the
    final policy exported as HF to ``run_dir/final-hf``."""
    from k1rl.master import CONFIG_FILE, start_local_services
    from k1rl.master.loop import Clients, Master
    from k1rl.master.problems import load_problems
    from k1rl.master.state import RunState
    from k1rl.protocol import CheckpointRequest, CheckpointResult

    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = (run_dir / CONFIG_FILE).resolve()
    config_path.write_text(cfg.dump_yaml())
    final = (run_dir / "final-hf").resolve()
    log("k1rl: starting trainer_svc, reward_svc, checkpoint engine (+ sandbox)")
    problems = load_problems(cfg, run_dir / "data")
    with start_local_services(cfg, config_path, run_dir / "logs", problems):
        clients = Clients.connect(cfg)
        try:
            master = Master(cfg, run_dir, clients, RunState(run_id=cfg.run_id), problems)
            with master.metric_sinks():
                totals = k1rl_iterations(master, cfg, budget_s)
            clients.trainer.call("checkpoint", CheckpointRequest(action="export_hf",
                                                                 path=str(final)),
                                 CheckpointResult)
        finally:
            clients.close()
    return {**totals, "model": str(final)}


def k1rl_iterations(master, cfg: RunConfig, budget_s: float) -> dict:
    wall = completions = steps = 0.0
    records = []
    while wall < budget_s:
        record = master.iteration(len(records))
        records.append(record)
        wall += record.time.iteration_s - (record.eval.seconds if record.eval else 0.0)
        completions += record.rollout.prompts_started * cfg.rollout.n
        steps += record.train.train_steps if record.train else 0
        reward = record.reward.reward_mean if record.reward else 0.0
        log(f"k1rl: iteration {record.iteration} reward {reward:.3f} "
            f"({record.time.iteration_s:.1f} s) train {wall:.0f}/{budget_s:.0f} s")
    iteration_s = sorted(r.time.iteration_s for r in records)
    return {
        "iterations": len(records),
        "optimizer_steps": int(steps),
        "completions": int(completions),
        "train_wall_s": wall,
        "iteration_s_median": iteration_s[len(iteration_s) // 2],
        # one-off vLLM start inside iteration 0 (persistent engine), counted in the wall
        "engine_start_s": sum(r.switch.engine_start_s for r in records),
        "rewards": [r.reward.reward_mean if r.reward else None for r in records],
    }


# ---------------------------------------------------------------------------- TRL


def source_levels(sources: list) -> list[str]:
    return [source.label() for source in sources]


def write_prompts(cfg: RunConfig, path: Path) -> dict[str, int]:
    """TRL's training prompts: k1rl's sampler's draws (its pools, task_weights and run
    seed) for PROMPT_ITERATIONS iterations, so the level mix is k1rl's. TRL shuffles
    them and takes PROMPTS_PER_STEP per step. Returns the rows per level."""
    from k1rl.master import samplers
    from k1rl.master.problems import load_problems

    if cfg.rl.sampler != "uniform":
        # curriculum / prioritized depend on k1rl's iteration and outcomes: no fixed list
        log(f"TRL prompts: rl.sampler={cfg.rl.sampler} drawn as uniform with task_weights")
    rl = cfg.rl.model_copy(update={"sampler": "uniform"})
    sampler = samplers.create(rl, load_problems(cfg).train)
    rng = random.Random(cfg.seed)
    levels: dict[str, int] = {}
    with open(path, "w") as f:
        for i in range(PROMPT_ITERATIONS):
            for task in sampler.sample(rng, i):
                levels[task.level] = levels.get(task.level, 0) + 1
                f.write(json.dumps({"id": task.id, "level": task.level, "prompt": task.prompt,
                                    "answer": task.answer, "verifier": task.verifier}) + "\n")
    return levels


def warn_what_trl_does_not_follow(cfg: RunConfig) -> None:
    """Per-iteration settings of k1rl's loop that the peer has no equivalent for."""
    schedule = getattr(cfg.rl, "schedule", None)
    if getattr(schedule, "phases", None):
        log("WARNING: rl.schedule changes token budgets / length-penalty weights by "
            "iteration; TRL keeps max_completion_length and reward_svc's own weight")
    if cfg.rollout.max_response_tokens:
        log("WARNING: k1rl trains with partial rollouts; TRL generates whole responses")


def reward_services(cfg: RunConfig, work: Path):
    """reward_svc (+ the sandbox when a training level is code) for the TRL worker, with
    the k1rl side's reward settings, on fresh ports."""
    from k1rl.launch import LocalCluster, free_tcp_address
    from k1rl.master.problems import load_problems

    cfg = cfg.model_copy(deep=True)
    cfg.reward.address = free_tcp_address()
    cfg.sandbox.address = cfg.reward.sandbox_address = free_tcp_address()
    cfg.sandbox.http_port = None
    config_path = (work / "reward.yaml").resolve()
    config_path.write_text(cfg.dump_yaml())
    cluster = LocalCluster(work / "logs")
    try:
        if "code" in load_problems(cfg, work / "data").verifiers():
            cluster.start("sandbox", "sandbox", ["serve", "--config", str(config_path)],
                          cfg.sandbox.address)
        cluster.start("reward", "reward_svc", ["--config", str(config_path)], cfg.reward.address)
        cluster.wait_ready(300)
    except BaseException:
        cluster.stop()
        raise
    return cluster, cfg.reward.address


def run_trl(gen: RunConfig, reward_cfg: RunConfig, sft: Path, lr: float, budget_s: float,
            prompts: Path, work: Path, seed: int) -> dict:
    """One GRPOTrainer run in .venv-trl; its result.json plus what it cost."""
    work.mkdir(parents=True, exist_ok=True)
    r = gen.rollout
    cmd = [str(trl_env.python()), str(WORKER), "--model", str(sft), "--prompts", str(prompts),
           "--out", str(work), "--lr", repr(lr), "--budget-s", repr(budget_s),
           "--seed", str(seed), "--num-generations", str(r.n),
           "--prompts-per-step", str(PROMPTS_PER_STEP), "--max-completion-length",
           str(r.max_tokens), "--temperature", repr(r.temperature), "--top-p", repr(r.top_p)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(REPO)}
    cluster, address = reward_services(reward_cfg, work)
    with cluster, open(work / "worker.log", "w") as worker_log:
        started = time.perf_counter()
        proc = subprocess.Popen([*cmd, "--reward-address", address], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for line in proc.stdout:  # TRL's own chatter goes to the log only
            worker_log.write(line)
            if line.startswith("trl:"):
                log(f"TRL lr={lr:g}: {line[4:].strip()}")
        if proc.wait() != 0:
            raise RuntimeError(f"TRL worker failed ({proc.returncode}); see {work}/worker.log")
    result = json.loads((work / "result.json").read_text())
    result["process_s"] = time.perf_counter() - started
    return result


# ------------------------------------------------------------------------- report


def side(run: dict, before: Accuracy) -> dict:
    """One training run's line in the report: counts, after-scores and its lift."""
    after = run["after"]
    rewards = [r for r in run.pop("rewards", []) if r is not None]
    return {
        **{k: v for k, v in run.items() if k not in ("after", "model")},
        "after_pass1": after.accuracy,
        "after_greedy": after.greedy,
        "after_by_level": _by_level(after),
        "lift": after.accuracy - before.accuracy,
        "greedy_lift": after.greedy - before.greedy,
        # mean training reward of the first / last 5 steps or iterations
        "train_reward_first5": _mean(rewards[:5]),
        "train_reward_last5": _mean(rewards[-5:]),
        "checkpoint": run["model"],
    }


def _rounded(obj):
    """Floats to 6 digits: differences of accuracies print as 0.025, not 0.025000000000000022."""
    if isinstance(obj, float):
        return round(obj, 6)
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rounded(v) for v in obj]
    return obj


def _by_level(measured: Accuracy) -> dict[str, float]:
    return {**{f"accuracy@{k}": v for k, v in measured.accuracy_by_level.items()},
            **{f"greedy@{k}": v for k, v in measured.greedy_by_level.items()}}


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def report(args, eval_cfg: RunConfig, train_cfg: RunConfig, before: Accuracy, k1rl: dict | None,
           trl_runs: list[dict], extra: dict) -> dict:
    best = max(trl_runs, key=lambda r: r["lift"]) if trl_runs else None
    out = {
        "k1rl_lift": k1rl["lift"] if k1rl else None,
        "trl_lift": best["lift"] if best else None,
        "k1rl_minus_trl": k1rl["lift"] - best["lift"] if k1rl and best else None,
        "before_pass1": before.accuracy,
        "before_greedy": before.greedy,
    }
    for name, run in (("k1rl", k1rl), ("trl", best)):
        for key in ("after_pass1", "after_greedy", "optimizer_steps", "completions",
                    "train_wall_s"):
            out[f"{name}_{key}"] = run[key] if run else None
    out["trl_best_lr"] = best["lr"] if best else None
    out["k1rl"] = k1rl
    out["trl_runs"] = trl_runs
    out["before_by_level"] = _by_level(before)
    r, rl = train_cfg.rollout, train_cfg.rl
    out["settings"] = {
        "seed": args.seed, "budget_s": args.budget_s, **extra,
        "eval": {"levels": source_levels(eval_cfg.data.eval) or eval_cfg.rl.headline_tasks,
                 "problems_per_level": eval_cfg.rl.eval_problems,
                 "samples": eval_cfg.rl.eval_samples, "temperature": eval_cfg.rollout.temperature,
                 "max_tokens": eval_cfg.rollout.max_tokens, "seed": eval_cfg.seed},
        "k1rl": {"overrides": args.k1rl_set, "lr": train_cfg.trainer.lr,
                 "prompts_per_iteration": rl.prompts_per_iteration, "n": r.n,
                 "temperature": r.temperature, "max_tokens": r.max_tokens,
                 "tasks": source_levels(train_cfg.data.train) or rl.tasks,
                 "task_weights": rl.task_weights,
                 "loss": train_cfg.trainer.loss.model_dump(),
                 "optimizer_policy": train_cfg.trainer.optimizer_policy,
                 "minibatches": train_cfg.trainer.minibatches_per_iteration},
        # both sides are scored by this reward service's settings
        "reward": {"length_penalty_weight": train_cfg.reward.length_penalty_weight,
                   "code_reward": train_cfg.reward.code_reward},
        "trl": {"lrs": args.trl_lr, "num_generations": eval_cfg.rollout.n,
                "prompts_per_step": PROMPTS_PER_STEP, "temperature": eval_cfg.rollout.temperature,
                "top_p": eval_cfg.rollout.top_p,
                "max_completion_length": eval_cfg.rollout.max_tokens, "beta": 0.0,
                "loss_type": "dapo", "lr_scheduler": "constant", "generation": "HF generate",
                "pins": [trl_env.TORCH, *trl_env.PINS]},
    }
    return out


# --------------------------------------------------------------------------- main


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    sft = ensure_sft(args)
    out_dir = (args.out_dir or REPO / "runs" / f"peer-seed{args.seed}"
               / f"bench-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    eval_cfg, train_cfg = configs(args, sft, out_dir)
    extra = {"sft": str(sft), "out_dir": str(out_dir),
             "trl_install_s": 0.0 if args.skip_trl else trl_env.ensure_trl_venv(log)}
    before = evaluate(eval_cfg, sft, out_dir / "eval-sft", "SFT")
    k1rl = None
    if not args.skip_k1rl:
        run = run_k1rl(train_cfg, args.budget_s, out_dir / "k1rl")
        run["after"] = evaluate(eval_cfg, Path(run["model"]), out_dir / "eval-k1rl", "k1rl")
        k1rl = side(run, before)
    trl_runs = []
    if not args.skip_trl:
        warn_what_trl_does_not_follow(train_cfg)
        prompts = out_dir / "trl-prompts.jsonl"
        extra["trl_prompt_levels"] = write_prompts(train_cfg, prompts)
        for lr in args.trl_lr:
            work = out_dir / f"trl-lr{lr:g}"
            log(f"TRL lr={lr:g}: training for {args.budget_s:.0f} s")
            run = run_trl(eval_cfg, train_cfg, sft, lr, args.budget_s, prompts, work, args.seed)
            run["after"] = evaluate(eval_cfg, Path(run["model"]), work / "eval",
                                    f"TRL lr={lr:g}")
            trl_runs.append(side(run, before))
    extra["bench_wall_s"] = round(time.perf_counter() - started, 1)
    out = _rounded(report(args, eval_cfg, train_cfg, before, k1rl, trl_runs, extra))
    (out_dir / "report.json").write_text(json.dumps(out, indent=2) + "\n")
    log(f"k1rl lift {out['k1rl_lift']}, TRL lift {out['trl_lift']} -> {out_dir}/report.json")
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
