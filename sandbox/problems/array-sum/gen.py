"""Inputs for array-sum: small, random and extreme-valued arrays."""

from cyaron import Vector, randint


def generate(case: int) -> str:
    n = 1 if case == 0 else randint(1, 10 if case < 10 else 1000)
    bound = 10**9 if case % 3 == 0 else 1000
    values = [v[0] for v in Vector.random(n, [(-bound, bound)])]
    return f"{n}\n{' '.join(map(str, values))}\n"
