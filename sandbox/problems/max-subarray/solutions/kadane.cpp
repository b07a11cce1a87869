#include <algorithm>
#include <cstdio>
int main() {
    int n; scanf("%d", &n);
    long long best, cur, x;
    scanf("%lld", &x); best = cur = x;
    for (int i = 1; i < n; i++) {
        scanf("%lld", &x);
        cur = std::max(x, cur + x);
        best = std::max(best, cur);
    }
    printf("%lld\n", best);
}
