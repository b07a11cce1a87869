"""Run plots are written for the metrics a run has, and only those."""

from __future__ import annotations

from k1rl.config import RunConfig
from k1rl.master.plots import plot_run
from k1rl.metrics import open_sinks
from k1rl.metrics.record import IterationMetrics, RewardMetrics, SwitchMetrics


def test_plots_cover_the_recorded_metrics(tmp_path):
    records = [
        IterationMetrics(
            iteration=i, policy_version=i,
            reward=RewardMetrics(reward_mean=0.1 * i, accuracy=0.1 * i,
                                 response_tokens_mean=40 - i),
            switch=SwitchMetrics(switch_to_rollout_s=12.0, switch_to_train_s=4.0))
        for i in range(4)
    ]
    with open_sinks(RunConfig(), tmp_path, 0) as sinks:
        for record in records:
            sinks.write(record)
    written = {p.name for p in plot_run(tmp_path)}
    assert written == {"reward.png", "response_length.png", "switch_times.png"}
    for name in written:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
