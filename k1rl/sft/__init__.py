"""Supervised fine-tuning as a command (`k1rl sft`): the config section (config.py),
problems turned into token ids with a loss mask (examples.py), and the run (run.py)."""
