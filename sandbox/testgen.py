"""Verified test sets from a CYaRon generator and reference solutions (k1.5's rules).

A problem directory holds::

    problem.yaml     limits, checker and the rules below (all optional)
    gen.py           def generate(case: int) -> str: one stdin, built with CYaRon
    solutions/       >= 10 reference solutions (main.py, a.cpp, ... by extension)

:func:`build_tests` generates ``cases`` inputs (``random`` is seeded per case, so a
problem's tests are reproducible), runs every reference on all of them in the sandbox,
keeps a case when at least ``agree`` references produce the same output (whitespace-
normalised; that output becomes the expected one) and keeps the problem when at least
``pass`` references pass every kept case. k1.5: 50 cases, 7 of 10 agree, 9 of 10 pass.
The generator is the problem author's code and runs in this process; the reference
solutions run in the sandbox like any program.
"""

from __future__ import annotations

import importlib.util
import json
import random
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from k1rl.config import ConfigError, parse_yaml_model
from k1rl.protocol import Checker, RunCodeRequest, RunCodeResult, TestCase

EXTENSIONS = {".py": "python", ".cpp": "cpp", ".cc": "cpp", ".c": "c"}


class Problem(BaseModel):
    """problem.yaml."""

    model_config = ConfigDict(extra="forbid")

    name: str = ""
    cases: int = Field(50, ge=1, le=1000, description="inputs generated")
    agree: int = Field(7, ge=1, description="references that must agree on a kept case")
    pass_: int = Field(9, ge=1, alias="pass",
                       description="references that must pass every kept case")
    min_references: int = Field(10, ge=1)
    seed: int = 0
    time_limit_s: float = Field(2.0, gt=0, le=60)
    memory_limit_mb: int = Field(256, ge=16)
    checker: Checker = Field(default_factory=lambda: Checker(name="whitespace"))

    @model_validator(mode="after")
    def _rules_fit(self) -> Problem:
        for rule in ("agree", "pass_"):
            if getattr(self, rule) > self.min_references:
                raise ValueError(f"{rule.rstrip('_')} = {getattr(self, rule)} exceeds "
                                 f"min_references = {self.min_references}")
        return self


class TestSet(BaseModel):
    __test__ = False

    problem: str
    kept: bool = Field(description="the problem passed the rules and may be used")
    tests: list[TestCase]
    cases_generated: int
    references: dict[str, int] = Field(description="reference -> kept cases it passes")
    passing_references: list[str]
    reason: str = ""


def load_problem(directory: Path) -> Problem:
    path = directory / "problem.yaml"
    problem = parse_yaml_model(Problem, path.read_text(), str(path)) if path.exists() \
        else Problem()
    if not problem.name:
        problem = problem.model_copy(update={"name": directory.name})
    return problem


def load_generator(directory: Path) -> Callable[[int], str]:
    spec = importlib.util.spec_from_file_location(f"k1rl_gen_{directory.name}",
                                                  directory / "gen.py")
    if spec is None or spec.loader is None:
        raise ConfigError(str(directory / "gen.py"), ["cannot load the generator"])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "generate", None)):
        raise ConfigError(str(directory / "gen.py"), ["defines no generate(case) -> str"])
    return module.generate


def references(directory: Path) -> dict[str, tuple[str, str]]:
    """file name -> (language, source) of the reference solutions."""
    out = {}
    for path in sorted((directory / "solutions").iterdir()):
        if path.suffix in EXTENSIONS:
            out[path.name] = (EXTENSIONS[path.suffix], path.read_text())
    return out


def generate_inputs(generate: Callable[[int], str], problem: Problem) -> list[str]:
    inputs = []
    state = random.getstate()
    try:
        for case in range(problem.cases):
            random.seed(f"{problem.seed}:{case}")  # CYaRon draws from `random`
            text = generate(case)
            if not isinstance(text, str):
                raise TypeError(f"generate({case}) returned {type(text).__name__}, not str")
            inputs.append(text if text.endswith("\n") else text + "\n")
    finally:
        random.setstate(state)
    return inputs


def build_tests(directory: Path, run: Callable[[RunCodeRequest], RunCodeResult],
                parallel: int = 2) -> TestSet:
    """Apply the rules; ``run`` sends a request to a sandbox (thread-safe; ``parallel``
    references are run at once)."""
    directory = Path(directory)
    problem = load_problem(directory)
    refs = references(directory)
    if len(refs) < problem.min_references:
        raise ConfigError(str(directory / "solutions"),
                          [f"{len(refs)} reference solutions, need {problem.min_references}"])
    inputs = generate_inputs(load_generator(directory), problem)
    cases = [TestCase(stdin=text) for text in inputs]

    def outputs_of(name: str) -> list[str | None]:
        language, source = refs[name]
        result = run(RunCodeRequest(language=language, source=source, tests=cases,
                                    time_limit_s=problem.time_limit_s,
                                    memory_limit_mb=problem.memory_limit_mb))
        if result.verdict == "sandbox_error":
            raise RuntimeError(f"the sandbox failed on reference {name}: {result.error}")
        # a reference that does not compile, crashes or times out has no output to vote
        return [" ".join(t.stdout.split()) if t.verdict == "accepted" else None
                for t in result.tests] or [None] * len(cases)

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        outputs = dict(zip(refs, pool.map(outputs_of, refs)))

    expected: dict[int, str] = {}  # kept case -> the agreed output
    for i in range(len(inputs)):
        votes = Counter(out[i] for out in outputs.values() if out[i] is not None)
        if votes:
            answer, count = votes.most_common(1)[0]
            if count >= problem.agree:
                expected[i] = answer
    kept = [TestCase(stdin=inputs[i], expected=answer) for i, answer in expected.items()]
    passes = {name: sum(out[i] == answer for i, answer in expected.items())
              for name, out in outputs.items()}
    passing = [name for name, n in passes.items() if kept and n == len(kept)]
    reason = ""
    if not kept:
        reason = f"no case had {problem.agree} agreeing references"
    elif len(passing) < problem.pass_:
        reason = f"{len(passing)} references pass every kept case, need {problem.pass_}"
    return TestSet(problem=problem.name, kept=not reason, tests=kept,
                   cases_generated=len(inputs), references=passes,
                   passing_references=passing, reason=reason)


def write_test_set(test_set: TestSet, path: Path) -> None:
    path.write_text(json.dumps(test_set.model_dump(), indent=1) + "\n")

