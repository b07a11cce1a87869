"""The run dir's metrics.jsonl: one JSON object per row, one row per line.

What resume, the plots (k1rl/master/plots.py) and the demo's summary read, so every run
writes it. Each row is appended with the file opened and closed around it, so a master
killed between iterations leaves only whole rows; on resume the rows of iterations that
did not complete are dropped, and those iterations write theirs again.
"""

from __future__ import annotations

import json
from pathlib import Path

from k1rl.config import RunConfig
from k1rl.metrics import MetricSink, Row, register

METRICS_FILE = "metrics.jsonl"


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

    def write(self, row: Row) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
