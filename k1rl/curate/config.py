"""The ``curate`` section of a run config: how `k1rl curate` builds an RL prompt set (k1.5
§2.1). Every threshold the report gives is the default here; where it is silent the choice
is a field with its reason."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from k1rl.data.sources import DataSource
from k1rl.yaml_config import Section


class MatchRule(Section):
    """A regular expression searched in one field of a problem."""

    name: str = Field(min_length=1, description="What the rule finds (the funnel's reason).")
    field: Literal["prompt", "answer"] = Field(
        "prompt", description="prompt (the text, or every chat turn) or answer.")
    pattern: str = Field(min_length=1, description="Python regex, searched (not matched).")
    ignore_case: bool = Field(True, description="Case-insensitive search.")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"not a regular expression: {e}") from None
        return pattern


# What the report calls not evaluable: a rule verifier cannot tell a right answer to these
# from a lucky one (choices, yes/no) or cannot check them at all (proofs).
DEFAULT_DROP = [
    MatchRule(name="multiple_choice", field="answer", pattern=r"^\s*\(?[A-E]\)?\s*$",
              ignore_case=False),
    MatchRule(name="multiple_choice", field="prompt",
              pattern=r"which of the following|\(A\)[^\n]*\(B\)"
                      r"|(^|\n)\s*A[).:]\s[^\n]*\n\s*B[).:]\s"),
    MatchRule(name="true_false", field="answer",
              pattern=r"^\s*(true|false|yes|no|correct|incorrect)\s*\.?\s*$"),
    MatchRule(name="true_false", field="prompt", pattern=r"\btrue or false\b|\bT/F\b"),
    MatchRule(name="proof", field="prompt",
              pattern=r"\bprove\b|\bshow that\b|\bprove that\b|\bproof\b|\bdemonstrate that\b"),
    MatchRule(name="proof", field="answer", pattern=r"^\s*(proof|q\.?e\.?d\.?|see proof)\b"),
]


class HackFilter(Section):
    """k1.5's hack filter: the policy answers with no chain of thought; a prompt answered
    right within ``tries`` tries is easy to guess and dropped."""

    enabled: bool = Field(True, description="Run the hack filter.")
    tries: int = Field(8, ge=1, description="N of the report (8).")
    suffix: str = Field(
        "\nGive only the final answer, with no reasoning.",
        description="Appended to the prompt (to the last user turn of a chat prompt).")
    prefill: str = Field(
        "", description="The start of the response, written for the model (after the chat "
        "template's generation prompt) and prepended to what it writes before judging: "
        "e.g. ' The answer is' makes a model of the demo's format answer at once.")
    max_tokens: int = Field(32, ge=1, description="An answer with no reasoning is short; "
                            "this also keeps a model that reasons anyway from getting far.")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature of the tries.")
    verifiers: list[str] = Field(
        default_factory=lambda: ["math"], description="Prompts judged by these verifiers are "
        "tried (an answer can be guessed; a program that passes tests cannot).")


class DifficultyRule(Section):
    """k1.5's difficulty: the pass rate of ``samples`` samples at a relatively high
    temperature from the SFT model. The written ``difficulty`` is 1 - pass rate (higher is
    harder, as the curriculum sampler orders it) and ``pass_rate`` is kept beside it."""

    enabled: bool = Field(True, description="Label (and band) the pass rate.")
    samples: int = Field(10, ge=1, description="Samples per prompt (the report: 10).")
    temperature: float = Field(1.0, ge=0, description="'Relatively high' in the report.")
    max_tokens: int | None = Field(None, ge=1, description="Default: rollout.max_tokens.")
    min_pass_rate: float = Field(
        0.0, ge=0, le=1, description="Drop prompts solved less often (the report keeps all: "
        "0.0; a prompt never solved gives RL no signal until the policy improves).")
    max_pass_rate: float = Field(
        1.0, ge=0, le=1, description="Drop prompts solved more often (the report keeps all: "
        "1.0; always-solved prompts carry no gradient under group-relative rewards).")

    @model_validator(mode="after")
    def _range(self) -> DifficultyRule:
        if self.min_pass_rate > self.max_pass_rate:
            raise ValueError("min_pass_rate is above max_pass_rate")
        return self


class TagBalance(Section):
    """k1.5's domain tags: tag rules add tags to prompts that match them; ``cap`` and
    ``weights`` then balance the set on each prompt's first tag they name."""

    rules: list[MatchRule] = Field(default_factory=list, description="Each adds tag "
                                   "``name`` to the prompts its pattern finds.")
    cap: dict[str, int] = Field(default_factory=dict, description="At most this many "
                                "prompts of a tag.")
    weights: dict[str, float] = Field(
        default_factory=dict, description="Relative shares of the tags named: the largest "
        "set with these proportions that the counts allow (prompts of other tags are kept).")

    @field_validator("cap")
    @classmethod
    def _caps(cls, cap: dict[str, int]) -> dict[str, int]:
        bad = [t for t, c in cap.items() if c < 0]
        if bad:
            raise ValueError(f"cap of {bad[0]!r} is negative")
        return cap

    @field_validator("weights")
    @classmethod
    def _weights(cls, weights: dict[str, float]) -> dict[str, float]:
        bad = [t for t, w in weights.items() if not w > 0]
        if bad:
            raise ValueError(f"weight of {bad[0]!r} must be positive")
        return weights


class CurateConfig(Section):
    """`k1rl curate`: the prompts of ``data`` through the evaluability rules, the hack
    filter, difficulty and the tag balance, judged by the policy in ``model.path`` (the SFT
    model) and reward_svc."""

    data: list[DataSource] = Field(default_factory=list, description="Candidate prompts "
                                   "(any data source; default: data.train).")
    drop: list[MatchRule] = Field(default_factory=lambda: list(DEFAULT_DROP), description=(
        "Evaluability: prompts a rule finds are dropped under its name (default: multiple "
        "choice, true/false and proof questions)."))
    hack_filter: HackFilter = Field(default_factory=HackFilter, description="Drop prompts "
                                    "the SFT model answers right with no chain of thought.")
    difficulty: DifficultyRule = Field(default_factory=DifficultyRule, description="Pass "
                                       "rate of the SFT model's samples as the difficulty.")
    tags: TagBalance = Field(default_factory=TagBalance, description="Tag rules, per-tag "
                             "caps and proportions.")
