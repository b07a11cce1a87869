"""The chain-of-thought reward model's contract (k1.5 §2.3: a CoT reward model for math
that reasons step by step and ends with its verdict as JSON), shared by reward_svc's
``cot_rm`` verifier, which asks the judge, and `k1rl train-rm`, which teaches one.

    judge_prompt     problem, reference answer, response (and a rubric) as the judge
                     reads them
    parse_verdict    the judge's output -> Verdict, or VerdictError for an output that
                     holds no clear verdict (an item error: never a reward of 0 or 1)
    verdict_json     the JSON line a judge ends with (the training targets end so)

The judge is a model served by a rollout_svc in judge mode (``python -m rollout_svc
--judge``): its own engine, its own address (reward.judge.addresses), no weight updates.
"""

from __future__ import annotations

import json
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from k1rl.data.prompts import PromptConfig
from k1rl.data.sources import DataSource
from k1rl.sft.config import SFTStage
from k1rl.yaml_config import Section

# The judge's output is read from the end: it reasons first, the verdict comes last.
MAX_VERDICT_CHARS = 4096
_OBJECT_START = re.compile(r"\{")


class RubricCriterion(Section):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_]+$",
                      description="Key of its score in the verdict JSON.")
    description: str = Field(min_length=1, description="What the judge checks.")


class JudgeConfig(Section):
    """reward.judge: the generative reward model and where it stands in for rules."""

    mode: Literal["off", "backup", "replace"] = Field(
        "off", description="off: rule verifiers only; backup: the judge re-checks what "
        "the rule verifier (``rule_verifier``) finds not correct (an answer in a form the "
        "rules miss); replace: the judge decides every such item. Items may also name the "
        "``cot_rm`` verifier themselves.")
    rule_verifier: str = Field("math", description="The rule verifier the judge backs up "
                               "or replaces.")
    model: str | None = Field(None, description="The judge's HF checkpoint (`k1rl "
                              "train-rm` makes one): local runs start `rollout_svc --judge` "
                              "on it; null: a judge already serves at the address.")
    address: str = Field("tcp://127.0.0.1:5711", description="RPC address of the judge's "
                         "rollout_svc.")
    addresses: list[str] = Field(default_factory=list, description="Judge replicas "
                                 "(empty: [address]).")
    max_tokens: int = Field(128, ge=1, description="Tokens the judge may reason for; a "
                            "verdict cut off by it is an item error.")
    max_model_len: int = Field(1024, ge=64, description="The judge engine's context: "
                               "prompt (problem, reference, response) plus max_tokens.")
    temperature: float = Field(0.0, ge=0, description="0: the judge's greedy verdict.")
    max_response_chars: int = Field(
        4000, ge=1, description="A response longer than this is shown to the judge cut to "
        "its last this-many characters (where the final answer is).")
    rubric: list[RubricCriterion] = Field(
        default_factory=list, description="Generative reward with rubrics: criteria the "
        "judge scores 0-1 each in the verdict's 'scores'; the reward is then their mean "
        "(the verdict's 'correct' stays the correctness).")
    timeout_s: float = Field(300.0, gt=0, description="One batch of judgements.")
    prompt: PromptConfig = Field(default_factory=PromptConfig, description="How the judge "
                                 "reads its prompt: raw text, or its tokenizer's chat "
                                 "template (an instruct model as judge).")

    def replicas(self) -> list[str]:
        return self.addresses or [self.address]


class TrainRMConfig(Section):
    """`k1rl train-rm`: SFT a judge on verified examples (problem, reference, a policy
    response; the target a chain of thought and the verdict of the rule verifier)."""

    data: list[DataSource] = Field(default_factory=list, description="Problems the policy "
                                   "(model.path) answers (default: data.train); or give "
                                   "`--examples` with the responses already written.")
    samples: int = Field(4, ge=1, description="Policy responses per problem.")
    temperature: float = Field(1.0, ge=0, description="Their sampling temperature: varied "
                               "responses, right and wrong.")
    heldout_fraction: float = Field(0.1, ge=0, lt=1, description="Problems (by id hash) "
                                    "whose examples are kept out of training, for the "
                                    "judge's validation.")
    base: str | None = Field(None, description="The judge's starting checkpoint (default: "
                             "model.path).")
    stages: list[SFTStage] = Field(default_factory=list, description="The SFT schedule "
                                   "(default: sft.stages).")


class Verdict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    correct: bool
    scores: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _unit_scores(self) -> Verdict:
        bad = {k: v for k, v in self.scores.items() if not 0.0 <= v <= 1.0}
        if bad:
            raise ValueError(f"scores outside [0, 1]: {bad}")
        return self


class VerdictError(ValueError):
    """The judge's output holds no clear verdict."""


