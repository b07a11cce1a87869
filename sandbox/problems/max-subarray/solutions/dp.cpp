#include <iostream>
#include <vector>
#include <algorithm>
int main() {
    std::ios::sync_with_stdio(false);
    int n; std::cin >> n;
    std::vector<long long> a(n), dp(n);
    for (auto& x : a) std::cin >> x;
    dp[0] = a[0];
    for (int i = 1; i < n; i++) dp[i] = a[i] + std::max(dp[i - 1], 0LL);
    std::cout << *std::max_element(dp.begin(), dp.end()) << '\n';
}
