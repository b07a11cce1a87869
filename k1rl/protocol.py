"""Typed messages exchanged between k1rl services.

Every message is a pydantic model with a literal ``kind`` tag, so a receiver can
validate a payload against exactly one schema and a wrong message never gets
half-interpreted. Services share nothing else: swapping an implementation means
speaking these messages.
"""

from __future__ import annotations

import base64

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Weight buffers are carved into tensors at this alignment so any dtype view is
# aligned and a receiver can map tensors in place without copying.
WEIGHT_ALIGNMENT = 256

SUPPORTED_DTYPES = ("float32", "bfloat16", "float16", "int64", "int32", "uint8")

# Per-field limits: a request within the services' frame limit can still name absurd
# sizes; these are refused by validation, with the field named, before any work.
NAME_LIMIT = 256  # run ids, receiver names
TOKEN_LIMIT = 1 << 20  # tokens one request may ask to generate per trajectory


class Message(BaseModel):
    """Base of all wire messages: unknown fields are an error, not silently dropped."""

    model_config = ConfigDict(extra="forbid", frozen=False)


class RunRef(Message):
    """Which run and iteration a message belongs to (carried by every loop message)."""

    run_id: str = Field("default", max_length=NAME_LIMIT)
    iteration: int = Field(0, ge=0)


# --------------------------------------------------------------------------- health


class Ping(Message):
    kind: Literal["ping"] = "ping"


class Pong(Message):
    kind: Literal["pong"] = "pong"
    service: str
    pid: int
    # one per server start: a caller watching a long call tells a restarted service (which
    # lost the call) from the one it called, whatever pid a container gives it
    instance: str = ""
    uptime_s: float
    ready: bool = True
    detail: dict[str, str | int | float | bool] = Field(default_factory=dict)


class ErrorReply(Message):
    """A failure travelling back to the caller, re-raised there as a typed exception
    (the traceback stays in the server's log)."""

    kind: Literal["error"] = "error"
    error_type: str
    message: str


# ------------------------------------------------------------------------ rollout


FinishReason = Literal["stop", "length", "abort", "repetition"]


class SamplingSpec(Message):
    n: int = Field(1, ge=1, le=1024)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(64, ge=1, le=TOKEN_LIMIT)
    stop: list[str] = Field(default_factory=list, max_length=64)
    seed: int | None = None


class Continuation(Message):
    """A parked trajectory to go on with (k1.5 partial rollouts): one sample continuing
    from its prompt plus the tokens generated so far, for at most ``max_tokens`` more."""

    prompt_token_ids: list[int] = Field(min_length=1)
    generated_token_ids: list[int] = Field(default_factory=list)
    max_tokens: int = Field(ge=1, le=TOKEN_LIMIT)
    seed: int | None = Field(
        None, description="Its sampling seed; None: sampling.seed + 1 + its index in the "
        "request (a request split over engines pins it, so any engine draws the same stream).")


class GenerateRequest(Message):
    """Prompts as text or as token ids (at most one form; k = ``sampling.n`` samples
    each), and/or continuations of parked trajectories, all decoded in one batch."""

    kind: Literal["generate_request"] = "generate_request"
    ref: RunRef = Field(default_factory=RunRef)
    prompts: list[str] | None = None
    prompt_token_ids: list[list[int]] | None = None
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    continuations: list[Continuation] = Field(default_factory=list)

    @model_validator(mode="after")
    def _exactly_one_prompt_form(self) -> GenerateRequest:
        if self.prompts is not None and self.prompt_token_ids is not None:
            raise ValueError("give at most one of 'prompts' or 'prompt_token_ids'")
        if not (self.prompts or self.prompt_token_ids or self.continuations):
            raise ValueError("the request has no prompts")
        return self


class Completion(Message):
    token_ids: list[int]
    text: str
    # log-prob of each sampled token under the policy that produced it
    logprobs: list[float]
    finish_reason: FinishReason
    policy_version: int

    @model_validator(mode="after")
    def _aligned(self) -> Completion:
        if len(self.logprobs) != len(self.token_ids):
            raise ValueError(
                f"{len(self.logprobs)} logprobs for {len(self.token_ids)} tokens"
            )
        return self


class PromptResult(Message):
    prompt: str
    prompt_token_ids: list[int]
    completions: list[Completion]


class EngineInfoRequest(Message):
    kind: Literal["engine_info_request"] = "engine_info_request"


class StartEngine(Message):
    """To a rollout_svc on standby (vLLM imported, no engine yet): create the engine."""

    kind: Literal["start_engine"] = "start_engine"


