"""A policy's sampled responses to problems, each judged by reward_svc: what prompt
curation (difficulty, the hack filter), shortest rejection sampling, DPO pairs and the
reward model's training data are built from.

The responses keep their token ids and log-probs (the engine's, under the policy that
sampled them), so a later training step can use them as they were drawn.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from k1rl.config import RunConfig
from k1rl.data.problem import Problem
from k1rl.data.prompts import PromptRenderer
from k1rl.master.evaluation import score_responses, serving
from k1rl.protocol import GenerateRequest, GenerateResult, RunRef, SamplingSpec
from k1rl.rpc import RPCClient

# prompts per generate call: a curation set of thousands of prompts x 10 samples would
# otherwise be one message of hundreds of MB and one call longer than any timeout
CHUNK_PROMPTS = 128


@dataclass(frozen=True)
class Draw:
    """How to sample: ``n`` responses per prompt at ``temperature``, at most ``max_tokens``
    each, every one starting with ``prefill`` (written for the model, judged with it)."""

    n: int
    temperature: float
    max_tokens: int
    prefill: str = ""
    seed: int = 0


@dataclass(frozen=True)
class Response:
    text: str  # as judged: the prefill, then what the policy wrote
    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    correct: bool
    reward: float

    @property
    def tokens(self) -> int:
        return len(self.token_ids)


class Responder:
    """Draws and judges responses of the policy an engine serves."""

    def __init__(self, cfg: RunConfig, rollout: RPCClient, reward: RPCClient) -> None:
        self.cfg = cfg
        self.rollout = rollout
        self.reward = reward
        self.renderer = PromptRenderer(cfg.data.prompt, cfg.model.path)
        self.ref = RunRef(run_id=cfg.run_id)

    def draw(self, problems: Sequence[Problem], draw: Draw) -> list[list[Response]]:
        """``draw.n`` judged responses per problem, in problem order."""
        out: list[list[Response]] = []
        for start in range(0, len(problems), CHUNK_PROMPTS):
            chunk = problems[start:start + CHUNK_PROMPTS]
            # each chunk its own seed: the samples do not depend on the chunk size's
            # relation to the number of problems, only on where a problem sits
            out += self._draw_chunk(chunk, draw, draw.seed + start)
        return out

    def _draw_chunk(self, problems: Sequence[Problem], draw: Draw,
                    seed: int) -> list[list[Response]]:
        sampling = SamplingSpec(n=draw.n, temperature=draw.temperature,
                                top_p=self.cfg.rollout.top_p, max_tokens=draw.max_tokens,
                                seed=seed)
        fields = self.renderer.request_fields(problems, prefill=draw.prefill)
        generated = self.rollout.call("generate", GenerateRequest(
            ref=self.ref, sampling=sampling, **fields), GenerateResult)
        flat = [(p, r, c) for p, r in zip(problems, generated.results) for c in r.completions]
        judged = score_responses(
            self.reward, [(p, draw.prefill + c.text, len(c.token_ids), c.finish_reason)
                          for p, _, c in flat], draw.n, self.ref, length_penalty_weight=0.0)
        responses = [
            Response(text=draw.prefill + c.text, prompt_token_ids=r.prompt_token_ids,
                     token_ids=c.token_ids, logprobs=c.logprobs, finish_reason=c.finish_reason,
                     correct=ok, reward=reward)
            for (_, r, c), ok, reward in zip(flat, judged.correct, judged.rewards)]
        return [responses[i:i + draw.n] for i in range(0, len(responses), draw.n)]


def stage_inputs(cfg: RunConfig, out_dir: Path, done_marker: str, model: Path | None,
                 what: str) -> tuple[Path, Path, RunConfig]:
    """Where an offline stage (curation, rejection sampling) starts: its output directory,
    made, and refused when it holds ``done_marker`` (a finished run of it); the model that
    answers (default: model.path), resolved; ``cfg`` with that model (its chat template and
    engine come from it)."""
    out_dir = Path(out_dir)
    if (out_dir / done_marker).exists():
        raise FileExistsError(f"{out_dir} holds {what} already: pick another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    model = Path(model or cfg.model.path).resolve()
    cfg = cfg.model_copy(deep=True)
    cfg.model.path = str(model)
    return out_dir, model, cfg


@contextmanager
def responder(cfg: RunConfig, model_dir: Path, work_dir: Path, problems: Sequence[Problem],
              *, ready_timeout_s: float = 900.0) -> Iterator[Responder]:
    """A :class:`Responder` over rollout_svc serving ``model_dir`` and reward_svc (and the
    sandbox when some problems are code), local processes stopped on exit."""
    from k1rl.master.evaluation import own_sandbox

    sandbox = own_sandbox(cfg, {p.verifier for p in problems})
    with serving(cfg, model_dir, work_dir, sandbox, ready_timeout_s) as (run, rollout, reward):
        yield Responder(run, rollout, reward)
