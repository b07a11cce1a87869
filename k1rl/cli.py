"""The `k1rl` command line. Each command is a thin wrapper over a library call."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    name="k1rl",
    help="k1rl: the Kimi k1.5 RL recipe as services.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()


def main() -> None:
    """The `k1rl` script: a config a user got wrong is its message, not a traceback."""
    from k1rl.parity import ParityError
    from k1rl.yaml_config import ConfigError

    try:
        app(prog_name="k1rl")
    except (ConfigError, FileExistsError, ParityError) as e:
        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/bold red] {e}",
                                                   highlight=False)
        raise SystemExit(2) from None


@app.command("init-model")
def init_model_cmd(
    out_dir: Path = typer.Argument(..., help="Directory to write the HF model into."),
    seed: int = typer.Option(0, help="Seeds the tokenizer corpus and the weights."),
    hidden_size: int = typer.Option(256, help="Model width."),
    layers: int = typer.Option(4, help="Number of transformer layers."),
    heads: int = typer.Option(8, help="Attention (query) heads."),
    kv_heads: int = typer.Option(2, help="Key/value heads (grouped-query attention)."),
    intermediate_size: int = typer.Option(704, help="MLP width."),
    vocab_size: int = typer.Option(512, help="BPE vocabulary budget of the tokenizer."),
    vocab_multiple: int = typer.Option(64, help="Pad the embedding rows to a multiple."),
    max_position: int = typer.Option(1024, help="Maximum sequence length."),
    tie_embeddings: bool = typer.Option(False, help="Share input and output embeddings."),
    corpus_size: int = typer.Option(200, help="Tokenizer corpus: tasks per level."),
    like: Path = typer.Option(
        None, help="A published config.json (or model dir) whose architecture to build, "
        "scaled down: its family, biases, tied head, QK-norm, GQA ratio, head_dim and RoPE "
        "scaling kept; --layers, --kv-heads, --intermediate-size (and --hidden-size when "
        "its head_dim is set apart from the width) set; --heads follows the GQA ratio."),
) -> None:
    """Build the tokenizer and a random-init tiny model (deterministic for the seed): a
    Qwen2, or with --like the architecture of your own model's config."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from k1rl.data.tiny_model import init_model

    try:
        summary = init_model(
            out_dir, seed=seed, hidden_size=hidden_size, num_layers=layers, num_heads=heads,
            num_kv_heads=kv_heads, intermediate_size=intermediate_size, vocab_size=vocab_size,
            vocab_multiple=vocab_multiple, max_position=max_position,
            tie_word_embeddings=tie_embeddings, corpus_size=corpus_size, like=like,
        )
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    table = Table(title="tiny model", show_header=False)
    for key, value in summary.model_dump().items():
        table.add_row(key, f"{value:,}" if key == "params" else str(value))
    console.print(table)


@app.command("gen-tasks")
def gen_tasks_cmd(
    out: Path = typer.Argument(..., help="JSONL file to write."),
    family: str = typer.Option("add", help="add | sub | mul | multi | code | count"),
    difficulty: int = typer.Option(1, help="Digits (add/sub/mul) or operations - 1 (multi)."),
    level: list[str] = typer.Option(
        None, help="family:difficulty, repeatable (instead of --family/--difficulty): "
        "--count problems of each, in order."),
    count: int = typer.Option(100, help="Distinct problems per level."),
    up_to: bool = typer.Option(False, help="A level with fewer distinct problems than "
                               "--count gives what it has (else an error)."),
    seed: int = typer.Option(0, help="Random seed."),
    split: str = typer.Option("all", help="all | train | heldout (hash split on task id)."),
    heldout_fraction: float = typer.Option(0.1, help="Share of ids in the held-out split."),
    exclude: list[Path] = typer.Option(
        None, help="A JSONL file of problems (e.g. a training set) whose ids are left out; "
        "repeatable."),
) -> None:
    """Generate synthetic problems with a verifiable answer, as a data source (JSONL in the
    format `data.train` reads with the default field names)."""
    from k1rl.data.tasks import problem_ids, write_problems
    from k1rl.rl_config import parse_levels

    try:
        levels = parse_levels(level) if level else [(family, difficulty)]
        skip = set().union(*(problem_ids(p) for p in exclude or []))
        n = write_problems(out, levels, count, seed, split=split,
                           heldout_fraction=heldout_fraction, exclude=skip, up_to=up_to)
    except (OSError, ValueError, KeyError) as e:
        raise typer.BadParameter(str(e)) from e
    names = ", ".join(f"{f}:{d}" for f, d in levels)
    console.print(f"wrote [bold]{n}[/bold] problems ({names}) to {out}")


