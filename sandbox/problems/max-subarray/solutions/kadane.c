#include <stdio.h>
int main(void) {
    int n; long long best, cur, x;
    if (scanf("%d", &n) != 1 || scanf("%lld", &x) != 1) return 1;
    best = cur = x;
    for (int i = 1; i < n; i++) {
        scanf("%lld", &x);
        cur = cur + x > x ? cur + x : x;
        if (cur > best) best = cur;
    }
    printf("%lld\n", best);
    return 0;
}
