"""`k1rl sft`: supervised fine-tuning of ``model.path`` on ``sft.data`` through trainer_svc.

The rows are loaded as any data source (k1rl/data/sources.py) and tokenized once into
Arrow columns (``RUN_DIR/data``), so every row is checked before the first step and a large
set is not held as Python objects. Each step draws ``sft.batch`` rows from a shuffled pass
over the training rows (a new order every pass), packs them, and takes one AdamW step at
the stage's learning rate. With ``sft.stop_when`` the RL loop's services run too, and
every few steps the trainer's weights go to the engine to measure sampled pass@1 on the
named problems; SFT ends once it reaches the threshold. The run directory gets
``config.yaml``, ``sft_metrics.jsonl`` (one record per step), ``sft_loss.png``, the
services' logs and the result as an HF checkpoint in ``final/``.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from k1rl.config import RunConfig
from k1rl.data.problem import Problem
from k1rl.master.loop import FINAL_HF
from k1rl.metrics.record import Accuracy, SFTStepMetrics
from k1rl.progress import progress_bar
from k1rl.protocol import (
    CheckpointRequest,
    CheckpointResult,
    LogprobRequest,
    LogprobResult,
    RunRef,
    SFTBatch,
    SFTExample,
    TrainStats,
)
from k1rl.yaml_config import ConfigError

console = Console()
METRICS_FILE = "sft_metrics.jsonl"
COLUMNS = ("prompt_token_ids", "response_token_ids", "response_mask")


@dataclass
class SFTResult:
    steps: int
    final_loss: float
    val_loss: float | None
    checkpoint: Path
    seconds: float


def run_sft(cfg: RunConfig, run_dir: Path, source: str = "run config") -> SFTResult:
    """SFT ``cfg.model.path`` on ``cfg.sft`` into ``run_dir`` (see the module docstring)."""
    from k1rl.preflight import check_paths

    started = time.perf_counter()
    run_dir = Path(run_dir)
    if not cfg.sft.stages or not cfg.sft.data.train:
        raise ConfigError(source, ["sft: `k1rl sft` needs sft.data.train and sft.stages"])
    if (run_dir / METRICS_FILE).exists():
        raise FileExistsError(f"{run_dir} holds an SFT run already: pick another --run-dir")
    check_paths(cfg, source, sections=("sft.data",))
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = (run_dir / "config.yaml").resolve()
    # the trainer writes its export only inside the run it is told of
    cfg = cfg.model_copy(update={"run_dir": str(run_dir.resolve())})
    config_path.write_text(cfg.dump_yaml())
    with console.status("tokenizing the SFT rows"):
        try:
            train, heldout = encoded_rows(cfg, run_dir / "data")
        except ValueError as e:  # a row that cannot be an example, found before any step
            raise ConfigError(source, [f"sft.data: {e}"]) from e
    console.print(f"sft: {len(train)} training rows, {len(heldout)} validation rows")
    services = (_trainer(cfg, config_path, run_dir / "logs") if cfg.sft.stop_when is None
                else _with_rollout(cfg, config_path, run_dir, source))
    with services as (trainer, validate):
        history = train_stages(cfg, trainer, train, heldout, run_dir / METRICS_FILE, validate)
        final = (run_dir / FINAL_HF).resolve()  # where `k1rl rl` puts its policy too
        trainer.call("checkpoint", CheckpointRequest(action="export_hf", path=str(final)),
                     CheckpointResult)
    plot_sft(run_dir, history)
    val = [r.val_loss for r in history if r.val_loss is not None]
    return SFTResult(len(history), history[-1].loss, val[-1] if val else None, final,
                     time.perf_counter() - started)


def encoded_rows(cfg: RunConfig, cache_dir: Path) -> tuple[Any, Any]:
    """(training rows, at most sft.eval_examples validation rows drawn with the run seed)
    as Arrow datasets of token ids and loss masks, every source in order. ValueError for a
    row that cannot be an example or is longer than a stage's packed rows, and for
    validation asked of a run without held-out rows."""
    from datasets import Features, List, Value, concatenate_datasets
    from transformers import AutoTokenizer

    from k1rl.data.sources import load_data
    from k1rl.sft.examples import SFTEncoder

    data = load_data(cfg.sft.data, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    encoder = SFTEncoder(cfg.sft.data.prompt, tokenizer, cfg.sft.loss_on)
    # typed up front: a first batch of unmasked rows ([]) must not fix the mask's type
    features = Features({"prompt_token_ids": List(Value("int64")),
                         "response_token_ids": List(Value("int64")),
                         "response_mask": List(Value("bool")), "length": Value("int64")})

    def encode(row: dict, label: str) -> dict:
        example = encoder.encode(Problem.from_row(row, label))
        return {"prompt_token_ids": example.prompt_token_ids,
                "response_token_ids": example.response_token_ids,
                "response_mask": example.response_mask or [],
                "length": len(example.prompt_token_ids) + len(example.response_token_ids)}

    def encoded(pools: list[tuple[str, Any]], kind: str) -> Any:
        parts = [ds.map(encode, fn_kwargs={"label": label}, remove_columns=ds.column_names,
                        features=features, new_fingerprint=f"sft-{kind}-{k}",
                        load_from_cache_file=False)
                 for k, (label, ds) in enumerate(pools) if len(ds)]
        return concatenate_datasets(parts) if parts else None

    train = encoded(data.train, "train")
    if train is None:
        raise ValueError("sft.data.train holds no rows")
    heldout = encoded(data.heldout, "heldout")
    if heldout is None and cfg.sft.eval_every:
        raise ValueError("sft.eval_every is set but there are no held-out rows: add "
                         "sft.data.eval or a heldout_fraction > 0")
    _check_lengths(cfg, [n for rows in (train, heldout) if rows is not None
                         for n in rows["length"]])
    if heldout is not None:
        n = min(cfg.sft.eval_examples, len(heldout))
        heldout = heldout.shuffle(seed=cfg.seed).select(range(n))
    return train, heldout if heldout is not None else []


def _check_lengths(cfg: RunConfig, lengths: list[int]) -> None:
    longest = max(lengths)
    limit = json.loads((Path(cfg.model.path) / "config.json").read_text()).get(
        "max_position_embeddings", longest)
    for k, stage in enumerate(cfg.sft.stages):
        row = min(limit, stage.seq_length or cfg.trainer.seq_length or limit)
        if longest > row:
            over = sum(n > row for n in lengths)
            raise ValueError(f"{over} rows are longer than stage {k}'s {row}-token rows "
                             f"(longest: {longest} tokens): raise sft.stages[{k}].seq_length "
                             "or trainer.seq_length (up to the model's "
                             "max_position_embeddings), or shorten the rows")


def train_stages(cfg: RunConfig, trainer: Any, train: Any, heldout: Any, metrics_path: Path,
                 validate: Callable[[], Accuracy] | None = None) -> list[SFTStepMetrics]:
    """Every stage's steps in order, or until sft.stop_when's accuracy is reached
    (``validate`` measures it); a record per step, appended to ``metrics_path`` as it is
    taken (validation loss every sft.eval_every steps and after the last)."""
    sft = cfg.sft
    order = _shuffled_passes(len(train), cfg.seed)
    batch_size = min(sft.batch, len(train))
    totals = [stage.total_steps(len(train), batch_size) for stage in sft.stages]
    history: list[SFTStepMetrics] = []
    with progress_bar(console) as progress, open(metrics_path, "w") as out:
        bar = progress.add_task("SFT (megatron-core)", total=sum(totals), info="")
        for k, (stage, total) in enumerate(zip(sft.stages, totals)):
            for s in range(total):
                rows = train[[next(order) for _ in range(batch_size)]]
                batch = SFTBatch(examples=_examples(rows), lr=stage.lr_at(s, total),
                                 seq_length=stage.seq_length)
                stats = trainer.call("sft_step", batch, TrainStats, timeout_s=600)
                record = SFTStepMetrics(step=len(history), loss=stats.loss,
                                        values=stats.metrics, stage=k, lr=batch.lr)
                if validate and sft.stop_when.due(record.step + 1):
                    record.val = validate()
                    progress.console.print(
                        f"SFT step {record.step + 1}: sampled pass@1 {record.val.accuracy:.3f}, "
                        f"greedy {record.val.greedy:.3f} (stop at {sft.stop_when.accuracy})")
                stop = record.val is not None and record.val.accuracy >= sft.stop_when.accuracy
                last = stop or (k == len(sft.stages) - 1 and s == total - 1)
                if len(heldout) and (last or (sft.eval_every and
                                              (record.step + 1) % sft.eval_every == 0)):
                    record.val_loss = validation_loss(trainer, heldout)
                history.append(record)
                out.write(json.dumps(record.row()) + "\n")
                out.flush()
                progress.update(bar, advance=1, info=_step_info(record))
                if stop:
                    progress.update(bar, total=len(history))
                    return history
    return history


def _step_info(record: SFTStepMetrics) -> str:
    info = f"stage {record.stage}  loss {record.loss:.3f}"
    if record.val_loss is not None:
        info += f"  val {record.val_loss:.3f}"
    if record.val is not None:
        info += f"  pass@1 {record.val.accuracy:.3f}"
    return info


def validation_loss(trainer: Any, heldout: Any, chunk: int = 64) -> float:
    """Mean NLL per learned token of the validation rows under the trainer's weights."""
    total, count = 0.0, 0
    for start in range(0, len(heldout), chunk):
        examples = _examples(heldout[start:start + chunk])
        req = LogprobRequest(prompt_token_ids=[e.prompt_token_ids for e in examples],
                             response_token_ids=[e.response_token_ids for e in examples])
        result = trainer.call("logprobs", req, LogprobResult, timeout_s=600)
        for e, values in zip(examples, result.logprobs, strict=True):
            mask = e.response_mask or [True] * len(values)
            total -= sum(v for v, keep in zip(values, mask, strict=True) if keep)
            count += sum(mask)
    return total / count


