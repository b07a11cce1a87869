"""Code rewards: run the response's program against the task's tests in the sandbox.

The gold "answer" of a code task is a JSON :class:`k1rl.protocol.CodeTask`: the tests (stdin and
expected stdout), limits, checker and default language. The program is the last fenced
code block of the response (```python ... ```); its info string, when it names a
language the sandbox knows, overrides the task's default. A response without a code
block, a program that does not compile, fails or times out scores 0 like a wrong
answer. When the sandbox itself fails (unreachable, a crashed worker, a broken
checker) the item carries an error instead: it was not judged, so it is neither
rewarded nor punished.
"""

from __future__ import annotations

import re

from pydantic import ValidationError

from k1rl.config import RewardConfig
from k1rl.protocol import CodeTask, RunCodeRequest, RunCodeResult
from k1rl.balance import BalancedClients
from k1rl.rpc import RemoteError, RPCError

from reward_svc.verifiers import Check, Verifier, register

_FENCE = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)```", re.S)
# fence info strings that name a sandbox language
LANGUAGE_TAGS = {"python": "python", "python3": "python", "py": "python", "cpp": "cpp",
                 "c++": "cpp", "cxx": "cpp", "cc": "cpp", "c": "c"}
MAX_PROGRAM_CHARS = 64 << 10


def extract_program(response: str) -> tuple[str | None, str]:
    """(language tag or None, program) of the last fenced block; ("", "") without one."""
    blocks = _FENCE.findall(response)
    if not blocks:
        return None, ""
    tag, body = blocks[-1]
    return LANGUAGE_TAGS.get(tag.lower()), body


@register("code")
class CodeVerifier(Verifier):
    concurrency = 4

    def __init__(self, address: str | list[str], reward: str = "all_pass",
                 concurrency: int = 4, timeout_s: float = 300.0, in_flight: int = 4) -> None:
        """``address``: the sandbox, or its replicas (programs go to the least busy one,
        at most ``in_flight`` at a time each; dns:// entries are re-resolved)."""
        self.addresses = [address] if isinstance(address, str) else list(address)
        self.reward = reward
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        # watched: a replica that dies under a program is noticed in seconds and the
        # program sent to another, or to it once restarted (within 30 s, or the timeout)
        self._clients = BalancedClients(self.addresses, max_in_flight=in_flight,
                                        timeout_s=timeout_s, ping_every_s=2.0, misses=3,
                                        restart_wait_s=min(30.0, timeout_s))

    @classmethod
    def from_config(cls, config: RewardConfig) -> CodeVerifier:
        return cls(config.sandbox_addresses or config.sandbox_address, config.code_reward,
                   config.code_concurrency, config.code_timeout_s, config.sandbox_in_flight)

    def verify(self, response: str, answer: str) -> bool:
        return self.check(response, answer).correct

    def check(self, response: str, answer: str) -> Check:
        try:
            task = CodeTask.model_validate_json(answer)
        except ValidationError as e:
            raise ValueError(f"code task answer is not a valid CodeTask: {e}") from None
        tag, program = extract_program(response)
        if not program.strip() or len(program) > MAX_PROGRAM_CHARS:
            return Check(correct=False, score=0.0)
        req = RunCodeRequest(language=tag or task.language, source=program, tests=task.tests,
                             time_limit_s=task.time_limit_s,
                             memory_limit_mb=task.memory_limit_mb, checker=task.checker,
                             stop_on_first_failure=self.reward == "all_pass")
        try:
            result = self._clients.call("run_code", req, RunCodeResult,
                                         timeout_s=self.timeout_s)
        except RemoteError as e:  # the sandbox refused the request (e.g. unknown language)
            return Check(correct=False, score=0.0, error=f"sandbox refused the program: {e}")
        except RPCError as e:
            return Check(correct=False, score=0.0, error=f"sandbox unavailable: {e}")
        errors = [t.detail for t in result.tests if t.verdict == "sandbox_error"]
        if result.verdict == "sandbox_error" or errors:
            return Check(correct=False, score=0.0,
                         error=f"sandbox error: {result.error or errors[0]}")
        passed = result.passed
        correct = result.verdict == "accepted"
        score = float(correct) if self.reward == "all_pass" else passed / len(task.tests)
        return Check(correct=correct, score=score)

    def close(self) -> None:
        self._clients.close()
