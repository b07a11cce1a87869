#include <cstdio>
int main() {
    int n; scanf("%d", &n);
    __int128 s = 0;
    for (int i = 0; i < n; ++i) { long long x; scanf("%lld", &x); s += x; }
    printf("%lld\n", (long long)s);
}
