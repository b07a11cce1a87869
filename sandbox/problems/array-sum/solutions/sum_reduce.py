import functools
import operator
import sys
tokens = sys.stdin.buffer.read().split()
n = int(tokens[0])
print(functools.reduce(operator.add, (int(t) for t in tokens[1:n + 1]), 0))
