"""reward_svc: scores rollouts for the RL loop (k1.5 "Rewards" and "Length penalty").

Public verbs: :class:`RewardService.score` (also served over ZMQ as method ``score`` by
``python -m reward_svc --config run.yaml``), :func:`length_rewards`, and the verifier registry
in :mod:`reward_svc.verifiers`.
"""

from reward_svc.length_penalty import length_rewards
from reward_svc.service import RewardService

__all__ = ["RewardService", "length_rewards"]
