import sys
d = list(map(int, sys.stdin.read().split()))
n, a = d[0], d[1:d[0] + 1]
best = a[0]
for i in range(n):
    s = 0
    for j in range(i, n):
        s += a[j]
        if s > best:
            best = s
print(best)
