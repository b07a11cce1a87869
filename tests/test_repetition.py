"""The repetition detector: loops are caught where they become loops, near-misses are not."""

from __future__ import annotations

import random

import pytest

from k1rl.config import RepetitionConfig
from rollout_svc.repetition import RepetitionDetector, find_repetition

# small thresholds so hand-made sequences stay readable
CFG = RepetitionConfig(enabled=True, max_period=6, min_repeats=4, min_span=8, ngram=3,
                       ngram_window=30, ngram_max_count=4)


def test_one_token_repeated_is_caught_once_the_span_is_long_enough():
    tokens = [5, 6] + [7] * 20
    rep = find_repetition(tokens, CFG)
    assert (rep.kind, rep.unit, rep.start, rep.end) == ("periodic", 1, 2, 10)  # 8 sevens
    assert tokens[rep.start:rep.end] == [7] * 8


def test_a_repeated_block_is_caught_at_its_fourth_copy_with_its_own_period():
    block = [1, 2, 3]
    tokens = [9, 9, 8] + block * 6
    rep = find_repetition(tokens, CFG)
    assert (rep.kind, rep.unit, rep.repeats) == ("periodic", 3, 4)
    assert rep.end == 3 + 12 and tokens[rep.start:rep.end] == block * 4


@pytest.mark.parametrize("tokens", [
    [1, 2, 3] * 3 + [1, 2, 4],                  # three copies, then it breaks
    [7] * 7,                                    # a run shorter than min_span
    list(range(10)) * 3,                        # period 10 > max_period, no n-gram x4
    [1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2],          # the fourth copy is never completed
])
def test_near_misses_are_not_repetition(tokens):
    assert find_repetition(tokens, CFG) is None


def test_a_loop_with_varying_filler_is_caught_by_the_recurring_ngram():
    loop = [40, 41, 42]
    tokens = []
    for filler in (1, 2, 3, 4, 5):
        tokens += loop + [filler]
    assert find_repetition(tokens, CFG.model_copy(update={"ngram": 0})) is None  # not periodic
    rep = find_repetition(tokens, CFG)
    assert (rep.kind, rep.unit, rep.repeats) == ("ngram", 3, 4)
    assert tokens[rep.start:rep.start + 3] == loop and rep.start == 0
    assert rep.end == 4 * 3 + 3 * 1  # right after the fourth copy of the loop


def test_ngrams_older_than_the_window_are_forgotten():
    loop, gap = [40, 41, 42], list(range(100, 120))
    tokens = loop + gap + loop + gap + loop + gap + loop
    assert find_repetition(tokens, CFG) is None  # never four copies within 30 tokens
    wide = CFG.model_copy(update={"ngram_window": 80})
    assert find_repetition(tokens, wide).kind == "ngram"


def test_random_text_and_a_disabled_detector_flag_nothing():
    rng = random.Random(0)
    noise = [rng.randrange(500) for _ in range(3000)]
    assert find_repetition(noise, CFG) is None
    assert find_repetition([7] * 100, CFG.model_copy(update={"enabled": False})) is None


def test_pushing_token_by_token_fires_exactly_where_a_scan_does():
    tokens = [3, 1, 4, 1, 5] + [9, 2] * 10
    detector = RepetitionDetector(CFG)
    fired = [i for i, t in enumerate(tokens) if detector.push(t) is not None]
    assert fired and fired[0] + 1 == find_repetition(tokens, CFG).end


def test_default_thresholds_flag_no_target_of_the_task_families():
    from k1rl.data.tasks import all_levels, generate_suite
    from k1rl.data.tiny_model import init_model  # noqa: F401  (the tokenizer it trains)
    from k1rl.data.tokenizer import train_tokenizer

    tasks = generate_suite(40, seed=0, levels=all_levels())
    tokenizer = train_tokenizer(t.prompt + t.target for t in tasks)
    defaults = RepetitionConfig(enabled=True)
    for task in tasks:
        ids = tokenizer.encode(task.target).ids
        assert find_repetition(ids, defaults) is None, task.id
    # ... while a model stuck on one column step is caught
    stuck = tokenizer.encode(" 0 + 0 = 0, write 0;" * 12).ids
    assert find_repetition(stuck, defaults).kind == "periodic"


def test_the_window_must_hold_the_ngrams():
    with pytest.raises(ValueError, match="ngram_window"):
        RepetitionConfig(ngram=20, ngram_window=50, ngram_max_count=6)


def test_a_looping_segment_is_cut_where_the_loop_is_established_however_it_arrives():
    from rollout_svc.repetition import SegmentWatch

    tokens = [5, 6] + [7] * 20
    for chunk in (1, 3, len(tokens)):  # the engine hands over one or more tokens a step
        watch = SegmentWatch(CFG)
        cuts = [watch.feed(tokens[i:i + chunk]) for i in range(0, len(tokens), chunk)]
        assert [c for c in cuts if c is not None][0] == 10  # 8 sevens after "5 6"
        assert watch.feed([8]) == 10  # cut stays cut
    clean = SegmentWatch(CFG)
    assert clean.feed([1, 2, 3]) is None and clean.cut is None


def test_a_loop_that_began_in_an_earlier_segment_is_cut_in_the_new_one():
    from rollout_svc.repetition import SegmentWatch

    before = [5, 6, 7, 7, 7, 7, 7]          # five sevens: not yet a loop (needs 8)
    watch = SegmentWatch(CFG, before)
    assert watch.cut is None
    assert watch.feed([7, 7, 7, 7, 7]) == 3


def test_a_segment_after_a_loop_already_complete_is_cut_before_its_first_token():
    from rollout_svc.repetition import SegmentWatch

    assert SegmentWatch(CFG, [5] + [7] * 12).cut == 0