@app.command("demo")
def demo_cmd(
    seed: int = typer.Option(0, help="Seeds the model, data and sampling."),
    run_dir: Path = typer.Option(None, help="Run directory (default: runs/demo-seed<SEED>)."),
    config: Path = typer.Option(None, help="Demo config YAML (default: k1rl/demo.yaml)."),
    sft_only: bool = typer.Option(
        False, help="Stop after SFT (its HF checkpoint: RUN_DIR/sft/final): no RL, no eval."),
) -> None:
    """The recipe end to end as the commands run it: gen-tasks, init-model, sft, rl, eval;
    then held-out accuracy before and after RL."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from k1rl.demo import DEFAULT_CONFIG, load_demo_config, run_demo

    cfg = load_demo_config(config or DEFAULT_CONFIG)
    run_demo(cfg, seed=seed, run_dir=run_dir or Path(f"runs/demo-seed{seed}"),
             sft_only=sft_only)


@app.command("eval")
def eval_cmd(
    model: Path = typer.Option(..., help="HF checkpoint directory to evaluate."),
    data: list[Path] = typer.Option(
        None, help="Problems: a .jsonl/.json/.parquet file or a directory of them, in the "
        "data-source format with its default field names (what `k1rl gen-tasks` writes); "
        "every row is evaluated. Repeatable. Default: --config's held-out set."),
    config: Path = typer.Option(
        None, help="RunConfig YAML: rollout (temperature, max_tokens), reward, data.prompt "
        "and seed; without --data its held-out set (data.eval, the hash split, or "
        "rl.eval_tasks). Default: RunConfig's defaults."),
    samples: int = typer.Option(None, min=1, help="Samples per problem at the rollout "
                                "temperature (default: rl.eval_samples)."),
    k: int = typer.Option(None, min=1, help="pass@k's k (default: --samples)."),
    limit: int = typer.Option(None, min=1, help="At most this many rows per --data path."),
    eval_problems: int = typer.Option(None, min=1, help="Held-out problems per level "
                                      "(default: the config's rl.eval_problems)."),
    overrides: list[str] = typer.Option(
        None, "--set", help="KEY=VALUE over the config (repeatable), e.g. "
        "rollout.max_tokens=512."),
    out: Path = typer.Option(None, help="Report JSON (default: WORK_DIR/report.json)."),
    work_dir: Path = typer.Option(None, help="Service logs, loaded data and the report "
                                  "(default: a temp dir)."),
) -> None:
    """pass@1, pass@k, greedy accuracy and response length of a checkpoint, overall, per
    level and per tag: prints a table, writes the report JSON, and prints the loop's
    eval_* metrics as the last line (one JSON object)."""
    import json
    import tempfile

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from k1rl.config import RunConfig, load_config
    from k1rl.master.evaluation import evaluate_problems, report

    if not (model / "config.json").is_file():
        raise typer.BadParameter(f"{model} holds no HF checkpoint (config.json)")
    if not data and config is None:
        raise typer.BadParameter("give --data FILE, or --config RUN.yaml for its held-out set")
    cfg = (load_config(config, overrides or []) if config
           else RunConfig.from_yaml_text("", "--set", overrides or []))
    if eval_problems is not None:
        cfg.rl.eval_problems = eval_problems
    samples = samples or cfg.rl.eval_samples
    k = k or samples
    if k > samples:
        raise typer.BadParameter(f"--k {k} needs at least {k} --samples, not {samples}")
    work_dir = work_dir or Path(tempfile.mkdtemp(prefix="k1rl-eval-"))
    problems, skipped = _eval_problems(cfg, data, limit, work_dir / "data")
    outcomes = evaluate_problems(cfg, model, work_dir, problems, samples)
    result = report(outcomes, k, model=str(model.resolve()), samples=samples,
                    data=[str(p) for p in data] if data else ["held-out"],
                    temperature=cfg.rollout.temperature, max_tokens=cfg.rollout.max_tokens,
                    seed=cfg.seed, skipped=dict(skipped))
    out = out or work_dir / "report.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(result.model_dump_json(indent=2) + "\n")
    console.print(_report_table(result))
    console.print(f"report: {out}")
    summary = {"model": result.model, "report": str(out), **outcomes.accuracy().row("eval")}
    print(json.dumps(summary), flush=True)


def _eval_problems(cfg, data: list[Path] | None, limit: int | None, cache_dir: Path):
    """The problems `k1rl eval` scores: every row (at most ``limit``) of the --data files,
    else the config's held-out set; and the rows skipped, by reason."""
    from k1rl.master.problems import load_files, load_problems

    try:
        if data:
            problems, skipped = load_files(data, cfg, cache_dir, limit)
        else:
            held = load_problems(cfg, cache_dir)
            problems, skipped = held.heldout_problems(), held.skipped
    except (OSError, ValueError) as e:
        raise typer.BadParameter(str(e)) from e
    if not problems:
        raise typer.BadParameter("no problem to evaluate")
    return problems, skipped