class Ack(Message):
    kind: Literal["ack"] = "ack"


class EngineInfo(Message):
    """What the running engine serves and when it stops, as vLLM itself resolved them."""

    kind: Literal["engine_info"] = "engine_info"
    model_type: str
    dtype: str
    max_model_len: int
    eos_token_id: int | None  # the tokenizer's, which vLLM always stops on
    # generation_config.json's eos_token_id(s), which vLLM adds as stop tokens
    generation_eos_token_ids: list[int]
    has_chat_template: bool
    policy_version: int

    @property
    def stop_token_ids(self) -> list[int]:
        """Every token id a response ends on."""
        return sorted({self.eos_token_id, *self.generation_eos_token_ids} - {None})


class GenerateResult(Message):
    kind: Literal["generate_result"] = "generate_result"
    ref: RunRef = Field(default_factory=RunRef)
    results: list[PromptResult]
    # one per request continuation, in order: the newly generated tokens only
    continued: list[Completion] = Field(default_factory=list)
    policy_version: int
    elapsed_s: float = 0.0
    # tokens the engine decoded, including those past a repetition cut: what looping
    # trajectories cost beyond what they return
    decoded_tokens: int = 0


# ------------------------------------------------------------------------ weights


class TensorMeta(Message):
    """Where one HF-named tensor lives inside a bucket of a flat weight buffer."""

    name: str
    dtype: Literal["float32", "bfloat16", "float16", "int64", "int32", "uint8"]
    shape: list[int]
    bucket: int = Field(ge=0)
    offset: int = Field(ge=0, description="byte offset inside its bucket, 256-aligned")
    nbytes: int = Field(ge=0)

    @model_validator(mode="after")
    def _aligned(self) -> TensorMeta:
        if self.offset % WEIGHT_ALIGNMENT:
            raise ValueError(f"offset {self.offset} of {self.name} is not {WEIGHT_ALIGNMENT}-aligned")
        return self


class BucketMeta(Message):
    index: int = Field(ge=0)
    nbytes: int = Field(ge=0)
    # offset of the bucket inside the sender's registered region
    offset: int = Field(ge=0)
    # "<algorithm>:<hex>" of this bucket's bytes, so each bucket is verified on arrival
    checksum: str | None = None


class WeightManifest(Message):
    """Everything a receiver needs to pull policy ``version`` bucket by bucket."""

    kind: Literal["weight_manifest"] = "weight_manifest"
    version: int = Field(ge=0)
    transport: str
    # transport-specific address of the sender: "host:port" for Mooncake, a
    # shared-memory segment name for shm
    endpoint: str
    base_addr: int = Field(0, ge=0, description="sender's registered region start")
    buckets: list[BucketMeta]
    tensors: list[TensorMeta]
    checksum: str | None = Field(None, description="hex digest over all bucket bytes")
    # Pipelined publish: the sender hands the manifest out while it still packs. Each
    # bucket then has a ready stamp (version, state, digest) at ready_offset + 64 * index
    # of the sender's region, which receivers poll before pulling the bucket; the stamps
    # carry bucket_checksum digests, as the manifest cannot. None: every bucket is packed.
    ready_offset: int | None = Field(None, ge=0)
    bucket_checksum: str | None = Field(None, description="algorithm of stamp digests")

    @property
    def total_bytes(self) -> int:
        return sum(b.nbytes for b in self.buckets)


class WeightUpdateResult(Message):
    kind: Literal["weight_update_result"] = "weight_update_result"
    version: int
    bytes: int
    transfer_s: float
    load_s: float
    checksum_ok: bool | None = None


# -------------------------------------------------------------------------- train


class SFTExample(Message):
    """A token sequence split into context (no loss) and the part learned from; in a
    multi-turn conversation ``response_mask`` keeps the loss on the assistant's tokens."""

    prompt_token_ids: list[int] = Field(min_length=1)
    response_token_ids: list[int] = Field(min_length=1)
    response_mask: list[bool] | None = Field(
        None, description="Per response token: learned from (True) or context (False); "
        "None: every response token.")

    @model_validator(mode="after")
    def _mask_fits(self) -> SFTExample:
        if self.response_mask is not None:
            if len(self.response_mask) != len(self.response_token_ids):
                raise ValueError(f"response_mask has {len(self.response_mask)} entries for "
                                 f"{len(self.response_token_ids)} response tokens")
            if not any(self.response_mask):
                raise ValueError("response_mask leaves no token to learn from")
        return self


