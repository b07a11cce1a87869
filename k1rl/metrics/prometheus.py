"""Prometheus: the master's iteration metrics and every service's RPC traffic, scraped
from ``/metrics``.

- The sink ``prometheus`` (``rl.metrics``) serves the master's registry on
  ``rl.prometheus_port`` and sets one gauge per key of each iteration's row
  (``k1rl_iteration_<key>``: phase times, rewards, the log-prob mismatch, queue sizes...).
- Every RPC server counts its requests, in-flight calls and queued jobs per method
  (:data:`RPC_REQUESTS`, ...), and every watched call the services it lost and the calls
  it sent again (:data:`CALLS_LOST`, :data:`CALLS_RESENT`); a service serves them when its
  config section sets ``metrics_port``.
- The master counts what it survived: iterations redone, steps retried, and the local
  services its launcher restarted (:data:`RECOVERIES`, :data:`STEPS_RETRIED`,
  :data:`SERVICE_RESTARTS`).

The metrics live in prometheus-client's default registry, one per process.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from k1rl.config import RunConfig
from k1rl.metrics import MetricSink, register
from k1rl.metrics.record import IterationMetrics

RPC_REQUESTS = Counter("k1rl_rpc_requests_total", "RPC requests answered",
                       ["service", "method", "outcome"])
RPC_SECONDS = Histogram("k1rl_rpc_seconds", "Time to answer an RPC request",
                        ["service", "method"],
                        buckets=(0.001, 0.01, 0.1, 1, 10, 60, 300, 900, float("inf")))
RPC_IN_FLIGHT = Gauge("k1rl_rpc_in_flight", "RPC requests being handled", ["service", "method"])
RPC_QUEUED = Gauge("k1rl_rpc_queued", "RPC requests waiting for a handler thread", ["service"])
CALLS_LOST = Counter("k1rl_calls_peer_gone_total",
                     "Watched calls whose service died or restarted under them",
                     ["address", "method"])
CALLS_RESENT = Counter("k1rl_calls_resent_total",
                       "Calls sent again to a service that came back", ["address", "method"])
STEPS_RETRIED = Counter("k1rl_steps_retried_total",
                        "Iteration steps sent again after their service died", ["step"])
RECOVERIES = Counter("k1rl_iterations_redone_total",
                     "Iterations redone from the last completed one after a service died")
SERVICE_RESTARTS = Counter("k1rl_service_restarts_total",
                           "Services restarted by the local launcher after they exited",
                           ["service"])

_served: dict[int, object] = {}
_lock = threading.Lock()


def serve(port: int, addr: str = "0.0.0.0") -> int:
    """Serve this process's metrics on ``port`` (0: a free one) once; returns the port."""
    with _lock:
        if port in _served and port != 0:
            return port
        server, _ = start_http_server(port, addr)
        bound = server.server_port
        _served[bound] = server
        return bound


def _gauge_name(key: str) -> str:
    return "k1rl_iteration_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)


@register("prometheus")
class PrometheusSink(MetricSink):
    """Each row's keys as gauges (the latest iteration's values), on rl.prometheus_port."""

    def __init__(self, port: int) -> None:
        self.port = port

    @classmethod
    def open(cls, cfg: RunConfig, run_dir: Path, resume_at: int) -> PrometheusSink:
        return cls(serve(cfg.rl.prometheus_port))

    def write(self, record: IterationMetrics) -> None:
        for key, value in record.row().items():
            name = _gauge_name(key)
            if name not in _GAUGES:
                _GAUGES[name] = Gauge(name, f"the last iteration's {key}")
            _GAUGES[name].set(value)


# one gauge per name per process: a second sink (a resumed run) reuses them
_GAUGES: dict[str, Gauge] = {}
