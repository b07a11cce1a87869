"""The prompt ledger: what became of every prompt the run drew.

Each prompt drawn starts a group (k samples, key ``"<iteration>-<position>"``). When an
iteration completes, the ledger gets one line per group that changed in it: ``parked``
(unfinished trajectories wait in the replay buffer), ``trained`` (the group's trajectories
went to the trainer, less those ``dropped`` with a reason: an empty response, a reward
error), or ``dropped`` with a reason (nothing in it could be trained on). The latest line
of a key is its status; ``parked`` is resolved while the replay buffer holds the group.

Lines are appended after the trainer's checkpoint and before the run state is written,
so a line whose iteration the run state does not count as done belongs to an iteration
that died; :meth:`PromptLedger.rewind` removes those when the run goes back to its last
completed iteration (a resume, or an iteration redone after a service failed), and the
redone iteration draws the same prompts again (the sampler and its random state are
restored with the run state): nothing is drawn twice, nothing is lost.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

LEDGER_FILE = "ledger.jsonl"

Status = Literal["parked", "trained", "dropped"]


class LedgerEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str = Field(description="The group: '<iteration drawn>-<position in the draw>'.")
    problem: str = Field(description="Problem.id")
    iteration: int = Field(ge=0, description="The iteration that set this status.")
    status: Status
    trajectories: int = Field(ge=0)
    trained: int = Field(0, ge=0, description="Trajectories sent to the trainer.")
    dropped: dict[str, int] = Field(
        default_factory=dict, description="Trajectories left out of training, by reason.")
    reason: str = Field("", description="Why a whole group was dropped.")


class PromptLedger:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LEDGER_FILE

    def entries(self) -> list[LedgerEntry]:
        if not self.path.exists():
            return []
        return [LedgerEntry.model_validate_json(line)
                for line in self.path.read_text().splitlines() if line.strip()]

    def append(self, entries: list[LedgerEntry]) -> None:
        if not entries:
            return
        with self.path.open("a") as f:
            f.write("".join(e.model_dump_json() + "\n" for e in entries))
            f.flush()
            os.fsync(f.fileno())

    def rewind(self, iterations_done: int) -> int:
        """Drop the lines of iterations that did not complete; how many were dropped."""
        entries = self.entries()
        kept = [e for e in entries if e.iteration < iterations_done]
        if len(kept) != len(entries):
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(e.model_dump_json() + "\n" for e in kept))
            os.replace(tmp, self.path)
        return len(entries) - len(kept)

    def latest(self) -> dict[str, LedgerEntry]:
        """Every group's current status."""
        return {e.key: e for e in self.entries()}


def audit(ledger: PromptLedger, parked_keys: set[str], n: int) -> dict[str, object]:
    """What a finished run's ledger says: groups by status, and what is unaccounted for —
    a group ``parked`` that the replay buffer does not hold, a trained group whose ``n``
    trajectories are not all trained or dropped with a reason, a group recorded twice for
    one iteration (drawn again without the first draw being rewound)."""
    lines: dict[str, list[int]] = {}
    for e in ledger.entries():
        lines.setdefault(e.key, []).append(e.iteration)
    latest = ledger.latest()
    lost_groups = [k for k, e in latest.items() if e.status == "parked" and k not in parked_keys]
    short = sum(n - e.trained - sum(e.dropped.values())
                for e in latest.values() if e.status == "trained")
    return {
        "groups": len(latest),
        "by_status": dict(Counter(e.status for e in latest.values())),
        "lost_groups": lost_groups,
        "lost_trajectories": short + n * len(lost_groups),
        "recorded_twice": sorted(k for k, its in lines.items()
                                 if any(a >= b for a, b in zip(its, its[1:]))),
    }
