"""`make demo`: the k1.5 recipe on a tiny model, from nothing, on CPU: a preset of the
general commands, each called as its command calls it.

    k1rl gen-tasks   problems into RUN_DIR/data (SFT rows, RL prompt pools, the SFT stop's
                     validation problems, the held-out set)
    k1rl init-model  a random-init tiny Qwen2 and its tokenizer in RUN_DIR/base-model
    k1rl sft         RUN_DIR/sft: until sampled pass@1 on the validation problems reaches
                     sft.stop_when.accuracy; the result in RUN_DIR/sft/final
    k1rl rl          RUN_DIR: from sft/final; held-out evaluation at iteration 0 (the SFT
                     policy), every rl.eval_every iterations and at the end; RUN_DIR/final
    k1rl eval        RUN_DIR/eval/report.json: final on the held-out files, with pass@k
    then             the before/after table and summary.json

One YAML file (``k1rl/demo.yaml``) says all of it: the model's shape, the problem files,
and the RunConfig that `k1rl sft` and `k1rl rl` read, whose relative data paths are files
of RUN_DIR. An interrupted demo's RL part continues with ``k1rl rl --resume RUN_DIR``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from rich.console import Console
from rich.table import Table

from k1rl.config import ConfigError, RunConfig, parse_yaml_model
from k1rl.launch import free_tcp_address
from k1rl.rl_config import parse_levels

console = Console()
DEFAULT_CONFIG = Path(__file__).with_name("demo.yaml")
SFT_DIR = "sft"
BASE_MODEL = "base-model"


class ModelShape(BaseModel):
    """Shape of the tiny Qwen2 `k1rl init-model` builds (k1rl.data.tiny_model.init_model)."""

    model_config = ConfigDict(extra="forbid")

    hidden_size: int = Field(128, ge=8)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(2, ge=1)
    intermediate_size: int = Field(352, ge=1)


class ProblemFile(BaseModel):
    """One `k1rl gen-tasks` call: ``count`` problems of each level into RUN_DIR/``file``."""

    model_config = ConfigDict(extra="forbid")

    file: str = Field(description="Path under the run directory.")
    levels: list[str] = Field(min_length=1, description="family:difficulty levels.")
    count: int = Field(ge=1, description="Problems per level.")
    up_to: bool = Field(False, description="A smaller level gives what it has.")
    split: Literal["all", "train", "heldout"] = "train"
    seed_offset: int = Field(0, ge=0, description="Generated with the demo seed plus this.")
    exclude: list[str] = Field(default_factory=list, description="Files above whose "
                               "problems are left out.")

    @field_validator("levels")
    @classmethod
    def _levels(cls, v: list[str]) -> list[str]:
        parse_levels(v)
        return v

    def write(self, run_dir: Path, seed: int) -> int:
        from k1rl.data.tasks import problem_ids, write_problems

        skip = set().union(*(problem_ids(run_dir / f) for f in self.exclude))
        return write_problems(run_dir / self.file, parse_levels(self.levels), self.count,
                              seed + self.seed_offset, split=self.split, exclude=skip,
                              up_to=self.up_to)


class DemoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: ModelShape = Field(default_factory=ModelShape)
    problems: list[ProblemFile] = Field(min_length=1)
    run: RunConfig

    @model_validator(mode="after")
    def _excluded_files_come_first(self) -> DemoConfig:
        written: set[str] = set()
        for k, item in enumerate(self.problems):
            missing = [f for f in item.exclude if f not in written]
            if missing:
                raise ValueError(f"problems[{k}].exclude: {missing} not written before it")
            written.add(item.file)
        if not self.run.sft.stages or not self.run.data.train or not self.run.rl.eval_every:
            raise ValueError("run: the demo needs sft.stages, data.train and rl.eval_every > 0")
        return self


def load_demo_config(path: Path = DEFAULT_CONFIG) -> DemoConfig:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(str(path), [f"cannot read file: {e.strerror or e}"]) from e
    return parse_yaml_model(DemoConfig, text, str(path))


def run_config(cfg: DemoConfig, seed: int, run_dir: Path, model_dir: Path) -> RunConfig:
    """The demo's RunConfig for ``model_dir``: this seed and run directory, relative data
    paths under ``run_dir``, fresh local ports (demos side by side do not collide)."""
    run = cfg.run.model_copy(deep=True)
    run.seed = seed
    run.run_dir = str(run_dir)
    run.model.path = str(Path(model_dir).resolve())
    sources = [*run.data.train, *run.data.eval, *run.sft.data.train, *run.sft.data.eval,
               *(run.sft.stop_when.data if run.sft.stop_when else [])]
    for source in sources:
        source.path = str((Path(run_dir) / source.path).resolve())
    for section in (run.trainer, run.rollout, run.reward, run.checkpoint_engine, run.sandbox):
        section.address = free_tcp_address()
    run.reward.sandbox_address = run.sandbox.address  # code rewards: this run's sandbox
    run.sandbox.http_port = None  # ZMQ only: parallel demos must not share a port
    return RunConfig.model_validate(run.model_dump())  # re-validate the edited copy


# ---------------------------------------------------------------------------- steps


def write_problems(cfg: DemoConfig, run_dir: Path, seed: int) -> None:
    for item in cfg.problems:
        n = item.write(run_dir, seed)
        console.print(f"gen-tasks: {n} problems ({', '.join(item.levels)}) -> {item.file}")


def build_model(model_dir: Path, shape: ModelShape, seed: int) -> None:
    if (model_dir / "config.json").exists():
        console.print(f"init-model: reusing {model_dir}")
        return
    from k1rl.data.tiny_model import init_model

    with console.status("building tokenizer and tiny Qwen2 model"):
        summary = init_model(model_dir, seed=seed, **shape.model_dump())
    console.print(f"init-model: {summary.params:,} parameters, vocab {summary.vocab_size} "
                  f"-> {model_dir}")


def sft_checkpoint(cfg: DemoConfig, seed: int, run_dir: Path) -> Path:
    """`k1rl sft` of the base model into RUN_DIR/sft; a finished one is reused."""
    from k1rl.master.loop import FINAL_HF
    from k1rl.sft.run import run_sft

    final = run_dir / SFT_DIR / FINAL_HF
    if (final / "config.json").exists():
        console.print(f"sft: reusing {final}")
        return final.resolve()
    sft = run_config(cfg, seed, run_dir, run_dir / BASE_MODEL)
    result = run_sft(sft, run_dir / SFT_DIR, source="demo config")
    console.print(f"sft: {result.steps} steps in {result.seconds:.0f} s -> {result.checkpoint}")
    return result.checkpoint


def evaluate_final(rl: RunConfig, run_dir: Path) -> dict:
    """`k1rl eval` of RUN_DIR/final on the run's held-out set: the report's dict."""
    from k1rl.master.evaluation import evaluate_problems, report
    from k1rl.master.loop import FINAL_HF
    from k1rl.master.problems import load_problems

    work = run_dir / "eval"
    problems = load_problems(rl, work / "data").heldout_problems()
    model = (run_dir / FINAL_HF).resolve()
    samples = rl.rl.eval_samples
    with console.status(f"k1rl eval: {model} on {len(problems)} held-out problems"):
        outcomes = evaluate_problems(rl, model, work, problems, samples)
    result = report(outcomes, samples, model=str(model), samples=samples, data=["held-out"],
                    temperature=rl.rollout.temperature, max_tokens=rl.rollout.max_tokens,
                    seed=rl.seed, skipped={})
    (work / "report.json").write_text(result.model_dump_json(indent=2) + "\n")
    return result.model_dump()


def run_demo(cfg: DemoConfig, *, seed: int = 0, run_dir: Path = Path("runs/demo"),
             sft_only: bool = False) -> dict:
    """gen-tasks, init-model, sft, rl, eval (see the module docstring); ``sft_only`` stops
    after SFT (a start checkpoint for other RL runs, e.g. bench/peer_trl.py) and returns
    where it is."""
    from k1rl import master
    from k1rl.master.loop import FINAL_HF
    from k1rl.metrics.jsonl import read_metrics

    started = time.perf_counter()
    run_dir = Path(run_dir).resolve()
    if (run_dir / "state.json").exists():
        raise FileExistsError(f"{run_dir} holds a run already: pick another --run-dir, or "
                              f"continue its RL part with `k1rl rl --resume {run_dir}`")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_problems(cfg, run_dir, seed)
    build_model(run_dir / BASE_MODEL, cfg.model, seed)
    sft = sft_checkpoint(cfg, seed, run_dir)
    if sft_only:
        return {"sft_hf": str(sft), "wall_seconds": round(time.perf_counter() - started, 1)}
    rl = run_config(cfg, seed, run_dir, sft)
    master.run(rl, run_dir, source="demo config")  # ends with the HF export to final/
    evaluated = evaluate_final(rl, run_dir)
    summary = summarize(read_metrics(run_dir), sft_rows(run_dir), evaluated, rl,
                        time.perf_counter() - started)
    summary["final_checkpoint"] = str(run_dir / FINAL_HF)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary)
    return summary


def sft_rows(run_dir: Path) -> list[dict]:
    from k1rl.sft.run import METRICS_FILE

    lines = (run_dir / SFT_DIR / METRICS_FILE).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def summarize(records: list, sft: list[dict], evaluated: dict, run: RunConfig,
              wall_s: float) -> dict:
    iterations = [r for r in records if r.reward and r.time and r.switch]
    evals = [r for r in records if r.eval]
    if not iterations or len(evals) < 2 or evals[0].iteration != 0:
        raise RuntimeError("the run has no held-out evaluation before and after RL")

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    before, after = evals[0].eval, evals[-1].eval
    rl_levels = [s.label() for s in run.data.train]
    return {
        "seed": run.seed,
        "sft_steps": len(sft),
        "final_sft_loss": sft[-1]["loss"],
        "sft_validation": [{"after_steps": r["step"] + 1, "accuracy": r["val_accuracy"],
                            "greedy": r["val_greedy"]} for r in sft if "val_accuracy" in r],
        "rl_levels": rl_levels,
        "rl_task_weights": run.rl.task_weights,
        "heldout_levels": list(evaluated["by_level"]),
        "heldout_problems": evaluated["overall"]["problems"],
        "heldout_samples_per_problem": run.rl.eval_samples,
        # every evaluated level on its own, and every RL level's training accuracy
        "eval_by_level": {
            level: {"accuracy_after_sft": before.accuracy_by_level[level],
                    "accuracy_after_rl": after.accuracy_by_level[level],
                    "greedy_after_sft": before.greedy_by_level[level],
                    "greedy_after_rl": after.greedy_by_level[level]}
            for level in before.accuracy_by_level
        },
        "train_accuracy_by_level": {
            level: {"first_10": mean([r.reward.accuracy_by_level[level]
                                      for r in iterations[:10]]),
                    "last_10": mean([r.reward.accuracy_by_level[level]
                                     for r in iterations[-10:]])}
            for level in rl_levels if level in iterations[0].reward.accuracy_by_level
        },
        "reward_errors": sum(r.reward.reward_errors for r in iterations),
        "eval_accuracy_after_sft": before.accuracy,
        "eval_accuracy_after_rl": after.accuracy,
        "eval_greedy_after_sft": before.greedy,
        "eval_greedy_after_rl": after.greedy,
        "rl_gain": after.accuracy - before.accuracy,
        "final_eval": evaluated["overall"],
        "final_eval_k": evaluated["k"],
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
    final = summary["final_eval"]
    console.print(
        f"k1rl eval of final/: pass@1 {final['pass1']:.3f}, pass@{summary['final_eval_k']} "
        f"{final['pass_k']:.3f}, greedy {final['greedy']:.3f}, "
        f"{final['response_tokens']:.1f} tokens per response")
    console.print(
        f"RL gain {summary['rl_gain']:+.3f}; switch to rollout {summary['mean_switch_to_rollout_s']:.2f} s, "
        f"to train {summary['mean_switch_to_train_s']:.2f} s; done in {summary['wall_seconds']} s"
    )
