"""Kubernetes manifests: rendered from one RunConfig, built by kustomize, validated strictly
against Kubernetes 1.32, clean under checkov, and carrying that RunConfig back intact.

No API server runs here, so this is what "the manifests are correct" can mean: the
validators run on the real build output of every overlay. The tools (a static kubectl,
kubernetes-validate, checkov) live in their own venv, installed by `make test`
(`.venv-k8s`, or the directory in K1RL_K8S_TOOLS).
"""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from k1rl import k8s
from k1rl.config import RunConfig, load_config

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "examples/configs/tiny_cpu.yaml"   # what k8s/ is rendered from
TOOLS = Path(os.environ.get("K1RL_K8S_TOOLS", REPO / ".venv-k8s/bin"))
OVERLAYS = ("cpu", "gpu")
KUBERNETES = "1.32.0"


def _tool(name: str) -> str:
    path = TOOLS / name
    assert path.exists(), f"{path} missing: `make test` installs the k8s tools (make k8s-tools)"
    return str(path)


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd[:3])} ... exited {done.returncode}:\n"
                             f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """overlay -> the multi-document YAML `kubectl kustomize` builds from k8s/."""
    out = tmp_path_factory.mktemp("k8s-built")
    paths = {}
    for overlay in OVERLAYS:
        done = _run(_tool("kubectl"), "kustomize", str(REPO / "k8s/overlays" / overlay))
        paths[overlay] = out / f"{overlay}.yaml"
        paths[overlay].write_text(done.stdout)
    return paths


def _objects(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _find(objects: list[dict], kind: str, name_prefix: str) -> dict:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].startswith(name_prefix)]
    assert len(found) == 1, f"{len(found)} {kind} named {name_prefix}*"
    return found[0]


def test_the_checked_in_tree_is_the_render_of_its_source_config(tmp_path):
    """k8s/ is generated: editing it by hand, or changing the renderer without
    re-rendering (`make k8s`), fails here."""
    k8s.render(load_config(SOURCE), tmp_path)
    rendered = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.yaml"))
    checked_in = sorted(p.relative_to(REPO / "k8s") for p in (REPO / "k8s").rglob("*.yaml"))
    assert rendered == checked_in
    stale = [str(p) for p in rendered if not filecmp.cmp(tmp_path / p, REPO / "k8s" / p,
                                                         shallow=False)]
    assert not stale, f"out of date, run `make k8s`: {stale}"


def test_every_overlay_builds_into_the_whole_deployment(built):
    for overlay, path in built.items():
        objects = _objects(path)
        kinds = {(o["kind"], o["metadata"]["name"].rsplit("-", 1)[0]
                  if o["kind"] == "ConfigMap" else o["metadata"]["name"]) for o in objects}
        assert {("StatefulSet", "k1rl-rl"), ("Service", "k1rl-rl"), ("Job", "k1rl-master"),
                ("Deployment", "k1rl-reward"), ("Deployment", "k1rl-sandbox"),
                ("HorizontalPodAutoscaler", "k1rl-sandbox"), ("NetworkPolicy", "k1rl-sandbox"),
                ("PodDisruptionBudget", "k1rl-sandbox"),
                ("ConfigMap", "k1rl-run")} <= kinds, overlay
        assert all(o["metadata"].get("namespace") == "k1rl"
                   for o in objects if o["kind"] != "Namespace"), overlay


def test_every_object_validates_strictly_against_kubernetes_1_32(built, tmp_path):
    for overlay, path in built.items():
        done = _run(_tool("kubernetes-validate"), "--strict", "-k", KUBERNETES, "--quiet",
                    str(path), check=False)
        assert done.returncode == 0, f"{overlay}:\n{done.stdout}{done.stderr}"
    # and the validation really is strict: one unknown field is an error
    objects = _objects(built["cpu"])
    _find(objects, "StatefulSet", "k1rl-rl")["spec"]["replicaCount"] = 2
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump_all(objects))
    done = _run(_tool("kubernetes-validate"), "--strict", "-k", KUBERNETES, "--quiet",
                str(bad), check=False)
    assert done.returncode != 0 and "replicaCount" in done.stdout + done.stderr


def _checkov(target: Path, framework: str) -> dict:
    """Failed and skipped checks of checkov on a file or a directory, offline."""
    done = _run(_tool("checkov"), "-d" if target.is_dir() else "-f", str(target),
                "--framework", framework, "--skip-download", "--output", "json",
                check=False)
    report = json.loads(done.stdout)
    results = {"failed": [], "skipped": []}
    for r in report if isinstance(report, list) else [report]:
        if "results" in r:  # a scan that found nothing to check is a bare summary
            results["failed"] += r["results"].get("failed_checks", [])
            results["skipped"] += r["results"].get("skipped_checks", [])
    return results


