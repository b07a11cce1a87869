import sys
d = list(map(int, sys.stdin.read().split()))
n, a = d[0], d[1:]
best, prefix, lowest = a[0], 0, 0
for x in a[:n]:
    prefix += x
    best = max(best, prefix - lowest)
    lowest = min(lowest, prefix)
print(best)
