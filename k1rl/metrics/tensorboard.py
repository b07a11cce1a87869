"""TensorBoard event files in the run dir's ``tensorboard/``: every key of a record's row
but ``iteration`` as a scalar, at step = iteration.

Written with torch's SummaryWriter (torch is imported only when this sink is on). A
resumed run's writer starts with a purge at the first iteration not completed, so
TensorBoard hides the steps a stopped master wrote for iterations that ran again.
"""

from __future__ import annotations

from pathlib import Path

from k1rl.config import RunConfig
from k1rl.metrics import MetricSink, register
from k1rl.metrics.record import IterationMetrics

LOG_DIR = "tensorboard"


@register("tensorboard")
class TensorBoardSink(MetricSink):
    def __init__(self, writer) -> None:
        self.writer = writer

    @classmethod
    def open(cls, cfg: RunConfig, run_dir: Path, resume_at: int) -> TensorBoardSink:
        from torch.utils.tensorboard import SummaryWriter

        return cls(SummaryWriter(str(Path(run_dir) / LOG_DIR), purge_step=resume_at or None))

    def write(self, record: IterationMetrics) -> None:
        for key, value in record.row().items():
            if key != "iteration":
                self.writer.add_scalar(key, value, global_step=record.iteration)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
