"""`make demo`: the whole k1.5 recipe on a tiny model, from nothing, on CPU.

    build tokenizer + tiny Qwen2  ->  SFT on easy problems (megatron-core)
    ->  RL with online policy mirror descent on harder ones (k1rl.master: checkpoint
        engine, vLLM rollouts, reward_svc, trainer_svc; held-out evaluation at
        iteration 0, i.e. right after SFT, every rl.eval_every iterations and at the end)
    ->  before/after table, summary.json, metrics.jsonl, PNG plots, final HF checkpoint

Everything the demo does is set by one YAML file (``k1rl/demo.yaml`` by default): the
model shape, the SFT schedule and a complete RunConfig for the RL part. The run
directory holds a normal run (config.yaml, state.json, checkpoints), so an interrupted
demo's RL part continues with ``k1rl rl --resume RUN_DIR``.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from rich.console import Console
from rich.table import Table

from k1rl.config import ConfigError, RunConfig, parse_yaml_model
from k1rl.data.problem import Problem, synthetic_problems
from k1rl.data.tasks import Task, generate_suite, generate_tasks
from k1rl.launch import free_tcp_address
from k1rl.metrics.record import Accuracy, IterationMetrics, SFTStepMetrics
from k1rl.progress import progress_bar
from k1rl.protocol import CheckpointRequest, CheckpointResult, SFTBatch, SFTExample, TrainStats
from k1rl.rl_config import parse_levels

if TYPE_CHECKING:  # the master package starts services; the demo imports it when it runs
    from k1rl.master.problems import ProblemSet

console = Console()
DEFAULT_CONFIG = Path(__file__).with_name("demo.yaml")


class ModelShape(BaseModel):
    """Shape of the tiny Qwen2 the demo builds (see k1rl.data.tiny_model.init_model)."""

    model_config = ConfigDict(extra="forbid")

    hidden_size: int = Field(128, ge=8)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(2, ge=1)
    intermediate_size: int = Field(352, ge=1)


class SFTStop(BaseModel):
    """Stop SFT once the RL levels are partly solved, measured on validation problems.

    The step at which the tiny model learns to copy operands correctly varies by tens of
    steps from seed to seed, and with it how much of the RL levels SFT leaves unsolved;
    a fixed step count starts RL from very different places. Validation problems are
    train-split problems of the RL levels that are not in the RL prompt pool (the
    held-out set is a different split altogether).
    """

    model_config = ConfigDict(extra="forbid")

    accuracy: float = Field(gt=0, le=1, description="Stop once validation pass@1 (samples at "
                            "the rollout temperature) reaches this.")
    every: int = Field(20, ge=1, description="Steps between validations.")
    min_steps: int = Field(0, ge=0, description="No validation before this step.")
    problems: int = Field(100, ge=1, description="Validation problems, split over the RL levels.")
    samples: int = Field(4, ge=1, description="Samples per validation problem.")

    def due(self, steps_done: int) -> bool:
        return steps_done >= self.min_steps and steps_done % self.every == 0


class SFTSettings(BaseModel):
    """Supervised warm-up: AdamW, linear warm-up then cosine decay to a floor."""

    model_config = ConfigDict(extra="forbid")

    levels: list[str] = Field(min_length=1, description="family:difficulty levels of the SFT mix.")
    problems_per_level: int = Field(3000, ge=1)
    level_problems: dict[str, int] = Field(
        default_factory=dict, description="Problems of a level when not problems_per_level "
        "(a level's share of the SFT mix is its share of the problems).")
    steps: int = Field(ge=1, description="Optimizer steps (at most, with stop_when).")
    stop_when: SFTStop | None = Field(None, description="Early stop on validation accuracy.")
    batch: int = Field(64, ge=1, description="Examples per step.")
    lr: float = Field(gt=0, description="Peak learning rate.")
    warmup_steps: int = Field(0, ge=0)
    min_lr_fraction: float = Field(0.1, ge=0, le=1, description="Final lr / peak lr.")

    @field_validator("levels")
    @classmethod
    def _levels(cls, v: list[str]) -> list[str]:
        parse_levels(v)
        return v

    @model_validator(mode="after")
    def _level_problems(self) -> SFTSettings:
        unknown = sorted(set(self.level_problems) - set(self.levels))
        if unknown:
            raise ValueError(f"level_problems names levels not in levels: {unknown}")
        if any(n < 1 for n in self.level_problems.values()):
            raise ValueError(f"level_problems must be >= 1: {self.level_problems}")
        return self

    def tasks(self, seed: int) -> list[Task]:
        """The SFT problems (train split), level by level."""
        return [task for item, (family, level) in zip(self.levels, parse_levels(self.levels))
                for task in generate_suite(self.level_problems.get(item, self.problems_per_level),
                                           seed=seed, levels=((family, level),), split="train")]

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return self.lr * (self.min_lr_fraction + (1 - self.min_lr_fraction) * cosine)


class DemoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: ModelShape = Field(default_factory=ModelShape)
    sft: SFTSettings
    run: RunConfig


def load_demo_config(path: Path = DEFAULT_CONFIG) -> DemoConfig:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(str(path), [f"cannot read file: {e.strerror or e}"]) from e
    return parse_yaml_model(DemoConfig, text, str(path))


# ---------------------------------------------------------------------------- steps


def build_model(model_dir: Path, shape: ModelShape, seed: int) -> None:
    if (model_dir / "config.json").exists():
        console.print(f"model: reusing {model_dir}")
        return
    from k1rl.data.tiny_model import init_model

    with console.status("building tokenizer and tiny Qwen2 model"):
        summary = init_model(model_dir, seed=seed, **shape.model_dump())
    console.print(f"model: {summary.params:,} parameters, vocab {summary.vocab_size} -> {model_dir}")


def run_config(cfg: DemoConfig, seed: int, run_dir: Path, model_dir: Path) -> RunConfig:
    """The RL run's config: the demo's, with this seed, this run dir and fresh local ports."""
    run = cfg.run.model_copy(deep=True)
    run.seed = seed
    run.run_dir = str(run_dir)
    run.model.path = str(model_dir.resolve())
    for section in (run.trainer, run.rollout, run.reward, run.checkpoint_engine, run.sandbox):
        section.address = free_tcp_address()
    run.reward.sandbox_address = run.sandbox.address  # code rewards: this run's sandbox
    run.sandbox.http_port = None  # ZMQ only: parallel demos must not share a port
    return RunConfig.model_validate(run.model_dump())  # re-validate the edited copy


def validation_set(run: RunConfig, problems: int, training: ProblemSet) -> list[Problem]:
    """Train-split problems of the headline RL levels (``rl.headline_tasks``) outside the
    RL prompt pools ``training.train`` (see SFTStop)."""
    pool = {t.id for level in training.train for t in level}
    levels = parse_levels(run.rl.headline_tasks)
    per_level = math.ceil(problems / len(levels))
    return synthetic_problems(
        t for family, level in levels
        for t in generate_tasks(family, level, per_level, seed=run.seed + 2, split="train",
                                exclude=pool))


def sft(trainer, tokenizer, tasks: list[Task], settings: SFTSettings, seed: int,
        validate: Callable[[], Accuracy] | None = None) -> list[SFTStepMetrics]:
    """SFT steps until ``settings.steps``, or until ``validate().accuracy`` reaches
    ``settings.stop_when.accuracy``; one record per step (validations included)."""
    encoded = [
        SFTExample(
            prompt_token_ids=tokenizer.encode(t.prompt),
            response_token_ids=tokenizer.encode(t.target) + [tokenizer.eos_token_id],
        )
        for t in tasks
    ]
    rng = random.Random(seed)
    stop = settings.stop_when
    history: list[SFTStepMetrics] = []
    with progress_bar(console) as progress:
        bar = progress.add_task("SFT (megatron-core)", total=settings.steps, info="")
        val = ""
        for step in range(settings.steps):
            batch = SFTBatch(
                examples=rng.sample(encoded, min(settings.batch, len(encoded))),
                lr=settings.lr_at(step),
            )
            stats = trainer.call("sft_step", batch, TrainStats, timeout_s=600)
            record = SFTStepMetrics(step=step, loss=stats.loss, values=stats.metrics)
            history.append(record)
            done = step + 1
            if stop and validate and stop.due(done):
                record.val = validate()
                val = f"  validation {record.val.accuracy:.3f}"
                progress.console.print(
                    f"SFT step {done}: validation pass@1 {record.val.accuracy:.3f}, "
                    f"greedy {record.val.greedy:.3f} (stop at {stop.accuracy})")
            progress.update(bar, advance=1, info=f"loss {stats.loss:.3f}{val}")
            if stop and record.val and record.val.accuracy >= stop.accuracy:
                progress.update(bar, total=done)
                break
    return history


def rl(master, iterations: int) -> None:
    with progress_bar(console) as progress:
        bar = progress.add_task(f"RL ({master.cfg.trainer.loss.name})", total=iterations,
                                completed=master.state.iterations_done, info="")

        def report(record: IterationMetrics) -> None:
            info = f"v{record.policy_version}"
            if record.reward:
                info = f"reward {record.reward.reward_mean:.3f}  {info}"
            if record.eval:
                info += f"  held-out {record.eval.accuracy:.3f}"
            progress.update(bar, completed=record.iteration + 1, info=info)

        master.run(on_iteration=report)


def run_demo(cfg: DemoConfig, *, seed: int = 0, run_dir: Path = Path("runs/demo"),
             sft_only: bool = False) -> dict:
    """Build, SFT (saved to ``checkpoints/sft`` and exported as HF to ``sft-hf``), RL,
    summary; ``sft_only`` stops after the SFT export (a start checkpoint for other RL
    runs, e.g. bench/peer_trl.py) and returns where it is."""
    from k1rl.data.tokenizer import load_tokenizer
    from k1rl.master import CONFIG_FILE, start_local_services
    from k1rl.master.loop import FINAL_HF, Clients, Master
    from k1rl.master.plots import plot_run
    from k1rl.master.problems import load_problems
    from k1rl.master.state import RunState
    from k1rl.metrics.jsonl import read_metrics

    started = time.perf_counter()
    run_dir = Path(run_dir)
    if (run_dir / "state.json").exists():
        raise FileExistsError(f"{run_dir} holds a run already: pick another --run-dir, or "
                              f"continue its RL part with `k1rl rl --resume {run_dir}`")
    run_dir.mkdir(parents=True, exist_ok=True)
    model_dir = run_dir / "base-model"
    build_model(model_dir, cfg.model, seed)
    run = run_config(cfg, seed, run_dir, model_dir)
    if not run.rl.eval_every:
        raise ConfigError("run.rl.eval_every must be > 0: the demo reports held-out accuracy")
    config_path = run_dir / CONFIG_FILE
    config_path.write_text(run.dump_yaml())
    sft_tasks = cfg.sft.tasks(seed)

    with console.status("starting trainer_svc, reward_svc and the checkpoint-engine sidecar "
                        "(which starts vLLM)"):
        problems = load_problems(run, run_dir / "data")
        cluster = start_local_services(run, config_path.resolve(), run_dir / "logs", problems)
    with cluster:
        clients = Clients.connect(run)
        try:
            master = Master(run, run_dir, clients, RunState(run_id=run.run_id), problems)
            validate = None
            if cfg.sft.stop_when:
                val_tasks = validation_set(run, cfg.sft.stop_when.problems, problems)

                def validate() -> Accuracy:
                    return master.measure_in_rollout(val_tasks, cfg.sft.stop_when.samples)

            history = sft(clients.trainer, load_tokenizer(model_dir), sft_tasks, cfg.sft, seed,
                          validate)
            sft_ckpt = (run_dir / "checkpoints" / "sft").resolve()
            saved = clients.trainer.call(
                "checkpoint", CheckpointRequest(action="save", path=str(sft_ckpt)), CheckpointResult
            )
            # The RL run starts from the SFT weights: a resumed run that stopped before
            # its first iteration completed goes back to them, not to the random model.
            master.state.policy_version = saved.policy_version
            master.state.trainer_checkpoint = str(sft_ckpt)
            master.state.save(run_dir)
            sft_hf = export_sft(clients.trainer, run_dir)
            if sft_only:
                return finish_sft_only(run_dir, history, sft_ckpt, sft_hf, started)
            rl(master, run.rl.iterations)  # ends with the HF export to final/
        finally:
            clients.close()

    with open(run_dir / "sft_metrics.jsonl", "w") as f:
        f.writelines(json.dumps(record.row()) + "\n" for record in history)
    rows = read_metrics(run_dir)
    plot_run(run_dir)
    summary = summarize(rows, history, cfg, run, time.perf_counter() - started)
    summary["final_checkpoint"] = str((run_dir / FINAL_HF).resolve())
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary)
    return summary


def export_sft(trainer, run_dir: Path) -> Path:
    """The SFT weights as an HF checkpoint (``sft-hf``): what any RL run, ours or a peer
    framework's, can start from and be evaluated against."""
    path = (run_dir / "sft-hf").resolve()
    trainer.call("checkpoint", CheckpointRequest(action="export_hf", path=str(path)),
                 CheckpointResult)
    return path


