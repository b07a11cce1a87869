"""Per-iteration token budget and length-penalty weight: k1.5's penalty warm-up, long2short
RL's cut budget, and "Toggle" (alternating budget-limited and normal phases) as config.

``rl.schedule.phases`` lists from which iteration each setting holds; a phase leaves a
setting out (null) to keep the run's own (``rollout.max_tokens``,
``reward.length_penalty_weight`` after its warm-up). With ``period`` the phases repeat:
iteration i uses the phase for i mod period, so two phases at 0 and period/2 alternate.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Phase(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    start: int = Field(ge=0, description="First iteration (within a period) of the phase.")
    max_tokens: int | None = Field(
        None, ge=1, description="Rollout token budget per trajectory (null: rollout.max_tokens).")
    length_penalty_weight: float | None = Field(
        None, ge=0, description="Weight of the k1.5 length reward (null: the reward config's).")


class BudgetSchedule(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    phases: list[Phase] = Field(default_factory=list, description="In order of start.")
    period: int | None = Field(
        None, ge=2, description="Repeat the phases every this many iterations (Toggle); "
        "null: the last phase holds to the end.")

    @model_validator(mode="after")
    def _ordered(self) -> BudgetSchedule:
        starts = [p.start for p in self.phases]
        if starts != sorted(set(starts)):
            raise ValueError(f"phase starts must increase strictly, got {starts}")
        if self.period is not None and starts and starts[-1] >= self.period:
            raise ValueError(f"phase start {starts[-1]} is not within the period {self.period}")
        return self

    def at(self, iteration: int) -> Phase:
        """The phase in force at ``iteration`` (an empty one before the first)."""
        i = iteration % self.period if self.period else iteration
        current = Phase(start=0)
        for phase in self.phases:
            if phase.start <= i:
                current = phase
        return current

    def budgets(self) -> list[int]:
        return [p.max_tokens for p in self.phases if p.max_tokens is not None]
