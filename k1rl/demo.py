"""`make demo`: build the tiny model, SFT it with megatron-core, push the weights into a
dummy-started vLLM over Mooncake, and sample from the pushed policy.

Each step is one named function, so the RL loop (k1rl.master) can grow out of the
same pieces.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from k1rl.config import RunConfig
from k1rl.data.tasks import Task, extract_answer, generate_suite, generate_tasks
from k1rl.launch import LocalStack
from k1rl.protocol import (
    CheckpointRequest,
    CheckpointResult,
    GenerateRequest,
    GenerateResult,
    PushWeightsRequest,
    SamplingSpec,
    SFTBatch,
    SFTExample,
    TrainStats,
    WeightManifest,
    WeightUpdateResult,
)

console = Console()

# The SFT curriculum of the demo: easy problems the tiny model can learn in minutes.
SFT_LEVELS = (("add", 1), ("add", 2), ("sub", 1), ("sub", 2))
EVAL_LEVEL = ("add", 2)


@dataclass
class DemoOptions:
    seed: int = 0
    model_dir: Path = Path("artifacts/tiny-model")
    run_dir: Path = Path("runs/demo")
    sft_steps: int = 60
    sft_batch: int = 64
    lr: float = 2e-3
    eval_problems: int = 200
    eval_samples: int = 4


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


def build_model(opts: DemoOptions) -> None:
    if (opts.model_dir / "config.json").exists():
        console.print(f"model: reusing {opts.model_dir}")
        return
    from k1rl.data.tiny_model import init_model

    with console.status("building tokenizer and tiny Qwen2 model"):
        summary = init_model(opts.model_dir, seed=opts.seed)
    console.print(f"model: {summary.params:,} parameters, vocab {summary.vocab_size} -> {opts.model_dir}")


def sft_data(opts: DemoOptions) -> list[Task]:
    return generate_suite(3000, seed=opts.seed, levels=SFT_LEVELS, split="train")


def run_sft(stack: LocalStack, tasks: list[Task], opts: DemoOptions) -> list[dict]:
    tok = stack.tokenizer
    encoded = [
        SFTExample(
            prompt_token_ids=tok.encode(t.prompt),
            response_token_ids=tok.encode(t.target) + [tok.eos_token_id],
        )
        for t in tasks
    ]
    rng = random.Random(opts.seed)
    history = []
    with _progress() as progress:
        bar = progress.add_task("SFT (megatron-core)", total=opts.sft_steps, info="")
        for step in range(opts.sft_steps):
            batch = SFTBatch(examples=rng.sample(encoded, min(opts.sft_batch, len(encoded))))
            stats = stack.trainer.call("sft_step", batch, TrainStats, timeout_s=600)
            history.append({"step": step, "loss": stats.loss, **stats.metrics})
            progress.update(bar, advance=1, info=f"loss {stats.loss:.3f}")
    return history


def push_weights(stack: LocalStack) -> WeightUpdateResult:
    started = time.perf_counter()
    manifest = stack.trainer.call("push_weights", PushWeightsRequest(), WeightManifest)
    result = stack.rollout.call("update_weights", manifest, WeightUpdateResult, timeout_s=600)
    console.print(
        f"weights: policy v{result.version}, {result.bytes / 1e6:.1f} MB over "
        f"{manifest.transport} in {time.perf_counter() - started:.2f} s "
        f"(checksum ok: {result.checksum_ok})"
    )
    return result


def evaluate(stack: LocalStack, tasks: list[Task], temperature: float, n: int, seed: int):
    req = GenerateRequest(
        prompts=[t.prompt for t in tasks],
        sampling=SamplingSpec(n=n, temperature=temperature, max_tokens=96, seed=seed),
    )
    result = stack.rollout.call("generate", req, GenerateResult, timeout_s=600)
    correct = [
        [extract_answer(c.text) == t.answer for c in r.completions]
        for t, r in zip(tasks, result.results)
    ]
    accuracy = sum(map(sum, correct)) / sum(map(len, correct))
    return accuracy, result


def show_samples(tasks: list[Task], result: GenerateResult, k: int = 4) -> None:
    table = Table(title=f"vLLM samples from trainer-pushed policy v{result.policy_version}")
    table.add_column("prompt")
    table.add_column("completion")
    table.add_column("ok")
    for t, r in list(zip(tasks, result.results))[:k]:
        c = r.completions[0]
        ok = "yes" if extract_answer(c.text) == t.answer else "no"
        table.add_row(t.prompt.replace("\n", " "), c.text.strip(), ok)
    console.print(table)


def run_demo(opts: DemoOptions) -> dict:
    started = time.perf_counter()
    build_model(opts)
    cfg = RunConfig(seed=opts.seed)
    cfg.trainer.lr = opts.lr
    opts.run_dir.mkdir(parents=True, exist_ok=True)
    family, level = EVAL_LEVEL
    heldout = generate_tasks(family, level, opts.eval_problems, seed=opts.seed + 1, split="heldout")
    with console.status("starting trainer_svc (megatron-core) and rollout_svc (vLLM, dummy weights)"):
        stack = LocalStack.start(opts.run_dir / "services", cfg=cfg, model_dir=opts.model_dir)
    with stack:
        push_weights(stack)
        before, _ = evaluate(stack, heldout, 0.0, 1, opts.seed)
        history = run_sft(stack, sft_data(opts), opts)
        push_weights(stack)
        greedy, greedy_result = evaluate(stack, heldout, 0.0, 1, opts.seed)
        sampled, _ = evaluate(stack, heldout, 1.0, opts.eval_samples, opts.seed)
        show_samples(heldout, greedy_result)
        final = opts.run_dir / "final"
        stack.trainer.call(
            "checkpoint", CheckpointRequest(action="export_hf", path=str(final.resolve())),
            CheckpointResult,
        )
    summary = {
        "seed": opts.seed,
        "sft_steps": opts.sft_steps,
        "final_sft_loss": history[-1]["loss"],
        "eval_level": f"{family}:{level}",
        "eval_greedy_before_sft": before,
        "eval_greedy_after_sft": greedy,
        "eval_accuracy_after_sft": sampled,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "final_checkpoint": str(final),
    }
    (opts.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    with open(opts.run_dir / "metrics.jsonl", "w") as f:
        for row in history:
            f.write(json.dumps(row) + "\n")
    _print_summary(summary)
    return summary


def _print_summary(summary: dict) -> None:
    table = Table(title="held-out accuracy (" + summary["eval_level"] + ")")
    table.add_column("stage")
    table.add_column("greedy")
    table.add_column("sampled pass@1 (T=1)")
    table.add_row("random init", f"{summary['eval_greedy_before_sft']:.3f}", "")
    table.add_row(
        "after SFT",
        f"{summary['eval_greedy_after_sft']:.3f}",
        f"{summary['eval_accuracy_after_sft']:.3f}",
    )
    console.print(table)
    console.print(f"done in {summary['wall_seconds']} s")
