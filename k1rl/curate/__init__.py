"""RL prompt-set curation (k1.5 §2.1), `k1rl curate`: one module per rule of the report
(evaluability, the hack filter, difficulty, tags and balance), the pipeline in run.py."""
