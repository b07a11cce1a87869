"""Synthetic arithmetic word problems with a verifiable answer and a digit-level chain of thought.

Every response has the same shape so that a model of a few million parameters can learn it:
one block per binary operation, worked column by column from the right, then one closing line

    " 37 + 48: 7 + 8 = 15, write 5 carry 1; 3 + 4 + 1 = 8, write 8; result 85. The answer is 85."

Each column step is a single-digit fact (plus a carry or borrow) that the model can look up,
instead of a whole multi-digit sum it would have to do in one forward pass. The closing line is
always ``The answer is <n>.`` so that `extract_answer` (and the reward verifier) can find it.

A task's id names the arithmetic only (``add:2:37+48``), never the wording, so two tasks with
the same numbers are the same problem whatever template they were phrased with: dedup,
`exclude=` and the held-out split all work on that.

The ``count`` family ("count from 17 up to 42") has a long tail of response lengths: its
counts are log-uniform, so most solutions are short and a few are very long (the case
k1.5's partial rollouts are for). The ``code`` family asks for a Python program that reads numbers from stdin and prints an
expression of them (``code:1:n*37``: read n, print n * 37; level 2 reads two numbers). Its
response is one fenced program, its gold answer the tests (a JSON
:class:`k1rl.protocol.CodeTask`), and the reward comes from running the program in the
sandbox (``Task.verifier`` is "code").
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from k1rl.protocol import CodeTask, TestCase

Family = Literal["add", "sub", "mul", "multi", "code", "count"]
Split = Literal["all", "train", "heldout"]

FAMILIES: tuple[str, ...] = ("add", "sub", "mul", "multi", "code", "count")
# Difficulty is the digit count of the operands (add, sub), of the multiplicand (mul, whose
# multiplier is one digit), the number of operations minus one (multi: 1 -> two operations)
# the number of inputs the program reads (code), and for count the longest count,
# 8 * 4**level numbers (the counts are log-uniform: most are short, a few very long).
DIFFICULTIES: dict[str, range] = {
    "add": range(1, 9),
    "sub": range(1, 9),
    "mul": range(1, 7),
    "multi": range(1, 5),
    "code": range(1, 3),
    "count": range(1, 4),
}
ANSWER_PREFIX = "The answer is"
DEFAULT_HELDOUT_FRACTION = 0.1

# An integer that is not the start of a decimal ("85.5" is not the answer 85) and is
# at most MAX_ANSWER_DIGITS long (int() refuses > 4300 digits; no task needs that many).
MAX_ANSWER_DIGITS = 1000
_ANSWER_RE = re.compile(r"The answer is\s*(-?\d[\d,]*)(?![\d,]*\.\d)")


class Task(BaseModel):
    """One problem: the SFT pair is (prompt, target); RL uses prompt and answer."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(description="family:difficulty:expression; identifies the arithmetic")
    family: Family
    difficulty: int = Field(ge=1)
    prompt: str = Field(description='"Q: <question>\\nA:"; the response follows it')
    cot: str = Field(description="the worked column steps, without the answer line (code: "
                                 "the program)")
    answer: str = Field(description="the final number, as extract_answer returns it (code: "
                                    "the tests, a CodeTask as JSON)")
    target: str = Field(description="the full SFT response: ' ' + cot + ' The answer is n.' "
                                    "(code: ' ' + the program in a fenced python block)")

    @property
    def verifier(self) -> str:
        """The reward_svc verifier that judges a response to this task."""
        return "code" if self.family == "code" else "math"

    def as_problem(self) -> dict:
        """This task as a row of the data-source format (k1rl/data/sources.py), as
        ``k1rl gen-tasks`` writes it: code tasks carry their tests, math tasks the answer."""
        gold = ({"tests": json.loads(self.answer)} if self.verifier == "code"
                else {"answer": self.answer})
        return {"id": self.id, "prompt": self.prompt, **gold, "verifier": self.verifier,
                "tags": [self.family, f"{self.family}:{self.difficulty}"],
                "difficulty": self.difficulty, "response": self.target}


# ----------------------------------------------------------------------- answer lines


def answer_line(answer: int | str) -> str:
    return f"{ANSWER_PREFIX} {answer}."


