"""Final-answer extraction (reward_svc/answers.py) and math verification of the forms
users' datasets and policies write: boxed LaTeX, fractions, decimals, intervals, sets."""

from __future__ import annotations

import re

import pytest

from k1rl.config import ConfigError, RunConfig
from reward_svc.answers import boxed_answer, extract, regex_answer


def test_the_last_box_counts_and_its_nested_braces_are_kept():
    assert boxed_answer(r"so \boxed{\frac{1}{2}}.") == r"\frac{1}{2}"
    assert boxed_answer(r"\boxed{3} wait, no: \boxed{4}") == "4"
    assert boxed_answer(r"\boxed{\{1, \{2\}\}}") == r"\{1, \{2\}\}"
    assert boxed_answer(r"\fbox{7}") == "7"
    assert boxed_answer(r"\boxed{5} and then \boxed{6") == "5"  # an unclosed last box
    assert boxed_answer("no box here") is None
    assert boxed_answer(r"\boxed{}") is None
    assert boxed_answer(r"\boxed{" + "9" * 1000 + "}") is None  # longer than any answer


def test_formats_are_tried_in_the_configured_order():
    both = r"The answer is 3. Actually \boxed{4}"
    assert extract(both) == "4"
    assert extract(both, ("answer_is", "boxed")) == "3"
    assert extract("The answer is 12.") == "12"  # no box: the synthetic tasks' line
    pattern = re.compile(r"Final: (\S+)")
    assert extract("Final: 1 Final: 2", ("regex",), pattern) == "2"
    assert regex_answer("x = 5", re.compile(r"\d+")) == "5"
    assert extract("nothing", ("boxed", "answer_is")) is None


@pytest.fixture(scope="module")
def verifier():
    from reward_svc.verifiers.math import MathVerifier

    v = MathVerifier(timeout_s=10.0)
    v.start()
    yield v
    v.close()


@pytest.mark.parametrize("gold,response", [
    ("85", r"\boxed{85}"),
    ("1/2", r"\boxed{\frac{1}{2}}"),
    (r"\frac{3}{4}", r"... so the answer is \boxed{0.75}"),
    ("[1, 2]", r"\boxed{[1,2]}"),
    (r"\{1, 2\}", r"\boxed{\{2, 1\}}"),
    (r"2\sqrt{2}", r"\boxed{\sqrt{8}}"),
])
def test_latex_forms_math_verify_equates_are_right(verifier, gold, response):
    assert verifier.verify(response, gold)


@pytest.mark.parametrize("gold,response", [
    ("1/2", r"\boxed{\frac{1}{3}}"),
    ("[1, 2]", r"\boxed{(1,2)}"),  # open and closed intervals differ
    ("85", r"\boxed{85} is wrong, \boxed{86}"),  # the last box counts
    ("85", "85"),  # no stated answer
])
def test_other_answers_are_wrong(verifier, gold, response):
    assert not verifier.verify(response, gold)


def test_answer_regex_is_checked_at_config_load():
    with pytest.raises(ConfigError, match="answer_regex and the answer format 'regex'"):
        RunConfig.from_yaml_text("reward: {answer_formats: [regex]}")
    with pytest.raises(ConfigError, match="does not compile"):
        RunConfig.from_yaml_text("reward: {answer_formats: [regex], answer_regex: '(['}")
    cfg = RunConfig.from_yaml_text(r"reward: {answer_formats: [regex, boxed], "
                                   r"answer_regex: 'ANSWER: (\S+)'}")
    assert cfg.reward.answer_formats == ["regex", "boxed"]
