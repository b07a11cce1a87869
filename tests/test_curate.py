"""`k1rl curate` (k1.5 §2.1): evaluability rules on hand-made prompts, the hack filter and
difficulty from counted samples of a policy that answers as the test says, the tag balance,
and the command end to end on the tiny model with the real services."""

from __future__ import annotations

import json
import random

import pytest

from k1rl.config import RunConfig
from k1rl.curate.config import CurateConfig, TagBalance
from k1rl.curate.difficulty import difficulty, pass_rate
from k1rl.curate.evaluability import not_evaluable
from k1rl.curate.hack_filter import guessed, no_thinking
from k1rl.curate.run import FunnelStage, sampled_stages
from k1rl.curate.tags import balance, quotas, tag_counts, tagged
from k1rl.data.problem import ChatMessage, Problem
from k1rl.data.rows import problem_row
from k1rl.master.responses import Draw, Response

RULES = CurateConfig().drop


def problem(prompt: str, answer: str = "12", **kw) -> Problem:
    return Problem(id=kw.pop("id", prompt[:40]), prompt=prompt, answer=answer, **kw)


# ----------------------------------------------------------------- evaluability


@pytest.mark.parametrize("prompt, answer, reason", [
    ("Which of the following is prime? (A) 4 (B) 6 (C) 7 (D) 9", "C", "multiple_choice"),
    ("What is 3+4?\nA) 6\nB) 7\nC) 8", "7", "multiple_choice"),
    ("Pick the right option for 2+2.", "B", "multiple_choice"),
    ("True or false: 7 is prime.", "true", "true_false"),
    ("Is 91 prime?", "No", "true_false"),
    ("Is 2+2=4 correct?", "Yes.", "true_false"),
    ("Prove that the square root of 2 is irrational.", "see proof", "proof"),
    ("Show that n^2 - n is even for every integer n.", "0", "proof"),
    ("Let x > 0. Give a proof that x + 1/x >= 2.", "2", "proof"),
])
def test_choices_yes_no_and_proofs_are_not_evaluable(prompt, answer, reason):
    assert not_evaluable(problem(prompt, answer), RULES) == reason


@pytest.mark.parametrize("prompt, answer", [
    ("Q: Tom found 34 books on Monday and 89 on Tuesday. How many books?\nA:", "123"),
    ("Compute the derivative of x^3 at x = 2.", "12"),
    ("What is the value of e to two decimals?", "2.72"),  # a lowercase letter is no choice
    ("Find the area of a circle of radius 1.", "\\pi"),
    ("How many positive divisors does 36 have? Options are endless.", "9"),
])
def test_questions_with_a_checkable_answer_are_kept(prompt, answer):
    assert not_evaluable(problem(prompt, answer), RULES) is None


def test_a_chat_prompt_is_searched_in_every_turn_and_code_answers_are_not_read():
    chat = Problem(id="c", messages=[ChatMessage(role="system", content="Be brief."),
                                     ChatMessage(role="user", content="True or false: 1 < 2")],
                   answer="1")
    assert not_evaluable(chat, RULES) == "true_false"
    code = problem("Read n and print n + 1.", answer='{"tests": []}', verifier="code")
    assert not_evaluable(code, RULES) is None


def test_drop_rules_are_config():
    cfg = RunConfig.from_yaml_text(
        "curate: {drop: [{name: geometry_figure, pattern: 'see the figure'}]}", "t", [])
    assert not_evaluable(problem("As in the figure? See the FIGURE."), cfg.curate.drop) == \
        "geometry_figure"
    assert not_evaluable(problem("Prove it."), cfg.curate.drop) is None  # defaults replaced


# --------------------------------------------------- hack filter and difficulty


def test_guessed_within_n_tries_counts_only_the_first_n():
    assert guessed([False] * 7 + [True], tries=8)
    assert not guessed([False] * 8 + [True], tries=8)
    with pytest.raises(ValueError, match="needs 8 tries"):
        guessed([True], tries=8)


def test_the_no_thinking_suffix_goes_after_the_prompt_or_the_last_user_turn():
    h = CurateConfig().hack_filter
    assert no_thinking(problem("What is 2+2?"), h).prompt == "What is 2+2?" + h.suffix
    chat = Problem(id="c", answer="4", messages=[
        ChatMessage(role="user", content="2+2?"), ChatMessage(role="assistant", content="hm"),
        ChatMessage(role="user", content="Well?"), ChatMessage(role="assistant", content="")])
    turns = no_thinking(chat, h).messages
    assert [t.content for t in turns] == ["2+2?", "hm", "Well?" + h.suffix, ""]


def test_difficulty_is_one_minus_the_counted_pass_rate():
    assert pass_rate([True, False, False, False, True, False, False, False, False, False]) == 0.2
    assert difficulty(0.2) == 0.8 and difficulty(1.0) == 0.0
    assert difficulty(pass_rate([True] * 3 + [False] * 7)) == 0.7  # no 0.7000000000000001


