// Checks gradstab::integer_power (csrc/integer_power.h, NOTE: [integer power]) against the C
// library: every k in [0, kMaxK] for a set of gammas across (0, 1), then random (gamma, k) pairs
// with k up to 2^62. Each result must be within 1 ulp of pow() (both are doubles: at most one
// representable number apart) and within 0.5 ulp + 2^-9 ulp of powl() (x87 long double, 11 more
// bits: the result is the correctly rounded x^k up to the reference's own error), or within 1 ulp
// of it for a result in the subnormal range (rounded twice, see the NOTE). Built and run
// by tests/test_integer_power.py with the CPU build's flags; prints a summary, and exits non-zero
// on the first miss with what failed.
#include <cinttypes>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>

#include "integer_power.h"

namespace {

constexpr int64_t kMaxK = 1000000;
// Above 0.5 ulp, what the long double reference's own error may add (its 64-bit significand
// is 2^-11 ulp of a double; its powl is accurate to about one of its own ulps).
constexpr long double kRoundingBound = 0.5L + 1.0L / 512;

int64_t checked = 0;
int64_t equal_to_pow = 0;
int64_t max_pow_ulps = 0;
long double max_exact_ulps = 0;

int64_t bits_of(double x) {
  int64_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits;
}

// The spacing of doubles at |y| (the subnormal spacing below the normals).
long double ulp_at(long double y) {
  const double d = static_cast<double>(y);
  const double up = std::nextafter(std::fabs(d), INFINITY);
  return static_cast<long double>(up) - std::fabs(static_cast<long double>(d));
}

void check(double x, int64_t k) {
  ++checked;
  const double ours = gradstab::integer_power(x, k);
  const double libm = std::pow(x, static_cast<double>(k));
  const int64_t pow_ulps = std::llabs(bits_of(ours) - bits_of(libm));
  equal_to_pow += pow_ulps == 0;
  if (pow_ulps > max_pow_ulps) max_pow_ulps = pow_ulps;
  // powl is slow: asked where the two differ (which one is right?), and on a sample.
  if (pow_ulps == 0 && checked % 16 != 0) return;
  const long double exact = std::pow(static_cast<long double>(x), static_cast<long double>(k));
  const long double exact_ulps =
      exact == 0.0L && ours == 0.0 ? 0.0L : std::fabs(ours - exact) / ulp_at(exact);
  const bool subnormal = std::fabs(exact) < 0x1p-1022L;
  if (pow_ulps > 1 || !(exact_ulps <= (subnormal ? 1.0L : kRoundingBound))) {
    std::fprintf(stderr,
                 "FAILED x=%a k=%" PRId64 ": integer_power %a, pow %a (%" PRId64
                 " ulp apart), powl %La (%.3Lf ulp away)\n",
                 x, k, ours, libm, pow_ulps, exact, exact_ulps);
    std::exit(1);
  }
  if (!subnormal && exact_ulps > max_exact_ulps) max_exact_ulps = exact_ulps;
}

void check_edges() {
  const double xs[] = {0.0, 0x1p-1074, 0x1p-1022, 1e-300, 0.5, 0.6, 0.999, 1.0 - 0x1p-53};
  for (double x : xs) {
    if (gradstab::integer_power(x, 0) != 1.0 || gradstab::integer_power(x, -5) != 1.0) {
      std::fprintf(stderr, "FAILED x=%a: x^0 and x^-5 must be 1\n", x);
      std::exit(1);
    }
    if (gradstab::integer_power(x, 1) != x) {
      std::fprintf(stderr, "FAILED x=%a: x^1 = %a\n", x, gradstab::integer_power(x, 1));
      std::exit(1);
    }
  }
  if (!std::isnan(gradstab::integer_power(NAN, 3))) {
    std::fprintf(stderr, "FAILED: NaN^3 must be NaN\n");
    std::exit(1);
  }
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t random_pairs = argc > 1 ? std::atoll(argv[1]) : 1000000;
  check_edges();
  // Every k up to kMaxK: the defaults (0.6, 0.999), typical betas, gammas near 1 whose powers
  // stay large over the whole range, 0.5 (exact powers, down through the subnormals to 0), and
  // a few others across (0, 1), whose powers go through the subnormals to 0 on the way.
  const double sweep[] = {0.6, 0.999, 0.9,  0.999999,       1.0 - 0x1p-45,
                          0.5, 0.3,   1e-3, 0.123456789012, 0.98765432101};
  for (double x : sweep) {
    for (int64_t k = 0; k <= kMaxK; ++k) check(x, k);
  }
  // Random pairs: x uniform in (0, 1), or 1 - 2^-u (u up to 53) near 1, or 2^-u near 0; k
  // log-uniform up to 2^62.
  std::mt19937_64 rng(20260521);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  for (int64_t i = 0; i < random_pairs; ++i) {
    double x;
    switch (i % 3) {
      case 0:
        x = unit(rng);
        break;
      case 1:
        x = 1.0 - std::exp2(-53.0 * unit(rng));
        break;
      default:
        x = std::exp2(-1074.0 * unit(rng));
        break;
    }
    if (!(x > 0.0 && x < 1.0)) continue;
    const int64_t k = static_cast<int64_t>(std::exp2(62.0 * unit(rng)));
    check(x, k);
  }
  std::printf("max %" PRId64
              " ulp from pow, %.4Lf ulp from powl (normal results); %.6f equal to pow\n",
              max_pow_ulps, max_exact_ulps,
              static_cast<double>(equal_to_pow) / static_cast<double>(checked));
  std::printf("%" PRId64 " checks passed\n", checked);
  return 0;
}
