// The sum-of-squares and rescale loops of kernels.h: a generic C++ version (the readable
// reference, and what non-x86 CPUs run), and AVX2 and AVX-512 versions chosen at run time.
//
// The x86 versions are ordinary functions with a `target` attribute, so the library is built for
// any x86-64 (no -march flag) and only calls them on a CPU that has the instructions. All
// versions give the same bits: see [summation order] in kernels.h; conversions are exact
// (16-bit and float32 to float64) or round to nearest-even like c10::Half and c10::BFloat16.
#include "kernels.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdlib>
#include <cstring>
#include <string>

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define GRADSTAB_X86_KERNELS 1
#include <immintrin.h>
#endif

namespace gradstab {
namespace cpu {
namespace {

template <typename scalar_t>
inline double to_double(scalar_t x) {
  return static_cast<double>(static_cast<float>(x));
}
template <>
inline double to_double<double>(double x) {
  return x;
}

// The lanes of [summation order], added in index order.
inline double add_lanes(const double* lanes) {
  double total = 0.0;
  for (int j = 0; j < kSumLanes; ++j) total += lanes[j];
  return total;
}

// Adds the squares of data[i, n) to lanes 0, 1, ... (the tail after the last full block).
template <typename scalar_t>
inline void add_tail(const scalar_t* data, int64_t i, int64_t n, double* lanes) {
  for (int j = 0; i < n; ++i, ++j) {
    const double x = to_double(data[i]);
    lanes[j] += x * x;
  }
}

// NOTE: [prefetching the sum of squares]
// One core reading one stream leaves memory idle much of the time: the hardware prefetcher
// alone gave about 8.5 GB/s on the machine of docs/benchmarks.md, asking for every line
// kSumPrefetchBytes ahead 11.5 GB/s (standalone loop over 240 MB of float32; 1 KiB gave 10,
// 16 KiB no more than 8). Prefetches change no value.
constexpr int64_t kSumPrefetchBytes = 8192;

// Asks for the lines of the next `bytes` bytes at p, kSumPrefetchBytes ahead.
template <int64_t bytes>
inline void prefetch_block(const void* p) {
  const char* ahead = static_cast<const char*>(p) + kSumPrefetchBytes;
  for (int64_t line = 0; line < bytes; line += 64) __builtin_prefetch(ahead + line, 0, 3);
}

// ------------------------------------------------------------------------------------------------
// Generic C++: the definition the vector versions must match bit for bit.

template <typename scalar_t>
double sum_squares_generic(const void* data, int64_t n) {
  const scalar_t* x = static_cast<const scalar_t*>(data);
  double lanes[kSumLanes] = {};
  int64_t i = 0;
  for (; i + kSumLanes <= n; i += kSumLanes) {
    for (int j = 0; j < kSumLanes; ++j) {
      const double v = to_double(x[i + j]);
      lanes[j] += v * v;
    }
  }
  add_tail(x, i, n, lanes);
  return add_lanes(lanes);
}

template <typename scalar_t>
void scale_generic(void* data, int64_t n, double factor) {
  scalar_t* x = static_cast<scalar_t*>(data);
  if constexpr (std::is_same_v<scalar_t, double>) {
    for (int64_t i = 0; i < n; ++i) x[i] *= factor;
  } else {
    const float f = static_cast<float>(factor);
    for (int64_t i = 0; i < n; ++i) x[i] = static_cast<scalar_t>(static_cast<float>(x[i]) * f);
  }
}

template <typename scalar_t>
constexpr DtypeKernels generic_kernels() {
  return {&sum_squares_generic<scalar_t>, &scale_generic<scalar_t>};
}

#ifdef GRADSTAB_X86_KERNELS
// ------------------------------------------------------------------------------------------------
// AVX-512 (AVX512F; F16C for float16): 8 float64 lanes per register, 4 registers per block.

#define GRADSTAB_AVX512 __attribute__((target("avx512f,avx2,f16c")))

// Eight elements from p, widened to float64.
template <typename scalar_t>
GRADSTAB_AVX512 inline __m512d load8_pd_avx512(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    return _mm512_loadu_pd(p);
  } else if constexpr (std::is_same_v<scalar_t, float>) {
    return _mm512_cvtps_pd(_mm256_loadu_ps(p));
  } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    return _mm512_cvtps_pd(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  } else {
    // bfloat16 is the upper half of a float32.
    const __m256i bits =
        _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm512_cvtps_pd(_mm256_castsi256_ps(_mm256_slli_epi32(bits, 16)));
  }
}

template <typename scalar_t>
GRADSTAB_AVX512 double sum_squares_avx512(const void* data, int64_t n) {
  static_assert(kSumLanes == 32, "four registers of eight float64 lanes");
  const scalar_t* x = static_cast<const scalar_t*>(data);
  __m512d acc[4] = {_mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd(),
                    _mm512_setzero_pd()};
  int64_t i = 0;
  for (; i + kSumLanes <= n; i += kSumLanes) {
    prefetch_block<kSumLanes * sizeof(scalar_t)>(x + i);
    for (int r = 0; r < 4; ++r) {
      const __m512d v = load8_pd_avx512(x + i + 8 * r);
      acc[r] = _mm512_add_pd(acc[r], _mm512_mul_pd(v, v));
    }
  }
  alignas(64) double lanes[kSumLanes];
  for (int r = 0; r < 4; ++r) _mm512_store_pd(lanes + 8 * r, acc[r]);
  add_tail(x, i, n, lanes);
  return add_lanes(lanes);
}

// Sixteen float32 values rounded to nearest-even to bfloat16 (finite inputs).
GRADSTAB_AVX512 inline __m256i float_to_bf16_avx512(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i bias = _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_add_epi32(bits, bias), 16));
}