class GuessingPolicy:
    """A policy that, asked for an answer alone (the suffix), says ``guess`` on try number
    ``right_on`` and something else before; asked to reason, it is right on the samples a
    problem's ``solves`` list marks. Judged the reward verifier's way: the stated answer
    against the problem's."""

    def __init__(self, guess: str, right_on: int, solves: dict[str, list[bool]]) -> None:
        self.guess, self.right_on, self.solves = guess, right_on, solves
        self.draws: list[Draw] = []

    def draw(self, problems, draw: Draw) -> list[list[Response]]:
        self.draws.append(draw)
        out = []
        for p in problems:
            if p.prompt.endswith(CurateConfig().hack_filter.suffix):
                said = [self.guess if k + 1 == self.right_on else "0" for k in range(draw.n)]
                oks = [s == p.answer for s in said]
            else:
                oks = self.solves[p.id][:draw.n]
            out.append([Response(text="", prompt_token_ids=[1], token_ids=[2], logprobs=[0.0],
                                 finish_reason="stop", correct=ok, reward=float(ok))
                        for ok in oks])
        return out


def sampled(policy, problems, **curate):
    cfg = RunConfig.model_validate({"curate": curate})
    dropped, stages, rates = [], [], {}
    kept = sampled_stages(policy, problems, cfg, dropped, stages, rates)
    return kept, dict((p.id, r) for p, r in dropped), stages, rates


def test_the_hack_filter_drops_what_a_guessing_policy_gets_within_n_tries():
    problems = [problem(f"q{a}", answer=str(a), id=f"p{a}") for a in (7, 8, 9)]
    solves = {p.id: [True] * 10 for p in problems}
    kept, dropped, stages, _ = sampled(GuessingPolicy("7", right_on=8, solves=solves), problems)
    assert dropped == {"p7": "guessable"}
    assert [p.id for p in kept] == ["p8", "p9"]
    assert stages[0] == FunnelStage(stage="not guessable", prompts=2)
    # right only on the 9th try: not within N = 8, kept
    kept, dropped, _, _ = sampled(GuessingPolicy("7", right_on=9, solves=solves), problems)
    assert dropped == {} and len(kept) == 3


def test_difficulty_comes_from_ten_samples_at_a_high_temperature_and_bands_drop():
    problems = [problem(f"q{i}", id=f"p{i}") for i in range(3)]
    solves = {"p0": [True] * 10, "p1": [True] * 3 + [False] * 7, "p2": [False] * 10}
    policy = GuessingPolicy("never", right_on=99, solves=solves)
    kept, dropped, stages, rates = sampled(
        policy, problems, difficulty={"min_pass_rate": 0.1, "max_pass_rate": 0.9})
    assert rates == {"p0": 1.0, "p1": 0.3, "p2": 0.0}
    assert dropped == {"p0": "pass_rate_above_max", "p2": "pass_rate_below_min"}
    assert [p.id for p in kept] == ["p1"] and stages[-1].prompts == 1
    hack, diff = policy.draws
    assert (hack.n, hack.max_tokens) == (8, 32)
    assert (diff.n, diff.temperature) == (10, 1.0)


# -------------------------------------------------------------- tags, balance


def test_tag_rules_add_tags_once():
    cfg = TagBalance(rules=[{"name": "geometry", "pattern": r"triangle|circle"},
                            {"name": "algebra", "pattern": r"\bx\b"}])
    p = tagged(problem("A circle and a triangle", tags=["geometry"]), cfg)
    assert p.tags == ["geometry"]
    assert tagged(problem("Solve x + 1 = 2 in a circle"), cfg).tags == ["geometry", "algebra"]


def test_weights_keep_the_largest_set_in_proportion_and_caps_bound_it():
    counts = {"add": 100, "sub": 30, "code": 8, "other": 5}
    assert quotas(counts, TagBalance(weights={"add": 2, "sub": 1})) == \
        {"add": 60, "sub": 30, "code": 8, "other": 5}
    assert quotas(counts, TagBalance(weights={"add": 1, "sub": 1, "code": 1}, cap={"add": 5})) \
        == {"add": 5, "sub": 8, "code": 8, "other": 5}


def test_balance_counts_a_prompt_under_its_first_named_tag_and_draws_with_the_seed():
    problems = ([problem(f"a{i}", id=f"a{i}", tags=["x", "add"]) for i in range(10)]
                + [problem(f"s{i}", id=f"s{i}", tags=["sub"]) for i in range(4)]
                + [problem("free", id="free", tags=["other"])])
    cfg = TagBalance(cap={"add": 3}, weights={"sub": 1})
    kept, dropped = balance(problems, cfg, seed=0)
    assert tag_counts(kept) == {"add": 3, "other": 1, "sub": 4, "x": 3}
    assert {r for _, r in dropped} == {"over_quota:add"} and len(dropped) == 7
    assert [p.id for p in kept] == [p.id for p in problems if p in kept]  # input order
    assert balance(problems, cfg, seed=0) == (kept, dropped)
    assert balance(problems, cfg, seed=1)[0] != kept


