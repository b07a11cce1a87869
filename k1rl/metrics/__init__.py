"""Metric sinks, registered by name (``rl.metrics``): where each iteration's metrics go.

Each iteration's metrics are one typed record (:class:`~k1rl.metrics.record.
IterationMetrics`); a sink stores its flat row (``record.row()``, str -> number) at step
``record.iteration``. The master opens every configured sink when a run starts or resumes (:func:`open_sinks`), writes
each record to all of them and closes them when the run ends. One module per sink:
``jsonl`` (the run dir's metrics.jsonl: resume, plots and summaries read it, so it is
always on), ``tensorboard`` and ``wandb`` (offline). A sink defined elsewhere registers
itself the same way (``@register("name")``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path

from k1rl.config import RunConfig
from k1rl.metrics.record import IterationMetrics
from k1rl.registry import METRIC_SINKS

register = METRIC_SINKS.register


class MetricSink(ABC):
    name: str = ""

    @classmethod
    @abstractmethod
    def open(cls, cfg: RunConfig, run_dir: Path, resume_at: int) -> MetricSink:
        """Start writing the metrics of the run in ``run_dir``, which has completed
        ``resume_at`` iterations (0: a new run). Records of later iterations were written
        by a master that stopped before they completed: the iterations run again, and the
        sink drops or hides the old ones where its format allows."""

    @abstractmethod
    def write(self, record: IterationMetrics) -> None:
        """Store one record, written out before returning where the format allows: the
        master may be killed right after."""

    def close(self) -> None:
        """Flush and release what the sink holds; called once, when the run ends."""


class MetricSinks:
    """The sinks of one run, written and closed together (a context manager)."""

    def __init__(self, sinks: Iterable[MetricSink]) -> None:
        self.sinks = list(sinks)

    def write(self, record: IterationMetrics) -> None:
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        """Close every sink, even when one fails (the first failure is raised after)."""
        failure = None
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as e:  # noqa: BLE001 - the others must still close
                failure = failure or e
        self.sinks = []
        if failure is not None:
            raise failure

    def __enter__(self) -> MetricSinks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def available() -> list[str]:
    return METRIC_SINKS.names()


def open_sinks(cfg: RunConfig, run_dir: Path, resume_at: int) -> MetricSinks:
    """Every sink ``cfg.rl.metrics`` names, open for the run in ``run_dir``."""
    opened = MetricSinks([])
    try:
        for name in cfg.rl.metrics:
            opened.sinks.append(METRIC_SINKS.get(name).open(cfg, Path(run_dir), resume_at))
    except BaseException:
        opened.close()
        raise
    return opened