def judge_prompt(problem: str, reference: str, response: str,
                 rubric: list[RubricCriterion] = (), max_response_chars: int = 4000) -> str:
    """What the judge reads. The response is fenced and cut from the front, so the
    instructions after it are the judge's, not something the response wrote."""
    shown = response if len(response) <= max_response_chars else (
        "..." + response[-max_response_chars:])
    criteria = "".join(f"- {c.name}: {c.description}\n" for c in rubric)
    scores = (', "scores": {' + ", ".join(f'"{c.name}": <0 to 1>' for c in rubric) + "}"
              if rubric else "")
    return (
        "Judge whether the response answers the problem correctly.\n"
        f"Problem:\n{problem.strip()}\n"
        f"Reference answer: {reference.strip()}\n"
        f"Response:\n<<<\n{shown.replace('>>>', '> > >')}\n>>>\n"
        + (f"Score each criterion from 0 to 1:\n{criteria}" if rubric else "")
        + "Reason step by step, then end with one line of JSON: "
        + '{"correct": true or false' + scores + "}\n"
        "Judgement:")


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def stated_answer(response: str) -> str | None:
    """What a response's final answer looks like to a reader who knows no format: its last
    number. (The teacher's chain of thought names it; the judge learns to find it.)"""
    found = _NUMBER.findall(response)
    return found[-1].rstrip(",") if found else None


def judge_cot(reference: str, response: str, correct: bool) -> str:
    """The chain of thought and verdict a judge is taught to write for a response a rule
    verifier labelled ``correct``: the reference, the response's answer, the comparison
    (digit by digit for numbers: a small judge compares adjacent digits far more reliably
    than whole numbers), then the verdict."""
    ref = reference.strip()
    stated = ref if correct else stated_answer(response)
    if not correct and stated is not None and stated.replace(",", "") == ref:
        stated = None  # the number is there but not as a checkable final answer
    if stated is None:
        said, compare = "The response states no final answer.", "Nothing to compare."
    else:
        said, compare = f"The response's final answer is {stated}.", _comparison(ref, stated)
    return f" The reference answer is {ref}. {said} {compare} {verdict_json(correct)}"


def _comparison(reference: str, stated: str) -> str:
    a, b = reference.replace(",", ""), stated.replace(",", "")
    same = "They match." if a == b else "They differ."
    if not (_NUMBER.fullmatch(a) and _NUMBER.fullmatch(b)) or max(len(a), len(b)) > 12:
        return same
    if len(a) != len(b):
        return f"{b} has {len(b)} characters, {a} has {len(a)}. {same}"
    steps = ", ".join(f"{x}={y}" if x == y else f"{x}!={y}" for x, y in zip(a, b))
    return f"Digit by digit: {steps}. {same}"


def verdict_json(correct: bool, scores: dict[str, float] | None = None) -> str:
    body = {"correct": correct, **({"scores": scores} if scores else {})}
    return json.dumps(body)


def parse_verdict(output: str, rubric: list[RubricCriterion] = (),
                  finished: bool = True) -> Verdict:
    """The verdict the judge's ``output`` ends with. VerdictError when the output was cut
    off (``finished`` False), holds no JSON object with a boolean "correct", holds two that
    disagree, or misses a rubric criterion's score."""
    if not finished:
        raise VerdictError("the judge's output was cut off before its verdict")
    tail = output[-MAX_VERDICT_CHARS:]
    found = _objects(tail)
    verdicts = [o for o in found if "correct" in o]
    if not verdicts:
        raise VerdictError("no JSON verdict with 'correct' in the judge's output")
    if len({json.dumps(v.get("correct")) for v in verdicts}) > 1:
        raise VerdictError("the judge's output holds verdicts that disagree")
    last = verdicts[-1]
    if not isinstance(last["correct"], bool):
        raise VerdictError(f"'correct' must be true or false, not {last['correct']!r}")
    scores = last.get("scores", {})
    if rubric:
        if not isinstance(scores, dict):
            raise VerdictError("'scores' must be an object of criterion: score")
        missing = [c.name for c in rubric if c.name not in scores]
        if missing:
            raise VerdictError(f"the verdict has no score for {missing}")
        scores = {c.name: scores[c.name] for c in rubric}
        if not all(isinstance(v, int | float) and not isinstance(v, bool)
                   for v in scores.values()):
            raise VerdictError("rubric scores must be numbers")
    else:
        scores = {}
    try:
        return Verdict(correct=last["correct"], scores={k: float(v) for k, v in scores.items()})
    except ValueError as e:
        raise VerdictError(str(e)) from None


def _objects(text: str) -> list[dict]:
    """Every JSON object that starts at a '{' of ``text`` and parses, outermost first."""
    decoder = json.JSONDecoder()
    out, end = [], -1
    for m in _OBJECT_START.finditer(text):
        if m.start() < end:
            continue  # inside an object already read
        try:
            value, stop = decoder.raw_decode(text, m.start())
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            out.append(value)
            end = stop
    return out
