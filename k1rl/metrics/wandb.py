"""An offline Weights & Biases run in the run dir's ``wandb/``: ``wandb sync`` uploads it
later, from wherever the network is allowed.

It never touches the network: offline mode, and nothing the SDK would gather about the
host (system stats, machine and cloud metadata, git state, code, requirements, console
output). A record's row is logged at step = iteration, with the run config as the run's config.
wandb cannot resume an offline run, so a resumed k1rl run is a second wandb run whose
steps start at the first iteration not completed; records a stopped master wrote for the
iterations that ran again stay in the first.
"""

from __future__ import annotations

from pathlib import Path

from k1rl.config import RunConfig
from k1rl.metrics import MetricSink, register
from k1rl.metrics.record import IterationMetrics

PROJECT = "k1rl"


@register("wandb")
class WandbSink(MetricSink):
    def __init__(self, run) -> None:
        self.run = run

    @classmethod
    def open(cls, cfg: RunConfig, run_dir: Path, resume_at: int) -> WandbSink:
        import wandb

        settings = wandb.Settings(
            mode="offline", silent=True, console="off", disable_git=True, save_code=False,
            x_disable_stats=True, x_disable_machine_info=True, x_save_requirements=False,
            # rows reach the run's file within a second (default 15 s): a killed master
            # loses at most that much
            x_transaction_log_flush_interval=1.0)
        # The process-wide settings too: the SDK's own telemetry follows them, not the
        # run's, and would otherwise probe the W&B server.
        wandb.setup(settings)
        run = wandb.init(dir=str(run_dir), project=PROJECT, name=cfg.run_id,
                         config=cfg.model_dump(mode="json"), settings=settings)
        return cls(run)

    def write(self, record: IterationMetrics) -> None:
        self.run.log({k: v for k, v in record.row().items() if k != "iteration"},
                     step=record.iteration)

    def close(self) -> None:
        import wandb

        self.run.finish()
        # finish() can return before wandb's service process has written the run's
        # file; teardown waits for that process to exit (nothing else here uses it)
        wandb.teardown()
