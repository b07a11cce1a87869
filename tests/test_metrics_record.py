"""The iteration metrics record: what the master fills in, stored flat under the names
every sink shows, and read back into the same record."""

from __future__ import annotations

import pytest

from k1rl.metrics.record import (
    Accuracy,
    IterationMetrics,
    RewardMetrics,
    RolloutMetrics,
    SFTStepMetrics,
    SwitchMetrics,
    Timings,
    TrainMetrics,
)

FULL = IterationMetrics(
    iteration=7, policy_version=8, max_tokens=96,
    time=Timings(iteration_s=9.5, rollout_s=5.0, reward_s=0.5, train_s=3.0),
    switch=SwitchMetrics(switch_to_rollout_s=0.4, switch_to_train_s=0.2, weight_sync_s=0.3),
    rollout=RolloutMetrics(policy_version_rollout=7, groups_trained=64, prompts_started=64,
                           decoded_tokens=20000, replay_age_mean=0.5),
    reward=RewardMetrics(reward_mean=0.4, accuracy=0.45,
                         accuracy_by_level={"add:2": 0.6, "code:1": 0.3}),
    train=TrainMetrics(train_loss=0.01, train_steps=4,
                       values={"grad_norm": 1.5, "clip_fraction": 0.02}),
    eval=Accuracy(accuracy=0.3, greedy=0.5, accuracy_by_level={"add:2": 0.4},
                  greedy_by_level={"add:2": 0.6}, seconds=12.0),
)


def test_a_record_is_stored_flat_under_the_names_every_sink_shows():
    row = FULL.row()
    assert row["iteration"] == 7 and row["max_tokens"] == 96
    assert row["train_s"] == 3.0  # the phase's seconds
    assert row["train_grad_norm"] == 1.5 and row["train_steps"] == 4
    assert row["accuracy@code:1"] == 0.3
    assert row["eval_accuracy@add:2"] == 0.4 and row["eval_greedy"] == 0.5
    assert row["eval_s"] == 12.0
    assert all(isinstance(v, int | float) for v in row.values())


def test_a_stored_row_reads_back_as_the_same_record():
    assert IterationMetrics.from_row(FULL.row()) == FULL


def test_sections_a_phase_did_not_fill_stay_empty():
    final = IterationMetrics(iteration=3, policy_version=3,
                             eval=Accuracy(accuracy=0.5, greedy=0.5))
    assert IterationMetrics.from_row(final.row()) == final
    assert final.reward is None and final.train is None and final.time is None


def test_a_row_with_a_key_no_field_holds_or_a_section_missing_a_field_is_refused():
    with pytest.raises(ValueError, match=r"keys no record field holds: \['reward_meen'\]"):
        IterationMetrics.from_row({**FULL.row(), "reward_meen": 0.4})
    row = FULL.row()
    del row["accuracy"]  # reward_mean without accuracy: half a reward section
    with pytest.raises(ValueError, match="accuracy"):
        IterationMetrics.from_row(row)
    with pytest.raises(ValueError, match="without 'policy_version'"):
        IterationMetrics.from_row({"iteration": 1})


def test_a_metric_whose_flat_name_shadows_another_field_is_refused():
    # the trainer's metric "s" would be stored as train_s, the train phase's seconds
    with pytest.raises(ValueError, match=r"\['train_s'\] are stored twice"):
        IterationMetrics(iteration=1, policy_version=1, time=Timings(iteration_s=2.0),
                         train=TrainMetrics(train_loss=0.0, train_steps=1, values={"s": 1.0}))


def test_an_sft_step_stores_its_validation_under_val():
    step = SFTStepMetrics(step=4, loss=0.7, values={"grad_norm": 2.0},
                          val=Accuracy(accuracy=0.2, greedy=0.3, seconds=1.0))
    assert step.row() == {"step": 4, "loss": 0.7, "grad_norm": 2.0, "val_accuracy": 0.2,
                          "val_greedy": 0.3, "val_s": 1.0}
