"""The rollout engine: one vLLM ``LLM`` that samples k completions per prompt with logprobs.

vLLM is imported lazily because its process model is configured through environment
variables that must be set before the first import (see ``configure_vllm_env``).
This module and ``worker_ext`` are the only places that know vLLM's API.

GPU path: ``device="cuda"`` selects CUDA vLLM with ``gpu_memory_utilization``; it is
written against the same API but cannot be exercised on the CPU development machines.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from k1rl.config import RepetitionConfig
from k1rl.protocol import (
    Completion,
    EngineInfo,
    EngineInfoRequest,
    GenerateRequest,
    GenerateResult,
    LogprobRequest,
    LogprobResult,
    PromptResult,
    WeightManifest,
    WeightUpdateResult,
)
from rollout_svc.repetition import SegmentWatch

log = logging.getLogger(__name__)

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
    # vLLM tensor parallelism: tp worker processes, each pulling the weight update
    tp: int = 1
    # "dummy" starts with random weights that the trainer then pushes (k1.5 restart mode)
    load_format: str = "auto"
    seed: int = 0
    # trajectories that loop are cut where the loop is established (finish "repetition")
    repetition: RepetitionConfig = field(default_factory=RepetitionConfig)
    # "native": vLLM's weight-transfer engine API (backend "k1rl"); "extension": the
    # worker extension's reload_weights; "auto": native on cuda
    weight_transfer: str = "auto"

    @property
    def native_transfer(self) -> bool:
        if self.weight_transfer == "native" and self.device != "cuda":
            raise ValueError("rollout.weight_transfer native needs vLLM's GPU worker: its CPU "
                             "worker runs no weight-transfer engine (use extension)")
        return self.weight_transfer == "native" or (
            self.weight_transfer == "auto" and self.device == "cuda")


def configure_vllm_env(spec: EngineSpec) -> None:
    """Set the process-wide knobs vLLM reads at import time."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # In-process engine: starts in ~5 s instead of ~30 s on CPU, which matters when
    # the engine is restarted every iteration, and lets the worker extension share
    # this process's transports.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if spec.in_process else "1"
    if spec.device == "cpu":
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, int(round(spec.kv_cache_gib))))
        if spec.tp > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_binding(
                sorted(os.sched_getaffinity(0)), spec.tp)
    envs = sys.modules.get("vllm.envs")
    if envs is not None:  # an engine started before in this process froze vLLM's env reads
        envs.disable_envs_cache()


