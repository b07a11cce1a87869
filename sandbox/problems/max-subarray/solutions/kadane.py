import sys
d = list(map(int, sys.stdin.read().split()))
best = cur = d[1]
for x in d[2:d[0] + 1]:
    cur = max(x, cur + x)
    best = max(best, cur)
print(best)
