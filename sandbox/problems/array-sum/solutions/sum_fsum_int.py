import sys
lines = sys.stdin.read().splitlines()
n = int(lines[0])
nums = list(map(int, " ".join(lines[1:]).split()))[:n]
print(sum(nums))