class SFTBatch(Message):
    kind: Literal["sft_batch"] = "sft_batch"
    ref: RunRef = Field(default_factory=RunRef)
    examples: list[SFTExample] = Field(min_length=1)
    lr: float | None = Field(
        None, gt=0, description="Learning rate for this step (an SFT schedule); None keeps it."
    )
    seq_length: int | None = Field(
        None, ge=2, description="Packed row length for this step (a stage of a staged "
        "schedule); None: trainer.seq_length.")


class TrainSample(Message):
    """One trajectory of a group of k samples for the same prompt.

    A trajectory generated over several iterations (partial rollouts) carries, per
    response token, the segment it came from (0, 1, ...) and the policy version that
    produced it; without them every token is segment 0 of ``policy_version``.
    """

    group_id: int
    prompt_token_ids: list[int]
    response_token_ids: list[int]
    rollout_logprobs: list[float]
    reward: float
    policy_version: int
    token_segments: list[int] | None = None
    token_versions: list[int] | None = None

    @model_validator(mode="after")
    def _per_token(self) -> TrainSample:
        n = len(self.response_token_ids)
        for name in ("token_segments", "token_versions"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"{name}: {len(value)} entries for {n} response tokens")
        return self


class TrainBatch(Message):
    kind: Literal["train_batch"] = "train_batch"
    ref: RunRef = Field(default_factory=RunRef)
    samples: list[TrainSample] = Field(min_length=1)


class LogprobRequest(Message):
    kind: Literal["logprob_request"] = "logprob_request"
    prompt_token_ids: list[list[int]]
    response_token_ids: list[list[int]]


class LogprobResult(Message):
    kind: Literal["logprob_result"] = "logprob_result"
    logprobs: list[list[float]]
    policy_version: int


class PushWeightsRequest(Message):
    """Ask the trainer to export its current policy and publish it for receivers."""

    kind: Literal["push_weights"] = "push_weights"
    ref: RunRef = Field(default_factory=RunRef)
    receivers: list[str] = Field(
        default_factory=list, max_length=4096,
        description="Who will pull this publish (e.g. engine addresses). The trainer writes "
        "its weight region again only after each has been released (ReleaseWeights).")
    abandon_readers: bool = Field(
        False, description="Sent by a sidecar that (re)started: receivers of an earlier "
        "publish that nobody is left to release are declared dead (a read of theirs still "
        "running fails its checksums).")


class ReleaseWeights(Message):
    """A receiver of a publish is done with it, or (``dead``) will never say so."""

    kind: Literal["release_weights"] = "release_weights"
    version: int = Field(ge=0)
    receiver: str = Field(max_length=NAME_LIMIT)
    dead: bool = False


class WeightReaders(Message):
    """The receivers of publish ``version`` that have not released it yet."""

    kind: Literal["weight_readers"] = "weight_readers"
    version: int
    pending: list[str]


class RoundTripRequest(Message):
    """Ask the trainer to export the weights it loaded (HF -> Megatron -> HF) and compare
    every tensor with its checkpoint's, bit for bit (before any training step)."""

    kind: Literal["roundtrip_request"] = "roundtrip_request"


class RoundTripResult(Message):
    kind: Literal["roundtrip_result"] = "roundtrip_result"
    model_type: str
    parameters: int
    tensors: int
    exact: bool
    mismatched: list[str] = Field(default_factory=list)  # the first few, by name
    max_abs_diff: float


class CheckpointRequest(Message):
    kind: Literal["checkpoint_request"] = "checkpoint_request"
    action: Literal["save", "load", "export_hf"]
    path: str = Field(min_length=1, max_length=4096)


class CheckpointResult(Message):
    kind: Literal["checkpoint_result"] = "checkpoint_result"
    path: str
    policy_version: int


class TrainStats(Message):
    kind: Literal["train_stats"] = "train_stats"
    ref: RunRef = Field(default_factory=RunRef)
    policy_version: int
    steps: int
    loss: float
    metrics: dict[str, float] = Field(default_factory=dict)


# ------------------------------------------------------------------------ rewards


class RewardItem(Message):
    group_id: int
    response: str
    answer: str
    prompt: str = Field("", max_length=1 << 20, description="The problem as the policy read "
                        "it (a generative judge reads it; rule verifiers do not).")
    response_tokens: int = Field(ge=0)
    verifier: str = Field("math", min_length=1, description="registry name of the verifier")
    repeated: bool = Field(False, description="stopped for repetition (finish_reason): "
                                              "wrong, and reward.repetition_penalty applies")


