"""The rollout engine: one vLLM ``LLM`` that samples k completions per prompt with logprobs.

vLLM is imported lazily because its process model is configured through environment
variables that must be set before the first import (see ``configure_vllm_env``).
This module and ``worker_ext`` are the only places that know vLLM's API.

GPU path: ``device="cuda"`` selects CUDA vLLM with ``gpu_memory_utilization``; it is
written against the same API but cannot be exercised on the CPU development machines.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from k1rl.config import RepetitionConfig
from k1rl.protocol import (
    Completion,
    GenerateRequest,
    GenerateResult,
    LogprobRequest,
    LogprobResult,
    PromptResult,
    WeightManifest,
    WeightUpdateResult,
)
from rollout_svc.repetition import cut_at_repetition

WORKER_EXTENSION = "rollout_svc.worker_ext.WeightSyncExtension"
NO_POLICY = -1  # dummy weights, or a half-applied update


@dataclass(frozen=True)
class EngineSpec:
    model_path: str
    device: str = "cpu"
    dtype: str = "float32"
    max_model_len: int = 512
    kv_cache_gib: float = 1.0
    max_num_seqs: int = 256
    gpu_memory_utilization: float = 0.5
    enforce_eager: bool = True
    in_process: bool = True
    # "dummy" starts with random weights that the trainer then pushes (k1.5 restart mode)
    load_format: str = "auto"
    seed: int = 0
    # trajectories that loop are cut where the loop is established (finish "repetition")
    repetition: RepetitionConfig = field(default_factory=RepetitionConfig)


def configure_vllm_env(spec: EngineSpec) -> None:
    """Set the process-wide knobs vLLM reads at import time."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # In-process engine: starts in ~5 s instead of ~30 s on CPU, which matters when
    # the engine is restarted every iteration, and lets the worker extension share
    # this process's transports.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if spec.in_process else "1"
    if spec.device == "cpu":
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, int(round(spec.kv_cache_gib))))


