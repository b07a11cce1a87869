"""The master: drives the k1.5 loop across services (see loop.py) and resumes runs."""

from __future__ import annotations

import contextlib
from pathlib import Path

from rich.console import Console

from k1rl.config import RunConfig, load_config
from k1rl.launch import LocalCluster
from k1rl.master.evaluation import needs_local_sandbox, start_judge
from k1rl.master.loop import Clients, Master
from k1rl.master.plots import plot_run
from k1rl.master.problems import ProblemSet, load_problems
from k1rl.master.recovery import wait_for_services
from k1rl.master.state import RunState
from k1rl.metrics.record import IterationMetrics
from k1rl.preflight import check_paths
from k1rl.progress import progress_bar

CONFIG_FILE = "config.yaml"


def start_local_services(cfg: RunConfig, config_path: Path, log_dir: Path,
                         problems: ProblemSet) -> LocalCluster:
    """trainer, reward and the checkpoint-engine sidecar (which owns vLLM's lifecycle), the
    code sandbox when some of ``problems`` are code and reward.sandbox_address names this
    run's sandbox section (another address is a sandbox service running elsewhere), and
    the CoT judge's engine when reward.judge is on with a checkpoint.
    Once all are ready, one that exits is restarted (calls.max_restarts)."""
    cluster = LocalCluster(log_dir)
    try:
        args = ["--config", str(config_path)]
        if needs_local_sandbox(cfg, problems, heldout_only=False):
            cluster.start("sandbox", "sandbox", ["serve", *args], cfg.sandbox.address)
        cluster.start("trainer", "trainer_svc", args, cfg.trainer.address)
        start_judge(cluster, cfg, args)
        cluster.start("reward", "reward_svc", args, cfg.reward.address)
        cluster.start("checkpoint_engine", "checkpoint_engine", args, cfg.checkpoint_engine.address)
        cluster.wait_ready(900)
        cluster.supervise(cfg.calls.max_restarts)
        return cluster
    except BaseException:
        cluster.stop()
        raise


def wait_for_external_services(cfg: RunConfig, timeout_s: float = 900.0) -> contextlib.nullcontext:
    """Services run by a deployment (Kubernetes): wait until the ones the master calls
    first answer ready. The rollout engine is the checkpoint-engine's to wait for."""
    wait_for_services(cfg, timeout_s)
    return contextlib.nullcontext()


def run(cfg: RunConfig | None, run_dir: Path, *, resume: bool = False,
        local_services: bool = True, source: str = "run config") -> RunState:
    """Start a run in ``run_dir`` (or resume the one there), starting its services here
    (``local_services``) or using the ones already running at the config's addresses.
    What the config names is checked first (ConfigError naming ``source``, the config's
    file, for a new run): the model directory when the services run here, data files."""
    run_dir = Path(run_dir)
    config_path = run_dir / CONFIG_FILE
    if resume:
        cfg = load_config(config_path)
        check_paths(cfg, str(config_path), model=local_services)
        state = RunState.load(run_dir)
    else:
        if cfg is None:
            raise ValueError("a new run needs a config")
        if (run_dir / "state.json").exists():
            raise FileExistsError(f"{run_dir} already holds a run: resume it or pick another dir")
        check_paths(cfg, source, model=local_services)
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg = cfg.model_copy(update={"run_dir": str(run_dir)})
        config_path.write_text(cfg.dump_yaml())
        state = RunState(run_id=cfg.run_id)
    # loaded before the services start: whether a sandbox is needed depends on them
    problems = load_problems(cfg, run_dir / "data")
    if problems.skipped:
        print(f"data: skipped bad rows by reason: {dict(problems.skipped)}", flush=True)
    services = (start_local_services(cfg, config_path.resolve(), run_dir / "logs", problems)
                if local_services else wait_for_external_services(cfg))
    with services:
        clients = Clients.connect(cfg)
        try:
            state = run_with_progress(Master(cfg, run_dir, clients, state, problems))
        finally:
            clients.close()
    plot_run(run_dir)
    return state


def run_with_progress(master: Master) -> RunState:
    """``master.run()`` under a progress bar: iterations, reward, policy version and the
    latest held-out accuracy."""
    with progress_bar(Console()) as progress:
        bar = progress.add_task(f"RL ({master.cfg.trainer.loss.name})",
                                total=master.cfg.rl.iterations,
                                completed=master.state.iterations_done, info="")

        def report(record: IterationMetrics) -> None:
            info = f"v{record.policy_version}"
            if record.reward:
                info = f"reward {record.reward.reward_mean:.3f}  {info}"
            if record.eval:
                info += f"  held-out {record.eval.accuracy:.3f}"
            progress.update(bar, completed=record.iteration + 1, info=info)

        return master.run(on_iteration=report)


__all__ = ["Clients", "Master", "RunState", "run", "start_local_services"]
