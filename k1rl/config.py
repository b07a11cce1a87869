"""The run configuration: one typed, documented pydantic model per service, loaded from YAML.

Every field has a default and a description, so an empty file is a valid config and
``RunConfig.model_json_schema()`` documents every knob. Bad input fails at load time with
a :class:`ConfigError` naming the dotted field path, the value and the reason, e.g.
``trainer.tp: 0 — input should be greater than or equal to 1``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationInfo, field_validator, model_validator

from k1rl.curate.config import CurateConfig
from k1rl.data.sources import DataConfig
from k1rl.judge import JudgeConfig, TrainRMConfig
from k1rl.long2short.config import Long2ShortConfig
from k1rl.registry import LOSSES, SANDBOX_RUNNERS, import_plugins
from k1rl.rl_config import RLConfig
from k1rl.sft.config import SFTConfig
from k1rl.yaml_config import ConfigError, Section, parse_yaml_model

# tcp://host:port (host may be a name, an IPv4/IPv6 literal or * for "all interfaces"),
# or ipc://<path> for same-host services
_TCP_RE = re.compile(r"^tcp://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.*-]+):(\d{1,5})$")


def check_address(address: str) -> str:
    """Return ``address`` if it is ``tcp://host:port`` (port 1-65535) or ``ipc://path``."""
    if address.startswith("ipc://") and len(address) > len("ipc://"):
        return address
    m = _TCP_RE.match(address)
    if not m:
        raise ValueError("must look like tcp://host:port or ipc://path")
    if not 1 <= int(m.group(2)) <= 65535:
        raise ValueError(f"port {m.group(2)} is outside 1-65535")
    return address


class ServiceSection(Section):
    """A section for a service reachable over k1rl.rpc."""

    max_message_mib: int = Field(
        512, ge=1,
        description="Largest request this service accepts, in MiB: ZMQ drops a peer that "
        "sends a larger frame before it is decoded, and the service serves on; its clients "
        "refuse to send one.",
    )

    metrics_port: int | None = Field(
        None, ge=0, le=65535,
        description="Serve this service's Prometheus /metrics (requests, in-flight and "
        "queued calls per method) on this port, all interfaces; null: off.",
    )

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mib << 20

    @field_validator("address", check_fields=False)
    @classmethod
    def _address_form(cls, v: str) -> str:
        return check_address(v)


class ModelConfig(Section):
    path: str = Field(
        "artifacts/tiny-model",
        min_length=1,
        description="HF model directory (config.json, safetensors, tokenizer) of the initial "
        "policy; the trainer builds the Megatron model from it and vLLM serves it.",
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="Parameter and compute dtype of trainer and rollout. bfloat16 is "
        "megatron-core's mixed precision (bf16 parameters and activations, fp32 gradients "
        "and master weights), bf16 weight buckets and vLLM in bf16; checkpoints and exports "
        "are written in it. float32 is the CPU default: CPUs without AVX512-BF16 run bf16 "
        "3-30x slower (with it, bench/precision.py measured bf16 ~1.7x faster).",
    )