template <typename scalar_t>
GRADSTAB_AVX512 void scale_avx512(void* data, int64_t n, double factor) {
  scalar_t* x = static_cast<scalar_t*>(data);
  int64_t i = 0;
  if constexpr (std::is_same_v<scalar_t, double>) {
    const __m512d f = _mm512_set1_pd(factor);
    for (; i + 8 <= n; i += 8) _mm512_storeu_pd(x + i, _mm512_mul_pd(_mm512_loadu_pd(x + i), f));
  } else {
    const __m512 f = _mm512_set1_ps(static_cast<float>(factor));
    for (; i + 16 <= n; i += 16) {
      if constexpr (std::is_same_v<scalar_t, float>) {
        _mm512_storeu_ps(x + i, _mm512_mul_ps(_mm512_loadu_ps(x + i), f));
      } else {
        __m256i* p = reinterpret_cast<__m256i*>(x + i);
        const __m256i raw = _mm256_loadu_si256(p);
        if constexpr (std::is_same_v<scalar_t, c10::Half>) {
          const __m512 v = _mm512_mul_ps(_mm512_cvtph_ps(raw), f);
          _mm256_storeu_si256(p, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        } else {
          const __m512i bits = _mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16);
          _mm256_storeu_si256(p, float_to_bf16_avx512(_mm512_mul_ps(_mm512_castsi512_ps(bits), f)));
        }
      }
    }
  }
  scale_generic<scalar_t>(x + i, n - i, factor);
}

template <typename scalar_t>
constexpr DtypeKernels avx512_kernels() {
  return {&sum_squares_avx512<scalar_t>, &scale_avx512<scalar_t>};
}

// ------------------------------------------------------------------------------------------------
// AVX2 (with F16C for float16): 4 float64 lanes per register, 8 registers per block.

#define GRADSTAB_AVX2 __attribute__((target("avx2,f16c")))

// Four elements from p, widened to float64.
template <typename scalar_t>
GRADSTAB_AVX2 inline __m256d load4_pd_avx2(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    return _mm256_loadu_pd(p);
  } else if constexpr (std::is_same_v<scalar_t, float>) {
    return _mm256_cvtps_pd(_mm_loadu_ps(p));
  } else {
    const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    if constexpr (std::is_same_v<scalar_t, c10::Half>) {
      return _mm256_cvtps_pd(_mm_cvtph_ps(raw));
    } else {
      return _mm256_cvtps_pd(_mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(raw), 16)));
    }
  }
}

template <typename scalar_t>
GRADSTAB_AVX2 double sum_squares_avx2(const void* data, int64_t n) {
  static_assert(kSumLanes == 32, "eight registers of four float64 lanes");
  const scalar_t* x = static_cast<const scalar_t*>(data);
  __m256d acc[8];
  for (auto& a : acc) a = _mm256_setzero_pd();
  int64_t i = 0;
  for (; i + kSumLanes <= n; i += kSumLanes) {
    prefetch_block<kSumLanes * sizeof(scalar_t)>(x + i);
    for (int r = 0; r < 8; ++r) {
      const __m256d v = load4_pd_avx2(x + i + 4 * r);
      acc[r] = _mm256_add_pd(acc[r], _mm256_mul_pd(v, v));
    }
  }
  alignas(32) double lanes[kSumLanes];
  for (int r = 0; r < 8; ++r) _mm256_store_pd(lanes + 4 * r, acc[r]);
  add_tail(x, i, n, lanes);
  return add_lanes(lanes);
}

