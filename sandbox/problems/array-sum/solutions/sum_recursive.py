import sys
sys.setrecursionlimit(10000)
xs = list(map(int, sys.stdin.read().split()))
n, xs = xs[0], xs[1:]
def total(lo, hi):
    if hi - lo == 1:
        return xs[lo]
    mid = (lo + hi) // 2
    return total(lo, mid) + total(mid, hi)
print(total(0, n))