class RolloutEngine:
    """Owns one vLLM engine and the policy version its weights belong to."""

    def __init__(self, spec: EngineSpec, transport_options: dict[str, Any] | None = None):
        configure_vllm_env(spec)
        from vllm import LLM

        self.spec = spec
        self.transport_options = dict(transport_options or {})
        started = time.perf_counter()
        kwargs: dict[str, Any] = dict(
            model=spec.model_path,
            dtype=spec.dtype,
            max_model_len=spec.max_model_len,
            enforce_eager=spec.enforce_eager,
            seed=spec.seed,
            load_format=spec.load_format,
            worker_extension_cls=WORKER_EXTENSION,
        )
        if spec.device == "cuda":
            kwargs["gpu_memory_utilization"] = spec.gpu_memory_utilization
        else:
            # vLLM-CPU crashes on seeded requests whose prefill is split across steps
            # ("CPU Generator does not use offset": it rewinds the generator of a
            # discarded partial-prefill sample). A budget that fits every scheduled
            # sequence's whole prefill means no prefill is ever split.
            kwargs["max_num_seqs"] = spec.max_num_seqs
            kwargs["max_num_batched_tokens"] = spec.max_num_seqs * spec.max_model_len
        self.llm = LLM(**kwargs)
        self.start_s = time.perf_counter() - started
        self.tokenizer = self.llm.get_tokenizer()
        # Weights loaded from disk are the checkpoint's version 0; dummy weights are
        # not a policy at all until the first push.
        self.policy_version = 0 if spec.load_format != "dummy" else NO_POLICY

    # ------------------------------------------------------------------ sampling
    def generate(self, req: GenerateRequest) -> GenerateResult:
        """Sample ``sampling.n`` completions of every prompt and continue every parked
        trajectory by one more segment, all in one batch: vLLM schedules them together,
        so short new prompts fill the engine while long ones go on."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._require_policy()
        s = req.sampling
        if req.prompt_token_ids is not None:
            prompt_ids = [list(p) for p in req.prompt_token_ids]
        else:
            prompt_ids = [self.tokenizer.encode(p, add_special_tokens=False)
                          for p in req.prompts or []]
        prefixes = [[*c.prompt_token_ids, *c.generated_token_ids] for c in req.continuations]
        too_long = [i for i, p in enumerate(prompt_ids) if len(p) + 1 > self.spec.max_model_len]
        too_long += [f"continuation {i}" for i, (p, c) in enumerate(zip(prefixes, req.continuations))
                     if len(p) + c.max_tokens > self.spec.max_model_len]
        if too_long:
            raise ValueError(
                f"prompts {too_long[:5]} exceed max_model_len={self.spec.max_model_len}"
            )

        def params(n: int, max_tokens: int, seed: int | None) -> SamplingParams:
            return SamplingParams(n=n, temperature=s.temperature, top_p=s.top_p,
                                  max_tokens=max_tokens, stop=s.stop or None, seed=seed,
                                  logprobs=0)  # the sampled token's logprob only

        # a continuation gets its own seed: seeded requests draw the same stream
        shifted = (lambda i: None) if s.seed is None else (lambda i: s.seed + 1 + i)
        requests = [(p, params(s.n, s.max_tokens, s.seed)) for p in prompt_ids]
        requests += [(p, params(1, c.max_tokens, shifted(i)))
                     for i, (p, c) in enumerate(zip(prefixes, req.continuations))]
        started = time.perf_counter()
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p, _ in requests],
            [sp for _, sp in requests], use_tqdm=False,
        )
        fresh, continued = outputs[: len(prompt_ids)], outputs[len(prompt_ids):]
        results = [self._prompt_result(req, p, out) for p, out in zip(prompt_ids, fresh)]
        return GenerateResult(
            ref=req.ref,
            results=results,
            continued=[self._completions(out, c.generated_token_ids)[0]
                       for out, c in zip(continued, req.continuations)],
            policy_version=self.policy_version,
            elapsed_s=time.perf_counter() - started,
        )

    def _prompt_result(self, req: GenerateRequest, prompt_ids: list[int], out) -> PromptResult:
        completions = self._completions(out)
        prompt = out.prompt if isinstance(out.prompt, str) else None
        if prompt is None:
            prompt = self.tokenizer.decode(prompt_ids)
        return PromptResult(prompt=prompt, prompt_token_ids=prompt_ids, completions=completions)

    def _completions(self, out, before: list[int] = ()) -> list[Completion]:
        """The outputs of one request; ``before``: what the trajectory generated in
        earlier segments (a loop may start there)."""
        completions = []
        for c in out.outputs:
            token_ids = list(c.token_ids)
            logprobs = [entry[t].logprob for t, entry in zip(token_ids, c.logprobs)]
            text, finish = c.text, _finish_reason(c.finish_reason)
            # Checked on the finished output: vLLM decoded the loop to the end (no early
            # stop inside one generate call), the trajectory keeps only its first copies.
            token_ids, logprobs, cut = cut_at_repetition(token_ids, logprobs,
                                                         self.spec.repetition, before)
            if cut:
                text, finish = self.tokenizer.decode(token_ids), "repetition"
            completions.append(
                Completion(
                    token_ids=token_ids,
                    text=text,
                    logprobs=logprobs,
                    finish_reason=finish,
                    policy_version=self.policy_version,
                )
            )
        return completions

    def _require_policy(self) -> None:
        if self.policy_version == NO_POLICY:
            raise RuntimeError(
                "engine holds no complete policy (dummy weights, or the last weight update "
                "failed part-way): push a policy before generating"
            )

    def score(self, req: LogprobRequest) -> LogprobResult:
        """Log-probs the engine's current weights give to given responses (no sampling).

        Used to probe a weight sync: the same sequences scored before and after an
        update, and against the trainer's forward, catch a silently wrong load.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._require_policy()
        if len(req.prompt_token_ids) != len(req.response_token_ids):
            raise ValueError("prompt_token_ids and response_token_ids differ in length")
        if any(not p for p in req.prompt_token_ids):
            raise ValueError("every scored sequence needs a non-empty prompt")
        seqs = [list(p) + list(r) for p, r in zip(req.prompt_token_ids, req.response_token_ids)]
        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0)
        outs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=s) for s in seqs], params, use_tqdm=False
        )
        logprobs = []
        for p, seq, out in zip(req.prompt_token_ids, seqs, outs):
            # prompt_logprobs[i] scores seq[i] given seq[:i]; entry 0 is None.
            entries = out.prompt_logprobs[len(p):]
            logprobs.append([e[t].logprob for t, e in zip(seq[len(p):], entries)])
        return LogprobResult(logprobs=logprobs, policy_version=self.policy_version)

    # ------------------------------------------------------------------- weights
    def update_weights(self, manifest: WeightManifest) -> WeightUpdateResult:
        """Pull policy ``manifest.version`` into the running engine and reload in place."""
        if manifest.version <= self.policy_version:
            raise ValueError(
                f"stale weights: engine has version {self.policy_version}, "
                f"manifest carries {manifest.version}"
            )
        started = time.perf_counter()
        # Buckets are loaded as they arrive, so a failure part-way leaves a mix of two
        # policies in the engine: it holds no valid policy until a complete update.
        self.policy_version = NO_POLICY
        per_worker = self.llm.collective_rpc(
            "k1rl_update_weights", args=(manifest.model_dump(), self.transport_options)
        )
        if any(w["bytes"] != manifest.total_bytes for w in per_worker):
            raise RuntimeError(f"a worker received fewer than {manifest.total_bytes} bytes")
        # Cached KV blocks were computed by the old weights.
        self.llm.reset_prefix_cache()
        self.policy_version = manifest.version
        return WeightUpdateResult(
            version=manifest.version,
            bytes=manifest.total_bytes,
            transfer_s=max(w["transfer_s"] for w in per_worker),
            # time the update took beyond waiting for bytes: reload and bookkeeping
            load_s=time.perf_counter() - started - max(w["wait_s"] for w in per_worker),
            checksum_ok=(
                all(w["checksum_ok"] for w in per_worker) if _has_digests(manifest) else None
            ),
        )

    def shutdown(self) -> None:
        try:
            self.llm.collective_rpc("k1rl_close_transport")
        finally:
            llm_engine = getattr(self.llm, "llm_engine", None)
            if llm_engine is not None and hasattr(llm_engine, "engine_core"):
                llm_engine.engine_core.shutdown()
            del self.llm


def _has_digests(manifest: WeightManifest) -> bool:
    # a pipelined manifest carries no update digest: its buckets' digests are in stamps
    return bool(
        manifest.checksum
        or manifest.bucket_checksum
        or all(b.checksum for b in manifest.buckets)
    )


def _finish_reason(vllm_reason: str | None) -> str:
    # vLLM reports "stop" for EOS and stop strings, "length" at max_tokens, "abort" when
    # a request is cancelled; anything else is a vLLM change we should notice.
    if vllm_reason in ("stop", "length", "abort"):
        return vllm_reason
    raise ValueError(f"unexpected vLLM finish reason {vllm_reason!r}")
