"""The rendered pods' commands work together: run here as a kubelet would run them.

No cluster is available, so this test takes the containers of the rendered RL pods
(checkpoint-engine sidecar, trainer, rollout) of a two-node render (`--nodes 2`), the
reward Deployment and the master Job from `k1rl k8s render`'s output and starts exactly
their commands as local processes, in the pod's order (native sidecar first), gated by
their own exec probes. Only what one machine cannot give two pods is changed: cluster DNS
names become 127.0.0.1, pod 1's ports are moved to free ones (both pods would bind the
same), the pod index comes from the test, and volumes (the run's CURVE keys Secret
among them) become directories. The trainer
spans both pods through torchrun's rendezvous at pod 0, the master samples from both
pods' engines, two k1.5 iterations run, and SIGTERM stops every container within its
grace period.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from k1rl import k8s
from k1rl.auth import CURVE_KEYS_ENV, create_curve_keys
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


class Pod:
    """Runs one pod's containers' commands as processes, with the paths of this machine and
    its own ports (``ports``: the rendered port -> the one this pod binds here)."""

    def __init__(self, root: Path, config: Path, data: Path, keys: Path, index: int = 0,
                 ports: dict[int, int] | None = None, rendezvous_port: int = 0):
        self.root, self.config, self.data, self.keys = root, config, data, keys
        self.index, self.ports, self.rendezvous_port = index, ports or {}, rendezvous_port
        self.procs: dict[str, subprocess.Popen] = {}
        (root / "home").mkdir(parents=True, exist_ok=True)

    def local(self, args: list[str]) -> list[str]:
        out = []
        for a in args:
            a = a.replace(k8s.CONFIG_PATH, str(self.config)).replace(k8s.DATA_DIR + "/",
                                                                     f"{self.data}/")
            a = a.replace("exec k1rl ", f"exec {sys.executable} -m k1rl ")
            for host in ("*", "127.0.0.1"):
                for rendered, here in self.ports.items():
                    if a == f"tcp://{host}:{rendered}":
                        a = f"tcp://{host}:{here}"
            out.append(sys.executable if a == "python" else a)
        return out

    def env(self, container: dict) -> dict[str, str]:
        env = {**os.environ, **{e["name"]: e["value"] for e in container["env"] if "value" in e}}
        for e in container["env"]:
            if "valueFrom" in e:  # the StatefulSet's pod-index label
                assert "pod-index" in e["valueFrom"]["fieldRef"]["fieldPath"], e
                env[e["name"]] = str(self.index)
        if "MASTER_ADDR" in env:
            assert env["MASTER_ADDR"] == k8s.RL_HOST
            env["MASTER_ADDR"] = "127.0.0.1"
            env["MASTER_PORT"] = str(self.rendezvous_port)
        assert env[CURVE_KEYS_ENV] == k8s.KEYS_DIR  # the Secret's mount
        env[CURVE_KEYS_ENV] = str(self.keys)
        env["HOME"] = env["XDG_CACHE_HOME"] = str(self.root / "home")
        return env

    def start(self, container: dict) -> None:
        log = open(self.root / f"{container['name']}.log", "ab")  # a restart appends
        self.procs[container["name"]] = subprocess.Popen(
            self.local(container["command"]), stdout=log, stderr=subprocess.STDOUT,
            env=self.env(container), start_new_session=True)

    def probe(self, container: dict, kind: str, timeout_s: float) -> None:
        """Run the container's exec probe until it passes, as the kubelet would."""
        command = self.local(container[kind]["exec"]["command"])
        deadline = time.monotonic() + timeout_s
        env = self.env(container)  # the kubelet execs probes in the container's environment
        while subprocess.run(command, capture_output=True, env=env).returncode != 0:
            proc = self.procs[container["name"]]
            assert proc.poll() is None, f"{container['name']} exited:\n{self.tail(container)}"
            assert time.monotonic() < deadline, f"{container['name']} {kind} never passed"
            time.sleep(1)

    def tail(self, container: dict) -> str:
        return self.log(container["name"])[-3000:]

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def kill(self, name: str) -> None:
        """The container dies (SIGKILL to everything in it)."""
        os.killpg(self.procs[name].pid, signal.SIGKILL)
        self.procs[name].wait(30)

    def signal_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)

    def wait_all(self, grace_s: float) -> dict[str, int | None]:
        codes = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                codes[name] = None
        return codes


def _free_port() -> int:
    return int(free_tcp_address().rsplit(":", 1)[1])


