n = int(input())
total = 0
for x in input().split()[:n]:
    total += int(x)
print(total)