class RewardRequest(Message):
    kind: Literal["reward_request"] = "reward_request"
    ref: RunRef = Field(default_factory=RunRef)
    items: list[RewardItem]
    length_penalty_weight: float | None = Field(
        None, ge=0, description="This request's length-penalty weight (the master's "
        "rl.schedule); null: the reward service's own, after its warm-up.")


class RewardResult(Message):
    """Per item: rewards[i] = task_rewards[i] + length_penalty_weight * length_rewards[i]."""

    kind: Literal["reward_result"] = "reward_result"
    rewards: list[float]
    correct: list[bool]
    # The components, so the loop can log them; empty when a scorer does not report them.
    task_rewards: list[float] = Field(default_factory=list)
    length_rewards: list[float] = Field(default_factory=list, description="unweighted")
    length_penalty_weight: float = Field(0.0, description="weight applied (0 during warm-up)")
    # per item, "" when judged; else why it could not be (e.g. the code sandbox failed):
    # such an item is neither right nor wrong and must not be trained on
    errors: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _components_aligned(self) -> RewardResult:
        for name in ("task_rewards", "length_rewards", "errors"):
            n = len(getattr(self, name))
            if n and n != len(self.rewards):
                raise ValueError(f"{n} {name} for {len(self.rewards)} rewards")
        return self


# ------------------------------------------------------------------------ sandbox

Verdict = Literal[
    "accepted",
    "wrong_answer",
    "time_limit",
    "memory_limit",
    "runtime_error",
    "output_limit",
    "compile_error",
    # the sandbox itself failed (could not start the program, checker crashed): never
    # the program's fault, so a reward must not count it as a wrong answer
    "sandbox_error",
]

MAX_SOURCE_BYTES = 1 << 20
MAX_TESTS = 1000
MAX_FILES_BYTES = 16 << 20  # a request's input files, base64


def work_dir_path(path: str) -> str:
    """A path inside the program's working dir: relative, no '..', nothing odd."""
    parts = path.split("/")
    if not path or path.startswith("/") or "\0" in path or any(p in ("", ".", "..")
                                                               for p in parts):
        raise ValueError(f"{path!r}: give a plain path relative to the program's working "
                         "directory (no leading /, no '.' or '..' parts)")
    return path


def check_base64(path: str, content: str) -> None:
    """Raise when input file ``path``'s ``content`` is not base64."""
    try:
        base64.b64decode(content, validate=True)
    except ValueError:
        raise ValueError(f"files[{path!r}]: not base64") from None


class TestCase(Message):
    """One run of the program: its stdin and, when checked, the expected stdout."""

    __test__ = False  # not a pytest class

    stdin: str = Field("", max_length=64 << 20)
    expected: str | None = Field(None, max_length=64 << 20)


class Checker(Message):
    """How a test's stdout is compared with its expected output.

    exact: byte-equal; whitespace: equal as sequences of whitespace-separated tokens;
    float: tokens equal, numbers within abs_tol or rel_tol; custom: a checker program
    (``source`` in ``language``) run in the sandbox as ``checker input expected output``
    (three file paths), accepting with exit code 0.
    """

    name: Literal["exact", "whitespace", "float", "custom"] = "whitespace"
    abs_tol: float = Field(1e-6, ge=0)
    rel_tol: float = Field(1e-6, ge=0)
    source: str = Field("", max_length=MAX_SOURCE_BYTES)
    language: str = "python"

    @model_validator(mode="after")
    def _custom_has_source(self) -> Checker:
        if self.name == "custom" and not self.source.strip():
            raise ValueError("a custom checker needs its program in 'source'")
        return self


class CodeTask(Message):
    """The gold "answer" of a code task, as JSON: the tests a program must pass, its limits,
    the checker and the default language (a response's fenced block may name another)."""

    tests: list[TestCase] = Field(min_length=1)
    language: str = "python"
    time_limit_s: float = Field(2.0, gt=0, le=60)
    memory_limit_mb: int = Field(256, ge=16)
    checker: Checker = Field(default_factory=Checker)


