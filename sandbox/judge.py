"""One RunCodeRequest from source to verdicts: compile once, run every test, check.

A :class:`Judge` owns one worker :class:`~sandbox.isolation.Slot` and a runner; it is
not thread-safe (one request at a time per slot, which is what a worker process is).
"""

from __future__ import annotations

import base64
import signal
import time
from pathlib import Path

from k1rl.config import SandboxConfig
from k1rl.protocol import (
    CompileOutcome,
    RunCodeRequest,
    RunCodeResult,
    TestCase,
    TestOutcome,
    Verdict,
)

from sandbox import languages
from sandbox.checkers import compare
from sandbox.compile_cache import CompileCache
from sandbox.isolation import Execution, Limits, Slot
from sandbox.runners import Runner

COMPILER_OUTPUT_CHARS = 16384
FETCHED_FILE_BYTES = 8 << 20  # larger fetch_files are left out
CHECKER_OUTPUT_BYTES = 4096  # a checker's message, not data
CHECKER_DIR = "checker"
_MEMORY_ERRORS = (b"MemoryError", b"std::bad_alloc", b"Cannot allocate memory",
                  b"out of memory")


class Judge:
    def __init__(self, runner: Runner, slot: Slot, cfg: SandboxConfig) -> None:
        self.runner = runner
        self.slot = slot
        self.cfg = cfg
        self.cache = CompileCache(Path(cfg.work_root) / "compile-cache",
                                  cfg.compile_cache_entries) \
            if cfg.compile_cache_entries else None

    def run(self, req: RunCodeRequest) -> RunCodeResult:
        """Raises ValueError for a request that cannot be run (unknown language)."""
        lang = languages.get(req.language)
        checker_lang = languages.get(req.checker.language) if req.checker.name == "custom" \
            else None
        self.slot.prepare()
        for path, content in req.files.items():  # before the source: the source wins
            self.slot.write_path(path, base64.b64decode(content))
        self.slot.write(lang.source_file, req.source.encode())
        result = RunCodeResult(verdict="accepted", runner=self.runner.name)
        if lang.compile:
            result.compile, result.error = self._compile(lang, req.compile_options,
                                                         time_s=req.compile_time_limit_s)
            if not result.compile.ok:
                result.verdict = "sandbox_error" if result.error else "compile_error"
                result.skipped = len(req.tests)
                return result
        checker_ready = None
        if checker_lang is not None:
            checker_ready = self._prepare_checker(checker_lang, req.checker.source)
        limits = self._limits(req, lang)
        for i, test in enumerate(req.tests):
            if req.stop_on_first_failure and result.verdict != "accepted":
                result.skipped = len(req.tests) - i
                break
            outcome = self._run_test(lang, test, limits, req, checker_lang, checker_ready)
            result.tests.append(outcome)
            if result.verdict == "accepted" and outcome.verdict != "accepted":
                result.verdict = outcome.verdict
        return result

    # ---------------------------------------------------------------- steps
    def _limits(self, req: RunCodeRequest, lang: languages.Language) -> Limits:
        return Limits(
            cpu_s=req.time_limit_s, wall_s=req.wall_limit, memory_mb=req.memory_limit_mb,
            output_bytes=req.output_limit_kb << 10, processes=self.cfg.max_processes,
            open_files=self.cfg.max_open_files, scratch_mb=self.cfg.scratch_mb,
            address_space_mb=lang.address_space_mb,
        )

    def _compile_limits(self, lang: languages.Language, time_s: float) -> Limits:
        return Limits(cpu_s=time_s, wall_s=2 * time_s,
                      memory_mb=lang.compile_memory_mb, output_bytes=COMPILER_OUTPUT_CHARS,
                      processes=self.cfg.max_processes, open_files=256,
                      scratch_mb=max(self.cfg.scratch_mb, 256),
                      address_space_mb=lang.compile_address_space_mb)

    def _compile(self, lang: languages.Language, options: list[str], cwd: str = "",
                 time_s: float | None = None) -> tuple[CompileOutcome, str]:
        """The compile outcome, and the sandbox's own failure ("" when it ran)."""
        time_s = time_s or lang.compile_time_s
        argv = lang.compile_argv(options)
        where = self.slot.code / cwd
        key = None
        if self.cache is not None:
            started = time.monotonic()
            key = self.cache.key(lang.name, argv, (where / lang.source_file).read_bytes())
            hit = self.cache.restore(key, where, self.slot.uid, time_s)
            if hit is not None:
                return hit.model_copy(update={"time_s": time.monotonic() - started}), ""
        outcome, error = self._run_compiler(lang, argv, cwd, time_s)
        if key is not None and not error:
            self.cache.store(key, where, lang.source_file, outcome)
        return outcome, error

    def _run_compiler(self, lang: languages.Language, argv: list[str], cwd: str,
                      time_s: float) -> tuple[CompileOutcome, str]:
        ex = self.runner.execute(self.slot, argv, stdin=b"",
                                 limits=self._compile_limits(lang, time_s), writable_code=True,
                                 cwd=cwd, env=dict(lang.env))
        if ex.start_error:
            return CompileOutcome(ok=False, output=f"sandbox error: {ex.start_error}"), \
                ex.start_error
        text = (ex.stdout + ex.stderr).decode("utf-8", "replace")[:COMPILER_OUTPUT_CHARS]
        timed_out = ex.wall_timeout or ex.signal == signal.SIGXCPU
        if timed_out:
            text = f"compilation exceeded {time_s:g} s\n{text}"
        elif ex.oom_killed:
            text = f"compilation exceeded {lang.compile_memory_mb} MB\n{text}"
        ok = ex.exit_code == 0 and not ex.wall_timeout
        return CompileOutcome(ok=ok, exit_code=ex.exit_code, time_s=ex.wall_s, output=text,
                              timed_out=timed_out), ""

    def _prepare_checker(self, lang: languages.Language, source: str) -> str | None:
        """Compile the custom checker into code/checker/; None when it is ready, else why not."""
        self.slot.mkdir(CHECKER_DIR)
        self.slot.write(f"{CHECKER_DIR}/{lang.source_file}", source.encode())
        if lang.compile:
            outcome, _ = self._compile(lang, [], cwd=CHECKER_DIR)
            if not outcome.ok:
                return f"the checker does not compile: {outcome.output[:500]}"
        return None

    def _run_test(self, lang: languages.Language, test: TestCase, limits: Limits,
                  req: RunCodeRequest, checker_lang: languages.Language | None,
                  checker_error: str | None) -> TestOutcome:
        # a program whose files are fetched afterwards writes them in its working dir
        ex = self.runner.execute(self.slot, lang.run_argv(limits.memory_mb),
                                 stdin=test.stdin.encode(), limits=limits, env=dict(lang.env),
                                 writable_code=bool(req.fetch_files))
        outcome = TestOutcome(
            verdict="accepted", exit_code=ex.exit_code, signal=ex.signal, cpu_s=ex.cpu_s,
            wall_s=ex.wall_s, memory_kb=ex.memory_kb,
            stdout=ex.stdout[:req.shown_output_kb << 10].decode("utf-8", "replace"),
            stderr=ex.stderr[:req.shown_output_kb << 10].decode("utf-8", "replace"),
        )
        for path in req.fetch_files:
            data = self.slot.read_path(path, FETCHED_FILE_BYTES)
            if data is not None:  # missing ones are left out, as SandboxFusion does
                outcome.files[path] = base64.b64encode(data).decode()
        verdict, detail = classify(ex, limits, lang.memory_errors)
        if verdict is None and test.expected is not None:
            if req.checker.name == "custom":
                verdict, detail = self._custom_check(checker_lang, test, ex.stdout,
                                                     checker_error)
            else:
                ok, detail = compare(req.checker, ex.stdout.decode("utf-8", "replace"),
                                     test.expected)
                verdict = "accepted" if ok else "wrong_answer"
        outcome.verdict = verdict or "accepted"
        outcome.detail = detail
        return outcome

    def _custom_check(self, lang: languages.Language, test: TestCase, output: bytes,
                      checker_error: str | None) -> tuple[Verdict, str]:
        if checker_error:
            return "sandbox_error", checker_error
        for name, data in (("input.txt", test.stdin.encode()),
                           ("expected.txt", (test.expected or "").encode()),
                           ("output.txt", output)):
            self.slot.write(f"{CHECKER_DIR}/{name}", data)
        limits = Limits(cpu_s=10, wall_s=20, memory_mb=1024,
                        output_bytes=CHECKER_OUTPUT_BYTES,
                        processes=self.cfg.max_processes, open_files=64,
                        scratch_mb=self.cfg.scratch_mb, address_space_mb=lang.address_space_mb)
        ex = self.runner.execute(
            self.slot, [*lang.run_argv(limits.memory_mb), "input.txt", "expected.txt",
                        "output.txt"],
            stdin=b"", limits=limits, cwd=CHECKER_DIR, env=dict(lang.env))
        message = (ex.stdout + ex.stderr).decode("utf-8", "replace")[:500].strip()
        if ex.exit_code == 0:
            return "accepted", message
        if ex.exit_code in (1, 2):  # testlib: 1 wrong answer, 2 presentation error
            return "wrong_answer", message
        return "sandbox_error", f"the checker failed ({_status(ex)}): {message}"


