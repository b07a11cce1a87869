"""One iteration's metrics as a typed record: what the master fills in phase by phase, the
sinks write, and the plots, the demo summary and the benches read back.

Sinks store it flat (:meth:`IterationMetrics.row`): every scalar under its field's name,
and the per-key maps under ``<template>.format(key)`` (``accuracy@math:3``,
``train_grad_norm``, ``eval_accuracy@code:1``), so metrics.jsonl, TensorBoard and W&B all
show the same names. :meth:`IterationMetrics.from_row` reads such a row back and refuses
a key no field holds.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict, model_validator

Row = dict[str, float | int]


class Section(BaseModel):
    """A group of metrics one phase produces, stored flat under its fields' names."""

    model_config = ConfigDict(extra="forbid")
    # dict fields: the flat key of each entry, as a template of the entry's key
    FLAT: ClassVar[dict[str, str]] = {}

    def row(self) -> Row:
        out: Row = {}
        for name, value in self:
            if name in self.FLAT:
                out.update({self.FLAT[name].format(key): v for key, v in value.items()})
            elif value is not None:
                out[name] = value
        return out

    @classmethod
    def take(cls, row: dict) -> Section | None:
        """The section made of the keys of ``row`` it holds, which are removed from
        ``row``; None when ``row`` has none of them."""
        values = {name: row.pop(name) for name in cls.model_fields
                  if name not in cls.FLAT and name in row}
        for name, template in cls.FLAT.items():
            prefix, suffix = template.split("{}")
            keys = [k for k in row if k.startswith(prefix) and k.endswith(suffix)
                    and len(k) > len(prefix) + len(suffix)]
            if keys:
                values[name] = {k[len(prefix):len(k) - len(suffix)]: row.pop(k) for k in keys}
        return cls.model_validate(values) if values else None


class Timings(Section):
    """Wall seconds of the iteration and its phases (evaluation's are in ``eval_s``)."""

    iteration_s: float
    rollout_s: float = 0.0
    reward_s: float = 0.0
    train_s: float = 0.0


class SwitchMetrics(Section):
    """The checkpoint engine's two phase switches of the iteration."""

    switch_to_rollout_s: float
    switch_to_train_s: float
    engine_start_s: float = 0.0
    weight_sync_s: float = 0.0


class RolloutMetrics(Section):
    """What the engines generated and what the replay buffer holds after it."""

    FLAT: ClassVar[dict[str, str]] = {"engine_tokens_per_s": "tokens_per_s@{}"}

    policy_version_rollout: int
    groups_trained: int
    prompts_started: int
    trajectories_continued: int = 0
    tokens_reused: int = 0
    # segments the engine stopped because they loop; every token it decoded
    repetition_stops: int = 0
    decoded_tokens: int = 0
    replay_parked: int = 0
    replay_groups: int = 0
    replay_age_mean: float = 0.0
    replay_age_max: int = 0
    replay_parked_tokens: int = 0
    # engines that took part, and each one's decoding rate in its part (by engine0, ...)
    engines: int = 1
    engine_tokens_per_s: dict[str, float] = {}


class RewardMetrics(Section):
    """Rewards of the groups that completed this iteration."""

    FLAT: ClassVar[dict[str, str]] = {"accuracy_by_level": "accuracy@{}"}

    reward_mean: float
    accuracy: float
    accuracy_by_level: dict[str, float] = {}
    reward_errors: int = 0
    length_penalty_weight: float = 0.0
    response_tokens_mean: float = 0.0


class TrainMetrics(Section):
    """The trainer's RL iteration: its loss, optimizer steps, and the step's own metrics
    (which depend on the loss: clip fractions, KL, the mismatch alarm)."""

    FLAT: ClassVar[dict[str, str]] = {"values": "train_{}"}

    train_loss: float
    train_steps: int
    values: dict[str, float] = {}


class DataMetrics(Section):
    """The run's problems, recorded with its first iteration: pool sizes and the data
    rows left out as bad (``data.on_bad_row: skip``), by reason."""

    FLAT: ClassVar[dict[str, str]] = {"skipped": "data_skipped@{}"}

    data_train_problems: int
    data_heldout_problems: int
    skipped: dict[str, int] = {}


class Accuracy(BaseModel):
    """Accuracy of a policy on a task set: pass@1 of ``samples`` samples at the rollout
    temperature, greedy, each per level when the set spans several, and the seconds it
    took. Stored under a prefix: ``eval`` in iteration records, ``val`` in SFT's."""

    model_config = ConfigDict(extra="forbid")

    accuracy: float
    greedy: float
    accuracy_by_level: dict[str, float] = {}
    greedy_by_level: dict[str, float] = {}
    seconds: float = 0.0

    def row(self, prefix: str) -> Row:
        return {f"{prefix}_accuracy": self.accuracy, f"{prefix}_greedy": self.greedy,
                **{f"{prefix}_accuracy@{k}": v for k, v in self.accuracy_by_level.items()},
                **{f"{prefix}_greedy@{k}": v for k, v in self.greedy_by_level.items()},
                f"{prefix}_s": self.seconds}

    @classmethod
    def take(cls, row: dict, prefix: str) -> Accuracy | None:
        if f"{prefix}_accuracy" not in row:
            return None
        levels = {kind: {k.split("@", 1)[1]: row.pop(k) for k in list(row)
                         if k.startswith(f"{prefix}_{kind}@")}
                  for kind in ("accuracy", "greedy")}
        return cls(accuracy=row.pop(f"{prefix}_accuracy"), greedy=row.pop(f"{prefix}_greedy"),
                   accuracy_by_level=levels["accuracy"], greedy_by_level=levels["greedy"],
                   seconds=row.pop(f"{prefix}_s", 0.0))