def _scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def _run_yaml(rendered: str, data: Path, pod_ports: list[dict[int, int]]) -> str:
    """The ConfigMap's run.yaml as this machine reads it: cluster DNS names resolved to
    127.0.0.1, each RL pod's address on that pod's ports."""
    for k, ports in enumerate(pod_ports):
        for rendered_port, here in ports.items():
            rendered = rendered.replace(f"tcp://{k8s.RL}-{k}.{k8s.RL}:{rendered_port}",
                                        f"tcp://127.0.0.1:{here}")
    for host in HOSTS:
        rendered = rendered.replace(f"tcp://{host}:", "tcp://127.0.0.1:")
    return rendered.replace(f"{k8s.DATA_DIR}/", f"{data}/")


def _config(iterations: int) -> RunConfig:
    cfg = RunConfig(run_id="k8s-local", seed=0)
    for section in (cfg.trainer, cfg.rollout, cfg.reward, cfg.checkpoint_engine, cfg.sandbox):
        section.address = free_tcp_address()
    cfg.reward.sandbox_address = cfg.sandbox.address
    cfg.rollout.n = 4
    cfg.rollout.max_tokens = 16
    cfg.rollout.kv_cache_gib = 0.25
    cfg.rl.iterations = iterations
    cfg.rl.prompts_per_iteration = 4
    cfg.rl.pool_size = 50
    return cfg


class Deployment:
    """A render of ``cfg`` for ``nodes`` RL pods, as Pods on this machine: ``pods`` (the RL
    pods), ``services`` (reward and the master Job), ``c`` (container specs by name),
    ``data`` (the data volume, the model and the run in it), ``metrics`` (per RL pod: the
    rendered /metrics port -> this machine's)."""

    def __init__(self, tmp_path: Path, model_dir: Path, cfg: RunConfig, nodes: int):
        k8s.render(cfg, tmp_path / "k8s", nodes=nodes)
        rl_ports = [k8s.ports(cfg)[name] for name in ("trainer", "rollout", "checkpoint_engine")]
        pod_ports = [{p: p for p in rl_ports}] + [
            {p: _free_port() for p in rl_ports} for _ in range(nodes - 1)]
        self.data = tmp_path / "data"
        shutil.copytree(model_dir, self.data / "model")
        text = _run_yaml((tmp_path / "k8s/base/run.yaml").read_text(), self.data, pod_ports)
        # every pod reads the one ConfigMap; here each gets a copy with its /metrics ports
        # moved
        self.metrics = [{p: _free_port() for p in k8s.METRICS_PORTS.values()}
                        for _ in pod_ports]
        configs = []
        for k, moved in enumerate(self.metrics):
            configs.append(tmp_path / f"etc/pod{k}/run.yaml")
            configs[k].parent.mkdir(parents=True)
            configs[k].write_text(re.sub(r"\b(metrics_port|prometheus_port): (\d+)",
                                         lambda m, moved=moved: f"{m[1]}: {moved[int(m[2])]}",
                                         text))
        self.run = RunConfig.from_yaml_text(text)
        rendezvous = _free_port()
        keys = create_curve_keys(tmp_path / "keys")  # what the Secret k1rl-curve-keys holds
        self.pods = [Pod(tmp_path / f"pod{k}", configs[k], self.data, keys, k, ports,
                         rendezvous) for k, ports in enumerate(pod_ports)]
        self.services = Pod(tmp_path / "services", configs[0], self.data, keys)
        self.c = _containers(tmp_path / "k8s/base")

    def start(self) -> None:
        """Every container but the master's, in the kubelet's order, gated by its probes:
        the native sidecar first, the main containers once its startup probe passes."""
        c = self.c
        for pod in self.pods:
            pod.start(c["checkpoint-engine"])
        for pod in self.pods:
            pod.probe(c["checkpoint-engine"], "startupProbe", 120)
        for pod in self.pods:
            for name in ("trainer", "rollout"):
                pod.start(c[name])
        self.services.start(c["reward"])
        for pod, name in [(p, n) for p in self.pods for n in ("trainer", "rollout")] + [
                (self.services, "reward")]:
            pod.probe(c[name], "startupProbe", 600)
            pod.probe(c[name], "readinessProbe", 600)

    def stop(self) -> dict[str, int | None]:
        """SIGTERM to every container; each one's exit code (None: still running after its
        grace period, then killed)."""
        everyone = (*self.pods, self.services)
        for pod in everyone:
            pod.signal_all()
        return {f"{pod.root.name}/{name}": code for pod in everyone
                for name, code in pod.wait_all(grace_s=60).items()}

    def rows(self) -> list[dict]:
        path = self.data / "run/metrics.jsonl"
        return ([json.loads(line) for line in path.read_text().splitlines()]
                if path.exists() else [])