def _report_table(result) -> Table:
    table = Table(title=f"{result.model}: {result.samples} samples at T={result.temperature}")
    for col in ("", "problems", "pass@1", f"pass@{result.k}", "greedy", "tokens"):
        table.add_column(col, justify="left" if not col else "right")
    rows = [("overall", result.overall),
            *((f"level {name}", s) for name, s in result.by_level.items()),
            *((f"tag {name}", s) for name, s in result.by_tag.items())]
    for name, s in rows:
        table.add_row(name, str(s.problems), f"{s.pass1:.3f}", f"{s.pass_k:.3f}",
                      f"{s.greedy:.3f}", f"{s.response_tokens:.1f}")
    return table


@app.command("sft")
def sft_cmd(
    config: Path = typer.Option(..., help="RunConfig YAML: model.path, trainer, sft "
                                "(data, loss_on, batch, stages)."),
    run_dir: Path = typer.Option(None, help="Run directory (default: RUN_DIR/sft, RUN_DIR "
                                 "the config's run_dir)."),
    overrides: list[str] = typer.Option(
        None, "--set", help="KEY=VALUE over the config, dotted, value in YAML (repeatable)."),
) -> None:
    """Supervised fine-tuning of model.path on sft.data, stage by stage; the result is an
    HF checkpoint in RUN_DIR/final."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from k1rl.config import load_config
    from k1rl.sft.run import run_sft

    cfg = load_config(config, overrides or [])
    result = run_sft(cfg, run_dir or Path(cfg.run_dir) / "sft", source=str(config))
    val = f", validation loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    console.print(f"sft done: {result.steps} steps in {result.seconds:.0f} s, loss "
                  f"{result.final_loss:.4f}{val}; HF checkpoint {result.checkpoint}")


@app.command("curate")
def curate_cmd(
    config: Path = typer.Option(..., help="RunConfig YAML: curate (data, drop rules, "
                                "hack_filter, difficulty, tags), rollout, reward, data.prompt."),
    out: Path = typer.Option(..., help="Directory for curated.jsonl, dropped.jsonl, "
                             "funnel.json and the services' logs."),
    model: Path = typer.Option(None, help="The SFT model that answers (default: model.path)."),
    overrides: list[str] = typer.Option(
        None, "--set", help="KEY=VALUE over the config (repeatable), e.g. "
        "curate.hack_filter.tries=8."),
) -> None:
    """Build an RL prompt set as k1.5 does: drop multiple-choice, true/false and proof
    questions, drop prompts the SFT model guesses with no chain of thought, label difficulty
    by its pass rate, balance the tags. The last line is the funnel as JSON."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from k1rl.config import load_config
    from k1rl.curate.run import CURATED, run_curate

    cfg = load_config(config, overrides or [])
    try:
        funnel = run_curate(cfg, out, model)
    except (OSError, ValueError) as e:
        raise typer.BadParameter(str(e)) from e
    table = Table(title=f"k1rl curate: {funnel.line()}")
    table.add_column("stage")
    table.add_column("prompts", justify="right")
    for stage in funnel.stages:
        table.add_row(stage.stage, str(stage.prompts))
    console.print(table)
    for reason, n in sorted(funnel.dropped.items()):
        console.print(f"dropped {n}: {reason}")
    console.print(f"curated set: {out / CURATED}")
    print(funnel.model_dump_json(), flush=True)