def test_a_curated_row_reads_back_as_the_same_problem(tmp_path):
    from k1rl.data.problem import DatasetPool
    from k1rl.data.sources import DataSource, load_sources

    code = json.dumps({"tests": [{"stdin": "1\n", "expected": "2\n"}]})
    rows = [problem("q1", tags=["add"], difficulty=0.7, pass_rate=0.3, id="a"),
            Problem(id="b", messages=[ChatMessage(role="user", content="hi")], answer="1"),
            problem("Read n, print n+1", answer=code, verifier="code", id="c")]
    path = tmp_path / "curated.jsonl"
    path.write_text("".join(json.dumps(problem_row(p)) + "\n" for p in rows))
    back = list(DatasetPool(load_sources([DataSource(path=str(path))]).problems, ""))
    assert back[0] == rows[0] and back[1] == rows[1]
    assert json.loads(back[2].answer)["tests"][0]["stdin"] == "1\n"


def test_prioritized_sampling_starts_from_the_curated_pass_rate():
    from k1rl.master.samplers.prioritized import Prioritized
    from k1rl.rl_config import RLConfig

    easy = problem("easy", id="easy", pass_rate=0.9)
    hard = problem("hard", id="hard", pass_rate=0.1)
    unknown = problem("unknown", id="unknown")
    sampler = Prioritized(RLConfig(prompts_per_iteration=1), [[easy, hard, unknown]])
    assert sampler.weight(easy) == pytest.approx(0.1)
    assert sampler.weight(hard) == pytest.approx(0.9)
    assert sampler.weight(unknown) == 1.0
    picks = [sampler.sample(random.Random(s), 0)[0].id for s in range(300)]
    assert picks.count("hard") > 3 * picks.count("easy")
    sampler.update([easy], [False, False], n=2)  # seen: the tracked rate takes over
    assert sampler.weight(easy) == 1.0


# ------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_k1rl_curate_runs_the_funnel_on_the_tiny_model(tmp_path, trainer_model_dir):
    import subprocess
    import sys

    from k1rl.data.problem import DatasetPool
    from k1rl.data.sources import DataSource, load_sources
    from k1rl.master.samplers.curriculum import Curriculum
    from k1rl.rl_config import RLConfig

    data = tmp_path / "prompts.jsonl"
    subprocess.run([sys.executable, "-m", "k1rl", "gen-tasks", str(data), "--family", "add",
                    "--difficulty", "1", "--count", "6"], check=True, timeout=120)
    with data.open("a") as f:
        for prompt, answer in (("Which of the following is even? (A) 3 (B) 4", "B"),
                               ("True or false: 2 + 2 = 4.", "true"),
                               ("Prove that there are infinitely many primes.", "proof")):
            f.write(json.dumps({"prompt": prompt, "answer": answer}) + "\n")
    cfg = RunConfig.model_validate({
        "rollout": {"max_tokens": 8},
        "curate": {"data": [{"path": str(data), "name": "mixed"}],
                   "hack_filter": {"prefill": " The answer is", "max_tokens": 4},
                   "tags": {"cap": {"add:1": 3}}}})
    config = tmp_path / "run.yaml"
    config.write_text(cfg.dump_yaml())
    out_dir = tmp_path / "curated"
    out = subprocess.run(
        [sys.executable, "-m", "k1rl", "curate", "--config", str(config), "--out",
         str(out_dir), "--model", str(trainer_model_dir)],
        check=False, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    funnel = json.loads(out.stdout.strip().splitlines()[-1])
    stages = [(s["stage"], s["prompts"]) for s in funnel["stages"]]
    assert [s for s, _ in stages] == ["loaded", "evaluable", "not guessable", "difficulty",
                                      "balanced"]
    assert stages[:2] == [("loaded", 9), ("evaluable", 6)]
    counts = [n for _, n in stages]
    assert counts == sorted(counts, reverse=True) and counts[-1] <= 3
    assert {k: funnel["dropped"].get(k) for k in ("multiple_choice", "true_false", "proof")} \
        == {"multiple_choice": 1, "true_false": 1, "proof": 1}

    curated = [json.loads(line) for line in (out_dir / "curated.jsonl").read_text().splitlines()]
    dropped = [json.loads(line) for line in (out_dir / "dropped.jsonl").read_text().splitlines()]
    assert len(curated) == counts[-1] and len(curated) + len(dropped) == 9  # nothing lost
    assert sum(funnel["dropped"].values()) == len(dropped)
    for r in curated:  # ten samples each: a pass rate in tenths, difficulty its complement
        assert round(r["pass_rate"] * 10, 6) == int(round(r["pass_rate"] * 10))
        assert r["difficulty"] == pytest.approx(1 - r["pass_rate"])
    pool = DatasetPool(load_sources([DataSource(path=str(out_dir / "curated.jsonl"))]).problems,
                       "curated")
    assert [p.id for p in pool] == [r["id"] for r in curated]
    Curriculum(RLConfig(sampler="curriculum"), [pool])  # every prompt has its label
