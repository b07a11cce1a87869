"""Metric sinks: each writes the master's records where they can be read back, resumes the
way the run does, and is chosen by name in rl.metrics."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import pytest

from k1rl.config import ConfigError, RunConfig
from k1rl.metrics import METRIC_SINKS, MetricSink, available, open_sinks, register
from k1rl.metrics.jsonl import METRICS_FILE, read_metrics
from k1rl.metrics.record import IterationMetrics, RewardMetrics, RolloutMetrics


def _record(i: int, reward: float, groups: int = 4) -> IterationMetrics:
    return IterationMetrics(
        iteration=i, policy_version=i,
        rollout=RolloutMetrics(policy_version_rollout=i, groups_trained=groups,
                               prompts_started=groups),
        reward=RewardMetrics(reward_mean=reward, accuracy=reward))


RECORDS = [_record(i, 0.5 + i / 10, 4 + i) for i in range(3)]


def _config(*sinks: str) -> RunConfig:
    return RunConfig.from_yaml_text(json.dumps({"run_id": "sinks", "rl": {"metrics": list(sinks)}}))


def _write(run_dir, cfg: RunConfig, records, resume_at: int = 0) -> None:
    with open_sinks(cfg, run_dir, resume_at) as sinks:
        for record in records:
            sinks.write(record)


# ------------------------------------------------------------------ config


def test_rl_metrics_names_registered_sinks_and_always_keeps_jsonl():
    assert {"jsonl", "tensorboard", "wandb"} <= set(available())
    assert RunConfig().rl.metrics == ["jsonl"]
    assert _config("tensorboard", "wandb").rl.metrics == ["jsonl", "tensorboard", "wandb"]
    with pytest.raises(ConfigError, match=r"rl.metrics: \['mlflow'\] — unknown metric sink "
                                          r"'mlflow' \(registered: jsonl, .*tensorboard, wandb"):
        _config("mlflow")
    with pytest.raises(ConfigError, match="listed twice"):
        _config("jsonl", "jsonl")


# ------------------------------------------------------------------ jsonl


def test_jsonl_appends_one_flat_row_per_record_and_reads_the_records_back(tmp_path):
    _write(tmp_path, _config(), RECORDS)
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert [json.loads(line) for line in lines] == [r.row() for r in RECORDS]
    assert json.loads(lines[0])["groups_trained"] == 4  # flat: the names every sink shows
    assert read_metrics(tmp_path) == RECORDS


def test_jsonl_drops_the_rows_of_iterations_that_did_not_complete_on_resume(tmp_path):
    _write(tmp_path, _config(), RECORDS)
    _write(tmp_path, _config(), [_record(1, 0.9)], resume_at=1)
    assert read_metrics(tmp_path) == [RECORDS[0], _record(1, 0.9)]


def test_a_row_no_record_field_holds_is_refused_naming_the_line_and_key(tmp_path):
    _write(tmp_path, _config(), RECORDS[:1])
    with open(tmp_path / METRICS_FILE, "a") as f:
        f.write(json.dumps({**RECORDS[1].row(), "rewrd_mean": 0.3}) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: .*iteration 1 .*\['rewrd_mean'\]"):
        read_metrics(tmp_path)


# ------------------------------------------------------------------ tensorboard


def _scalars(log_dir, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [(e.step, round(e.value, 6)) for e in events.Scalars(tag)]


def test_tensorboard_writes_every_key_as_a_scalar_at_the_iteration_step(tmp_path):
    _write(tmp_path, _config("tensorboard"), RECORDS)
    assert _scalars(tmp_path / "tensorboard", "reward_mean") == [(0, 0.5), (1, 0.6), (2, 0.7)]
    assert _scalars(tmp_path / "tensorboard", "groups_trained") == [(0, 4), (1, 5), (2, 6)]


def test_tensorboard_hides_the_steps_of_iterations_that_ran_again_on_resume(tmp_path):
    _write(tmp_path, _config("tensorboard"), RECORDS)
    _write(tmp_path, _config("tensorboard"), [_record(1, 0.9)], resume_at=1)
    assert _scalars(tmp_path / "tensorboard", "reward_mean") == [(0, 0.5), (1, 0.9)]


# ------------------------------------------------------------------ wandb (offline)


def _wandb_history(run_file) -> list[dict]:
    """History rows of a .wandb transaction log: a 7-byte header, then LevelDB-log
    records (32 KiB blocks, 7-byte chunk headers) of protobuf ``Record`` messages."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, part, rows = run_file.read_bytes(), 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        part, pos = part + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = pb.Record.FromString(part)
            part = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                             for i in record.history.item})
    return rows


# Writes the records of the given rows to a wandb sink in a fresh process whose every DNS
# lookup or non-Unix connect is refused and reported, until the process has exited (the
# SDK's background threads and exit handlers included).
_OFFLINE_PROCESS = """
import json, socket, sys
from pathlib import Path

def refuse(*args, **kwargs):
    print("NETWORK", args, file=sys.stderr, flush=True)
    raise OSError("an offline run must not use the network")

_connect = socket.socket.connect
socket.getaddrinfo = refuse
socket.socket.connect = lambda self, a: (_connect if self.family == socket.AF_UNIX
                                         else refuse)(self, a)

from k1rl.config import RunConfig
from k1rl.metrics import open_sinks
from k1rl.metrics.record import IterationMetrics

cfg = RunConfig.from_yaml_text("run_id: sinks\\nrl: {metrics: [wandb]}")
with open_sinks(cfg, Path(sys.argv[1]), 0) as sinks:
    for row in json.loads(sys.argv[2]):
        sinks.write(IterationMetrics.from_row(row))
"""


def test_wandb_logs_an_offline_run_in_the_run_dir_without_touching_the_network(tmp_path):
    done = subprocess.run([sys.executable, "-c", _OFFLINE_PROCESS, str(tmp_path),
                           json.dumps([r.row() for r in RECORDS])],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "NETWORK" not in done.stderr, done.stderr
    [run_dir] = (tmp_path / "wandb").glob("offline-run-*")
    [run_file] = run_dir.glob("run-*.wandb")
    history = _wandb_history(run_file)
    assert [(h["_step"], h["reward_mean"], h["groups_trained"]) for h in history] == \
        [(r.iteration, r.reward.reward_mean, r.rollout.groups_trained) for r in RECORDS]
    assert (tmp_path / METRICS_FILE).exists()  # jsonl beside it, always


# ------------------------------------------------------------------ the registry


@register("records_in_memory")
class RecordsInMemory(MetricSink):
    """A sink defined outside k1rl.metrics: registered on import, selectable by config."""

    written: list[IterationMetrics] = []

    @classmethod
    def open(cls, cfg, run_dir, resume_at):
        return cls()

    def write(self, record):
        self.written.append(record)


def test_a_sink_defined_elsewhere_is_selectable_and_gets_every_record(tmp_path):
    assert "records_in_memory" in METRIC_SINKS
    _write(tmp_path, _config("records_in_memory"), RECORDS)
    assert RecordsInMemory.written == RECORDS