class TrainerConfig(ServiceSection):
    address: str = Field("tcp://127.0.0.1:5701", description="RPC address of trainer_svc.")
    tp: int = Field(1, ge=1, description="Megatron tensor-parallel size.")
    pp: int = Field(
        1, ge=1,
        description="Megatron pipeline-parallel stages (1F1B schedule); the model's layers "
        "are split equally, so they must be a multiple of pp.",
    )
    dp: int = Field(
        1, ge=1,
        description="Data-parallel replicas. The trainer runs tp x pp x dp ranks, launched "
        "by torchrun over `nnodes` nodes.",
    )
    distributed_optimizer: bool = Field(
        False,
        description="megatron-core's distributed optimizer: optimizer state and fp32 master "
        "weights sharded over the dp replicas (gradients reduce-scattered, parameters "
        "all-gathered).",
    )
    sequence_parallel: bool = Field(
        False,
        description="Megatron sequence parallelism (needs tp > 1): the tp ranks split the "
        "tokens of norms and residuals between the tensor-parallel layers, cutting their "
        "activation memory by tp; rows are padded to a multiple of tp.",
    )
    nnodes: int = Field(
        1, ge=1,
        description="Nodes (torchrun agents) the trainer's ranks span; tp x pp x dp must be "
        "a multiple. K1RL_NNODES overrides it (the k8s manifests set it).",
    )
    device: Literal["cpu", "cuda"] = Field("cpu", description="Device the trainer runs on.")
    dist_backend: Literal["gloo", "nccl"] = Field(
        "gloo",
        description="torch.distributed backend. cpu requires gloo; cuda normally uses nccl "
        "(gloo is allowed there for debugging).",
    )
    optimizer: Literal["adam", "sgd"] = Field(
        "adam",
        description="Optimizer of RL iterations, re-created at the start of each (k1.5 "
        "resets it). adam = AdamW, whose first step after a reset is ~lr*sign(gradient) on "
        "every parameter; sgd = plain SGD (no momentum), whose step follows the gradient, "
        "so with grad_clip it moves the weights by at most lr*grad_clip. SFT steps always "
        "use AdamW.",
    )
    lr: float = Field(1e-3, gt=0, description="Learning rate of RL iterations.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay.")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2.")
    grad_clip: float = Field(1.0, gt=0, description="Global gradient-norm clipping threshold.")
    seq_length: int = Field(
        512,
        ge=2,
        description="Training sequence length in tokens; SFT packs several examples into "
        "one sequence of this length (k1.5 'vanilla SFT' packing).",
    )
    micro_batch_tokens: int = Field(
        8192,
        ge=2,
        description="Upper bound on rows x width of one forward/backward pass; larger batches "
        "are split into micro-batches whose gradients accumulate.",
    )
    attention: Literal["sdpa", "megatron"] = Field(
        "sdpa",
        description="Core attention: torch scaled_dot_product_attention (fused kernels on CPU "
        "and CUDA, ~4x faster than megatron's local attention on CPU) or megatron-core's "
        "local DotProductAttention. Same function up to float rounding.",
    )
    loss: Any = Field(
        default_factory=lambda: LOSSES.config("mirror_descent"),
        description="RL loss: {name: <registered loss>, ...its parameters} (a bare name takes "
        "the defaults). Registered in trainer_svc/losses: mirror_descent (k1.5 eq. 3: tau, "
        "baseline), grpo, gspo, token_clip, dpo; policy-gradient losses take a 'mismatch' "
        "correction (TIS/MIS).",
    )
    optimizer_policy: Literal["reset", "keep", "reset_first_moment"] = Field(
        "reset",
        description="Optimizer state at the start of an RL iteration: reset (k1.5: fresh "
        "every iteration, so Adam's first step is ~lr*sign(gradient)), keep (Adam's moments "
        "carry across iterations, as in one long run), reset_first_moment (momentum zeroed, "
        "second moment kept). The first RL iteration after SFT steps always starts fresh.",
    )
    reference: Literal["trainer", "rollout"] = Field(
        "trainer",
        description="Log-probs of θ_i, the policy that generated the samples: the trainer's "
        "(its own forward pass for a one-step iteration, an extra no-grad pass otherwise) or "
        "the rollout engine's (no extra pass; the mismatch correction then has nothing to "
        "correct).",
    )
    minibatches_per_iteration: int = Field(
        1, ge=1, description="Optimizer steps per pass over an iteration's batch (k1.5 takes several)."
    )
    epochs_per_iteration: int = Field(
        1, ge=1, description="Passes over the iteration's batch; the optimizer is reset before."
    )
    segments: Literal["all", "latest", "recent"] = Field(
        "all",
        description="Tokens of partial-rollout trajectories in the loss: all segments, only "
        "the latest (generated by the current policy), or those at most max_segment_age "
        "policy versions old. The reference log-probs are always the trainer's, under θ_i.",
    )
    max_segment_age: int = Field(1, ge=0, description="Oldest segment age for 'recent'.")
    skip_uniform_groups: bool = Field(
        False,
        description="Leave out of the update the prompts whose k rewards are all equal (zero "
        "advantage: they add only the tau term, which is zero on an iteration's first step). "
        "Exact with one optimizer step per iteration, and it saves their compute.",
    )

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        moved = [k for k in ("tau", "baseline") if isinstance(data, dict) and k in data]
        if moved:
            raise ValueError(f"trainer.{moved[0]} moved into the loss section: "
                             f"trainer.loss: {{name: mirror_descent, {moved[0]}: ...}}")
        return data

    @field_validator("loss", mode="before")
    @classmethod
    def _registered_loss(cls, v: Any) -> Any:
        return LOSSES.config(v)

    @field_validator("dist_backend")
    @classmethod
    def _backend_fits_device(cls, v: str, info: ValidationInfo) -> str:
        if v == "nccl" and info.data.get("device") == "cpu":
            raise ValueError("nccl needs device 'cuda'; trainer.device is 'cpu' (use gloo)")
        return v

    @property
    def world_size(self) -> int:
        """Trainer ranks: tp x pp x dp."""
        return self.tp * self.pp * self.dp

    @model_validator(mode="after")
    def _ranks_fill_nodes(self) -> TrainerConfig:
        if self.world_size % self.nnodes:
            raise ValueError(f"trainer.nnodes: {self.nnodes} nodes cannot hold tp x pp x dp = "
                             f"{self.world_size} ranks equally")
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("trainer.sequence_parallel: sequence parallelism splits tokens "
                             "over the tensor-parallel ranks, so it needs trainer.tp > 1")
        if self.distributed_optimizer and self.optimizer != "adam":
            raise ValueError("trainer.distributed_optimizer: megatron's distributed optimizer "
                             f"shards Adam only, not trainer.optimizer {self.optimizer!r}")
        return self


