"""The master's rollout over several engines (k1rl/master/engines.py), with two real vLLM
engines: a spread rollout is the one a single engine gives, and an engine killed in the
middle of it costs nothing but time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from k1rl.config import RunConfig
from k1rl.launch import LocalCluster, free_tcp_address
from k1rl.master.engines import EnginePool, NoEngineError
from k1rl.protocol import Continuation, GenerateRequest, SamplingSpec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_engines(trainer_model_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("engines")
    cfg = RunConfig()
    cfg.model.path = str(trainer_model_dir)
    cfg.rollout.kv_cache_gib = 0.25
    config = work / "run.yaml"
    config.write_text(cfg.dump_yaml())
    addresses = [free_tcp_address(), free_tcp_address()]
    with LocalCluster(work / "logs") as cluster:
        for k, address in enumerate(addresses):
            cluster.start(f"engine{k}", "rollout_svc",
                          ["--config", str(config), "--address", address], address)
        cluster.wait_ready(600)
        yield addresses, cluster


def _request(prompts: int, n: int, max_tokens: int, continuations: int = 0) -> GenerateRequest:
    return GenerateRequest(
        prompt_token_ids=[[5 + i, 6 + i, 7 + 2 * i] for i in range(prompts)],
        sampling=SamplingSpec(n=n, max_tokens=max_tokens, temperature=1.0, seed=11),
        continuations=[Continuation(prompt_token_ids=[9, 10 + i], generated_token_ids=[3, 4],
                                    max_tokens=max_tokens) for i in range(continuations)])


def test_a_rollout_spread_over_two_engines_is_the_one_engine_rollout(two_engines):
    addresses, _ = two_engines
    req = _request(prompts=6, n=2, max_tokens=8, continuations=3)
    alone = EnginePool(addresses[:1]).generate(req)
    pool = EnginePool(addresses)
    spread = pool.generate(req)
    assert all(e.last_tokens > 0 for e in pool.engines)  # both engines took a part
    assert set(pool.tokens_per_s()) == {"engine0", "engine1"}
    # each prompt's k samples, in request order, the same seeded streams
    assert [r.prompt_token_ids for r in spread.results] == req.prompt_token_ids
    assert [[c.token_ids for c in r.completions] for r in spread.results] == [
        [c.token_ids for c in r.completions] for r in alone.results]
    assert [c.token_ids for c in spread.continued] == [c.token_ids for c in alone.continued]
    assert spread.decoded_tokens == alone.decoded_tokens


def test_an_engine_killed_mid_rollout_has_its_part_resent(two_engines):
    addresses, cluster = two_engines
    pool = EnginePool(addresses)
    req = _request(prompts=24, n=8, max_tokens=300)
    outcome = {}
    rollout = threading.Thread(target=lambda: outcome.update(result=pool.generate(req)))
    rollout.start()
    time.sleep(2)  # both engines are decoding their parts (~15 s of work)
    victim = cluster.services["engine1"]
    os.killpg(victim.proc.pid, signal.SIGKILL)
    rollout.join(600)
    result = outcome["result"]
    assert [e.address for e in pool.live] == addresses[:1]
    assert len(result.results) == 24
    assert all(len(r.completions) == 8 for r in result.results)
    with pytest.raises(NoEngineError, match="every rollout engine is gone"):
        pool.use([])
        pool.generate(req)


def test_two_engines_and_a_trainer_run_iterations_and_lose_an_engine_mid_rollout(
        tmp_path, trainer_model_dir):
    """`k1rl rl` over two engines: one publish reaches both, each iteration's prompts are
    spread over them; the engine killed during iteration 1's rollout costs that iteration
    nothing but time."""
    cfg = RunConfig(run_id="engines", seed=0)
    cfg.model.path = str(trainer_model_dir)
    for section in (cfg.trainer, cfg.rollout, cfg.reward, cfg.checkpoint_engine):
        section.address = free_tcp_address()
    engines = [free_tcp_address(), free_tcp_address()]
    cfg.rollout.addresses = engines
    cfg.rollout.kv_cache_gib = 0.25
    cfg.checkpoint_engine.engine_lifecycle = "persistent"
    cfg.rollout.n, cfg.rollout.max_tokens = 8, 200
    cfg.rl.iterations, cfg.rl.prompts_per_iteration, cfg.rl.pool_size = 2, 8, 50
    config = tmp_path / "run.yaml"
    config.write_text(cfg.dump_yaml())
    run_dir = tmp_path / "run"
    master = subprocess.Popen(
        [sys.executable, "-m", "k1rl", "rl", "--config", str(config), "--run-dir", str(run_dir)],
        start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    engine1_log = run_dir / "logs" / "engine1" / "rollout.log"
    deadline = time.monotonic() + 600
    # engine 1 has taken its part of iteration 1's rollout (sampled with policy v1)
    while "policy v1" not in _text(engine1_log):
        assert master.poll() is None, master.stdout.read()
        assert time.monotonic() < deadline, "iteration 1 never reached engine 1"
        time.sleep(0.05)
    victim = subprocess.run(["pgrep", "-f", f"rollout_svc.*{engines[1]}"],
                            capture_output=True, text=True).stdout.split()
    assert victim, "engine 1 is not running"
    for pid in victim:
        os.kill(int(pid), signal.SIGKILL)
    out, _ = master.communicate(timeout=900)
    assert master.returncode == 0, out
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    iterations = [r for r in rows if "prompts_started" in r]
    assert [r["iteration"] for r in iterations] == [0, 1]
    assert iterations[0]["engines"] == 2
    assert {"tokens_per_s@engine0", "tokens_per_s@engine1"} <= set(iterations[0])
    assert iterations[1]["engines"] == 1  # lost mid-rollout; its prompts were re-sent
    assert iterations[1]["prompts_started"] == 8 and iterations[1]["groups_trained"] == 8
    assert iterations[1]["policy_version_rollout"] == iterations[0]["policy_version"]


def _text(log) -> str:
    try:
        return log.read_text(errors="replace")
    except FileNotFoundError:
        return ""