def _examples(rows: dict[str, list]) -> list[SFTExample]:
    return [SFTExample(prompt_token_ids=p, response_token_ids=r, response_mask=m or None)
            for p, r, m in zip(*(rows[c] for c in COLUMNS), strict=True)]


def _shuffled_passes(n: int, seed: int) -> Iterator[int]:
    rng = random.Random(seed)
    while True:
        order = list(range(n))
        rng.shuffle(order)
        yield from order


@contextmanager
def _trainer(cfg: RunConfig, config_path: Path, log_dir: Path) -> Iterator[tuple[Any, None]]:
    """trainer_svc started on ``config_path`` as a local process; yields its client (and
    no validation)."""
    from k1rl.launch import trainer_service

    console.print("starting trainer_svc (megatron-core)")
    with trainer_service(cfg.trainer.address, config_path, log_dir) as client:
        yield client, None


@contextmanager
def _with_rollout(cfg: RunConfig, config_path: Path, run_dir: Path, source: str
                  ) -> Iterator[tuple[Any, Callable[[], Accuracy]]]:
    """The RL loop's services (trainer, reward, the sidecar with its engine, and the
    sandbox when some problems are code) as local processes; yields the trainer's client
    and a function measuring sft.stop_when's accuracy of the trainer's current weights."""
    from k1rl.data.prompts import PromptRenderer
    from k1rl.master import start_local_services
    from k1rl.master.evaluation import accuracy
    from k1rl.master.loop import Clients, in_rollout_phase
    from k1rl.master.problems import ProblemSet

    stop = cfg.sft.stop_when
    try:
        problems = stop_problems(cfg, run_dir / "data")
    except ValueError as e:
        raise ConfigError(source, [f"sft.stop_when.data: {e}"]) from e
    # prompts reach the engine the way SFT rendered them
    renderer = PromptRenderer(cfg.sft.data.prompt, cfg.model.path)
    with console.status("starting trainer_svc, reward_svc and the checkpoint-engine sidecar "
                        "(which starts vLLM)"):
        cluster = start_local_services(cfg, config_path, run_dir / "logs",
                                       ProblemSet(lambda: [problems], lambda: []))
    with cluster:
        clients = Clients.connect(cfg)
        try:
            def validate() -> Accuracy:
                return in_rollout_phase(
                    clients.checkpoint_engine, RunRef(run_id=cfg.run_id),
                    lambda ref: accuracy(cfg, clients.rollout, clients.reward, problems, ref,
                                         stop.samples, renderer))

            yield clients.trainer, validate
        finally:
            clients.close()


def stop_problems(cfg: RunConfig, cache_dir: Path) -> list[Problem]:
    """sft.stop_when's problems: at most problems_per_source rows of each source, read
    with sft.data.on_bad_row."""
    from k1rl.data.problem import DatasetPool
    from k1rl.data.sources import load_each

    stop = cfg.sft.stop_when
    pools, _ = load_each(stop.data, cfg.sft.data.on_bad_row, cache_dir, "stop_when")
    n = stop.problems_per_source
    problems = [p for label, ds in pools
                for p in DatasetPool(ds.select(range(min(n or len(ds), len(ds)))), label)]
    if not problems:
        raise ValueError("no problem to measure")
    return problems


def plot_sft(run_dir: Path, history: list[SFTStepMetrics]) -> Path:
    """``sft_loss.png``: training loss per step and validation loss where measured."""
    from k1rl.master.plots import line_plot

    series = {"loss": [(r.step, r.loss) for r in history],
              "val_loss": [(r.step, r.val_loss) for r in history if r.val_loss is not None]}
    return line_plot(run_dir / "sft_loss.png", "SFT loss", "step", "NLL per token",
                     {k: v for k, v in series.items() if v})
