"""`k1rl doctor --model DIR`: will this checkpoint train correctly, before the first GPU-day?

It starts trainer_svc and rollout_svc on the checkpoint (the processes, loaders and messages
of a real run) and checks, in order:

- ``load``: both services load it; an architecture feature the converter does not
  reproduce is refused by name (trainer_svc/hf_spec.py).
- ``roundtrip``: HF -> Megatron -> HF gives back every tensor of the checkpoint bit for bit.
- ``push``: the trainer's weights go through the configured transport into the engine,
  which started with random weights (k1.5's restart mode), checksums verified.
- ``parity``: log-probs of sampled tokens, the engine's against the trainer's, within the
  dtype's tolerance (k1rl/parity.py). With ``engine_model``, vLLM loads that checkpoint
  itself instead (no push): is a converted or exported copy the trainer's policy?
- ``stop_tokens``: tokenizer, generation config and engine agree on EOS, and the chat
  template ends an assistant turn with a token the engine stops on.

It prints a table and, as its last line, one JSON object (:class:`DoctorReport`).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from pydantic import BaseModel

from k1rl import parity
from k1rl.config import RunConfig, load_config
from k1rl.launch import LocalStack, ServiceStartError
from k1rl.preflight import model_problems
from k1rl.protocol import (
    EngineInfo,
    EngineInfoRequest,
    GenerateRequest,
    GenerateResult,
    PushWeightsRequest,
    RoundTripRequest,
    RoundTripResult,
    SamplingSpec,
    WeightManifest,
    WeightUpdateResult,
)

# Plain requests of the kinds RL prompts are: arithmetic, code, facts, reasoning.
PROMPTS = (
    "What is 17 + 25? Think step by step.",
    "Write a Python function that reverses a string.",
    "Name three prime numbers greater than 50.",
    "If a train travels 60 km in 45 minutes, what is its speed in km/h?",
)


# prompts of ~20-60 tokens plus 32 sampled: a short context keeps vLLM's KV cache small
DOCTOR_MAX_MODEL_LEN = 256


class Check(BaseModel):
    name: str
    ok: bool
    detail: str


class DoctorReport(BaseModel):
    model: str
    model_type: str | None = None
    parameters: int | None = None
    dtype: str
    tp: int
    roundtrip_exact: bool | None = None
    logprob_max_abs_diff: float | None = None
    logprob_mean_abs_diff: float | None = None
    logprob_tokens: int = 0
    tolerance: dict[str, float]
    checks: list[Check] = []
    failed: list[str] = []
    ok: bool = False


def doctor_config(model: Path, *, tp: int, dtype: str | None, config: Path | None,
                  max_model_len: int) -> RunConfig:
    """The run config the services start with: ``config``'s (its transport, devices,
    parity thresholds) or the defaults, on ``model`` at ``tp`` and ``dtype``."""
    base = load_config(config) if config is not None else RunConfig()
    data = base.model_dump(mode="json")
    data["model"].update(path=str(model), **({"dtype": dtype} if dtype else {}))
    data["trainer"].update(tp=tp, seq_length=max(data["trainer"]["seq_length"], max_model_len))
    data["rollout"]["max_model_len"] = max_model_len
    return RunConfig.model_validate(data)


def run_doctor(model: Path, *, tp: int = 1, dtype: str | None = None,
               config: Path | None = None, engine_model: Path | None = None,
               work_dir: Path | None = None, samples: int = 4, max_tokens: int = 32,
               seed: int = 0) -> DoctorReport:
    """Run every check (see the module docstring) and return the report."""
    max_model_len = min(DOCTOR_MAX_MODEL_LEN, _max_positions(model))
    cfg = doctor_config(model, tp=tp, dtype=dtype, config=config, max_model_len=max_model_len)
    tol = parity.tolerance(cfg)
    report = DoctorReport(model=str(model), dtype=cfg.model.dtype, tp=tp,
                          tolerance={"mean": tol.mean, "max": tol.max})
    problems = model_problems(cfg)
    if engine_model is not None:
        problems += [p.replace("model.path", "engine model")
                     for p in model_problems(doctor_config(
                         engine_model, tp=tp, dtype=dtype, config=config,
                         max_model_len=max_model_len))]
    if problems:
        return _finish(report, Check(name="load", ok=False, detail="; ".join(problems)))
    work_dir = Path(work_dir or tempfile.mkdtemp(prefix="k1rl-doctor-"))
    try:
        stack = LocalStack.start(work_dir, cfg=cfg, model_dir=model,
                                 dummy_rollout=engine_model is None,
                                 engine_model_dir=engine_model)
    except ServiceStartError as e:
        return _finish(report, Check(name="load", ok=False, detail=_error_line(str(e))))
    with stack:
        _add(report, Check(name="load", ok=True,
                           detail=f"trainer (tp={tp}) and vLLM serve {model.name}"))
        _roundtrip(report, stack)
        # The engine starts with random weights, so every weight it samples with came
        # through the push: the parity is the trainer's conversion, export and transport.
        if engine_model is not None or _push(report, stack):
            what = (f"vLLM loading {engine_model}" if engine_model is not None
                    else "the pushed weights")
            _parity(report, stack, _sample(stack, samples, max_tokens, seed), tol, what)
        _stop_tokens(report, stack, engine_model or model)
    return _finish(report)


def _max_positions(model: Path) -> int:
    """The checkpoint's context length (a missing or bad config.json is `load`'s to name)."""
    try:
        return int(json.loads((model / "config.json").read_text())["max_position_embeddings"])
    except (OSError, ValueError, KeyError, TypeError):
        return DOCTOR_MAX_MODEL_LEN


def _add(report: DoctorReport, check: Check) -> None:
    report.checks.append(check)


def _finish(report: DoctorReport, check: Check | None = None) -> DoctorReport:
    if check is not None:
        _add(report, check)
    report.failed = [c.name for c in report.checks if not c.ok]
    report.ok = bool(report.checks) and not report.failed
    return report


def _error_line(message: str) -> str:
    """The exception line of a service's log tail (what was refused, and why)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    errors = [line for line in lines if "Error:" in line or "Error(" in line]
    return errors[-1] if errors else lines[0]