// Eight float32 values rounded to nearest-even to bfloat16 (finite inputs).
GRADSTAB_AVX2 inline __m128i float_to_bf16_avx2(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i bias = _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, bias), 16);
  // packus works within 128-bit halves: gather the two useful 64-bit pieces into the low half.
  const __m256i packed = _mm256_packus_epi32(rounded, rounded);
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0b1000));
}

template <typename scalar_t>
GRADSTAB_AVX2 void scale_avx2(void* data, int64_t n, double factor) {
  scalar_t* x = static_cast<scalar_t*>(data);
  int64_t i = 0;
  if constexpr (std::is_same_v<scalar_t, double>) {
    const __m256d f = _mm256_set1_pd(factor);
    for (; i + 4 <= n; i += 4) _mm256_storeu_pd(x + i, _mm256_mul_pd(_mm256_loadu_pd(x + i), f));
  } else {
    const __m256 f = _mm256_set1_ps(static_cast<float>(factor));
    for (; i + 8 <= n; i += 8) {
      if constexpr (std::is_same_v<scalar_t, float>) {
        _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), f));
      } else {
        __m128i* p = reinterpret_cast<__m128i*>(x + i);
        const __m128i raw = _mm_loadu_si128(p);
        if constexpr (std::is_same_v<scalar_t, c10::Half>) {
          const __m256 v = _mm256_mul_ps(_mm256_cvtph_ps(raw), f);
          _mm_storeu_si128(p, _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        } else {
          const __m256i bits = _mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16);
          _mm_storeu_si128(p, float_to_bf16_avx2(_mm256_mul_ps(_mm256_castsi256_ps(bits), f)));
        }
      }
    }
  }
  scale_generic<scalar_t>(x + i, n - i, factor);
}

template <typename scalar_t>
constexpr DtypeKernels avx2_kernels() {
  return {&sum_squares_avx2<scalar_t>, &scale_avx2<scalar_t>};
}
#endif  // GRADSTAB_X86_KERNELS

// ------------------------------------------------------------------------------------------------
// Choice of instruction set

enum Isa : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };
constexpr const char* kIsaNames[] = {"generic", "avx2", "avx512"};

Isa detect_isa() {
#ifdef GRADSTAB_X86_KERNELS
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  if (avx2 && __builtin_cpu_supports("avx512f")) return kAvx512;
  if (avx2) return kAvx2;
#endif
  return kGeneric;
}

Isa chosen_isa() {
  static const Isa isa = [] {
    Isa best = detect_isa();
    const char* env = std::getenv("GRADSTAB_CPU_ISA");
    if (env == nullptr || *env == '\0') return best;
    for (int i = kGeneric; i <= kAvx512; ++i) {
      if (std::string(env) == kIsaNames[i]) return i < best ? static_cast<Isa>(i) : best;
    }
    TORCH_WARN("gradstab: GRADSTAB_CPU_ISA=", env, " is not one of generic, avx2, avx512; using ",
               kIsaNames[best]);
    return best;
  }();
  return isa;
}

// Indexed by [kernel_table_row()][kernel_table_column(dtype)].
constexpr DtypeKernels kKernelTable[][4] = {
    {generic_kernels<float>(), generic_kernels<double>(), generic_kernels<c10::Half>(),
     generic_kernels<c10::BFloat16>()},
#ifdef GRADSTAB_X86_KERNELS
    {avx2_kernels<float>(), avx2_kernels<double>(), avx2_kernels<c10::Half>(),
     avx2_kernels<c10::BFloat16>()},
    {avx512_kernels<float>(), avx512_kernels<double>(), avx512_kernels<c10::Half>(),
     avx512_kernels<c10::BFloat16>()},
#endif
};

}  // namespace

int kernel_table_row() {
  return chosen_isa();
}

int kernel_table_column(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return 0;
    case at::kDouble:
      return 1;
    case at::kHalf:
      return 2;
    case at::kBFloat16:
      return 3;
    default:
      return -1;
  }
}

const DtypeKernels& kernels_for(at::ScalarType dtype) {
  const int column = kernel_table_column(dtype);
  TORCH_CHECK(column >= 0, "gradstab: unsupported dtype ", dtype);
  return kKernelTable[kernel_table_row()][column];
}

const char* kernel_isa() {
  return kIsaNames[chosen_isa()];
}

}  // namespace cpu
}  // namespace gradstab
