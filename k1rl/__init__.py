"""k1rl: the Kimi k1.5 RL recipe as a suite of services."""

__version__ = "0.1.0"
