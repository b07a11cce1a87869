"""Run plots are written for the metrics a run has, and only those."""

from __future__ import annotations

import json

from k1rl.master.plots import plot_run


def test_plots_cover_the_recorded_metrics(tmp_path):
    rows = [
        {"iteration": i, "reward_mean": 0.1 * i, "accuracy": 0.1 * i,
         "response_tokens_mean": 40 - i, "switch_to_rollout_s": 12.0, "switch_to_train_s": 4.0}
        for i in range(4)
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    written = {p.name for p in plot_run(tmp_path)}
    assert written == {"reward.png", "response_length.png", "switch_times.png"}
    for name in written:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
