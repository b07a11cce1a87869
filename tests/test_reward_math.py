"""The "math" verifier: the final answer follows the last "The answer is" and is compared with
the gold answer by value; malformed or adversarial answers score 0 and never raise or hang."""

import threading
import time

import pytest

from k1rl.config import RewardConfig
from k1rl.data.tasks import generate_tasks
from reward_svc import verifiers
from reward_svc.answers import MAX_ANSWER_CHARS, final_answer
from reward_svc.verifiers.math import BadGoldAnswer, MathVerifier, canonical_int


@pytest.fixture(scope="module")
def verifier():
    v = MathVerifier(timeout_s=3.0)
    yield v
    v.close()


def answer(text: str) -> str:
    return f" 37 + 48: 7 + 8 = 15, write 5 carry 1; 3 + 4 + 1 = 8, write 8. The answer is {text}."


# ------------------------------------------------------------------ answer extraction


def test_final_answer_is_the_sentence_after_the_last_prefix():
    assert final_answer("The answer is 85.") == "85"
    assert final_answer("The answer is 12. The answer is 85. Done.") == "85"
    assert final_answer("The answer is 85.0.") == "85.0"
    assert final_answer("The answer is 85\nthen more text") == "85"
    assert final_answer("The answer is 85. Wait, maybe 86") == "85"
    assert final_answer("85") is None
    assert final_answer("the answer is 85.") is None  # the task format is case-sensitive
    assert final_answer("The answer is .") is None
    assert final_answer("The answer is") is None
    assert final_answer("") is None


def test_final_answer_refuses_over_long_answers():
    assert final_answer("The answer is " + "7" * MAX_ANSWER_CHARS) == "7" * MAX_ANSWER_CHARS
    assert final_answer("The answer is " + "7" * (MAX_ANSWER_CHARS + 1)) is None


def test_canonical_int_normalises_like_extract_answer():
    assert canonical_int("085") == "85"
    assert canonical_int("1,000") == "1000"
    assert canonical_int("-7") == "-7"
    assert canonical_int("-0") == "0"
    assert canonical_int("85.0") is None
    assert canonical_int("\\boxed{85}") is None


# -------------------------------------------------------------- integer answers (no sympy)


def test_real_task_targets_verify(verifier):
    for task in generate_tasks("add", 3, 5, seed=1) + generate_tasks("sub", 2, 5, seed=1):
        assert verifier.verify(task.target, task.answer)
        assert not verifier.verify(task.target, str(int(task.answer) + 1))


@pytest.mark.parametrize(
    "text, gold, expected",
    [
        ("85", "85", True),
        ("86", "85", False),
        ("-85", "-85", True),
        ("-85", "85", False),
        ("85", "-85", False),
        ("-0", "0", True),
        ("0085", "85", True),  # leading zeros: same value
        ("00", "0", True),
        ("1,000", "1000", True),
        ("８５", "85", True),  # Unicode decimal digits read as digits, as int() does
    ],
)
def test_integer_answers(verifier, text, gold, expected):
    assert verifier.verify(answer(text), gold) is expected


def test_last_answer_line_counts(verifier):
    hedge = "The answer is 12. Hmm, no. The answer is 85."
    assert verifier.verify(hedge, "85")
    assert not verifier.verify(hedge, "12")


def test_answer_inside_text(verifier):
    assert verifier.verify("I add them. The answer is 85. That was easy!", "85")
    # a number without the answer line does not count, even if it is right
    assert not verifier.verify("I add them and get 85.", "85")


# ---------------------------------------------------------- other forms, via math-verify


@pytest.mark.parametrize(
    "text, expected",
    [
        ("85.0", True),
        ("\\boxed{85}", True),
        ("$85$", True),
        ("$\\boxed{85}$", True),
        ("\\frac{170}{2}", True),
        ("85 apples", True),
        ("85.5", False),
        ("86 or 85", False),  # a hedge is a set, not its last number
        ("85^2", False),
    ],
)
def test_equivalent_forms(verifier, text, expected):
    assert verifier.verify(answer(text), "85") is expected


def test_gold_in_latex_form(verifier):
    assert verifier.verify(answer("0.5"), "\\frac{1}{2}")
    assert not verifier.verify(answer("0.25"), "\\frac{1}{2}")


@pytest.mark.parametrize(
    "response",
    [
        "",
        "The answer is",
        answer("\\frac{\\frac{"),
        answer("\\boxed{"),
        answer("\\boxed{}"),
        answer("$$"),
        answer("((((((((((((((("),
        answer("\\frac{" * 60),
        answer("eighty-five"),
        answer("\ud800"),  # a lone surrogate: not even encodable as UTF-8
        answer("\x00\x01\x7f"),
        answer("\u202e58"),  # right-to-left override
        answer("8\u03055"),  # combining overline
        "The answer is " + "9" * 100_000 + ".",  # 10^5 digits
        "The answer is 85" + "5" * 100_000 + ".",
        "The answer is " * 20_000,
    ],
)
def test_malformed_answers_score_zero(verifier, response):
    start = time.monotonic()
    assert verifier.verify(response, "85") is False
    assert time.monotonic() - start < 2.0


def test_bad_gold_is_an_error_naming_it(verifier):
    with pytest.raises(BadGoldAnswer, match="empty"):
        verifier.verify(answer("85"), "  ")
    with pytest.raises(BadGoldAnswer, match="frac"):
        verifier.verify(answer("85.0"), "\\frac{")


def test_works_off_the_main_thread(verifier):
    # math-verify's own (signal) timeouts raise off the main thread; the RPC server calls
    # verifiers from its worker thread
    results = []
    t = threading.Thread(target=lambda: results.append(verifier.verify(answer("85.0"), "85")))
    t.start()
    t.join(30)
    assert results == [True]


def test_runaway_computation_is_cut_off_and_the_verifier_recovers():
    v = MathVerifier(timeout_s=0.5)
    try:
        v.start()
        start = time.monotonic()
        # 14 characters that make sympy compute 10**(10**10)
        assert v.verify(answer("$10^{10^{10}}$"), "85") is False
        assert time.monotonic() - start < 3.0
        assert v.worker.restarts == 1
        assert v.verify(answer("$85$"), "85") is True
    finally:
        v.close()


def test_registry_creates_math_from_config():
    assert "math" in verifiers.available()
    v = verifiers.create("math", RewardConfig(verify_timeout_s=1.5))
    try:
        assert isinstance(v, MathVerifier) and v.worker.timeout_s == 1.5
    finally:
        v.close()
    with pytest.raises(verifiers.UnknownVerifierError,
                       match="'chess'.*registered: code, cot_rm, math"):
        verifiers.create("chess", RewardConfig())