def classify(ex: Execution, limits: Limits, memory_errors: tuple[bytes, ...] = ()
             ) -> tuple[Verdict | None, str]:
    """The verdict an execution earns before its output is checked (None: ran cleanly);
    ``memory_errors``: what the program's runtime prints when it runs out of memory."""
    if ex.start_error:
        return "sandbox_error", ex.start_error
    if ex.stdout_overflow:
        return "output_limit", f"wrote more than {limits.output_bytes} bytes to stdout"
    if ex.wall_timeout:
        return "time_limit", f"still running after {limits.wall_s:g} s wall time"
    if ex.cpu_s > limits.cpu_s or ex.signal == signal.SIGXCPU:
        return "time_limit", f"used {ex.cpu_s:.2f} s CPU, limit {limits.cpu_s:g} s"
    failed = ex.exit_code != 0
    if ex.oom_killed or (failed and any(m in ex.stderr
                                        for m in (*_MEMORY_ERRORS, *memory_errors))):
        return "memory_limit", f"exceeded {limits.memory_mb} MB"
    if ex.signal == signal.SIGXFSZ:
        return "output_limit", f"wrote more than {limits.scratch_mb} MB to files"
    if failed:
        return "runtime_error", _status(ex)
    return None, ""


def _status(ex: Execution) -> str:
    if ex.signal is not None:
        try:
            return f"killed by {signal.Signals(ex.signal).name}"
        except ValueError:
            return f"killed by signal {ex.signal}"
    return f"exit code {ex.exit_code}"
