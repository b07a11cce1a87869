"""trainer_svc over two "nodes": two torchrun agents on this machine, one pipeline stage
each, rendezvous at node 0. They serve and train as one trainer; when a node dies, the
other fails with an error naming the rank instead of hanging."""

from __future__ import annotations

import time

import pytest

from k1rl.config import RunConfig
from k1rl.launch import free_tcp_address, start_service
from k1rl.protocol import (
    LogprobRequest,
    LogprobResult,
    PushWeightsRequest,
    SFTBatch,
    SFTExample,
    TrainStats,
    WeightManifest,
)
from k1rl.rpc import RemoteError, RPCClient, RPCTimeout
from trainer_svc.dist import free_port

pytestmark = pytest.mark.slow

PROMPTS = [[1, 2, 3], [4, 5, 6, 7]]
RESPONSES = [[8, 9], [10, 11, 12]]


@pytest.fixture
def two_nodes(trainer_hf_dir, tmp_path):
    cfg = RunConfig()
    cfg.model.path = str(trainer_hf_dir)
    cfg.trainer.pp, cfg.trainer.nnodes = 2, 2
    cfg.trainer.address = free_tcp_address()
    config = tmp_path / "run.yaml"
    config.write_text(cfg.dump_yaml())
    rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    # each node its own trainer address, as each pod has: node 1's answers ping only
    addresses = [cfg.trainer.address, free_tcp_address()]
    nodes = [start_service(f"node{r}", "trainer_svc",
                           ["--config", str(config), "--address", addresses[r]],
                           addresses[r], tmp_path / "logs",
                           env={**rendezvous, "K1RL_NODE_RANK": str(r)})
             for r in (0, 1)]
    try:
        for node in nodes:
            node.wait_ready(300)
        yield cfg, nodes
    finally:
        for node in nodes:
            node.stop()


def test_two_agents_serve_and_train_as_one_trainer(two_nodes):
    cfg, nodes = two_nodes
    with RPCClient(nodes[1].address, timeout_s=30) as follower:
        detail = follower.ping().detail
        assert (detail["rank"], detail["follower"]) == (1, True) and "pp" not in detail
    with RPCClient(cfg.trainer.address, timeout_s=300) as trainer:
        assert trainer.ping().detail["pp"] == 2
        probe = LogprobRequest(prompt_token_ids=PROMPTS, response_token_ids=RESPONSES)
        before = trainer.call("logprobs", probe, LogprobResult).logprobs
        batch = SFTBatch(examples=[SFTExample(prompt_token_ids=p, response_token_ids=r)
                                   for p, r in zip(PROMPTS, RESPONSES, strict=True)], lr=1e-2)
        stats = [trainer.call("sft_step", batch, TrainStats) for _ in range(3)]
        after = trainer.call("logprobs", probe, LogprobResult).logprobs
        # bad input fails on every rank alike: an error for the caller, the ranks in step
        bad = LogprobRequest(prompt_token_ids=[[10**6]], response_token_ids=[[1]])
        with pytest.raises(RemoteError, match="outside"):
            trainer.call("logprobs", bad, LogprobResult)
        again = trainer.call("logprobs", probe, LogprobResult).logprobs
        manifest = trainer.call("push_weights", PushWeightsRequest(), WeightManifest)
    assert stats[-1].loss < stats[0].loss
    assert again == after
    assert sum(map(sum, after)) > sum(map(sum, before))  # SFT made the responses likelier
    assert manifest.version == 3
    # the manifest covers the whole model: both stages' layers
    names = {t.name for t in manifest.tensors}
    assert {"model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight",
            "model.embed_tokens.weight", "model.norm.weight"} <= names


def test_a_dead_node_fails_the_trainer_naming_the_rank(two_nodes):
    cfg, nodes = two_nodes
    nodes[1].stop(timeout_s=5)  # node 1's agent and its rank go away
    with RPCClient(cfg.trainer.address, timeout_s=60) as trainer:
        probe = LogprobRequest(prompt_token_ids=PROMPTS, response_token_ids=RESPONSES)
        with pytest.raises((RemoteError, RPCTimeout)):
            trainer.call("logprobs", probe, LogprobResult)
    deadline = time.monotonic() + 120
    while nodes[0].proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert nodes[0].proc.returncode not in (None, 0), "node 0 hung after node 1 died"
    log = nodes[0].log_path.read_text(errors="replace")
    assert "rank: 0" in log or "rank 0" in log, log[-3000:]