def finish_sft_only(run_dir: Path, history: list[SFTStepMetrics], sft_ckpt: Path, sft_hf: Path,
                    started: float) -> dict:
    with open(run_dir / "sft_metrics.jsonl", "w") as f:
        f.writelines(json.dumps(record.row()) + "\n" for record in history)
    out = {"sft_steps": len(history), "final_sft_loss": history[-1].loss,
           "sft_checkpoint": str(sft_ckpt), "sft_hf": str(sft_hf),
           "wall_seconds": round(time.perf_counter() - started, 1)}
    console.print(f"SFT done in {out['sft_steps']} steps: HF checkpoint {sft_hf}")
    return out


def summarize(records: list[IterationMetrics], sft_history: list[SFTStepMetrics],
              cfg: DemoConfig, run: RunConfig, wall_s: float) -> dict:
    iterations = [r for r in records if r.reward and r.time and r.switch]
    evals = [r for r in records if r.eval]
    if not iterations or len(evals) < 2 or evals[0].iteration != 0:
        raise RuntimeError("the run has no held-out evaluation before and after RL")

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    before, after = evals[0].eval, evals[-1].eval
    return {
        "seed": run.seed,
        "model_parameters_shape": cfg.model.model_dump(),
        "sft_levels": cfg.sft.levels,
        "sft_steps": len(sft_history),
        "final_sft_loss": sft_history[-1].loss,
        "sft_validation": [{"after_steps": r.step + 1, "accuracy": r.val.accuracy,
                            "greedy": r.val.greedy}
                           for r in sft_history if r.val],
        "rl_levels": run.rl.tasks,
        "rl_task_weights": run.rl.task_weights,
        "heldout_levels": run.rl.headline_tasks,
        "heldout_problems": run.rl.eval_problems * len(run.rl.headline_tasks),
        "heldout_samples_per_problem": run.rl.eval_samples,
        # every evaluated level on its own, and every RL level's training accuracy
        "eval_by_level": {
            level: {"accuracy_after_sft": before.accuracy_by_level[level],
                    "accuracy_after_rl": after.accuracy_by_level[level],
                    "greedy_after_sft": before.greedy_by_level[level],
                    "greedy_after_rl": after.greedy_by_level[level]}
            for level in run.rl.headline_tasks if level in before.accuracy_by_level
        },
        "train_accuracy_by_level": {
            level: {"first_10": mean([r.reward.accuracy_by_level[level]
                                      for r in iterations[:10]]),
                    "last_10": mean([r.reward.accuracy_by_level[level]
                                     for r in iterations[-10:]])}
            for level in run.rl.tasks if level in iterations[0].reward.accuracy_by_level
        },
        "reward_errors": sum(r.reward.reward_errors for r in iterations),
        "eval_accuracy_after_sft": before.accuracy,
        "eval_accuracy_after_rl": after.accuracy,
        "eval_greedy_after_sft": before.greedy,
        "eval_greedy_after_rl": after.greedy,
        "rl_gain": after.accuracy - before.accuracy,
        "iterations": len(iterations),
        "policy_version": evals[-1].policy_version,
        "train_reward_first": iterations[0].reward.reward_mean,
        "train_reward_last": iterations[-1].reward.reward_mean,
        "mean_switch_to_rollout_s": mean([r.switch.switch_to_rollout_s for r in iterations]),
        "mean_switch_to_train_s": mean([r.switch.switch_to_train_s for r in iterations]),
        "mean_iteration_s": mean([r.time.iteration_s for r in iterations]),
        "mean_rollout_s": mean([r.time.rollout_s for r in iterations]),
        "mean_train_s": mean([r.time.train_s for r in iterations]),
        "wall_seconds": round(wall_s, 1),
    }


def print_summary(summary: dict) -> None:
    levels = ", ".join(summary["heldout_levels"])
    table = Table(title=f"held-out accuracy ({levels}; {summary['heldout_problems']} problems)")
    table.add_column("stage")
    table.add_column(f"pass@1 (T=1, {summary['heldout_samples_per_problem']} samples)")
    table.add_column("greedy")
    table.add_row("after SFT", f"{summary['eval_accuracy_after_sft']:.3f}",
                  f"{summary['eval_greedy_after_sft']:.3f}")
    table.add_row(f"after RL ({summary['iterations']} iterations)",
                  f"{summary['eval_accuracy_after_rl']:.3f}",
                  f"{summary['eval_greedy_after_rl']:.3f}")
    console.print(table)
    for level, acc in summary["train_accuracy_by_level"].items():
        console.print(f"{level}: training accuracy {acc['first_10']:.3f} (first 10 iterations)"
                      f" -> {acc['last_10']:.3f} (last 10)")
    console.print(
        f"RL gain {summary['rl_gain']:+.3f}; switch to rollout {summary['mean_switch_to_rollout_s']:.2f} s, "
        f"to train {summary['mean_switch_to_train_s']:.2f} s; done in {summary['wall_seconds']} s"
    )