def test_checkov_fails_nothing_and_every_skip_is_written_down_and_used(built):
    for overlay, path in built.items():
        results = _checkov(path, "kubernetes")
        assert not results["failed"], [(c["check_id"], c["resource"]) for c in results["failed"]]
        used = {(c["resource"].split(".")[-1], c["check_id"]) for c in results["skipped"]}
        for obj in _objects(path):
            for key, value in (obj["metadata"].get("annotations") or {}).items():
                if key.startswith("checkov.io/skip"):
                    check, _, reason = value.partition("=")
                    assert len(reason) > 20, f"{check} on {obj['metadata']['name']}: no reason"
                    # a skip of a check that passes anyway is stale
                    assert (obj["metadata"]["name"], check) in used, (overlay, check)


def test_every_image_has_a_dockerfile_checkov_accepts_and_no_secret_is_baked_in(built,
                                                                               tmp_path):
    for image, dockerfile in k8s.IMAGES.items():
        assert (REPO / dockerfile).exists(), (image, dockerfile)
        results = _checkov(REPO / dockerfile, "dockerfile")
        assert not results["failed"], (dockerfile, [c["check_id"] for c in results["failed"]])
    for target in [REPO / "k8s", *{(REPO / d).parent for d in k8s.IMAGES.values()}]:
        assert not _checkov(target, "secrets")["failed"], target
    # the secrets scan is live: a key baked into an image is caught
    (tmp_path / "leaky").mkdir()
    (tmp_path / "leaky/Dockerfile").write_text(
        "FROM debian:bookworm-slim\nENV AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE\n")
    assert _checkov(tmp_path / "leaky", "secrets")["failed"]
    # every image the manifests run is one of them
    used = set()
    for path in built.values():
        for obj in _objects(path):
            pod = obj.get("spec", {}).get("template", {}).get("spec", {})
            used |= {c["image"].split(":")[0]
                     for c in pod.get("containers", []) + pod.get("initContainers", [])}
    assert used and used <= set(k8s.IMAGES), used - set(k8s.IMAGES)


def test_the_configmap_carries_the_run_config_back_intact(built):
    source = load_config(SOURCE)
    expected = {"cpu": k8s.cluster_config(source), "gpu": k8s.gpu_config(source)}
    for overlay, path in built.items():
        configmap = _find(_objects(path), "ConfigMap", "k1rl-run")
        assert RunConfig.from_yaml_text(configmap["data"]["run.yaml"]) == expected[overlay]
    gpu = expected["gpu"]
    assert (gpu.trainer.device, gpu.trainer.dist_backend, gpu.rollout.device) == \
        ("cuda", "nccl", "cuda")


def test_the_cluster_config_is_the_source_with_cluster_addresses_and_paths():
    source = load_config(SOURCE)
    cluster = k8s.cluster_config(source)
    assert cluster.trainer.address == "tcp://k1rl-rl-0.k1rl-rl:5701"
    assert cluster.reward.sandbox_address == cluster.sandbox.address == \
        "tcp://k1rl-sandbox:5705"
    assert cluster.checkpoint_engine.engine_lifecycle == "external"
    assert (cluster.run_dir, cluster.model.path) == (k8s.RUN_DIR, k8s.MODEL_DIR)
    # every process serves Prometheus metrics on its own port
    assert cluster.rl.metrics == [*source.rl.metrics, "prometheus"]
    assert cluster.rl.prometheus_port == k8s.METRICS_PORTS["master"]
    for name in ("trainer", "rollout", "reward", "checkpoint_engine", "sandbox"):
        assert getattr(cluster, name).metrics_port == k8s.METRICS_PORTS[name]
    # everything else is the source's
    moved = {"metrics", "prometheus_port"}
    assert {k: v for k, v in cluster.rl.model_dump().items() if k not in moved} == \
        {k: v for k, v in source.rl.model_dump().items() if k not in moved}
    assert cluster.trainer.lr == source.trainer.lr and cluster.rollout.n == source.rollout.n


