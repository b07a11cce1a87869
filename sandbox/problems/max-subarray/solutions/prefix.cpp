#include <algorithm>
#include <iostream>
#include <vector>
int main() {
    int n; std::cin >> n;
    std::vector<long long> p(n + 1, 0);
    for (int i = 1; i <= n; i++) { long long x; std::cin >> x; p[i] = p[i - 1] + x; }
    long long best = p[1], low = 0;
    for (int i = 1; i <= n; i++) { best = std::max(best, p[i] - low); low = std::min(low, p[i]); }
    std::cout << best << "\n";
}
