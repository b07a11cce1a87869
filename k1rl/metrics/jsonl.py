"""The run dir's metrics.jsonl: one record's flat row per line, as JSON.

What resume, the plots (k1rl/master/plots.py), the demo's summary and the benches read
(:func:`read_metrics`), so every run writes it. Each row is appended with the file opened
and closed around it, so a master killed between iterations leaves only whole rows; on
resume the rows of iterations that did not complete are dropped, and those iterations
write theirs again.
"""

from __future__ import annotations

import json
from pathlib import Path

from k1rl.config import RunConfig
from k1rl.metrics import MetricSink, register
from k1rl.metrics.record import IterationMetrics

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: Path) -> list[IterationMetrics]:
    """The records of the run in ``run_dir``, in the order they were written."""
    path = Path(run_dir) / METRICS_FILE
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(IterationMetrics.from_row(json.loads(line)))
            except ValueError as e:  # JSONDecodeError and pydantic's errors are ValueErrors
                raise ValueError(f"{path}:{n}: {e}") from None
    return records


@register("jsonl")
class JsonlSink(MetricSink):
    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def open(cls, cfg: RunConfig, run_dir: Path, resume_at: int) -> JsonlSink:
        sink = cls(Path(run_dir) / METRICS_FILE)
        sink.truncate(resume_at)
        return sink

    def truncate(self, iterations_done: int) -> None:
        """Drop the rows of iterations from ``iterations_done`` on."""
        if not self.path.exists():
            return
        rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        kept = [r for r in rows if r["iteration"] < iterations_done]
        if len(kept) != len(rows):
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: IterationMetrics) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record.row()) + "\n")