def extract_answer(response_text: str) -> str | None:
    """The number after the last "The answer is" (normalised: no commas, no leading zeros).

    The last one counts because a response may restate an earlier guess before settling.
    """
    matches = _ANSWER_RE.findall(response_text)
    if not matches:
        return None
    raw = matches[-1].replace(",", "")
    if raw in ("", "-") or len(raw) > MAX_ANSWER_DIGITS:
        return None
    return str(int(raw))


# ------------------------------------------------------------------- column arithmetic


def _digits(n: int, width: int) -> list[int]:
    """Digits of n from the least significant, padded with zeros to width."""
    return [(n // 10**i) % 10 for i in range(width)]


def _width(*numbers: int) -> int:
    return max(len(str(n)) for n in numbers)


def add_steps(a: int, b: int) -> list[str]:
    width = _width(a, b)
    steps, carry = [], 0
    for x, y in zip(_digits(a, width), _digits(b, width)):
        total = x + y + carry
        lhs = f"{x} + {y}" + (" + 1" if carry else "")
        carry = total // 10
        steps.append(f"{lhs} = {total}, write {total % 10}" + (" carry 1" if carry else ""))
    if carry:
        steps.append("write 1")
    return steps


def sub_steps(a: int, b: int) -> list[str]:
    """Columns of a - b (a >= b): a column that must borrow shows its top digit plus ten."""
    if a < b:
        raise ValueError(f"sub_steps needs a >= b, got {a} - {b}")
    width = _width(a, b)
    steps, borrow = [], 0
    for x, y in zip(_digits(a, width), _digits(b, width)):
        needs_borrow = x - borrow < y
        top = x + 10 if needs_borrow else x
        diff = top - borrow - y
        lhs = f"{top} - {y}" + (" - 1" if borrow else "")
        borrow = int(needs_borrow)
        steps.append(f"{lhs} = {diff}, write {diff}" + (" borrow 1" if borrow else ""))
    return steps


def mul_steps(a: int, b: int) -> list[str]:
    """Columns of a * b for a one-digit b: each column multiplies, then adds the carry."""
    if not 0 <= b <= 9:
        raise ValueError(f"mul_steps needs a one-digit multiplier, got {b}")
    steps, carry = [], 0
    for x in _digits(a, len(str(a))):
        product = x * b
        step = f"{x} * {b} = {product}"
        total = product + carry
        if carry:
            step += f", {product} + {carry} = {total}"
        carry = total // 10
        steps.append(f"{step}, write {total % 10}" + (f" carry {carry}" if carry else ""))
    if carry:
        steps.append(f"write {carry}")
    return steps


_STEPS = {"+": add_steps, "-": sub_steps, "*": mul_steps}
_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def op_block(a: int, op: str, b: int) -> tuple[str, int]:
    """One worked operation, "a op b: step; step; result r.", and its result r."""
    result = _APPLY[op](a, b)
    return f"{a} {op} {b}: " + "; ".join(_STEPS[op](a, b)) + f"; result {result}.", result


def chain_cot(start: int, ops: list[tuple[str, int]]) -> tuple[str, int]:
    """The blocks of start op1 x1 op2 x2 ..., evaluated left to right."""
    blocks, value = [], start
    for op, operand in ops:
        block, value = op_block(value, op, operand)
        blocks.append(block)
    return " ".join(blocks), value


# ------------------------------------------------------------------------- wording

_PEOPLE = (
    ("Tom", "he"), ("Anna", "she"), ("Ben", "he"), ("Mia", "she"), ("Sam", "he"),
    ("Lily", "she"), ("Max", "he"), ("Zoe", "she"), ("Leo", "he"), ("Emma", "she"),
)
_OBJECTS = (
    "apples", "pens", "books", "cards", "stamps", "marbles", "shells", "coins", "stickers",
    "cookies",
)
_BOXES = ("boxes", "bags", "baskets", "jars", "packs")

_ADD = (
    "{name} has {a} {obj} and buys {b} more. How many {obj} does {pro} have?",
    "There are {a} {obj} in a box and {b} {obj} in a bag. How many {obj} are there in total?",
    "{name} found {a} {obj} on Monday and {b} {obj} on Tuesday. How many {obj} did {pro} find?",
)
_SUB = (
    "{name} has {a} {obj} and gives away {b}. How many {obj} does {pro} have left?",
    "A shop had {a} {obj} and sold {b} of them. How many {obj} are left?",
    "{name} needs {a} {obj} and already has {b}. How many more {obj} does {pro} need?",
)
_MUL = (
    "There are {b} {box} with {a} {obj} in each. How many {obj} are there?",
    "{name} buys {b} {box} of {obj}. Each holds {a} {obj}. How many {obj} does {pro} buy?",
    "Each of {b} {box} holds {a} {obj}. How many {obj} are there in all?",
)
_MULTI_GAIN = ("buys {x} more", "finds {x} more", "gets {x} more")
_MULTI_LOSS = ("gives away {x}", "loses {x}", "sells {x}")
_MULTI = "{name} has {a} {obj}. Then {pro} {clauses}. How many {obj} does {pro} have now?"


def _question(rng: random.Random, family: str, start: int, ops: list[tuple[str, int]]) -> str:
    name, pro = rng.choice(_PEOPLE)
    words = {"name": name, "pro": pro, "obj": rng.choice(_OBJECTS), "a": start}
    if family == "multi":
        clauses = [rng.choice(_MULTI_GAIN if op == "+" else _MULTI_LOSS).format(x=x)
                   for op, x in ops]
        return _MULTI.format(clauses=", then ".join(clauses), **words)
    templates = {"add": _ADD, "sub": _SUB, "mul": _MUL}[family]
    return rng.choice(templates).format(b=ops[0][1], box=rng.choice(_BOXES), **words)


# ------------------------------------------------------------------------- code

CODE_TESTS = 2
_CODE_INPUTS = {1: ("n",), 2: ("a", "b")}
_CODE_READ = {1: "n = int(input())", 2: "a, b = map(int, input().split())"}
_CODE_ASK = {
    1: ("Write a Python program that reads a number n and prints {expr}.",
        "Write a program: read an integer n from the input and print {expr}."),
    2: ("Write a Python program that reads two numbers a and b from one line and prints {expr}.",
        "Write a program: read integers a and b (one line) and print {expr}."),
}


def _sample_code(rng: random.Random, level: int) -> list[str]:
    """An expression as tokens: n op K or K - n (level 1), a op b op K (level 2)."""
    k = str(rng.randint(2, 999))
    if level == 1:
        op = rng.choice("+-*")
        return ["n", op, k] if op != "-" or rng.random() < 0.5 else [k, "-", "n"]
    return ["a", rng.choice("+-*"), "b", rng.choice("+-*"), k]


def _evaluate(tokens: list[str], values: dict[str, int]) -> int:
    """The value of ``a op b op c`` with Python's precedence (* before + and -)."""
    terms = [values.get(t) if t in values else int(t) for t in tokens[::2]]
    ops = tokens[1::2]
    while "*" in ops:
        i = ops.index("*")
        terms[i : i + 2] = [terms[i] * terms[i + 1]]
        del ops[i]
    value = terms[0]
    for op, term in zip(ops, terms[1:]):
        value = value + term if op == "+" else value - term
    return value


def _build_code_task(rng: random.Random, level: int, tokens: list[str], tid: str) -> Task:
    expr = " ".join(tokens)
    program = f"{_CODE_READ[level]}\nprint({expr})"
    tests = []
    for _ in range(CODE_TESTS):
        values = {name: rng.randint(0, 999) for name in _CODE_INPUTS[level]}
        stdin = " ".join(str(values[name]) for name in _CODE_INPUTS[level])
        tests.append(TestCase(stdin=stdin, expected=str(_evaluate(tokens, values))))
    return Task(
        id=tid,
        family="code",
        difficulty=level,
        prompt=f"Q: {rng.choice(_CODE_ASK[level]).format(expr=expr)}\nA:",
        cot=program,
        answer=CodeTask(tests=tests, time_limit_s=1.0, memory_limit_mb=64).model_dump_json(),
        target=f" ```python\n{program}\n```",
    )


# ------------------------------------------------------------------------ count


def _sample_count(rng: random.Random, level: int) -> tuple[int, int]:
    """(first, last) of a count of log-uniform length in [3, 8 * 4**level]."""
    longest = 8 * 4**level
    length = round(math.exp(rng.uniform(math.log(3), math.log(longest))))
    first = rng.randint(1, 99)
    return first, first + length - 1


def _build_count_task(rng: random.Random, level: int, first: int, last: int, tid: str) -> Task:
    cot = ", ".join(str(n) for n in range(first, last + 1)) + "."
    return Task(
        id=tid,
        family="count",
        difficulty=level,
        prompt=f"Q: Count from {first} up to {last}, one number at a time.\nA:",
        cot=cot,
        answer=str(last),
        target=f" {cot} {answer_line(last)}",
    )


# ----------------------------------------------------------------------- sampling


def _n_digit(rng: random.Random, digits: int) -> int:
    """A number with exactly `digits` digits; one-digit numbers start at 1 (no 'has 0')."""
    return rng.randint(1 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def _sample_ops(rng: random.Random, family: str, level: int) -> tuple[int, list[tuple[str, int]]]:
    if family == "add":
        return _n_digit(rng, level), [("+", _n_digit(rng, level))]
    if family == "sub":
        a = _n_digit(rng, level)
        return a, [("-", rng.randint(1 if level == 1 else 10 ** (level - 1), a))]
    if family == "mul":
        a = rng.randint(2, 9) if level == 1 else _n_digit(rng, level)
        return a, [("*", rng.randint(2, 9))]
    start = value = rng.randint(10, 99)
    ops: list[tuple[str, int]] = []
    for _ in range(level + 1):
        # Only subtract what is there, so every intermediate count stays a count.
        if value >= 10 and rng.random() < 0.5:
            operand = rng.randint(1, min(99, value))
            ops.append(("-", operand))
            value -= operand
        else:
            operand = rng.randint(1, 99)
            ops.append(("+", operand))
            value += operand
    return start, ops


def task_id(family: str, difficulty: int, start: int, ops: list[tuple[str, int]]) -> str:
    return f"{family}:{difficulty}:{start}" + "".join(f"{op}{x}" for op, x in ops)


def is_heldout(task_id_: str, fraction: float = DEFAULT_HELDOUT_FRACTION) -> bool:
    """Hash split on the id: stable across seeds, runs and machines."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"heldout fraction must be in [0, 1], got {fraction}")
    digest = hashlib.sha256(task_id_.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _build_task(rng: random.Random, family: str, difficulty: int, start: int,
                ops: list[tuple[str, int]]) -> Task:
    cot, value = chain_cot(start, ops)
    return Task(
        id=task_id(family, difficulty, start, ops),
        family=family,
        difficulty=difficulty,
        prompt=f"Q: {_question(rng, family, start, ops)}\nA:",
        cot=cot,
        answer=str(value),
        target=f" {cot} {answer_line(value)}",
    )


def _check_level(family: str, difficulty: int) -> None:
    if family not in DIFFICULTIES:
        raise ValueError(f"unknown task family {family!r}; choose one of {list(FAMILIES)}")
    allowed = DIFFICULTIES[family]
    if difficulty not in allowed:
        raise ValueError(
            f"difficulty {difficulty} out of range for family {family!r}: "
            f"allowed {allowed.start}..{allowed.stop - 1}"
        )


def _rng(seed: int, family: str, difficulty: int) -> random.Random:
    # One stream per (seed, family, difficulty): adding a level never shifts another's tasks.
    material = f"k1rl-tasks/{seed}/{family}/{difficulty}".encode()
    return random.Random(int.from_bytes(hashlib.sha256(material).digest()[:8], "big"))


def _sample(rng: random.Random, family: str, difficulty: int) -> tuple[str, Callable[[], Task]]:
    """One problem of the level: its id, and how to build its Task (worded with further
    draws from ``rng``, so only for a problem that is kept)."""
    if family == "code":
        expr = _sample_code(rng, difficulty)
        tid = f"code:{difficulty}:" + "".join(expr)
        return tid, lambda: _build_code_task(rng, difficulty, expr, tid)
    if family == "count":
        first, last = _sample_count(rng, difficulty)
        tid = f"count:{difficulty}:{first}..{last}"
        return tid, lambda: _build_count_task(rng, difficulty, first, last, tid)
    start, ops = _sample_ops(rng, family, difficulty)
    return (task_id(family, difficulty, start, ops),
            lambda: _build_task(rng, family, difficulty, start, ops))


def _draw(family: str, difficulty: int, count: int, seed: int, split: str,
          heldout_fraction: float, exclude: Iterable[str]) -> list[Task]:
    """Up to `count` distinct tasks; fewer when the level runs out of problems."""
    _check_level(family, difficulty)
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if split not in ("all", "train", "heldout"):
        raise ValueError(f"split must be 'all', 'train' or 'heldout', got {split!r}")
    if not 0.0 <= heldout_fraction <= 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1], got {heldout_fraction}")
    rng, seen, tasks = _rng(seed, family, difficulty), set(exclude), []
    # Enough draws to exhaust a one-digit level (81 problems at most) many times over.
    for _ in range(100 * count + 1000):
        if len(tasks) == count:
            break
        tid, build = _sample(rng, family, difficulty)
        if tid in seen:
            continue
        if split != "all" and is_heldout(tid, heldout_fraction) != (split == "heldout"):
            continue
        seen.add(tid)
        tasks.append(build())
    return tasks


def generate_tasks(
    family: str,
    difficulty: int,
    count: int,
    seed: int = 0,
    *,
    split: Split = "all",
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
    exclude: Iterable[str] = (),
) -> list[Task]:
    """`count` distinct problems of one family and level, deterministic for the seed.

    split="train" keeps only ids outside the held-out hash bucket, "heldout" only ids inside
    it, so a train set and a held-out set never share a problem whatever their seeds.
    `exclude` drops the given ids (e.g. another set's), for ad-hoc disjointness.
    Raises ValueError when the level has fewer distinct problems than asked for.
    """
    tasks = _draw(family, difficulty, count, seed, split, heldout_fraction, exclude)
    if len(tasks) < count:
        raise ValueError(
            f"found only {len(tasks)} distinct {family!r} problems at difficulty {difficulty} "
            f"for split {split!r}; asked for {count}"
        )
    return tasks


def all_levels(families: Iterable[str] = FAMILIES) -> list[tuple[str, int]]:
    return [(family, level) for family in families for level in DIFFICULTIES[family]]


def generate_suite(
    count_per_level: int,
    seed: int = 0,
    *,
    levels: Iterable[tuple[str, int]] | None = None,
    split: Split = "all",
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
    exclude: Iterable[str] = (),
) -> list[Task]:
    """Up to count_per_level tasks of every (family, difficulty) level, in level order.

    Unlike generate_tasks a small level (one-digit add has 81 problems) gives what it has.
    """
    exclude = frozenset(exclude)
    tasks: list[Task] = []
    for family, level in levels if levels is not None else all_levels():
        tasks += _draw(family, level, count_per_level, seed, split, heldout_fraction, exclude)
    return tasks


# ------------------------------------------------------------------------ storage


def write_problems(path: str | Path, levels: Iterable[tuple[str, int]], count: int,
                   seed: int = 0, *, split: Split = "all",
                   heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
                   exclude: Iterable[str] = (), up_to: bool = False) -> int:
    """``count`` problems of each level, in level order, written as rows of the data-source
    format (:meth:`Task.as_problem`) to a JSONL file: what ``k1rl gen-tasks`` writes.
    ``up_to``: a level with fewer distinct problems gives what it has, else ValueError."""
    exclude = frozenset(exclude)
    tasks = [t for family, level in levels
             for t in (generate_suite(count, seed, levels=((family, level),), split=split,
                                      heldout_fraction=heldout_fraction, exclude=exclude)
                       if up_to else
                       generate_tasks(family, level, count, seed, split=split,
                                      heldout_fraction=heldout_fraction, exclude=exclude))]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(t.as_problem()) + "\n" for t in tasks), encoding="utf-8")
    return len(tasks)


def problem_ids(path: str | Path) -> set[str]:
    """The ids of the rows of a JSONL file ``write_problems`` wrote."""
    with Path(path).open(encoding="utf-8") as f:
        return {json.loads(line)["id"] for line in f if line.strip()}


def write_jsonl(tasks: Iterable[Task], path: str | Path) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for task in tasks:
            f.write(task.model_dump_json() + "\n")
            n += 1
    return n


def read_jsonl(path: str | Path) -> list[Task]:
    tasks = []
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                tasks.append(Task.model_validate(json.loads(line)))
            except (json.JSONDecodeError, ValidationError) as e:
                raise ValueError(f"{path}:{lineno}: not a valid task record: {e}") from e
    return tasks
