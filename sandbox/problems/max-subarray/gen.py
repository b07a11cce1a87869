"""Inputs for max-subarray: all-negative, all-positive and mixed arrays up to n = 2000."""

from cyaron import randint


def generate(case: int) -> str:
    n = randint(1, 8) if case < 15 else randint(100, 2000)
    if case % 5 == 0:
        lo, hi = -10**6, -1          # the answer is the largest single element
    elif case % 5 == 1:
        lo, hi = 1, 10**6            # the answer is the whole array
    else:
        lo, hi = -10**6, 10**6
    return f"{n}\n{' '.join(str(randint(lo, hi)) for _ in range(n))}\n"