class RunCodeRequest(Message):
    kind: Literal["run_code"] = "run_code"
    language: str = Field(min_length=1, description="registry name, e.g. python, cpp, c")
    source: str = Field(max_length=MAX_SOURCE_BYTES)
    compile_options: list[str] = Field(
        default_factory=list, max_length=64,
        description="extra compiler arguments (e.g. -O2); each one argv item, no shell")
    tests: list[TestCase] = Field(default_factory=lambda: [TestCase()], min_length=1,
                                  max_length=MAX_TESTS)
    time_limit_s: float = Field(2.0, gt=0, le=60, description="CPU seconds per test")
    wall_limit_s: float | None = Field(
        None, gt=0, le=300, description="wall seconds per test (default: 2 x time + 1)")
    memory_limit_mb: int = Field(256, ge=16, le=16384)
    output_limit_kb: int = Field(1024, ge=1, le=65536, description="stdout cap per test")
    checker: Checker = Field(default_factory=Checker)
    stop_on_first_failure: bool = Field(
        False, description="skip the remaining tests once one is not accepted")
    compile_time_limit_s: float | None = Field(
        None, gt=0, le=300, description="CPU seconds for compiling (default: the language's)")
    shown_output_kb: int = Field(4, ge=1, le=65536, description="stdout and stderr kept in "
                                 "the response per test (the check reads all of stdout)")
    files: dict[str, str] = Field(
        default_factory=dict, description="input files: path in the working dir -> base64 "
        "content, written before compiling")
    fetch_files: list[str] = Field(
        default_factory=list, max_length=64, description="files (paths in the working dir) "
        "returned after each test, base64; the working dir is then writable while tests run")

    @model_validator(mode="after")
    def _file_paths(self) -> RunCodeRequest:
        for path in (*self.files, *self.fetch_files):
            work_dir_path(path)
        for path, content in self.files.items():
            check_base64(path, content)
        if sum(len(v) for v in self.files.values()) > MAX_FILES_BYTES:
            raise ValueError(f"files: more than {MAX_FILES_BYTES >> 20} MB")
        return self

    @property
    def wall_limit(self) -> float:
        return self.wall_limit_s or 2 * self.time_limit_s + 1.0


class CompileOutcome(Message):
    ok: bool
    exit_code: int | None = None
    time_s: float = 0.0
    timed_out: bool = False
    output: str = Field("", description="compiler stdout+stderr, truncated")
    cached: bool = Field(False, description="the same source compiled before: its outputs "
                                            "were reused (sandbox/compile_cache.py)")


class TestOutcome(Message):
    __test__ = False

    verdict: Verdict
    exit_code: int | None = None
    signal: int | None = None
    cpu_s: float = 0.0
    wall_s: float = 0.0
    memory_kb: int = 0
    stdout: str = Field("", description="truncated")
    stderr: str = Field("", description="truncated")
    detail: str = Field("", description="why this verdict (checker message, limit hit)")
    files: dict[str, str] = Field(default_factory=dict,
                                  description="the request's fetch_files found, base64")


class RunCodeResult(Message):
    kind: Literal["run_code_result"] = "run_code_result"
    verdict: Verdict = Field(description="first test verdict that is not accepted, else accepted")
    compile: CompileOutcome | None = None
    tests: list[TestOutcome] = Field(default_factory=list)
    skipped: int = Field(0, ge=0, description="tests not run (stop_on_first_failure)")
    runner: str = ""
    error: str = Field("", description="what went wrong when verdict is sandbox_error")

    @property
    def passed(self) -> int:
        return sum(t.verdict == "accepted" for t in self.tests)


# -------------------------------------------------------------------------- phase


Phase = Literal["train", "rollout"]


class PhaseCommand(Message):
    kind: Literal["phase_command"] = "phase_command"
    ref: RunRef = Field(default_factory=RunRef)
    phase: Phase
    policy_version: int = Field(0, ge=0)


class PhaseStatus(Message):
    kind: Literal["phase_status"] = "phase_status"
    phase: Phase
    policy_version: int
    switch_s: float = 0.0
    # where the switch time went: engine_start_s, push_s, update_s (weight sync), ...
    breakdown: dict[str, float] = Field(default_factory=dict)
    engines: list[str] = Field(
        default_factory=list,
        description="Addresses of the rollout engines that hold policy_version (rollout phase).")


AnyMessage = Annotated[
    Ping
    | Pong
    | ErrorReply
    | GenerateRequest
    | GenerateResult
    | EngineInfoRequest
    | EngineInfo
    | WeightManifest
    | WeightUpdateResult
    | SFTBatch
    | TrainBatch
    | LogprobRequest
    | LogprobResult
    | TrainStats
    | PushWeightsRequest
    | ReleaseWeights
    | WeightReaders
    | RoundTripRequest
    | RoundTripResult
    | CheckpointRequest
    | CheckpointResult
    | RewardRequest
    | RewardResult
    | PhaseCommand
    | RunCodeRequest
    | RunCodeResult
    | PhaseStatus,
    Field(discriminator="kind"),
]