class RepetitionConfig(Section):
    """The repetition detector (rollout_svc/repetition.py). Off by default: the thresholds
    depend on the task; the defaults flag no target of k1rl's task families."""

    enabled: bool = Field(False, description="Detect repetition and stop the trajectory there.")
    max_period: int = Field(32, ge=1, description="Longest repeating block, in tokens.")
    min_repeats: int = Field(8, ge=2, description="Copies of the block in a row to flag it.")
    min_span: int = Field(64, ge=2, description="...and at least this many tokens in all.")
    ngram: int = Field(20, ge=0, description="n of the recurring n-gram signal (0: off).")
    ngram_window: int = Field(400, ge=2, description="Tokens the n-gram signal looks back on.")
    ngram_max_count: int = Field(
        6, ge=2, description="Occurrences of one n-gram within the window that flag it.")

    @model_validator(mode="after")
    def _window_holds_the_ngrams(self) -> RepetitionConfig:
        if self.ngram and self.ngram_window < self.ngram * self.ngram_max_count:
            raise ValueError(f"ngram_window ({self.ngram_window}) must hold ngram_max_count "
                             f"({self.ngram_max_count}) n-grams of {self.ngram} tokens")
        return self


class RolloutConfig(ServiceSection):
    address: str = Field("tcp://127.0.0.1:5702", description="RPC address of rollout_svc.")
    addresses: list[str] = Field(
        default_factory=list,
        description="Every rollout engine: the sidecar updates them all from one publish, "
        "the master spreads each rollout over them. Empty: [address]. 'dns://HOST:PORT' "
        "stands for every address HOST resolves to (a Kubernetes headless service), "
        "resolved when a service starts.",
    )

    weight_transfer: Literal["auto", "native", "extension"] = Field(
        "auto",
        description="How vLLM workers take a new policy: native = vLLM's weight-transfer "
        "engine API with k1rl's receiver registered as backend 'k1rl' (vLLM's GPU worker); "
        "extension = k1rl's worker extension and reload_weights (any worker; vLLM's CPU "
        "worker has no weight-transfer engine); auto = native on cuda, extension on cpu.",
    )

    tp: int = Field(
        1, ge=1,
        description="vLLM tensor-parallel size: each engine runs tp workers (processes), and "
        "each worker pulls the weight update itself. On CPU each worker is bound to its "
        "share of this process's cores (VLLM_CPU_OMP_THREADS_BIND, unless set).",
    )

    def engine_addresses(self) -> list[str]:
        """``addresses`` (or ``[address]``) with dns:// entries resolved, in order."""
        from k1rl.balance import resolve_addresses

        return resolve_addresses(self.addresses or [self.address])
    device: Literal["cpu", "cuda"] = Field("cpu", description="Device vLLM runs on.")
    max_model_len: int = Field(
        512, ge=2, description="vLLM context length: prompt plus generated tokens."
    )
    kv_cache_gib: float = Field(
        1.0, gt=0, description="KV-cache size in GiB on CPU (sets VLLM_CPU_KVCACHE_SPACE)."
    )
    max_num_seqs: int = Field(
        256, ge=1,
        description="Sequences vLLM-CPU decodes at once (cpu only; CUDA keeps vLLM's "
        "default). A rollout of prompts x n samples above it runs in several waves; a "
        "decode step of a tiny model is mostly fixed overhead, so one wave is faster.")
    gpu_memory_utilization: float = Field(
        0.5, gt=0, le=1, description="Fraction of GPU memory vLLM may take (cuda only)."
    )
    enforce_eager: bool = Field(
        True, description="Disable CUDA graphs / compilation: faster engine start."
    )
    in_process: bool = Field(
        True,
        description="Run the vLLM engine core in the service process "
        "(VLLM_ENABLE_V1_MULTIPROCESSING=0): engine start 4-6 s instead of ~30 s on CPU, "
        "which matters for restart-per-iteration.",
    )
    n: int = Field(
        8, ge=1, description="k: samples per prompt (the group of the mirror-descent baseline)."
    )
    temperature: float = Field(1.0, ge=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus-sampling probability mass.")
    max_tokens: int = Field(
        64,
        ge=1,
        description="Output-token budget per trajectory per iteration (k1.5 partial rollouts: "
        "longer trajectories continue next iteration). Must be < max_model_len.",
    )

    max_response_tokens: int | None = Field(
        None, ge=2,
        description="k1.5 partial rollouts: a trajectory may grow to this many tokens over "
        "several iterations, max_tokens per iteration; one that reaches max_tokens earlier "
        "is parked in the replay buffer and continued next iteration. null: off, every "
        "trajectory ends at max_tokens.")
    replay_capacity: int = Field(
        4096, ge=1, description="Most unfinished trajectories the replay buffer holds; fresh "
        "prompts are admitted only while there is room.")
    repetition: RepetitionConfig = Field(
        default_factory=RepetitionConfig,
        description="Stop trajectories that loop; marked finish_reason 'repetition'.")

    @model_validator(mode="after")
    def _partial_budget(self) -> RolloutConfig:
        m = self.max_response_tokens
        if m is not None and not self.max_tokens < m < self.max_model_len:
            raise ValueError(f"max_response_tokens ({m}) must be above max_tokens "
                             f"({self.max_tokens}) and below max_model_len "
                             f"({self.max_model_len})")
        if m is not None and self.replay_capacity < self.n:
            raise ValueError(f"replay_capacity ({self.replay_capacity}) must hold a group "
                             f"of n={self.n} trajectories")
        return self

    @field_validator("max_tokens")
    @classmethod
    def _fits_context(cls, v: int, info: ValidationInfo) -> int:
        max_len = info.data.get("max_model_len")
        if max_len is not None and v >= max_len:
            raise ValueError(
                f"must be < rollout.max_model_len ({max_len}) to leave room for the prompt"
            )
        return v


class WeightSyncConfig(Section):
    transport: Literal["mooncake", "shm"] = Field(
        "mooncake",
        description="How the checkpoint engine moves weights trainer -> vLLM: Mooncake "
        "transfer engine (as in k1.5) or a same-host shared-memory segment.",
    )
    mooncake_protocol: Literal["tcp", "rdma"] = Field(
        "tcp", description="Mooncake transport protocol (rdma needs an HCA)."
    )
    host: str = Field(
        "127.0.0.1", min_length=1, description="Address the weight sender advertises to peers."
    )
    rdma_device: str = Field(
        "", description="Comma-separated RDMA HCA names for Mooncake; empty = auto-detect."
    )
    bucket_mb: int = Field(
        64, ge=1, description="Bucket size in MiB: weights are sent and loaded bucket by bucket."
    )
    verify: Literal["checksum", "none"] = Field(
        "checksum", description="Verify every weight sync with a checksum over all buckets."
    )
    pipelined: bool = Field(
        True,
        description="push_weights returns the manifest at once and packs on a thread; "
        "receivers pull each bucket as soon as it is packed (export overlaps transfer).",
    )


class RewardConfig(ServiceSection):
    address: str = Field("tcp://127.0.0.1:5703", description="RPC address of reward_svc.")
    length_penalty_weight: float = Field(
        0.1,
        ge=0,
        description="Weight of the k1.5 length reward added to the task reward "
        "(value not given by the report; 0 disables).",
    )
    length_penalty_warmup_iters: int = Field(
        0,
        ge=0,
        description="RL iterations trained without the length penalty before it switches on "
        "(k1.5 warm-up; switch point not given by the report).",
    )
    verify_timeout_s: float = Field(
        3.0,
        gt=0,
        description="Wall-clock limit for checking one non-integer answer with math-verify "
        "(sympy can hang on inputs like 10^{10^{10}}); past it the answer scores 0.",
    )
    answer_formats: list[Literal["boxed", "answer_is", "regex"]] = Field(
        default_factory=lambda: ["boxed", "answer_is"], min_length=1,
        description="Where a math response's final answer is, tried in order: the last "
        "\\boxed{...} (nested braces), the sentence after the last 'The answer is', or "
        "the last match of answer_regex.")
    answer_regex: str | None = Field(
        None, description="For answer_formats 'regex': a Python regex; its first group (or "
        "the whole match) is the answer.")
    repetition_penalty: float = Field(
        0.0, ge=0, description="A trajectory stopped for repetition (rollout.repetition) is "
        "wrong and its task reward is -repetition_penalty.")
    sandbox_address: str = Field(
        "tcp://127.0.0.1:5705", description="The sandbox service code rewards run programs on.")
    sandbox_addresses: list[str] = Field(
        default_factory=list,
        description="Sandbox replicas to spread programs over (empty: [sandbox_address]); "
        "'dns://HOST:PORT' is every address HOST resolves to, re-resolved every 10 s, so "
        "replicas an autoscaler adds receive work.")
    sandbox_in_flight: int = Field(
        4, ge=1, description="Programs one sandbox replica is sent at once (keep it at its "
        "workers); a request waits when every replica is full.")
    addresses: list[str] = Field(
        default_factory=list,
        description="reward_svc replicas the master scores on (empty: [address]); "
        "dns:// entries as for sandbox_addresses.")
    handler_threads: int = Field(
        4, ge=1, description="Score requests one reward_svc serves at once.")
    judge: JudgeConfig = Field(default_factory=JudgeConfig, description="The CoT reward "
                               "model (k1rl/judge.py): off, backing up or replacing a rule "
                               "verifier.")
    code_reward: Literal["all_pass", "fraction"] = Field(
        "all_pass",
        description="Code task reward: 1 when every test passes (k1.5), or the fraction passed.")
    code_concurrency: int = Field(
        4, ge=1, le=256,
        description="Code responses checked at once (keep >= the sandbox's workers).")
    code_timeout_s: float = Field(
        300.0, gt=0, description="Longest wait for the sandbox to judge one response.")

    @field_validator("sandbox_address")
    @classmethod
    def _sandbox_address(cls, v: str) -> str:
        return check_address(v)

    @model_validator(mode="after")
    def _answer_regex(self) -> RewardConfig:
        if ("regex" in self.answer_formats) != (self.answer_regex is not None):
            raise ValueError("answer_regex and the answer format 'regex' go together")
        if self.answer_regex is not None:
            try:
                groups = re.compile(self.answer_regex).groups
            except re.error as e:
                raise ValueError(f"answer_regex does not compile: {e}") from None
            if groups > 1:
                raise ValueError("answer_regex: at most one group (the answer)")
        return self


class CheckpointEngineConfig(ServiceSection):
    address: str = Field(
        "tcp://127.0.0.1:5704", description="RPC address of the checkpoint_engine sidecar."
    )
    engine_lifecycle: Literal["restart", "persistent", "external"] = Field(
        "restart",
        description="restart: halt vLLM after each rollout and start it again (k1.5, frees "
        "all memory); persistent: keep it running and reload weights in place; external: "
        "the engine is run by its deployment (the Kubernetes pod's rollout container), "
        "weights reload in place.",
    )


class SandboxConfig(ServiceSection):
    """The code-execution service (sandbox/): where it listens and how it isolates."""

    address: str = Field("tcp://127.0.0.1:5705", description="RPC (ZMQ) address of the sandbox.")
    http_port: int | None = Field(
        8080, ge=0, le=65535,
        description="Port of the JSON HTTP API (POST /run_code); 0 picks a free one, null "
        "serves ZMQ only.")
    http_host: str = Field("127.0.0.1", description="Interface the HTTP API listens on.")
    http_token_file: str | None = Field(
        None,
        description="File holding the bearer token POST /run_code requires (Authorization: "
        "Bearer TOKEN). Needed when http_host is not a loopback address; without one the "
        "API serves this machine only.",
    )
    workers: int = Field(2, ge=1, le=256, description="Programs run at once (one per core).")
    runner: str = Field(
        "bwrap",
        description="Runner by registry name (sandbox/runners.py). bwrap: bubblewrap "
        "namespaces + seccomp + rlimits (+ cgroups when writable), pre-warmed: ~6 ms over a "
        "bare run. podman: a podman/runc container per run (same seccomp rules, rlimits, "
        "container cgroup limits), ~0.25 s per run; needs root, podman, runc and a writable "
        "/sys/fs/cgroup. "
        "docker: a container per run through the Docker Engine API at docker_url (Docker, "
        "or podman's compatible socket), same rules as podman.")
    docker_url: str = Field(
        "unix:///var/run/docker.sock", min_length=1,
        description="Engine API the docker runner talks to: a Docker daemon's socket, or "
        "podman's (podman system service).")
    work_root: str = Field(
        "/tmp/k1rl-sandbox", min_length=1,
        description="Host directory for the pre-created per-worker work dirs.")
    uid_base: int = Field(
        61000, ge=1000, le=2**31 - 1024,
        description="Worker i runs programs as uid/gid uid_base + i: never root (root "
        "ignores RLIMIT_NPROC) and never shared between workers (the limit counts per uid).")
    scratch_mb: int = Field(64, ge=1, le=65536,
                            description="Size of the writable tmpfs a program runs in.")
    max_processes: int = Field(64, ge=1, description="Processes/threads per run (RLIMIT_NPROC, "
                                                     "and pids.max when a cgroup is writable).")
    max_open_files: int = Field(64, ge=8, description="RLIMIT_NOFILE per run.")
    use_cgroups: Literal["auto", "off"] = Field(
        "auto", description="auto: pids+memory cgroup per worker when /sys/fs/cgroup is "
                            "writable (v1 or v2); off: rlimits only.")
    prewarm: bool = Field(
        True, description="bwrap: set up each worker's next sandbox while its current "
        "program runs (sandbox/prewarm.py), so a run does not wait for namespaces and mounts.")
    compile_cache_entries: int = Field(
        512, ge=0, description="Compiled programs kept by source hash under work_root, "
        "shared by the workers (a program sent once per test compiles once); 0: off.")

    @field_validator("runner")
    @classmethod
    def _registered_runner(cls, v: str) -> str:
        return SANDBOX_RUNNERS.check(v)

    @model_validator(mode="after")
    def _reachable_api_needs_a_token(self) -> SandboxConfig:
        from k1rl.auth import is_loopback

        if self.http_port is not None and self.http_token_file is None \
                and not is_loopback(self.http_host):
            raise ValueError(f"sandbox.http_token_file: the HTTP API on {self.http_host!r} is "
                             "reachable from other machines; give it a bearer token file "
                             "(or listen on 127.0.0.1)")
        return self


_SERVICES = ("trainer", "rollout", "reward", "checkpoint_engine", "sandbox")


class ParityConfig(Section):
    """Trainer and rollout engine must give the same log-probs to the same tokens: a
    conversion slip (a dropped bias, a RoPE variant, a tied head) shows here first."""

    check_first_iteration: bool = Field(
        True,
        description="Before the first RL iteration trains, score some of its samples with the "
        "trainer and stop the run if they disagree with the engine's log-probs beyond the "
        "thresholds (`k1rl doctor` runs the same check on its own).",
    )
    samples: int = Field(32, ge=1, description="Samples of the first iteration compared.")
    mean_abs_diff: float | None = Field(
        None, gt=0, description="Largest mean |log-prob difference| per token; null: the "
        "model dtype's default (k1rl/parity.py).")
    max_abs_diff: float | None = Field(
        None, gt=0, description="Largest |log-prob difference| of any token; null: the "
        "model dtype's default.")


class CallPolicy(Section):
    """How the master waits on its services: a long call is watched through the service's
    ping, so a dead service is noticed in seconds rather than at the call's timeout."""

    timeout_s: float = Field(
        900.0, gt=0, description="Longest a call may take (a train step, a rollout).")
    ping_every_s: float = Field(
        2.0, gt=0, description="While a call runs, the service is pinged this often.")
    misses: int = Field(
        3, ge=1, description="Missed pings in a row after which the service counts as gone.")
    restart_wait_s: float = Field(
        300.0, ge=0,
        description="After a service is gone, how long a call that is safe to repeat (a "
        "score, log-probs) waits for it to answer again (restarted by its launcher or the "
        "kubelet) before it is re-sent; 0: fail at once.")
    max_recoveries: int = Field(
        3, ge=0,
        description="How many times one iteration is redone from the last completed one "
        "after a service died in it (k1rl/master/recovery.py) before the run stops.")
    max_restarts: int = Field(
        5, ge=0,
        description="Services run on this machine (`k1rl rl`): how many times the launcher "
        "restarts each one that exits on its own.")


class RunConfig(Section):
    plugins: list[str] = Field(
        default_factory=list,
        description="Python modules imported before the rest of the config is validated, in "
        "every process: where your own losses, verifiers or samplers register themselves.",
    )
    run_id: str = Field("k1rl", min_length=1, description="Name of the run; tags messages.")
    seed: int = Field(0, ge=0, description="Global random seed.")
    run_dir: str = Field(
        "runs/default", min_length=1, description="Directory for checkpoints, logs and metrics."
    )
    model: ModelConfig = Field(default_factory=ModelConfig, description="The policy model.")
    trainer: TrainerConfig = Field(default_factory=TrainerConfig, description="trainer_svc.")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="rollout_svc.")
    weights: WeightSyncConfig = Field(
        default_factory=WeightSyncConfig, description="Weight sync trainer -> rollout."
    )
    reward: RewardConfig = Field(default_factory=RewardConfig, description="reward_svc.")
    checkpoint_engine: CheckpointEngineConfig = Field(
        default_factory=CheckpointEngineConfig, description="The checkpoint-engine sidecar."
    )
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig,
                                   description="Code execution for code rewards.")
    rl: RLConfig = Field(default_factory=RLConfig, description="The master's RL loop.")
    data: DataConfig = Field(default_factory=DataConfig,
                             description="Your datasets (k1rl/data/sources.py).")
    sft: SFTConfig = Field(default_factory=SFTConfig,
                           description="`k1rl sft`: its rows and schedule (k1rl/sft/).")
    curate: CurateConfig = Field(default_factory=CurateConfig,
                                 description="`k1rl curate`: the RL prompt set (k1rl/curate/).")
    reward_model: TrainRMConfig = Field(
        default_factory=TrainRMConfig,
        description="`k1rl train-rm`: the CoT reward model's training (k1rl/judge.py).")
    long2short: Long2ShortConfig = Field(
        default_factory=Long2ShortConfig,
        description="Shortest rejection sampling, DPO, the RL preset (k1rl/long2short/).")
    parity: ParityConfig = Field(default_factory=ParityConfig,
                                 description="Trainer vs engine log-prob agreement.")
    calls: CallPolicy = Field(default_factory=CallPolicy,
                              description="Timeouts and liveness of the master's calls.")

    @model_validator(mode="before")
    @classmethod
    def _import_plugins(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("plugins"), list):
            import_plugins([str(m) for m in data["plugins"]])
        return data

    @model_validator(mode="after")
    def _one_prompt_set(self) -> RunConfig:
        pools = len(self.data.train)
        if pools and self.rl.tasks is not None:
            raise ValueError("rl.tasks: the prompts come from data.train; drop rl.tasks "
                             "(synthetic levels) or data.train")
        if not pools and self.rl.tasks is None:
            self.rl.tasks = ["add:2"]
        weights = self.rl.task_weights
        if pools and weights is not None and len(weights) != pools:
            raise ValueError(f"rl.task_weights: {len(weights)} weights for {pools} "
                             "data.train sources")
        return self

    @model_validator(mode="after")
    def _schedule_fits_rollout(self) -> RunConfig:
        budgets, r = self.rl.schedule.budgets(), self.rollout
        if budgets and r.max_response_tokens is not None:
            raise ValueError("rl.schedule: a token budget per phase needs partial rollouts off "
                             "(rollout.max_response_tokens sets the segment budget)")
        if budgets and max(budgets) > r.max_tokens:
            raise ValueError(f"rl.schedule: max_tokens {max(budgets)} is above "
                             f"rollout.max_tokens ({r.max_tokens}), the run's largest budget")
        return self

    @model_validator(mode="after")
    def _trajectories_fit_a_row(self) -> RunConfig:
        if self.trainer.seq_length < self.rollout.max_model_len:
            raise ValueError(
                f"trainer.seq_length: {self.trainer.seq_length} is below rollout.max_model_len "
                f"({self.rollout.max_model_len}): a trajectory (prompt + response) of up to "
                "max_model_len tokens must fit one training row: raise trainer.seq_length or "
                "lower rollout.max_model_len")
        return self

    @model_validator(mode="after")
    def _distinct_addresses(self) -> RunConfig:
        seen: dict[str, str] = {}
        for name in _SERVICES:
            addr = getattr(self, name).address
            if addr in seen:
                raise ValueError(f"{name}.address: {addr!r} — same as {seen[addr]}.address")
            seen[addr] = name
        return self

    @classmethod
    def from_yaml_text(cls, text: str, source: str = "<text>",
                       overrides: Sequence[str] = ()) -> RunConfig:
        """Parse and validate YAML text, with ``dotted.key=value`` overrides applied to it
        first; raise ConfigError naming every bad field."""
        return parse_yaml_model(cls, text, source, overrides)

    def dump_yaml(self) -> str:
        """YAML text that loads back to an equal RunConfig."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Load a RunConfig from a YAML file, with ``dotted.key=value`` overrides (``--set``);
    raise ConfigError naming what was wrong."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(str(p), [f"cannot read file: {e.strerror or e}"]) from e
    return RunConfig.from_yaml_text(text, source=str(p), overrides=overrides)
