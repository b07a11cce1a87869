#include <iostream>
int main() {
    std::ios::sync_with_stdio(false);
    int n; std::cin >> n;
    long long s = 0;
    while (n-- > 0) { long long x; std::cin >> x; s += x; }
    std::cout << s << "\n";
}