@app.command("rl")
def rl_cmd(
    config: Path = typer.Option(None, help="RunConfig YAML of a new run."),
    run_dir: Path = typer.Option(None, help="Run directory (default: the config's run_dir)."),
    resume: Path = typer.Option(None, help="Resume the run in this directory."),
    services: str = typer.Option(
        "local", help="local: start the services here; external: use the ones running at "
        "the config's addresses (a Kubernetes deployment)."),
    overrides: list[str] = typer.Option(
        None, "--set", help="KEY=VALUE over the config of a new run, dotted, value in "
        "YAML (repeatable): --set rl.iterations=2 --set 'trainer.loss={name: grpo}'."),
    preset: str = typer.Option(
        None, help="long2short: the length penalty on from the start and rollout.max_tokens "
        "sharply cut (long2short.rl says how much), for RL from a long-CoT model."),
) -> None:
    """Run the k1.5 RL loop from the config's model and data with local services, or
    resume a stopped run."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from k1rl import master
    from k1rl.config import load_config
    from k1rl.long2short.preset import PRESETS

    if services not in ("local", "external"):
        raise typer.BadParameter(f"--services must be local or external, not {services!r}")
    if preset is not None and preset not in PRESETS:
        raise typer.BadParameter(f"--preset must be one of {sorted(PRESETS)}, not {preset!r}")
    local = services == "local"
    if (config is None) == (resume is None):
        raise typer.BadParameter("give exactly one of --config (new run) or --resume RUN_DIR")
    if resume is not None:
        if overrides or preset:
            raise typer.BadParameter("--set and --preset change a new run's config, not a "
                                     "resumed one")
        state = master.run(None, resume, resume=True, local_services=local)
    else:
        cfg = load_config(config, overrides or [])
        if preset is not None:
            cfg = PRESETS[preset](cfg)
        state = master.run(cfg, run_dir or Path(cfg.run_dir), local_services=local,
                           source=str(config))
    console.print(f"run done: {state.iterations_done} iterations, policy v{state.policy_version}")


@app.command("doctor")
def doctor_cmd(
    model: Path = typer.Option(..., help="HF checkpoint directory to check."),
    tp: int = typer.Option(1, min=1, help="Trainer tensor-parallel size."),
    dtype: str = typer.Option(None, help="float32 or bfloat16 (default: the config's)."),
    config: Path = typer.Option(None, help="RunConfig YAML whose transport, devices and "
                                "parity thresholds to use (default: the defaults)."),
    engine_model: Path = typer.Option(
        None, help="Another checkpoint for vLLM to load (a converted or exported copy): is "
        "it the policy the trainer loads from --model? Default: --model."),
    samples: int = typer.Option(4, min=1, help="Samples per prompt compared."),
    work_dir: Path = typer.Option(None, help="Where the services' config and logs go "
                                  "(default: a temporary directory)."),
) -> None:
    """Check a checkpoint end to end before training on it: loading, the HF <-> Megatron
    round trip, trainer/vLLM log-prob parity, the weight push, stop tokens. The last line
    is the report as JSON; the exit code is 1 when a check fails."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from k1rl.doctor import run_doctor

    if dtype not in (None, "float32", "bfloat16"):
        raise typer.BadParameter(f"--dtype must be float32 or bfloat16, not {dtype!r}")
    report = run_doctor(model, tp=tp, dtype=dtype, config=config, engine_model=engine_model,
                        samples=samples, work_dir=work_dir)
    table = Table(title=f"k1rl doctor: {model} ({report.model_type or '?'}, "
                  f"{report.parameters or 0:,} parameters, {report.dtype}, tp={tp})")
    for column in ("check", "", "detail"):
        table.add_column(column)
    for check in report.checks:
        table.add_row(check.name, "[green]ok[/green]" if check.ok else "[red]FAIL[/red]",
                      check.detail)
    console.print(table)
    if not report.ok:
        console.print(f"[bold red]failed:[/bold red] {', '.join(report.failed)}")
    print(report.model_dump_json())
    raise typer.Exit(0 if report.ok else 1)


