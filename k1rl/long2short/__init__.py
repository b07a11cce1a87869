"""Long2short (k1.5 §2.4): ways to keep a long-CoT model's accuracy with fewer tokens.

    merge.py      model merging: a weighted average of checkpoints (`k1rl merge`)
    pairs.py      the shortest correct response and the DPO pairs of a prompt's samples
    rejection.py  shortest rejection sampling: SFT rows, DPO pairs and the sampled groups
                  (`k1rl long2short sample`)
    dpo.py        DPO on the sampled groups through trainer_svc's `dpo` loss
                  (`k1rl long2short dpo`)
    preset.py     long2short RL: the length penalty on and a sharply cut rollout length
                  (`k1rl rl --preset long2short`)
"""