def _roundtrip(report: DoctorReport, stack: LocalStack) -> None:
    result = stack.trainer.call("roundtrip", RoundTripRequest(), RoundTripResult)
    report.model_type, report.parameters = result.model_type, result.parameters
    report.roundtrip_exact = result.exact
    detail = (f"{result.tensors} tensors bit-exact" if result.exact else
              f"differ: {', '.join(result.mismatched)} (max |Δ| {result.max_abs_diff:.3g})")
    _add(report, Check(name="roundtrip", ok=result.exact, detail=detail))


def _prompt_ids(stack: LocalStack) -> list[list[int]]:
    tok = stack.tokenizer
    if getattr(tok, "chat_template", None):
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                         add_generation_prompt=True) for p in PROMPTS]
    else:
        texts = list(PROMPTS)
    return [tok.encode(t, add_special_tokens=False) for t in texts]


def _sample(stack: LocalStack, n: int, max_tokens: int, seed: int) -> GenerateResult:
    req = GenerateRequest(prompt_token_ids=_prompt_ids(stack),
                          sampling=SamplingSpec(n=n, temperature=1.0, max_tokens=max_tokens,
                                                seed=seed))
    return stack.rollout.call("generate", req, GenerateResult, timeout_s=600)


def _parity(report: DoctorReport, stack: LocalStack, sampled: GenerateResult,
            tol: parity.Tolerance, what: str) -> None:
    pairs = [(r.prompt_token_ids, c) for r in sampled.results for c in r.completions
             if c.token_ids]
    found = parity.against_trainer(stack.trainer, [p for p, _ in pairs],
                                   [c.token_ids for _, c in pairs],
                                   [c.logprobs for _, c in pairs])
    report.logprob_max_abs_diff = found.max_abs_diff
    report.logprob_mean_abs_diff = found.mean_abs_diff
    report.logprob_tokens = found.tokens
    _add(report, Check(name="parity", ok=found.within(tol),
                       detail=f"{what}: {found.describe(tol)}"))


def _push(report: DoctorReport, stack: LocalStack) -> bool:
    manifest = stack.trainer.call("push_weights", PushWeightsRequest(), WeightManifest)
    result = stack.rollout.call("update_weights", manifest, WeightUpdateResult, timeout_s=600)
    ok = result.checksum_ok is not False and result.version == manifest.version
    transport = stack.cfg.weights.transport
    _add(report, Check(name="push", ok=ok, detail=(
        f"{result.bytes / 2**20:.1f} MiB through {transport}, checksum "
        f"{'verified' if result.checksum_ok else 'not checked'}, engine at "
        f"v{result.version}")))
    return ok


def stop_token_problems(tokenizer, generation_config: dict, engine: EngineInfo) -> list[str]:
    """Where tokenizer, generation config and engine disagree on when a response ends."""
    problems = []
    if tokenizer.eos_token_id is None:
        problems.append("the tokenizer has no eos_token")
    if engine.eos_token_id != tokenizer.eos_token_id:
        problems.append(f"the engine stops on eos id {engine.eos_token_id}, the tokenizer's "
                        f"eos is {tokenizer.eos_token_id}")
    declared = generation_config.get("eos_token_id")
    declared = [] if declared is None else [declared] if isinstance(declared, int) else declared
    if sorted(declared) != sorted(engine.generation_eos_token_ids):
        problems.append(f"generation_config.json's eos_token_id {declared} but the engine "
                        f"uses {engine.generation_eos_token_ids}")
    stops = engine.stop_token_ids
    if getattr(tokenizer, "chat_template", None):
        end = turn_end_token(tokenizer)
        if end is None:
            problems.append("the chat template puts nothing after an assistant message")
        elif end not in stops:
            problems.append(
                f"the chat template ends an assistant turn with {tokenizer.decode([end])!r} "
                f"(id {end}), which is not a stop token {stops}: responses would run "
                "to max_tokens; add it to generation_config.json's eos_token_id")
    return problems


def turn_end_token(tokenizer) -> int | None:
    """The first token the chat template writes after an assistant message's content."""
    marker = "XQ7Z"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
        tokenize=False)
    after = text[text.rindex(marker) + len(marker):]
    ids = tokenizer.encode(after, add_special_tokens=False)
    return ids[0] if ids else None


def _stop_tokens(report: DoctorReport, stack: LocalStack, model: Path) -> None:
    engine = stack.rollout.call("info", EngineInfoRequest(), EngineInfo)
    path = model / "generation_config.json"
    generation = json.loads(path.read_text()) if path.is_file() else {}
    problems = stop_token_problems(stack.tokenizer, generation, engine)
    if engine.model_type != report.model_type:
        problems.append(f"the engine serves model_type {engine.model_type}, the trainer "
                        f"{report.model_type}")
    detail = "; ".join(problems) or (
        f"stop ids {engine.stop_token_ids}" + (", chat template ends turns with one" if
                               engine.has_chat_template else ", no chat template"))
    _add(report, Check(name="stop_tokens", ok=not problems, detail=detail))
