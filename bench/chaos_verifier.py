"""The chaos bench's reward: k1rl's math verifier taking as long per response as a judge
model would (``slow_math``), so that a kill can land while a batch is being scored.

A plugin (``plugins: [chaos_verifier]``, this directory on PYTHONPATH), registered the way
a user's own verifier is. The built-in scores a batch of the bench's size in milliseconds,
too short a window for a kill from outside the process to land in.
"""

from __future__ import annotations

import time

from reward_svc.verifiers import register
from reward_svc.verifiers.math import MathVerifier

SECONDS_PER_RESPONSE = 0.1


@register("slow_math")
class SlowMathVerifier(MathVerifier):
    def verify(self, response: str, answer: str) -> bool:
        time.sleep(SECONDS_PER_RESPONSE)
        return super().verify(response, answer)
