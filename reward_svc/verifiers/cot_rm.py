"""The chain-of-thought reward model (k1.5 §2.3): a generative judge reads the problem, the
reference answer and the response, reasons step by step and ends with a JSON verdict
(k1rl/judge.py). The judge is a model served by its own rollout_svc in judge mode
(reward.judge.addresses); one generate call judges a whole request's items.

A verdict that cannot be read (no JSON, two that disagree, cut off by max_tokens, a rubric
score missing) or a judge that does not answer makes the item an error: it was not judged,
so the trainer leaves it out rather than count a reward of 0 or 1.

reward.judge.mode says where the judge stands: ``backup`` keeps the rule verifier's
correct verdicts (exact, and free) and asks the judge about the rest, the answers a rule
may have missed; ``replace`` and items naming ``cot_rm`` ask the judge about everything.
With a rubric the reward is the mean of the criteria's scores.
"""

from __future__ import annotations

from k1rl.balance import BalancedClients
from k1rl.config import RewardConfig
from k1rl.data.problem import Problem
from k1rl.data.prompts import PromptRenderer
from k1rl.judge import JudgeConfig, VerdictError, judge_prompt, parse_verdict
from k1rl.protocol import GenerateRequest, GenerateResult, RewardItem, SamplingSpec
from k1rl.rpc import RPCError

from reward_svc.verifiers import Check, Verifier, create, register

# the judge's samples are seeded: the same item gets the same verdict
JUDGE_SEED = 0


@register("cot_rm")
class CoTRewardModel(Verifier):
    batched = True

    def __init__(self, judge: JudgeConfig, rule: Verifier | None = None) -> None:
        self.judge = judge
        self.rule = rule
        # a chat judge's template comes from its own tokenizer
        self._renderer = PromptRenderer(judge.prompt, judge.model)
        self._clients = BalancedClients(judge.replicas(), timeout_s=judge.timeout_s,
                                        ping_every_s=5.0, misses=3,
                                        restart_wait_s=min(60.0, judge.timeout_s))

    @classmethod
    def from_config(cls, config: RewardConfig) -> CoTRewardModel:
        judge = config.judge
        rule = create(judge.rule_verifier, config) if judge.mode == "backup" else None
        return cls(judge, rule)

    def verify(self, response: str, answer: str) -> bool:
        return self.check(response, answer).correct

    def check(self, response: str, answer: str) -> Check:
        item = RewardItem(group_id=0, response=response, answer=answer, response_tokens=0)
        return self.check_items([item])[0]

    def check_items(self, items: list[RewardItem]) -> list[Check]:
        checks: list[Check | None] = [None] * len(items)
        if self.rule is not None:
            for i, item in enumerate(items):
                ruled = self.rule.check(item.response, item.answer)
                if ruled.correct:
                    checks[i] = ruled
        asked = [i for i, c in enumerate(checks) if c is None]
        if asked:
            for i, check in zip(asked, self._judge([items[i] for i in asked])):
                checks[i] = check
        return checks

    def _judge(self, items: list[RewardItem]) -> list[Check]:
        j = self.judge
        texts = [judge_prompt(it.prompt, it.answer, it.response, j.rubric,
                              j.max_response_chars) for it in items]
        fields = self._renderer.request_fields(
            [Problem(id=f"judge-{k}", prompt=t, answer="-") for k, t in enumerate(texts)])
        request = GenerateRequest(**fields, sampling=SamplingSpec(
            n=1, temperature=j.temperature, max_tokens=j.max_tokens, seed=JUDGE_SEED))
        try:
            result = self._clients.call("generate", request, GenerateResult,
                                        timeout_s=j.timeout_s)
        except RPCError as e:
            return [Check(correct=False, score=0.0, error=f"judge unavailable: {e}")] * len(items)
        return [self._verdict(r.completions[0]) for r in result.results]

    def _verdict(self, completion) -> Check:
        try:
            v = parse_verdict(completion.text, self.judge.rubric,
                              finished=completion.finish_reason != "length")
        except VerdictError as e:
            return Check(correct=False, score=0.0, error=f"judge verdict unreadable: {e}")
        score = (sum(v.scores.values()) / len(v.scores)) if v.scores else float(v.correct)
        return Check(correct=v.correct, score=score)

    def close(self) -> None:
        self._clients.close()
        if self.rule is not None:
            self.rule.close()
