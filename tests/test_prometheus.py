"""Prometheus: every service's RPC traffic and the master's iteration metrics on /metrics."""

from __future__ import annotations

import urllib.request

from prometheus_client import REGISTRY
from pydantic import BaseModel

from k1rl.config import RunConfig
from k1rl.metrics.prometheus import PrometheusSink
from k1rl.metrics.record import IterationMetrics, Timings
from k1rl.rpc import RemoteError, RPCClient, RPCServer


class Text(BaseModel):
    text: str


def _scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def _boom(req: Text) -> Text:
    raise RuntimeError("boom")


def test_a_service_counts_its_requests_by_method_and_outcome():
    server = RPCServer("tcp://127.0.0.1:0", "scraped", metrics_port=0)
    server.register("echo", Text, lambda r: r)
    server.register("fail", Text, _boom)
    server.start_in_thread()
    try:
        with RPCClient(server.address, timeout_s=5) as client:
            for _ in range(3):
                client.call("echo", Text(text="x"), Text)
            try:
                client.call("fail", Text(text="x"), Text)
            except RemoteError:
                pass
            client.ping()
        text = _scrape(server.metrics_port)
    finally:
        server.stop()
    assert 'k1rl_rpc_requests_total{method="echo",outcome="ok",service="scraped"} 3.0' in text
    assert 'k1rl_rpc_requests_total{method="fail",outcome="error",service="scraped"} 1.0' in text
    assert 'method="ping"' not in text  # probes are not the service's traffic
    assert 'k1rl_rpc_seconds_count{method="echo",service="scraped"} 3.0' in text
    assert 'k1rl_rpc_in_flight{method="echo",service="scraped"} 0.0' in text


def test_the_master_sink_serves_the_last_iterations_row_as_gauges(tmp_path):
    cfg = RunConfig()
    cfg.rl.prometheus_port = 0
    sink = PrometheusSink.open(cfg, tmp_path, resume_at=0)
    for it in (0, 1):
        sink.write(IterationMetrics(iteration=it, policy_version=it + 1,
                                    time=Timings(iteration_s=10.0 + it, rollout_s=4.0,
                                                 train_s=5.0, reward_s=1.0)))
    text = _scrape(sink.port)
    assert "k1rl_iteration_iteration 1.0" in text
    assert "k1rl_iteration_policy_version 2.0" in text
    assert REGISTRY.get_sample_value("k1rl_iteration_iteration_s") == 11.0