@app.command("train-rm")
def train_rm_cmd(
    config: Path = typer.Option(..., help="RunConfig YAML: reward_model (data, samples, "
                                "base, stages), reward (the labelling rules, judge.rubric)."),
    run_dir: Path = typer.Option(..., help="Run directory; the judge in RUN_DIR/sft/final."),
    examples: Path = typer.Option(
        None, help="JSONL of verified examples (prompt or messages, answer, response, "
        "optional correct); default: the policy in model.path samples reward_model.data."),
    overrides: list[str] = typer.Option(None, "--set", help="KEY=VALUE over the config."),
) -> None:
    """Train a chain-of-thought reward model: SFT on problem, reference answer and policy
    response, with a chain of thought and the rule verifier's verdict as the target."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from k1rl.config import load_config
    from k1rl.train_rm import run_train_rm

    cfg = load_config(config, overrides or [])
    try:
        result = run_train_rm(cfg, run_dir, examples, source=str(config))
    except (OSError, ValueError) as e:
        raise typer.BadParameter(str(e)) from e
    val = f", validation loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    console.print(f"train-rm: {result.examples} examples ({result.correct} correct), "
                  f"{result.train_rows} trained on, {result.heldout_rows} held out{val}; "
                  f"judge {result.judge} (reward.judge.model)")


@app.command("merge")
def merge_cmd(
    models: list[Path] = typer.Argument(..., help="HF checkpoints of one architecture."),
    out: Path = typer.Option(..., help="Directory for the merged HF checkpoint."),
    weights: list[float] = typer.Option(
        None, "--weights", help="One per model, positive, summing to 1 (repeatable; "
        "default: equal)."),
) -> None:
    """Model merging (k1.5 long2short): the weighted average of checkpoints, e.g. a
    long-CoT and a short-CoT model fine-tuned from one base."""
    from k1rl.long2short.merge import merge_checkpoints

    try:
        done = merge_checkpoints(models, weights, out)
    except (OSError, ValueError) as e:
        raise typer.BadParameter(str(e)) from e
    console.print(f"merged {len(models)} models ({done['tensors']} tensors, weights "
                  f"{done['weights']}) -> {out}")


l2s_app = typer.Typer(help="Long2short (k1.5 §2.4): shortest rejection sampling, DPO.",
                      no_args_is_help=True)
app.add_typer(l2s_app, name="long2short")


@l2s_app.command("sample")
def l2s_sample_cmd(
    config: Path = typer.Option(..., help="RunConfig YAML: long2short (data, samples, "
                                "length_ratio), rollout, reward, data.prompt."),
    out: Path = typer.Option(..., help="Directory for sft.jsonl, pairs.jsonl, groups.jsonl "
                             "and report.json."),
    model: Path = typer.Option(None, help="The model that samples (default: model.path)."),
    overrides: list[str] = typer.Option(None, "--set", help="KEY=VALUE over the config."),
) -> None:
    """Shortest rejection sampling: n samples per prompt; the shortest correct one is an SFT
    row, and DPO pairs it against the wrong ones and the correct ones >= 1.5x longer. The
    last line is the report as JSON."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from k1rl.config import load_config
    from k1rl.long2short.rejection import run_sample

    cfg = load_config(config, overrides or [])
    try:
        report = run_sample(cfg, out, model)
    except (OSError, ValueError) as e:
        raise typer.BadParameter(str(e)) from e
    console.print(f"{report.sft_rows} SFT rows ({out / 'sft.jsonl'}), {report.pairs} DPO "
                  f"pairs; mean tokens {report.mean_tokens} sampled, "
                  f"{report.mean_tokens_kept} kept")
    print(report.model_dump_json(), flush=True)


