"""`k1rl long2short dpo`: DPO on the groups `k1rl long2short sample` drew (k1.5 §2.4).

Each step sends trainer_svc a few prompts' samples as one RL batch (reward 1 for a
correct sample, 0 for a wrong one) and the ``dpo`` loss pairs them by the long2short
rule: the shortest correct against every wrong one and every correct one at least
``long2short.length_ratio`` times longer. The reference policy is the model that drew the
samples: their recorded log-probs (``trainer.reference: rollout``), so every step is
measured against the same reference, as offline DPO is. The run directory gets
``config.yaml``, ``dpo_metrics.jsonl``, the trainer's log and the result as an HF
checkpoint in ``final/``.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from k1rl.config import RunConfig
from k1rl.long2short.rejection import GROUPS, REPORT
from k1rl.protocol import CheckpointRequest, CheckpointResult, TrainBatch, TrainSample, TrainStats
from k1rl.yaml_config import ConfigError

console = Console()
METRICS_FILE = "dpo_metrics.jsonl"
FINAL_HF = "final"


@dataclass
class DPOResult:
    steps: int
    final_loss: float
    checkpoint: Path
    seconds: float


def dpo_config(cfg: RunConfig, source: str) -> RunConfig:
    """``cfg`` with the trainer set for offline DPO: the ``dpo`` loss (its own settings
    kept when it is already dpo) and the sampling model as the reference."""
    loss = cfg.trainer.loss
    ratio = cfg.long2short.length_ratio
    if getattr(loss, "name", None) == "dpo":
        if loss.length_ratio != ratio:
            raise ConfigError(source, [
                f"trainer.loss.length_ratio ({loss.length_ratio}) differs from "
                f"long2short.length_ratio ({ratio}): the pairs would not be the sampled ones"])
        spec = loss.model_dump()
    else:
        spec = {"name": "dpo", "length_ratio": ratio}
    data = cfg.model_dump()
    data["trainer"] |= {"loss": spec, "reference": "rollout"}
    return RunConfig.model_validate(data)


def read_groups(samples_dir: Path) -> tuple[list[dict], str]:
    """The sampled groups of ``samples_dir`` and the model that drew them."""
    samples_dir = Path(samples_dir)
    for name in (GROUPS, REPORT):
        if not (samples_dir / name).is_file():
            raise FileNotFoundError(f"{samples_dir} has no {name}: run `k1rl long2short "
                                    "sample --out` into it first")
    model = json.loads((samples_dir / REPORT).read_text())["model"]
    with (samples_dir / GROUPS).open(encoding="utf-8") as f:
        groups = [json.loads(line) for line in f if line.strip()]
    if not groups:
        raise ValueError(f"{samples_dir / GROUPS}: no prompt has a DPO pair (no correct "
                         "sample, or every sample equally short)")
    return groups, model


def train_batch(groups: list[dict]) -> TrainBatch:
    """One trainer call: every sample of ``groups`` (group ids in order), reward 1 when it
    was judged correct."""
    return TrainBatch(samples=[
        TrainSample(group_id=g, prompt_token_ids=group["prompt_token_ids"],
                    response_token_ids=s["token_ids"], rollout_logprobs=s["logprobs"],
                    reward=1.0 if s["correct"] else 0.0, policy_version=0)
        for g, group in enumerate(groups) for s in group["samples"]])


def batches(groups: list[dict], epochs: int, per_step: int, seed: int) -> Iterator[list[dict]]:
    """``per_step`` groups at a time, a new seeded order every epoch."""
    rng = random.Random(seed)
    for _ in range(epochs):
        order = list(range(len(groups)))
        rng.shuffle(order)
        for start in range(0, len(order), per_step):
            yield [groups[i] for i in order[start:start + per_step]]


def run_dpo(cfg: RunConfig, samples_dir: Path, run_dir: Path,
            source: str = "run config") -> DPOResult:
    """DPO of the model that drew ``samples_dir`` (see the module docstring)."""
    from k1rl.launch import trainer_service

    started = time.perf_counter()
    groups, model = read_groups(samples_dir)
    run_dir = Path(run_dir)
    if (run_dir / METRICS_FILE).exists():
        raise FileExistsError(f"{run_dir} holds a DPO run already: pick another --run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = dpo_config(cfg, source)
    # the reference log-probs are the sampling model's: train that model
    cfg.model.path = model
    cfg.run_dir = str(run_dir.resolve())
    config_path = (run_dir / "config.yaml").resolve()
    config_path.write_text(cfg.dump_yaml())
    d = cfg.long2short.dpo
    steps, loss = 0, float("nan")
    console.print(f"dpo: {len(groups)} prompts with pairs, from {model}")
    with trainer_service(cfg.trainer.address, config_path, run_dir / "logs") as trainer, \
            (run_dir / METRICS_FILE).open("w") as metrics:
        for chunk in batches(groups, d.epochs, d.prompts_per_step, cfg.seed):
            stats = trainer.call("train", train_batch(chunk), TrainStats)
            steps, loss = steps + 1, stats.loss
            metrics.write(json.dumps({"step": steps, "prompts": len(chunk), "loss": loss,
                                      **stats.metrics}) + "\n")
            metrics.flush()
        final = (run_dir / FINAL_HF).resolve()
        trainer.call("checkpoint", CheckpointRequest(action="export_hf", path=str(final)),
                     CheckpointResult)
    return DPOResult(steps, loss, final, time.perf_counter() - started)