class EvalScores(BaseModel):
    """Scores of a policy on a set of problems (``k1rl eval``): pass@1 (the share of right
    samples), pass@k (the unbiased estimate from the samples), greedy accuracy and the mean
    response length of the samples."""

    model_config = ConfigDict(extra="forbid")

    problems: int
    pass1: float
    pass_k: float
    greedy: float
    response_tokens: float


class EvalReport(BaseModel):
    """``k1rl eval``'s report: the scores overall, per level (pool or data source) and per
    tag, and what was evaluated how."""

    model_config = ConfigDict(extra="forbid")

    model: str
    data: list[str]
    samples: int
    k: int
    temperature: float
    max_tokens: int
    seed: int
    seconds: float
    overall: EvalScores
    by_level: dict[str, EvalScores] = {}
    by_tag: dict[str, EvalScores] = {}
    skipped: dict[str, int] = {}


class IterationMetrics(BaseModel):
    """One iteration's record. A section is None when its phase did nothing (no group
    completed, so nothing was scored or trained) or did not run (the final evaluation's
    record holds only ``eval``)."""

    model_config = ConfigDict(extra="forbid")

    iteration: int
    policy_version: int
    max_tokens: int | None = None
    time: Timings | None = None
    switch: SwitchMetrics | None = None
    rollout: RolloutMetrics | None = None
    reward: RewardMetrics | None = None
    train: TrainMetrics | None = None
    eval: Accuracy | None = None
    data: DataMetrics | None = None

    # Timings before TrainMetrics: its train_s must not read as a trainer metric "s"
    SECTIONS: ClassVar[tuple[tuple[str, type[Section]], ...]] = (
        ("time", Timings), ("switch", SwitchMetrics), ("rollout", RolloutMetrics),
        ("reward", RewardMetrics), ("train", TrainMetrics), ("data", DataMetrics))

    def row(self) -> Row:
        """The flat row the sinks store."""
        out: Row = {}
        for part in self._parts():
            out.update(part)
        return out

    def _parts(self) -> list[Row]:
        parts: list[Row] = [{"iteration": self.iteration, "policy_version": self.policy_version}]
        if self.max_tokens is not None:
            parts.append({"max_tokens": self.max_tokens})
        parts += [section.row() for name, _ in self.SECTIONS
                  if (section := getattr(self, name)) is not None]
        if self.eval is not None:
            parts.append(self.eval.row("eval"))
        return parts

    @model_validator(mode="after")
    def _flat_names_are_distinct(self) -> IterationMetrics:
        # a trainer metric named "s" would be stored as train_s, the train phase's seconds
        seen: set[str] = set()
        for part in self._parts():
            if clash := seen & part.keys():
                raise ValueError(f"metric names {sorted(clash)} are stored twice: rename "
                                 "the metric that shadows a record field")
            seen |= part.keys()
        return self

    @classmethod
    def from_row(cls, row: dict) -> IterationMetrics:
        """The record a flat row stores (see :meth:`row`)."""
        rest = dict(row)
        try:
            fields = {"iteration": rest.pop("iteration"),
                      "policy_version": rest.pop("policy_version")}
        except KeyError as e:
            raise ValueError(f"metrics row without {e}: {row}") from None
        if "max_tokens" in rest:
            fields["max_tokens"] = rest.pop("max_tokens")
        fields["eval"] = Accuracy.take(rest, "eval")
        for name, section in cls.SECTIONS:
            fields[name] = section.take(rest)
        if rest:
            raise ValueError(f"metrics row of iteration {row['iteration']} has keys no "
                             f"record field holds: {sorted(rest)}")
        return cls(**fields)


class SFTStepMetrics(BaseModel):
    """One SFT step: its loss, the trainer's step metrics, its stage and learning rate,
    and, when one was due, the validation loss or accuracy after it (accuracy stored with
    the prefix ``val``)."""

    model_config = ConfigDict(extra="forbid")

    step: int
    loss: float
    values: dict[str, float] = {}
    stage: int | None = None
    lr: float | None = None
    val_loss: float | None = None
    val: Accuracy | None = None

    def row(self) -> Row:
        optional = {k: v for k in ("stage", "lr", "val_loss")
                    if (v := getattr(self, k)) is not None}
        return {"step": self.step, "loss": self.loss, **self.values, **optional,
                **(self.val.row("val") if self.val else {})}
