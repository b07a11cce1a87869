"""Where an RL iteration's time goes, for the demo config, measured on real services.

Runs a short k1.5 run (trainer_svc, reward_svc, checkpoint-engine sidecar owning vLLM)
with the RL part of the demo config (k1rl/demo.yaml) and reports medians over its
iterations. The model is the demo's shape, untrained unless --model-dir points at a
trained one: random weights rarely emit EOS, so responses run to max_tokens (the slow
case). The last output line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from k1rl import master  # noqa: E402
from k1rl.config import load_config  # noqa: E402
from k1rl.demo import load_demo_config, run_config, write_problems  # noqa: E402
from k1rl.launch import free_tcp_address  # noqa: E402
from k1rl.metrics.jsonl import read_metrics  # noqa: E402

KEYS = (
    "iteration_s",
    "switch_to_rollout_s",
    "engine_start_s",
    "weight_sync_s",
    "rollout_s",
    "reward_s",
    "switch_to_train_s",
    "train_s",
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", help="RunConfig YAML (default: the demo's run config)")
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--lifecycle", choices=("restart", "persistent"),
                    help="override checkpoint_engine.engine_lifecycle")
    ap.add_argument("--model-dir", default="artifacts/bench-demo-model")
    args = ap.parse_args()

    demo = load_demo_config()
    run_dir = Path(tempfile.mkdtemp(prefix="k1rl-bench-iter-"))
    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").exists():
        from k1rl.data.tiny_model import init_model

        init_model(model_dir, seed=demo.run.seed, **demo.model.model_dump())
    if args.config:
        cfg = load_config(args.config)
        cfg.model.path = str(model_dir.resolve())
        for section in (cfg.trainer, cfg.rollout, cfg.reward, cfg.checkpoint_engine):
            section.address = free_tcp_address()
    else:  # the demo's RL run, on the problem files the demo writes
        write_problems(demo, run_dir, demo.run.seed)
        cfg = run_config(demo, demo.run.seed, run_dir, model_dir)
    cfg.rl.iterations = args.iterations
    cfg.rl.eval_every = 0
    if args.lifecycle:
        cfg.checkpoint_engine.engine_lifecycle = args.lifecycle
    master.run(cfg, run_dir)
    rows = [record.row() for record in read_metrics(run_dir)]
    report = {k: round(statistics.median(r[k] for r in rows), 3) for k in KEYS}
    report.update(
        iterations=len(rows),
        prompts=cfg.rl.prompts_per_iteration,
        samples_per_prompt=cfg.rollout.n,
        max_tokens=cfg.rollout.max_tokens,
        engine_lifecycle=cfg.checkpoint_engine.engine_lifecycle,
    )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