@l2s_app.command("dpo")
def l2s_dpo_cmd(
    config: Path = typer.Option(..., help="RunConfig YAML: trainer, long2short.dpo."),
    samples: Path = typer.Option(..., help="The --out directory of `k1rl long2short sample`."),
    run_dir: Path = typer.Option(..., help="Run directory; the result in RUN_DIR/final."),
    overrides: list[str] = typer.Option(None, "--set", help="KEY=VALUE over the config."),
) -> None:
    """DPO of the model that drew SAMPLES on its long2short pairs (the trainer's `dpo`
    loss, the sampling model as reference); the result is an HF checkpoint."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from k1rl.config import load_config
    from k1rl.long2short.dpo import run_dpo

    cfg = load_config(config, overrides or [])
    try:
        result = run_dpo(cfg, samples, run_dir, source=str(config))
    except (OSError, ValueError) as e:
        raise typer.BadParameter(str(e)) from e
    console.print(f"dpo done: {result.steps} steps in {result.seconds:.0f} s, loss "
                  f"{result.final_loss:.4f}; HF checkpoint {result.checkpoint}")


# `run` was the command's name before `rl`: scripts and run directories' notes still use it
app.command("run", help="The same as `k1rl rl`.")(rl_cmd)


k8s_app = typer.Typer(help="Kubernetes manifests from a run config.", no_args_is_help=True)
app.add_typer(k8s_app, name="k8s")


@k8s_app.command("render")
def k8s_render_cmd(
    config: Path = typer.Argument(..., help="RunConfig YAML: the one source of truth."),
    out_dir: Path = typer.Argument(..., help="Where to write base/ and overlays/{cpu,gpu}/."),
    nodes: int = typer.Option(1, min=1, help="RL pods (nodes) of the StatefulSet."),
    gpus_per_node: int = typer.Option(8, min=1, help="GPUs the RL pod claims (gpu overlay)."),
) -> None:
    """Render the kustomize base and overlays for CONFIG (validated first)."""
    from k1rl import k8s
    from k1rl.config import load_config

    try:
        written = k8s.render(load_config(config), out_dir, nodes=nodes,
                             gpus_per_node=gpus_per_node)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    console.print(f"wrote {len(written)} files under {out_dir}")


keys_app = typer.Typer(help="The run's CURVE keys (ZMQ authentication).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("create")
def keys_create_cmd(
    directory: Path = typer.Argument(..., help="New directory for run.key and run.key_secret."),
) -> None:
    """Create the run keypair every k1rl process of a run shares; point K1RL_CURVE_KEYS at
    DIRECTORY in each (on Kubernetes: a Secret, see k8s/README.md)."""
    from k1rl.auth import CURVE_KEYS_ENV, create_curve_keys

    try:
        create_curve_keys(directory)
    except FileExistsError as e:
        raise typer.BadParameter(str(e)) from e
    console.print(f"wrote {directory}/run.key and run.key_secret; export "
                  f"{CURVE_KEYS_ENV}={directory.resolve()}")
