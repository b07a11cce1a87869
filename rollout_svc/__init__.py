"""rollout_svc: the vLLM rollout engine served over ZMQ (the only package that knows vLLM)."""
