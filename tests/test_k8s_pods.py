"""The rendered pods' commands work together: run here as a kubelet would run them.

No cluster is available, so this test takes the containers of the rendered RL pod
(checkpoint-engine sidecar, trainer, rollout), the reward Deployment and the master Job
from `k1rl k8s render`'s output and starts exactly their commands as local processes,
in the pod's order (native sidecar first), gated by their own exec probes; only the
cluster DNS names become 127.0.0.1 and the volumes become directories. The master Job
then runs two k1.5 iterations through them, and SIGTERM stops every container within
its grace period.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from k1rl import k8s
from k1rl.config import RunConfig
from k1rl.launch import free_tcp_address

pytestmark = pytest.mark.slow

HOSTS = ("k1rl-rl-0.k1rl-rl", "k1rl-reward", "k1rl-sandbox")


def _containers(base: Path) -> dict[str, dict]:
    """name -> container spec, from the rendered base manifests."""
    found = {}
    for name in ("rl.yaml", "reward.yaml", "master.yaml"):
        for obj in yaml.safe_load_all((base / name).read_text()):
            pod = (obj or {}).get("spec", {}).get("template", {}).get("spec", {})
            for c in pod.get("initContainers", []) + pod.get("containers", []):
                found[c["name"]] = c
    return found


class Node:
    """Runs containers' commands as processes, with the paths of this machine."""

    def __init__(self, root: Path, config: Path, data: Path):
        self.root, self.config, self.data = root, config, data
        self.procs: dict[str, subprocess.Popen] = {}

    def local(self, args: list[str]) -> list[str]:
        out = []
        for a in args:
            a = a.replace(k8s.CONFIG_PATH, str(self.config)).replace(k8s.DATA_DIR + "/",
                                                                     f"{self.data}/")
            a = a.replace("exec k1rl ", f"exec {sys.executable} -m k1rl ")
            out.append(sys.executable if a == "python" else a)
        return out

    def start(self, container: dict) -> None:
        log = open(self.root / f"{container['name']}.log", "wb")
        env = {**os.environ, **{e["name"]: e["value"] for e in container["env"] if "value" in e}}
        env["HOME"] = env["XDG_CACHE_HOME"] = str(self.root / "home")
        self.procs[container["name"]] = subprocess.Popen(
            self.local(container["command"]), stdout=log, stderr=subprocess.STDOUT,
            env=env, start_new_session=True)

    def probe(self, container: dict, kind: str, timeout_s: float) -> None:
        """Run the container's exec probe until it passes, as the kubelet would."""
        command = self.local(container[kind]["exec"]["command"])
        deadline = time.monotonic() + timeout_s
        while subprocess.run(command, capture_output=True).returncode != 0:
            proc = self.procs[container["name"]]
            assert proc.poll() is None, f"{container['name']} exited:\n{self.tail(container)}"
            assert time.monotonic() < deadline, f"{container['name']} {kind} never passed"
            time.sleep(1)

    def tail(self, container: dict) -> str:
        return (self.root / f"{container['name']}.log").read_text(errors="replace")[-3000:]

    def stop_all(self, grace_s: float) -> dict[str, int | None]:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        codes = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                codes[name] = None
        return codes


def test_the_rendered_pods_run_k15_iterations_together_and_stop_gracefully(
        tmp_path, trainer_model_dir):
    cfg = RunConfig(run_id="k8s-local", seed=0)
    for section in (cfg.trainer, cfg.rollout, cfg.reward, cfg.checkpoint_engine, cfg.sandbox):
        section.address = free_tcp_address()
    cfg.reward.sandbox_address = cfg.sandbox.address
    cfg.rollout.n = 4
    cfg.rollout.max_tokens = 16
    cfg.rl.iterations = 2
    cfg.rl.prompts_per_iteration = 4
    cfg.rl.pool_size = 50
    k8s.render(cfg, tmp_path / "k8s")

    # the ConfigMap's run.yaml, with cluster DNS names resolved to this machine
    data = tmp_path / "data"
    shutil.copytree(trainer_model_dir, data / "model")
    text = (tmp_path / "k8s/base/run.yaml").read_text()
    for host in HOSTS:
        text = text.replace(f"tcp://{host}:", "tcp://127.0.0.1:")
    text = text.replace(f"{k8s.DATA_DIR}/", f"{data}/")
    config = tmp_path / "etc/run.yaml"
    config.parent.mkdir()
    config.write_text(text)
    assert RunConfig.from_yaml_text(text).checkpoint_engine.engine_lifecycle == "external"

    node = Node(tmp_path, config, data)
    (tmp_path / "home").mkdir()
    c = _containers(tmp_path / "k8s/base")
    try:
        # the native sidecar first: the kubelet starts the main containers once its
        # startup probe passes
        node.start(c["checkpoint-engine"])
        node.probe(c["checkpoint-engine"], "startupProbe", 120)
        for name in ("trainer", "rollout", "reward"):
            node.start(c[name])
        for name in ("trainer", "rollout", "reward"):
            node.probe(c[name], "startupProbe", 600)
            node.probe(c[name], "readinessProbe", 600)
        node.start(c["master"])
        master = node.procs["master"]
        master.wait(900)
        assert master.returncode == 0, node.tail(c["master"])
    finally:
        codes = node.stop_all(grace_s=60)

    state = json.loads((data / "run/state.json").read_text())
    assert state["iterations_done"] == 2
    rows = [json.loads(line) for line in (data / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]
    assert rows[1]["policy_version_rollout"] == rows[0]["policy_version"]
    # the engine is the rollout container's: the sidecar never started one of its own
    assert not (data / "run/logs/rollout.log").exists()
    # SIGTERM: every long-running container stopped by itself within the grace period
    assert all(codes[name] is not None for name in ("checkpoint-engine", "trainer", "rollout",
                                                    "reward")), codes