def test_ports_and_probes_follow_the_config(tmp_path):
    cfg = load_config(SOURCE)
    cfg.trainer.address = "tcp://127.0.0.1:6101"
    k8s.render(cfg, tmp_path)
    rl = _find(_objects(tmp_path / "base/rl.yaml"), "StatefulSet", "k1rl-rl")
    trainer = next(c for c in rl["spec"]["template"]["spec"]["containers"]
                   if c["name"] == "trainer")
    assert trainer["command"][-2:] == ["--address", "tcp://*:6101"]
    assert 6101 in [p["containerPort"] for p in trainer["ports"]]
    assert trainer["readinessProbe"]["exec"]["command"] == [
        "python", "-m", "k1rl.probe", "tcp://127.0.0.1:6101", "--timeout", "3", "--ready"]
    sidecar = rl["spec"]["template"]["spec"]["initContainers"][0]
    assert (sidecar["name"], sidecar["restartPolicy"]) == ("checkpoint-engine", "Always")


def test_an_address_that_cannot_cross_pods_is_refused_by_name(tmp_path):
    cfg = load_config(SOURCE)
    cfg.reward.address = "ipc:///tmp/reward.sock"
    with pytest.raises(ValueError, match="reward.address must be tcp"):
        k8s.render(cfg, tmp_path)


def test_k1rl_k8s_render_is_the_command_line_entry(tmp_path):
    done = subprocess.run([sys.executable, "-m", "k1rl", "k8s", "render", str(SOURCE),
                           str(tmp_path / "out"), "--nodes", "2"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    rl = _find(_objects(tmp_path / "out/base/rl.yaml"), "StatefulSet", "k1rl-rl")
    assert rl["spec"]["replicas"] == 2
    bad = subprocess.run([sys.executable, "-m", "k1rl", "k8s", "render", str(tmp_path / "nope"),
                          str(tmp_path / "o2")], capture_output=True, text=True, timeout=120,
                         cwd=REPO)
    assert bad.returncode != 0 and "cannot read file" in bad.stdout + bad.stderr


def test_several_nodes_render_one_trainer_across_the_pods_and_every_pod_engine():
    source = load_config(SOURCE)  # one trainer rank: two pods need two DP replicas
    cluster = k8s.cluster_config(source, nodes=2)
    assert (cluster.trainer.nnodes, cluster.trainer.dp, cluster.trainer.world_size) == (2, 2, 2)
    assert cluster.rollout.addresses == ["tcp://k1rl-rl-0.k1rl-rl:5702",
                                         "tcp://k1rl-rl-1.k1rl-rl:5702"]
    assert cluster.trainer.address == "tcp://k1rl-rl-0.k1rl-rl:5701"  # node 0 hosts rank 0
    assert k8s.gpu_config(source, nodes=2).rollout.addresses == cluster.rollout.addresses
    rl = k8s.rl_objects(cluster, nodes=2)
    statefulset = _find(rl, "StatefulSet", "k1rl-rl")
    env = {e["name"]: e for c in statefulset["spec"]["template"]["spec"]["containers"]
           if c["name"] == "trainer" for e in c["env"]}
    assert env["K1RL_NNODES"]["value"] == "2"
    assert "pod-index" in env["K1RL_NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert env["MASTER_ADDR"]["value"] == "k1rl-rl-0.k1rl-rl"


def test_a_cot_judge_gets_its_own_deployment_reachable_from_reward_only(tmp_path):
    cfg = load_config(SOURCE)
    cfg.reward.judge.mode = "backup"
    cfg.reward.judge.model = "/home/me/judge"
    k8s.render(cfg, tmp_path)
    run = RunConfig.from_yaml_text((tmp_path / "base/run.yaml").read_text(), "run.yaml", [])
    assert run.reward.judge.address == "tcp://k1rl-judge:5711"
    assert run.reward.judge.model == k8s.JUDGE_DIR  # on the run volume
    for overlay in OVERLAYS:
        built = tmp_path / f"{overlay}.yaml"
        built.write_text(_run(_tool("kubectl"), "kustomize",
                              str(tmp_path / "overlays" / overlay)).stdout)
        done = _run(_tool("kubernetes-validate"), "--strict", "-k", KUBERNETES, "--quiet",
                    str(built), check=False)
        assert done.returncode == 0, f"{overlay}:\n{done.stdout}{done.stderr}"
        objects = _objects(built)
        judge = _find(objects, "Deployment", "k1rl-judge")["spec"]["template"]["spec"]
        command = judge["containers"][0]["command"]
        assert command[:3] == ["python", "-m", "rollout_svc"] and "--judge" in command
        policy = _find(objects, "NetworkPolicy", "k1rl-judge")["spec"]
        assert policy["ingress"][0]["from"] == [{"podSelector": {"matchLabels": {
            "app.kubernetes.io/name": "k1rl", "app.kubernetes.io/component": "reward"}}}]
        assert policy["egress"] == []
        if overlay == "gpu":
            assert judge["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert not _checkov(built, "kubernetes")["failed"], overlay
