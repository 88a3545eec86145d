// x^k for the bias corrections (gamma1^k, gamma2^k of the stabilizer, beta1^step, beta2^step of
// AdamW): one routine, compiled by the host compiler for the CPU kernels and by nvcc for the CUDA
// kernels, so that both get the same bits (docs/cuda.md, "What the device shares with the CPU").
//
// NOTE: [integer power]
// pow() is no good here: glibc's and CUDA's differ in the last bit (CUDA documents up to 2 ulp),
// and libdevice's pow is made of fused multiply-adds. Plain binary exponentiation in double is
// exact to the operations but not accurate: the rounding of each square grows with the power, to
// about k/2 ulp of x^k. So x^k is computed by left-to-right binary exponentiation in double-double
// arithmetic (a value is hi + lo, about 106 significant bits): products are made exact with
// Dekker's splitting (no fused multiply-add, which the CPU build does not use and the CUDA check
// refuses), and the result is hi, the double nearest hi + lo. The relative error of hi + lo is
// below 2^-100 for any k < 2^63, so hi is the correctly rounded x^k except when x^k lies within
// that of a midpoint between two doubles: within 1 ulp of pow, and nearly always equal to it
// (tests/test_integer_power.py checks every k up to 10^6). Every operation is a rounded IEEE
// add, subtract or multiply, whose result is the same on every IEEE machine as long as the
// compiler contracts none into a fused multiply-add (-ffp-contract=off, nvcc -fmad=false).
//
// Intermediate values are kept in [2^-kRescaleBits, 1] by exact scalings by powers of two, with
// the scale counted apart, so no product underflows; a power below 2^-1075 is 0, and one in the
// subnormal range is rounded twice (to 53 bits, then to the subnormal's), within 1 ulp.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define GRADSTAB_HOST_DEVICE __host__ __device__
#else
#define GRADSTAB_HOST_DEVICE
#endif

namespace gradstab {
namespace integer_power_detail {

// Values are rescaled by 2^kRescaleBits once below 2^-kRescaleBits: the square of one at the
// limit, times an x at the limit, stays above 2^-3 * kRescaleBits, far from the subnormals.
constexpr int kRescaleBits = 300;
constexpr double kRescale = 0x1p300;
constexpr double kRescaleLimit = 0x1p-300;
// x = hi + lo exactly with hi, lo of at most 26 significant bits (Veltkamp): 2^27 + 1.
constexpr double kSplitter = 134217729.0;

struct DoubleDouble {
  double hi;
  double lo;
};

struct Split {
  double hi;
  double lo;
};

GRADSTAB_HOST_DEVICE inline Split split(double a) {
  const double c = kSplitter * a;
  const double hi = c - (c - a);
  return {hi, a - hi};
}

// a * b as p + e exactly (Dekker), given the splits of a and b.
GRADSTAB_HOST_DEVICE inline DoubleDouble exact_product(double a, const Split& sa, double b,
                                                       const Split& sb) {
  const double p = a * b;
  const double e = ((sa.hi * sb.hi - p) + sa.hi * sb.lo + sa.lo * sb.hi) + sa.lo * sb.lo;
  return {p, e};
}

// hi + lo renormalized so that hi is the double nearest the sum (|hi| >= |lo|).
GRADSTAB_HOST_DEVICE inline DoubleDouble renormalize(double hi, double lo) {
  const double s = hi + lo;
  return {s, lo - (s - hi)};
}

GRADSTAB_HOST_DEVICE inline DoubleDouble square(const DoubleDouble& x) {
  const Split s = split(x.hi);
  const DoubleDouble p = exact_product(x.hi, s, x.hi, s);
  const double cross = x.hi * x.lo;
  return renormalize(p.hi, p.lo + (cross + cross));
}

GRADSTAB_HOST_DEVICE inline DoubleDouble times(const DoubleDouble& x, double y, const Split& sy) {
  const DoubleDouble p = exact_product(x.hi, split(x.hi), y, sy);
  return renormalize(p.hi, p.lo + x.lo * y);
}

// 2^-n for 0 <= n <= 1022, exactly.
GRADSTAB_HOST_DEVICE inline double inverse_power_of_two(int n) {
  const uint64_t bits = static_cast<uint64_t>(1023 - n) << 52;
  double value;
  memcpy(&value, &bits, sizeof value);
  return value;
}

}  // namespace integer_power_detail

// x^k for x in [0, 1) and k >= 0 (0^0 = 1; k < 0 is taken as 0). See NOTE: [integer power].
GRADSTAB_HOST_DEVICE inline double integer_power(double x, int64_t k) {
  using namespace integer_power_detail;
  if (k <= 0) return 1.0;
  if (!(x > 0.0)) return x == 0.0 ? 0.0 : x * 0.0;  // 0, or NaN for NaN
  // x = base * 2^-base_scale with base in [2^-kRescaleBits, 1): exact.
  double base = x;
  int base_scale = 0;
  while (base < kRescaleLimit) {
    base *= kRescale;
    base_scale += kRescaleBits;
  }
  const Split base_split = split(base);
  int top = 62;
  while (((k >> top) & 1) == 0) --top;
  // Invariant: x^(the bits of k above `bit`) = (r.hi + r.lo) * 2^-scale, r.hi in [2^-300, 1].
  DoubleDouble r{base, 0.0};
  int scale = base_scale;
  for (int bit = top - 1; bit >= 0; --bit) {
    r = square(r);
    scale *= 2;
    if (r.hi < kRescaleLimit) {
      r = {r.hi * kRescale, r.lo * kRescale};
      scale += kRescaleBits;
    }
    if ((k >> bit) & 1) {
      r = times(r, base, base_split);
      scale += base_scale;
      if (r.hi < kRescaleLimit) {
        r = {r.hi * kRescale, r.lo * kRescale};
        scale += kRescaleBits;
      }
    }
    // r.hi <= 1 and the rest only makes it smaller: below 2^-1075 it rounds to 0.
    if (scale > 1075) return 0.0;
  }
  // One rounding at most, in the last multiply (r.hi >= 2^-300, so r.hi * 2^-53 is exact).
  double value = r.hi;
  if (scale > 1022) {
    value *= 0x1p-53;
    scale -= 53;
  }
  return value * inverse_power_of_two(scale);
}

}  // namespace gradstab
