"""Where an RL iteration's time goes, for the demo config, measured on real services.

Runs a short k1.5 run (trainer_svc, reward_svc, checkpoint-engine sidecar restarting
vLLM per rollout) and reports medians over its iterations. The last output line is one
JSON object.
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
from k1rl.config import RunConfig, load_config  # noqa: E402
from k1rl.launch import free_tcp_address  # noqa: E402

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
    ap.add_argument("--config", help="RunConfig YAML (default: built-in defaults)")
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--model-dir", default="artifacts/tiny-model")
    args = ap.parse_args()

    cfg = load_config(args.config) if args.config else RunConfig()
    cfg.rl.iterations = args.iterations
    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").exists():
        from k1rl.data.tiny_model import init_model

        init_model(model_dir, seed=cfg.seed)
    cfg.model.path = str(model_dir.resolve())
    for section in (cfg.trainer, cfg.rollout, cfg.reward, cfg.checkpoint_engine):
        section.address = free_tcp_address()
    run_dir = Path(tempfile.mkdtemp(prefix="k1rl-bench-iter-"))
    master.run(cfg, run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
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