def cpu_binding(cores: Sequence[int], tp: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for ``tp`` CPU workers: the cores in ``tp`` equal runs.
    vLLM's "auto" binds one worker per NUMA node, so it refuses tp > 1 on one socket."""
    if len(cores) < tp:
        raise ValueError(f"rollout.tp={tp} needs a core per worker; this process may use "
                         f"{len(cores)} ({list(cores)})")
    share = len(cores) // tp
    return "|".join(",".join(str(c) for c in cores[k * share:(k + 1) * share])
                    for k in range(tp))


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
            tensor_parallel_size=spec.tp,
        )
        if spec.tp > 1:  # worker processes, whatever in_process says of the engine core
            kwargs["distributed_executor_backend"] = "mp"
        if spec.native_transfer:
            from vllm.config import WeightTransferConfig

            from rollout_svc.weight_transfer import BACKEND

            kwargs["weight_transfer_config"] = WeightTransferConfig(backend=BACKEND)
        self._transfer_initialised = False
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
        self._batches = 0  # makes request ids unique across generate calls

    # ------------------------------------------------------------------ sampling
    def generate(self, req: GenerateRequest) -> GenerateResult:
        """Sample ``sampling.n`` completions of every prompt and continue every parked
        trajectory by one more segment, all in one batch: vLLM schedules them together,
        so short new prompts fill the engine while long ones go on."""
        from vllm import SamplingParams

        self._require_policy()
        s = req.sampling
        n_prompts = len(req.prompt_token_ids if req.prompt_token_ids is not None
                        else req.prompts or [])
        log.info("generate: %d prompts x %d, %d continuations, policy v%d",
                 n_prompts, s.n, len(req.continuations), self.policy_version)
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

        def params(max_tokens: int, seed: int | None) -> SamplingParams:
            return SamplingParams(temperature=s.temperature, top_p=s.top_p,
                                  max_tokens=max_tokens, stop=s.stop or None, seed=seed,
                                  logprobs=0)  # the sampled token's logprob only

        # One vLLM request per trajectory (not n per request) so that one looping sample
        # can be stopped alone. Sample j of a seeded prompt gets seed + j, the seed vLLM's
        # own fan-out of n gives it, so the streams are the ones n would draw.
        seeded = (lambda j: None) if s.seed is None else (lambda j: s.seed + j)
        fresh = [_Run(p, params(s.max_tokens, seeded(j))) for p in prompt_ids for j in range(s.n)]
        # a continuation gets its own seed: seeded requests draw the same stream
        continued = [_Run(p, params(c.max_tokens, seeded(1 + i) if c.seed is None else c.seed),
                          c.generated_token_ids)
                     for i, (p, c) in enumerate(zip(prefixes, req.continuations))]
        started = time.perf_counter()
        # parked trajectories first: when the batch exceeds the engine's slots, vLLM admits
        # in arrival order, so they resume at once and fresh prompts fill the slots left
        # and those freed as short ones finish
        self._decode(continued + fresh)
        results = [
            PromptResult(prompt=self.tokenizer.decode(p), prompt_token_ids=p,
                         completions=[self._completion(r) for r in fresh[k * s.n:(k + 1) * s.n]])
            for k, p in enumerate(prompt_ids)
        ]
        return GenerateResult(
            ref=req.ref,
            results=results,
            continued=[self._completion(r) for r in continued],
            policy_version=self.policy_version,
            elapsed_s=time.perf_counter() - started,
            decoded_tokens=sum(r.decoded for r in continued + fresh),
        )

    def _decode(self, runs: list[_Run]) -> None:
        """Step the engine until every run has finished, been cut at a repetition, or
        failed; the engine is left with none of them on any exit."""
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        engine = self.llm.llm_engine
        watch = self.spec.repetition.enabled
        # Watching a trajectory needs its tokens as they come (DELTA); otherwise one
        # output per request at its end is cheaper.
        kind = RequestOutputKind.DELTA if watch else RequestOutputKind.FINAL_ONLY
        self._batches += 1
        by_id: dict[str, _Run] = {}
        try:
            for i, run in enumerate(runs):
                run.params.output_kind = kind
                if watch:
                    run.watch(self.spec.repetition)
                    if run.finish is not None:
                        continue  # looped in its earlier segments: nothing to decode
                request_id = f"k1rl-{self._batches}-{i}"
                by_id[request_id] = run
                engine.add_request(request_id, TokensPrompt(prompt_token_ids=run.prompt),
                                   run.params)
            while engine.has_unfinished_requests():
                for out in engine.step():
                    run = by_id.get(out.request_id)
                    if run is None or run.finish is not None:
                        continue  # not ours, or already cut
                    c = out.outputs[0]
                    if run.take(list(c.token_ids), c.logprobs, c.text):
                        # the loop is established: stop decoding it now, not at max_tokens
                        if not out.finished:
                            engine.abort_request([out.request_id])
                    elif out.finished:
                        run.finish = _finish_reason(c.finish_reason)
        finally:
            unfinished = [rid for rid, run in by_id.items() if run.finish is None]
            if unfinished:
                engine.abort_request(unfinished)
                # drain the aborts so the next batch starts on an empty engine
                while engine.has_unfinished_requests():
                    engine.step()

    def _completion(self, run: _Run) -> Completion:
        text = run.text if run.finish != "repetition" else self.tokenizer.decode(run.token_ids)
        return Completion(token_ids=run.token_ids, text=text, logprobs=run.logprobs,
                          finish_reason=run.finish, policy_version=self.policy_version)

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

    def info(self, req: EngineInfoRequest) -> EngineInfo:
        """The model, dtype and stop tokens as vLLM resolved them from the checkpoint."""
        model_config = self.llm.llm_engine.model_config
        eos = model_config.try_get_generation_config().get("eos_token_id")
        eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        return EngineInfo(
            model_type=model_config.hf_config.model_type,
            dtype=str(model_config.dtype).removeprefix("torch."),
            max_model_len=model_config.max_model_len,
            eos_token_id=self.tokenizer.eos_token_id,
            generation_eos_token_ids=eos_ids,
            has_chat_template=bool(getattr(self.tokenizer, "chat_template", None)),
            policy_version=self.policy_version,
        )

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
        if self.spec.native_transfer:
            per_worker = self._native_update(manifest)
        else:
            per_worker = self.llm.collective_rpc(
                "k1rl_update_weights", args=(manifest.model_dump(), self.transport_options))
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

    def _native_update(self, manifest: WeightManifest) -> list[dict]:
        """The update through vLLM's own weight-transfer lifecycle (backend "k1rl")."""
        rpc = self.llm.collective_rpc
        if not self._transfer_initialised:
            rpc("init_weight_transfer_engine",
                args=({"transport": manifest.transport, "options": self.transport_options},))
            self._transfer_initialised = True
        rpc("start_weight_update")
        rpc("update_weights", args=({"manifest": manifest.model_dump()},))
        rpc("finish_weight_update")
        return rpc("k1rl_native_stats")

    def shutdown(self) -> None:
        try:
            self.llm.collective_rpc("k1rl_close_transport")
            if self._transfer_initialised:
                self.llm.collective_rpc("shutdown_weight_transfer_engine")
        finally:
            llm_engine = getattr(self.llm, "llm_engine", None)
            if llm_engine is not None and hasattr(llm_engine, "engine_core"):
                llm_engine.engine_core.shutdown()
            del self.llm


class _Run:
    """One trajectory's request in a decode batch, and what the engine returned for it."""

    def __init__(self, prompt: list[int], params: Any, before: Sequence[int] = ()) -> None:
        self.prompt, self.params, self.before = prompt, params, before
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.text = ""
        self.finish: str | None = None
        self.decoded = 0  # tokens the engine produced for it, cut ones included
        self._watch: SegmentWatch | None = None

    def watch(self, cfg: RepetitionConfig) -> None:
        self._watch = SegmentWatch(cfg, self.before)
        if self._watch.cut == 0:
            self.finish = "repetition"

    def take(self, token_ids: list[int], logprobs: Any, text: str) -> bool:
        """Append the engine's output (new tokens when watched, all of them otherwise);
        True when it completes a loop, which cuts the trajectory there."""
        self.decoded += len(token_ids)
        self.token_ids += token_ids
        self.logprobs += [entry[t].logprob for t, entry in zip(token_ids, logprobs)]
        self.text += text
        keep = self._watch.feed(token_ids) if self._watch is not None else None
        if keep is None:
            return False
        del self.token_ids[keep:], self.logprobs[keep:]
        self.finish = "repetition"
        return True


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
