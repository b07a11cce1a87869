"""What the master must remember to continue a run exactly where it stopped."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

STATE_FILE = "state.json"


class RunState(BaseModel):
    """Written after every completed iteration, atomically, so a kill never leaves half a state."""

    model_config = ConfigDict(extra="forbid")

    run_id: str
    iterations_done: int = Field(0, ge=0)
    policy_version: int = Field(0, ge=0)
    # trainer checkpoint holding exactly the weights of policy_version (None: the initial model)
    trainer_checkpoint: str | None = None
    rng_state: list = Field(default_factory=list, description="random.Random.getstate()")
    sampler_state: dict = Field(default_factory=dict, description="PromptSampler.state_dict()")
    # replay buffer (parked trajectories) as of iterations_done (None: empty)
    replay_file: str | None = None

    def rng(self, seed: int) -> random.Random:
        rng = random.Random(seed)
        if self.rng_state:
            version, internal, gauss = self.rng_state
            rng.setstate((version, tuple(internal), gauss))
        return rng

    def remember_rng(self, rng: random.Random) -> None:
        version, internal, gauss = rng.getstate()
        self.rng_state = [version, list(internal), gauss]

    def save(self, run_dir: Path) -> None:
        path = Path(run_dir) / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.model_dump()))
        os.replace(tmp, path)  # atomic on POSIX: readers see the old or the new state

    @classmethod
    def load(cls, run_dir: Path) -> RunState:
        path = Path(run_dir) / STATE_FILE
        if not path.exists():
            raise FileNotFoundError(f"{run_dir} has no {STATE_FILE}: nothing to resume")
        return cls.model_validate_json(path.read_text())
