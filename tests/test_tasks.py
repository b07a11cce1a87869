"""Synthetic tasks: deterministic, verifiable, with a chain of thought whose every step is true."""

import re

import pytest

from k1rl.data.tasks import (
    DIFFICULTIES,
    Task,
    all_levels,
    answer_line,
    extract_answer,
    generate_suite,
    generate_tasks,
    is_heldout,
    op_block,
    read_jsonl,
    write_jsonl,
)

_BLOCK = re.compile(r"(\d+) ([-+*]) (\d+): ([^.]*); result (\d+)\.")
_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def _eval(expr: str) -> int:
    """Left-to-right value of 'x op y op z' (a step never mixes * with + or -)."""
    tokens = expr.split()
    value = int(tokens[0])
    for op, operand in zip(tokens[1::2], tokens[2::2]):
        value = _APPLY[op](value, int(operand))
    return value


def _digit(n: int, i: int) -> int:
    return (n // 10**i) % 10


def _check_step(a: int, op: str, b: int, i: int, step: str, carry_in: int) -> tuple[int, int]:
    """Check one column step; return (digit written, carry or borrow out)."""
    parts = step.split(", ")
    equations = [p for p in parts if " = " in p]
    for eq in equations:
        lhs, rhs = eq.split(" = ")
        assert _eval(lhs) == int(rhs), f"false step {eq!r} in {a} {op} {b}"
    written = re.search(r"write (\d)", step)
    assert written, f"step {step!r} writes no digit"
    out = re.search(r"(?:carry|borrow) (\d)", step)
    carry_out = int(out.group(1)) if out else 0
    if not equations:  # the final "write c" column just flushes the carry
        assert int(written.group(1)) == carry_in and carry_out == 0
        return carry_in, 0
    first = equations[0].split(" = ")[0].split()
    last_value = int(equations[-1].split(" = ")[1])
    if op == "+":
        assert first[:3] == [str(_digit(a, i)), "+", str(_digit(b, i))]
        assert first[3:] == (["+", "1"] if carry_in else [])
        assert (int(written.group(1)), carry_out) == (last_value % 10, last_value // 10)
    elif op == "-":
        top = int(first[0])
        assert top in (_digit(a, i), _digit(a, i) + 10) and first[1:3] == ["-", str(_digit(b, i))]
        assert first[3:] == (["-", "1"] if carry_in else [])
        assert carry_out == (top >= 10) and last_value == int(written.group(1)) >= 0
    else:
        assert first == [str(_digit(a, i)), "*", str(b)]
        if carry_in:
            assert equations[1].split(" = ")[0] == f"{_digit(a, i) * b} + {carry_in}"
        assert (int(written.group(1)), carry_out) == (last_value % 10, last_value // 10)
    return int(written.group(1)), carry_out


def check_block(a: int, op: str, b: int, steps: str, result: int) -> None:
    assert result == _APPLY[op](a, b), f"{a} {op} {b} is not {result}"
    written, carry = [], 0
    for i, step in enumerate(steps.split("; ")):
        digit, carry = _check_step(a, op, b, i, step, carry)
        written.append(str(digit))
    assert carry == 0, f"{a} {op} {b} ends with an unused carry"
    assert int("".join(reversed(written))) == result, f"written digits of {a} {op} {b}"


def check_task(task: Task) -> None:
    family, level, expr = task.id.split(":")
    assert (family, int(level)) == (task.family, task.difficulty)
    assert task.prompt.startswith("Q: ") and task.prompt.endswith("\nA:")
    assert task.target == f" {task.cot} {answer_line(task.answer)}"
    assert task.target.endswith(f"The answer is {task.answer}.")
    assert extract_answer(task.target) == task.answer
    blocks = _BLOCK.findall(task.cot)
    assert " ".join(f"{a} {op} {b}: {s}; result {r}." for a, op, b, s, r in blocks) == task.cot
    numbers = [int(x) for x in re.split(r"[-+*]", expr)]
    ops = re.findall(r"[-+*]", expr)
    value = numbers[0]
    for (a, op, b, steps, r), want_op, want_b in zip(blocks, ops, numbers[1:], strict=True):
        assert (int(a), op, int(b)) == (value, want_op, want_b)
        check_block(int(a), op, int(b), steps, int(r))
        value = int(r)
        assert value >= 0
    assert str(value) == task.answer
    # Every number the question mentions is an operand of the problem, in order.
    question_numbers = [int(x) for x in re.findall(r"\d+", task.prompt)]
    assert sorted(question_numbers) == sorted(numbers)


@pytest.mark.parametrize(
    ("a", "op", "b", "block"),
    [
        (37, "+", 48, "37 + 48: 7 + 8 = 15, write 5 carry 1; 3 + 4 + 1 = 8, write 8; result 85."),
        (95, "+", 7, "95 + 7: 5 + 7 = 12, write 2 carry 1; 9 + 0 + 1 = 10, write 0 carry 1; "
                     "write 1; result 102."),
        (403, "-", 229, "403 - 229: 13 - 9 = 4, write 4 borrow 1; "
                        "10 - 2 - 1 = 7, write 7 borrow 1; 4 - 2 - 1 = 1, write 1; result 174."),
        (94, "*", 3, "94 * 3: 4 * 3 = 12, write 2 carry 1; "
                     "9 * 3 = 27, 27 + 1 = 28, write 8 carry 2; write 2; result 282."),
    ],
)
def test_worked_operation_format(a, op, b, block):
    # Pinned down so that a change of the format the model learns is a deliberate one.
    assert op_block(a, op, b) == (block, _APPLY[op](a, b))


def test_response_is_cot_then_one_answer_line():
    task = generate_tasks("add", 2, 1, seed=3)[0]
    assert task.target == f" {task.cot} The answer is {task.answer}."
    assert task.target.count("The answer is") == 1


ARITHMETIC = ("add", "sub", "mul", "multi")


@pytest.mark.parametrize(("family", "level"), all_levels(ARITHMETIC))
def test_every_level_is_verifiable_and_its_cot_is_correct(family, level):
    tasks = generate_tasks(family, level, 20, seed=7)
    assert len({t.id for t in tasks}) == 20
    for task in tasks:
        check_task(task)


def test_difficulty_means_digits_or_operations():
    for level in (1, 3, 5):
        for task in generate_tasks("add", level, 10, seed=0):
            a, b = task.id.split(":")[2].split("+")
            assert len(a) == len(b) == level
    for task in generate_tasks("mul", 3, 10, seed=0):
        a, b = task.id.split(":")[2].split("*")
        assert len(a) == 3 and len(b) == 1
    for level in DIFFICULTIES["multi"]:
        for task in generate_tasks("multi", level, 10, seed=0):
            assert len(re.findall(r"[-+*]", task.id.split(":")[2])) == level + 1


def test_same_seed_same_tasks_other_seed_other_tasks():
    first = generate_tasks("multi", 2, 30, seed=11)
    assert first == generate_tasks("multi", 2, 30, seed=11)
    assert [t.id for t in first] != [t.id for t in generate_tasks("multi", 2, 30, seed=12)]
    # Levels draw from their own streams: a suite's add tasks match a direct request.
    suite = generate_suite(5, seed=11, levels=[("sub", 2), ("add", 3)])
    assert suite[5:] == generate_tasks("add", 3, 5, seed=11)


def test_heldout_split_is_disjoint_from_train_across_seeds():
    train = generate_suite(40, seed=0, split="train")
    heldout = generate_suite(40, seed=1, split="heldout")
    assert heldout and train
    assert not {t.id for t in train} & {t.id for t in heldout}
    assert all(is_heldout(t.id) for t in heldout)
    assert not any(is_heldout(t.id) for t in train)
    # The held-out share follows the requested fraction.
    ids = [t.id for t in generate_tasks("add", 4, 2000, seed=5)]
    share = sum(is_heldout(i, 0.2) for i in ids) / len(ids)
    assert 0.16 < share < 0.24


def test_exclude_drops_another_sets_problems():
    first = generate_tasks("sub", 2, 50, seed=0)
    second = generate_tasks("sub", 2, 50, seed=0, exclude={t.id for t in first})
    assert not {t.id for t in first} & {t.id for t in second}


def test_small_level_runs_out_with_a_clear_error_and_suite_takes_what_it_has():
    assert len(generate_tasks("add", 1, 81, seed=0)) == 81
    with pytest.raises(ValueError, match="found only 81 distinct 'add' problems"):
        generate_tasks("add", 1, 82, seed=0)
    suite = generate_suite(100, seed=0, levels=[("sub", 1)])
    assert len(suite) == 45  # every a - b with 1 <= b <= a <= 9


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"family": "div", "difficulty": 1}, "unknown task family 'div'"),
        ({"family": "add", "difficulty": 0}, "difficulty 0 out of range for family 'add'"),
        ({"family": "multi", "difficulty": 9}, "difficulty 9 out of range for family 'multi'"),
        ({"family": "add", "difficulty": 2, "count": -1}, "count must be >= 0"),
        ({"family": "add", "difficulty": 2, "split": "test"}, "split must be"),
        ({"family": "add", "difficulty": 2, "heldout_fraction": 1.5}, "heldout_fraction must"),
    ],
)
def test_bad_requests_name_what_is_wrong(kwargs, message):
    kwargs = {"count": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate_tasks(**kwargs)


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        (" 3 + 4: 3 + 4 = 7, write 7; result 7. The answer is 7.", "7"),
        ("The answer is 12. No wait. The answer is 1,024.", "1024"),
        ("The answer is 007.", "7"),
        ("The answer is -5.", "-5"),
        ("The answer is", None),
        ("no answer here 42", None),
        ("", None),
        ("The answer is 85.5.", None),
        ("The answer is 3.14 no, The answer is 3.", "3"),
        ("The answer is " + "9" * 5000 + ".", None),
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_jsonl_round_trip_and_bad_line(tmp_path):
    tasks = generate_suite(3, seed=2)
    path = tmp_path / "sub" / "tasks.jsonl"
    assert write_jsonl(tasks, path) == len(tasks)
    assert read_jsonl(path) == tasks
    path.write_text(path.read_text() + '{"id": "x"}\n')
    with pytest.raises(ValueError, match=rf"tasks.jsonl:{len(tasks) + 1}: not a valid task"):
        read_jsonl(path)


@pytest.mark.parametrize(
    ("old", "new"),
    [("7 + 8 = 15", "7 + 8 = 16"), ("write 5 carry 1", "write 5"), ("write 8;", "write 9;"),
     ("3 + 4 + 1", "3 + 4")],
)
def test_the_cot_checker_catches_a_wrong_step(old, new):
    # The correctness tests above are only worth what this checker catches.
    task = Task(id="add:2:37+48", family="add", difficulty=2, prompt="Q: 37 and 48?\nA:",
                cot=op_block(37, "+", 48)[0], answer="85", target="")
    task = task.model_copy(update={"target": f" {task.cot} The answer is 85."})
    check_task(task)
    broken = task.cot.replace(old, new)
    assert broken != task.cot
    broken_task = task.model_copy(update={"cot": broken, "target": f" {broken} {answer_line(85)}"})
    with pytest.raises(AssertionError):
        check_task(broken_task)


@pytest.mark.parametrize("level", DIFFICULTIES["code"])
def test_a_code_task_target_is_a_program_that_passes_its_own_tests(level):
    import subprocess
    import sys

    from k1rl.protocol import CodeTask

    tasks = generate_tasks("code", level, 5, seed=2)
    assert len({t.id for t in tasks}) == 5
    for task in tasks:
        assert task.verifier == "code" and task.prompt.endswith("\nA:")
        assert task.target == f" ```python\n{task.cot}\n```"
        expr = task.id.split(":")[2]
        assert " ".join(re.findall(r"\d+|[a-z]+|[-+*]", expr)) in task.prompt  # asked for
        gold = CodeTask.model_validate_json(task.answer)
        assert len(gold.tests) >= 2
        for test in gold.tests:
            assert len(test.stdin.split()) == level
            ran = subprocess.run([sys.executable, "-c", task.cot], input=test.stdin,
                                 capture_output=True, text=True, timeout=30)
            assert ran.stdout.strip() == test.expected


def test_arithmetic_tasks_are_judged_by_the_math_verifier():
    assert {t.verifier for f in ARITHMETIC for t in generate_tasks(f, 1, 3, seed=0)} == {"math"}


def test_count_lengths_have_a_long_tail_and_the_answer_is_the_last_number():
    tasks = generate_tasks("count", 2, 400, seed=1)
    counts = sorted(len(t.cot.split(", ")) for t in tasks)
    assert counts[0] >= 3 and counts[-1] <= 8 * 4**2
    assert counts[len(counts) // 2] * 4 < counts[-1]  # the median is far below the longest
    for task in tasks[:20]:
        numbers = [int(x) for x in task.cot.rstrip(".").split(", ")]
        assert numbers == list(range(numbers[0], numbers[-1] + 1))
        assert extract_answer(task.target) == task.answer == str(numbers[-1])
        assert f"from {numbers[0]} up to {numbers[-1]}" in task.prompt
