"""The k1.5 length reward of one group: lam = 0.5 - (len - min) / (max - min),
lam if correct, min(0, lam) if wrong, all 0 when every length is equal."""

import pytest

from reward_svc.length_penalty import length_rewards


def test_equal_lengths_give_zero_whatever_the_correctness():
    assert length_rewards([12, 12, 12], [True, False, True]) == [0.0, 0.0, 0.0]


def test_single_response_gives_zero():
    assert length_rewards([40], [True]) == [0.0]
    assert length_rewards([40], [False]) == [0.0]


def test_empty_group():
    assert length_rewards([], []) == []


def test_mixed_group_hand_computed():
    # span 40: lam = 0.5, 0.25, 0.0, -0.25, -0.5
    got = length_rewards([10, 20, 30, 40, 50], [True, False, True, False, True])
    assert got == pytest.approx([0.5, 0.0, 0.0, -0.25, -0.5])


def test_all_wrong_group_is_never_rewarded_for_being_short():
    # lam = 0.5, 0.0, -0.5; wrong answers keep only the negative part
    assert length_rewards([5, 15, 25], [False, False, False]) == pytest.approx([0.0, 0.0, -0.5])


def test_all_correct_unsorted_lengths():
    # min 10, max 30: lam(30) = -0.5, lam(10) = 0.5, lam(20) = 0.0, lam(15) = 0.25
    got = length_rewards([30, 10, 20, 15], [True, True, True, True])
    assert got == pytest.approx([-0.5, 0.5, 0.0, 0.25])


def test_two_lengths_with_ties():
    # min 0, max 8: lam(0) = 0.5, lam(8) = -0.5, lam(2) = 0.25
    got = length_rewards([0, 8, 8, 2], [True, True, False, False])
    assert got == pytest.approx([0.5, -0.5, -0.5, 0.0])


def test_values_stay_within_half():
    lengths = [3, 99, 17, 64, 3, 250, 41]
    correct = [i % 2 == 0 for i in range(len(lengths))]
    got = length_rewards(lengths, correct)
    assert all(-0.5 <= r <= 0.5 for r in got)
    assert got[0] == got[4] == 0.5  # the shortest correct answer gets the full bonus


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="2 lengths for 3 correctness flags"):
        length_rewards([1, 2], [True, False, True])
    with pytest.raises(ValueError, match="lengths must be >= 0"):
        length_rewards([1, -2], [True, False])
