"""SandboxFusion's ``POST /run_code`` schema on k1rl's sandbox: what verl's
``sandbox_fusion`` reward, SandboxFusion's own Python SDK and other clients send, run by the
native judge (one test: the request's stdin, no expected output) and answered in
SandboxFusion's response shape.

Honoured: ``code``, ``language`` (SandboxFusion's names that this sandbox runs), ``stdin``,
``compile_timeout`` (compile CPU seconds), ``run_timeout`` (wall seconds of the run; also
its CPU limit, at most 60 s), ``memory_limit_MB`` (-1, SandboxFusion's "unlimited": the
sandbox's ``UNLIMITED_MB``), ``files`` and ``fetch_files`` with paths relative to the
working directory (written before compiling; read back after the run, the working
directory writable meanwhile; missing ones left out, as SandboxFusion does). Refused with a
422 naming the field: absolute paths in either (each run has a fresh /tmp, and nothing
else is writable). A language SandboxFusion knows but this sandbox does not run is
answered as SandboxFusion answers a language with no runner: ``SandboxError``.

Outcome mapping: compile failed -> ``Failed``, ``compile_result`` with its return code,
``run_result`` null; a time limit -> ``TimeLimitExceeded``, ``return_code`` null,
``Failed``; a non-zero exit (a signal as its negative number) -> ``Failed``; the sandbox's
own failure -> ``SandboxError`` with the reason in ``message``; else ``Success``.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from k1rl.protocol import (
    RunCodeRequest,
    RunCodeResult,
    TestCase,
    check_base64,
    work_dir_path,
)

# SandboxFusion's language names (its `Language` literal)
FUSION_LANGUAGES = (
    "python", "cpp", "nodejs", "go", "go_test", "java", "php", "csharp", "bash",
    "typescript", "sql", "rust", "cuda", "lua", "R", "perl", "D_ut", "ruby", "scala",
    "julia", "pytest", "junit", "kotlin_script", "jest", "verilog", "python_gpu", "lean",
    "swift", "racket")
# SandboxFusion name -> this sandbox's language, where the two run the same thing
NATIVE_NAMES = {"python": "python", "cpp": "cpp", "nodejs": "javascript", "go": "go",
                "java": "java", "php": "php", "bash": "bash", "typescript": "typescript",
                "rust": "rust", "ruby": "ruby"}
UNLIMITED_MB = 4096  # SandboxFusion's lite isolation caps memory at 4G too
MAX_OUTPUT_KB = 1024  # SandboxFusion reads at most 1 MiB of each stream


class FusionRequest(BaseModel):
    """SandboxFusion's RunCodeRequest (unknown fields ignored, as its server does)."""

    model_config = ConfigDict(extra="ignore")

    code: str
    language: Literal[FUSION_LANGUAGES]  # type: ignore[valid-type]
    stdin: str | None = None
    compile_timeout: float = Field(10, gt=0, le=300)
    run_timeout: float = Field(10, gt=0, le=300)
    memory_limit_MB: int = Field(-1, ge=-1, le=16384)
    files: dict[str, str | None] = Field(default_factory=dict)
    fetch_files: list[str] = Field(default_factory=list)

    @field_validator("files", "fetch_files")
    @classmethod
    def _in_the_working_dir(cls, paths):
        for path in paths:
            if path.startswith("/"):
                raise ValueError(f"{path!r}: absolute paths are not supported by this "
                                 "sandbox (each run has a fresh /tmp): give a path relative "
                                 "to the working directory")
            if "IGNORE_THIS_FILE" not in path:
                work_dir_path(path)
        return paths

    @field_validator("files")
    @classmethod
    def _base64(cls, files: dict[str, str | None]) -> dict[str, str | None]:
        for path, content in files.items():
            if content is not None:
                check_base64(path, content)
        return files


class CommandRunResult(BaseModel):
    status: Literal["Finished", "Error", "TimeLimitExceeded"]
    execution_time: float | None = None
    return_code: int | None = None
    stdout: str | None = None
    stderr: str | None = None


class FusionResponse(BaseModel):
    status: Literal["Success", "Failed", "SandboxError"]
    message: str = ""
    compile_result: CommandRunResult | None = None
    run_result: CommandRunResult | None = None
    executor_pod_name: str | None = None
    files: dict[str, str] = Field(default_factory=dict)


def native_request(req: FusionRequest, known: set[str]) -> RunCodeRequest | str:
    """The native request running ``req``, or why it cannot run here (``known``: the
    languages this sandbox has)."""
    name = NATIVE_NAMES.get(req.language)
    if name is None or name not in known:
        runs = sorted(f for f, n in NATIVE_NAMES.items() if n in known)
        return (f"language {req.language!r} is not available in this sandbox (available: "
                f"{', '.join(runs)})")
    memory = UNLIMITED_MB if req.memory_limit_MB == -1 else max(16, req.memory_limit_MB)
    # SandboxFusion skips null contents and paths marked IGNORE_THIS_FILE
    files = {path: content for path, content in req.files.items()
             if content is not None and "IGNORE_THIS_FILE" not in path}
    return RunCodeRequest(
        language=name, source=req.code, tests=[TestCase(stdin=req.stdin or "")],
        time_limit_s=min(req.run_timeout, 60.0), wall_limit_s=req.run_timeout,
        memory_limit_mb=memory, compile_time_limit_s=req.compile_timeout,
        output_limit_kb=MAX_OUTPUT_KB, shown_output_kb=MAX_OUTPUT_KB, files=files,
        fetch_files=req.fetch_files)


def fusion_response(result: RunCodeResult) -> FusionResponse:
    """``result`` of a one-test native request in SandboxFusion's shape."""
    pod = os.environ.get("MY_POD_NAME") or os.environ.get("K1RL_POD_NAME")
    if result.verdict == "sandbox_error":
        return FusionResponse(status="SandboxError", message=result.error or (
            result.tests[0].detail if result.tests else "sandbox error"),
            executor_pod_name=pod)
    compiled = None
    if result.compile is not None:
        c = result.compile
        compiled = CommandRunResult(
            status="TimeLimitExceeded" if c.timed_out else "Finished",
            execution_time=c.time_s, return_code=None if c.timed_out else c.exit_code,
            stdout="", stderr=c.output)
        if not c.ok:
            return FusionResponse(status="Failed", compile_result=compiled,
                                  executor_pod_name=pod)
    test = result.tests[0]
    timed_out = test.verdict == "time_limit"
    code = None if timed_out else (
        -test.signal if test.signal is not None else test.exit_code)
    ran = CommandRunResult(status="TimeLimitExceeded" if timed_out else "Finished",
                           execution_time=test.wall_s, return_code=code, stdout=test.stdout,
                           stderr=test.stderr)
    failed = timed_out or code != 0
    return FusionResponse(status="Failed" if failed else "Success", compile_result=compiled,
                          run_result=ran, executor_pod_name=pod, files=test.files)
