import sys
sys.setrecursionlimit(10000)
d = list(map(int, sys.stdin.read().split()))
a = d[1:d[0] + 1]
def solve(lo, hi):
    """(best, best prefix, best suffix, total) of a[lo:hi]."""
    if hi - lo == 1:
        return a[lo], a[lo], a[lo], a[lo]
    mid = (lo + hi) // 2
    lb, lp, ls, lt = solve(lo, mid)
    rb, rp, rs, rt = solve(mid, hi)
    return max(lb, rb, ls + rp), max(lp, lt + rp), max(rs, rt + ls), lt + rt
print(solve(0, len(a))[0])