def test_the_rendered_pods_of_two_nodes_run_k15_iterations_together_and_stop_gracefully(
        tmp_path, trainer_model_dir):
    d = Deployment(tmp_path, trainer_model_dir, _config(iterations=2), nodes=2)
    assert d.run.checkpoint_engine.engine_lifecycle == "external"
    assert (d.run.trainer.nnodes, d.run.trainer.dp) == (2, 2)  # one DP replica per pod
    pods, services, c, data, metrics = d.pods, d.services, d.c, d.data, d.metrics
    try:
        d.start()
        services.start(c["master"])
        master = services.procs["master"]
        master.wait(900)
        assert master.returncode == 0, services.tail(c["master"])
        # each service's /metrics, on the port its pod's config gives it
        trainer_metrics = _scrape(metrics[0][k8s.METRICS_PORTS["trainer"]])
        engine_metrics = _scrape(metrics[1][k8s.METRICS_PORTS["rollout"]])
    finally:
        codes = d.stop()

    state = json.loads((data / "run/state.json").read_text())
    assert state["iterations_done"] == 2
    rows = d.rows()
    assert [r["iteration"] for r in rows] == [0, 1]
    assert rows[1]["policy_version_rollout"] == rows[0]["policy_version"]
    # one publish reached both pods' engines and the master sampled from both
    assert [r["engines"] for r in rows] == [2, 2]
    for pod in pods:
        assert "policy v1" in pod.log("rollout"), pod.log("rollout")[-2000:]
    # every service bound all interfaces, so each one authenticated its callers with CURVE
    for pod in (*pods, services):
        for name in pod.procs:
            if name != "master":
                assert "serving CURVE-authenticated" in pod.log(name), (pod.root, name)
    assert 'k1rl_rpc_requests_total{method="train",outcome="ok",service="trainer"} 2.0' \
        in trainer_metrics
    assert re.search(r'k1rl_rpc_requests_total\{method="generate",outcome="ok",'
                     r'service="rollout"\} [1-9]', engine_metrics)
    # pod 1's trainer is rank 1 of the group, answering its pod's probes
    assert "trainer rank 1 (following rank 0)" in pods[1].log("trainer")
    # the engines are the rollout containers': the sidecar never started one of its own
    assert not list((data / "run/logs").glob("engine*/rollout.log"))
    # SIGTERM: every long-running container stopped by itself within the grace period
    assert all(code is not None for name, code in codes.items()
               if not name.endswith("master")), codes


def _wait(condition, what: str, timeout_s: float = 600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.02)


def test_the_three_restarts_that_stopped_a_run_on_kubernetes_now_resume_it(
        tmp_path, trainer_model_dir):
    """Replayed as the kubelet and the Job controller would, in one run of 4 iterations:
    (a) the master Job's pod dies while the sidecar is in ROLLOUT, and the Job retries it;
    (b) the sidecar container restarts while its engine holds the iteration's policy, which
    the redone iteration pushes again; (c) the trainer container restarts between
    iterations and comes back with the base model (v0)."""
    d = Deployment(tmp_path, trainer_model_dir, _config(iterations=4), nodes=1)
    pod, services, c = d.pods[0], d.services, d.c
    engine_metrics = d.metrics[0][k8s.METRICS_PORTS["rollout"]]

    def generating() -> bool:
        try:
            text = _scrape(engine_metrics)
        except OSError:
            return False
        return 'k1rl_rpc_in_flight{method="generate",service="rollout"} 1.0' in text

    try:
        d.start()
        services.start(c["master"])
        # the engine samples iteration 1: the sidecar is in ROLLOUT
        _wait(lambda: len(d.rows()) == 1 and generating(), "iteration 1 generating")
        services.kill("master")  # (a)
        services.start(c["master"])  # the Job's retry: resumes the run on the volume
        # the engine samples iteration 2 with v2: the master talks to the sidecar again
        # only for this iteration's switch to TRAIN
        _wait(lambda: len(d.rows()) == 2 and generating(), "iteration 2 generating")
        pod.kill("checkpoint-engine")  # (b)
        pod.start(c["checkpoint-engine"])
        pod.probe(c["checkpoint-engine"], "startupProbe", 120)
        _wait(lambda: len(d.rows()) == 3, "iteration 2 done")
        pod.kill("trainer")  # (c)
        pod.start(c["trainer"])
        pod.probe(c["trainer"], "startupProbe", 600)
        master = services.procs["master"]
        master.wait(900)
        assert master.returncode == 0, services.tail(c["master"])
    finally:
        d.stop()

    rows = d.rows()
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3]
    # every iteration sampled from the run's policy and trained it one step further: no
    # iteration from the base model after the trainer's restart
    assert [(r["policy_version_rollout"], r["policy_version"]) for r in rows] == [
        (0, 1), (1, 2), (2, 3), (3, 4)]
    # (b): the restarted sidecar never pushed the engine the version it held (refused as
    # stale); (c) may have the engine refuse the restarted trainer's v0, as it should
    assert not re.search(r"engine has version (\d+), manifest carries \1\b", pod.log("rollout"))
    master_log = services.log("master")
    assert "trainer held v0: loaded v3" in master_log, master_log[-3000:]
    assert "redoing it from the last completed one" in master_log  # (b)
