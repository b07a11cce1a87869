"""The rollout engines the master samples from, as one.

A generate request is spread over the engines that hold the current policy: each prompt,
with its k samples, goes to one engine (their shared prefix is cached there), parked
partial-rollout continuations go wherever there is room, and each engine's share follows
its measured throughput. The parts run at the same time; an engine that dies mid-rollout
(:class:`~k1rl.watch.PeerGone`) is dropped and its part re-sent to the others. Seeds are
pinned before the split, so a re-sent part draws the streams it would have drawn.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from pydantic import BaseModel

from k1rl.protocol import Completion, GenerateRequest, GenerateResult, PromptResult
from k1rl.rpc import RPCTimeout
from k1rl.watch import call_watched

log = logging.getLogger(__name__)

T = TypeVar("T", bound=BaseModel)
_SMOOTHING = 0.5  # weight of the newest throughput measurement


class NoEngineError(RuntimeError):
    """Every rollout engine is gone."""


@dataclass
class Engine:
    address: str
    alive: bool = True
    tokens_per_s: float = 0.0  # smoothed; 0 until measured
    last_tokens: int = 0
    last_s: float = 0.0


@dataclass
class _Part:
    engine: Engine
    prompts: list[int]
    continuations: list[int]


class EnginePool:
    """``call`` like an RPCClient of one engine; ``generate`` is spread over them all."""

    def __init__(self, addresses: list[str], timeout_s: float = 900.0, *,
                 ping_every_s: float = 2.0, misses: int = 3):
        """Calls are watched: an engine missing ``misses`` pings of ``ping_every_s`` is gone."""
        if not addresses:
            raise ValueError("no rollout engine addresses")
        self.engines = [Engine(a) for a in dict.fromkeys(addresses)]
        self.timeout_s = timeout_s
        self.ping_every_s, self.misses = ping_every_s, misses

    @property
    def live(self) -> list[Engine]:
        return [e for e in self.engines if e.alive]

    def use(self, addresses: list[str]) -> None:
        """Sample only from these engines (those that took the current policy)."""
        known = {e.address for e in self.engines}
        self.engines += [Engine(a) for a in addresses if a not in known]
        for engine in self.engines:
            engine.alive = engine.address in addresses

    def call(self, method: str, request: BaseModel, response_model: type[T],
             timeout_s: float | None = None) -> T:
        if method == "generate":
            return self.generate(request, timeout_s)  # type: ignore[arg-type,return-value]
        for engine in self.live:
            try:
                return self._call(engine, method, request, response_model, timeout_s)
            except RPCTimeout:
                self._drop(engine, method)
        raise NoEngineError(f"no rollout engine answered {method!r}")

    def ping(self, timeout_s: float | None = None):
        from k1rl.protocol import Ping, Pong

        return self.call("ping", Ping(), Pong, timeout_s)

    def close(self) -> None:
        """Nothing held: every call opens its own connection."""

    # ---------------------------------------------------------------- generate
    def generate(self, req: GenerateRequest, timeout_s: float | None = None) -> GenerateResult:
        """The request's result, as one engine would give it, from all live engines."""
        started = time.perf_counter()
        req = _pin_seeds(req)
        prompts = req.prompts if req.prompts is not None else req.prompt_token_ids or []
        todo_p, todo_c = list(range(len(prompts))), list(range(len(req.continuations)))
        done_p: dict[int, PromptResult] = {}
        done_c: dict[int, Completion] = {}
        versions, decoded = set(), 0
        while todo_p or todo_c:
            if not self.live:
                raise NoEngineError("every rollout engine is gone; "
                                    f"{len(todo_p)} prompts and {len(todo_c)} continuations left")
            parts = self._plan(req, todo_p, todo_c)
            with ThreadPoolExecutor(max_workers=len(parts)) as pool:
                outcomes = list(pool.map(lambda p: self._run(req, p, timeout_s), parts))
            for part, outcome in zip(parts, outcomes, strict=True):
                if isinstance(outcome, RPCTimeout):
                    self._drop(part.engine, "generate")
                    continue
                if isinstance(outcome, BaseException):
                    raise outcome
                done_p.update(zip(part.prompts, outcome.results, strict=True))
                done_c.update(zip(part.continuations, outcome.continued, strict=True))
                versions.add(outcome.policy_version)
                decoded += outcome.decoded_tokens
            todo_p = [i for i in todo_p if i not in done_p]
            todo_c = [i for i in todo_c if i not in done_c]
        if len(versions) > 1:
            raise RuntimeError(f"the engines answered with policies {sorted(versions)}: "
                               "they must all hold the same one")
        return GenerateResult(
            ref=req.ref, results=[done_p[i] for i in range(len(prompts))],
            continued=[done_c[i] for i in range(len(req.continuations))],
            policy_version=versions.pop(), elapsed_s=time.perf_counter() - started,
            decoded_tokens=decoded)

    def _plan(self, req: GenerateRequest, prompts: list[int],
              continuations: list[int]) -> list[_Part]:
        """Longest work first, each to the engine that would finish it soonest (work over
        measured throughput; engines not yet measured count as the fastest known)."""
        live = self.live
        known = [e.tokens_per_s for e in live if e.tokens_per_s > 0]
        speed = {e.address: e.tokens_per_s or (max(known) if known else 1.0) for e in live}
        load = {e.address: 0.0 for e in live}
        parts = {e.address: _Part(e, [], []) for e in live}
        s = req.sampling
        work = [(s.n * s.max_tokens, "p", i) for i in prompts]
        work += [(req.continuations[i].max_tokens, "c", i) for i in continuations]
        for cost, kind, i in sorted(work, key=lambda w: (-w[0], w[1], w[2])):
            target = min(live, key=lambda e: ((load[e.address] + cost) / speed[e.address],
                                              load[e.address]))
            load[target.address] += cost
            part = parts[target.address]
            (part.prompts if kind == "p" else part.continuations).append(i)
        return [p for p in parts.values() if p.prompts or p.continuations]

    def _run(self, req: GenerateRequest, part: _Part,
             timeout_s: float | None) -> GenerateResult | BaseException:
        fields: dict = {"continuations": [req.continuations[i] for i in part.continuations]}
        if req.prompts is not None:
            fields["prompts"] = [req.prompts[i] for i in part.prompts]
        elif req.prompt_token_ids is not None:
            fields["prompt_token_ids"] = [req.prompt_token_ids[i] for i in part.prompts]
        sub = req.model_copy(update=fields)
        try:
            result = self._call(part.engine, "generate", sub, GenerateResult, timeout_s)
        except BaseException as exc:  # noqa: BLE001 - sorted out by the caller
            return exc
        self._measure(part.engine, result)
        return result

    def _call(self, engine: Engine, method: str, request: BaseModel,
              response_model: type[T], timeout_s: float | None) -> T:
        return call_watched(engine.address, method, request, response_model,
                            timeout_s or self.timeout_s, ping_every_s=self.ping_every_s,
                            misses=self.misses)

    def _measure(self, engine: Engine, result: GenerateResult) -> None:
        engine.last_tokens, engine.last_s = result.decoded_tokens, result.elapsed_s
        if result.elapsed_s > 0 and result.decoded_tokens:
            rate = result.decoded_tokens / result.elapsed_s
            engine.tokens_per_s = (rate if not engine.tokens_per_s else
                                   _SMOOTHING * rate + (1 - _SMOOTHING) * engine.tokens_per_s)

    def _drop(self, engine: Engine, method: str) -> None:
        engine.alive = False
        log.warning("rollout engine %s is gone (during %s); %d left", engine.address, method,
                    len(self.live))

    def tokens_per_s(self) -> dict[str, float]:
        """Each live engine's decoding rate in its part of the last rollout."""
        return {f"engine{k}": e.last_tokens / e.last_s
                for k, e in enumerate(self.engines) if e.alive and e.last_s > 0}


def _pin_seeds(req: GenerateRequest) -> GenerateRequest:
    """Each continuation's seed as the whole request would give it (sampling.seed + 1 + its
    index), so that its part of a split request draws the same stream on any engine."""
    seed = req.sampling.seed
    if seed is None or all(c.seed is not None for c in req.continuations):
        return req
    pinned = [c if c.seed is not None else c.model_copy(update={"seed": seed + 1 + i})
              for i, c in enumerate(req.continuations)]
    return req.model_copy(update={"continuations": pinned})
