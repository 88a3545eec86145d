// The AdamW loops of adamw_kernels.h: a generic C++ loop over adamw_element (the readable
// reference, and what non-x86 CPUs run) and AVX2 and AVX-512 loops that run the same
// adamw_element on vector types.
//
// NOTE: [one formula, three instruction sets]
// adamw_element (csrc/adamw_math.h) is a template over the type it computes in. Here it is
// instantiated with float and double (generic), and with thin vector types (F512: 16 floats,
// D512: 8 doubles, F256, D256) whose +, -, *, /, sqrt_of and nan_max are the IEEE operations
// lane by lane. So every path runs the same operations in the same order on every element, and
// with no fused multiply-add (-ffp-contract=off, and none in the operators) they give the same
// bits. The vector operators carry a `target` attribute; the loop that calls adamw_element is
// `flatten`, so the whole formula is inlined into a function compiled for that instruction set.
#include "adamw_kernels.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <type_traits>

#include "kernels.h"

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define GRADSTAB_X86_KERNELS 1
#include <immintrin.h>
#endif

namespace gradstab {
namespace cpu {
namespace {

// The type the math of a dtype runs in: double for float64, float otherwise.
template <typename scalar_t>
using opmath_of = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// ------------------------------------------------------------------------------------------------
// Generic C++: the definition the vector loops must match bit for bit.

// Elements [begin, numel) of the run, one at a time.
template <typename scalar_t>
void adamw_elements(const AdamwRun& run, const AdamwConstants<opmath_of<scalar_t>>& c,
                    int64_t begin) {
  using opmath_t = opmath_of<scalar_t>;
  auto* param = static_cast<scalar_t*>(run.param);
  const auto* grad = static_cast<const scalar_t*>(run.grad);
  auto* exp_avg = static_cast<scalar_t*>(run.exp_avg);
  auto* exp_avg_sq = static_cast<scalar_t*>(run.exp_avg_sq);
  auto* max_exp_avg_sq = static_cast<scalar_t*>(run.max_exp_avg_sq);
  for (int64_t i = begin; i < run.numel; ++i) {
    opmath_t p = static_cast<opmath_t>(param[i]);
    const opmath_t g = grad != nullptr ? stabilized_grad(grad[i], c.grad_scale) : opmath_t(0);
    opmath_t m = static_cast<opmath_t>(exp_avg[i]);
    opmath_t v = static_cast<opmath_t>(exp_avg_sq[i]);
    if (max_exp_avg_sq != nullptr) {
      opmath_t v_max = static_cast<opmath_t>(max_exp_avg_sq[i]);
      adamw_element(p, g, m, v, &v_max, c);
      max_exp_avg_sq[i] = static_cast<scalar_t>(v_max);
    } else {
      adamw_element(p, g, m, v, static_cast<opmath_t*>(nullptr), c);
    }
    param[i] = static_cast<scalar_t>(p);
    exp_avg[i] = static_cast<scalar_t>(m);
    exp_avg_sq[i] = static_cast<scalar_t>(v);
  }
}

template <typename scalar_t>
void adamw_generic(const AdamwRun& run, const AdamwStep& step) {
  const auto c =
      adamw_constants<opmath_of<scalar_t>>(step.group, step.bias, step.grad_scale, step.maximize);
  adamw_elements<scalar_t>(run, c, 0);
}

// The same constants for a vector type V of lanes of S.
template <typename V, typename S>
AdamwConstants<V> broadcast(const AdamwConstants<S>& c) {
  AdamwConstants<V> out;
  out.grad_scale = V::set1(c.grad_scale);
  out.decay = V::set1(c.decay);
  out.lerp_weight = V::set1(c.lerp_weight);
  out.lerp_complement = V::set1(c.lerp_complement);
  out.lerp_from_start = c.lerp_from_start;
  out.beta2 = V::set1(c.beta2);
  out.one_minus_beta2 = V::set1(c.one_minus_beta2);
  out.bias2_sqrt = V::set1(c.bias2_sqrt);
  out.eps = V::set1(c.eps);
  out.neg_step_size = V::set1(c.neg_step_size);
  return out;
}

// NOTE: [prefetching the AdamW streams]
// The loop reads four or five streams (param, grad, moments) and writes three or four. On the
// machine of docs/benchmarks.md the hardware prefetcher alone leaves one core at about 20 GB/s
// on them; asking for each stream's line kAdamwPrefetchBytes ahead made the loop 12-15% faster
// (measured in a standalone loop, 30M float32 elements; 1-2 KiB were best, 256 B too short).
constexpr int64_t kAdamwPrefetchBytes = 1024;

template <typename T>
inline void prefetch_ahead(const T* p) {
  __builtin_prefetch(reinterpret_cast<const char*>(p) + kAdamwPrefetchBytes, 0, 3);
}

// The vector loop: W lanes at a time with V, then the generic loop for the tail. kZeroGrad: AdamW
// sees zero gradients; kAmsgrad: max_exp_avg_sq is updated and used. V::load and V::store convert
// from and to scalar_t (exactly, and to nearest-even); V::round_as(const scalar_t*, x) rounds x to
// scalar_t and back, as stabilized_grad does. It has no instruction-set attribute of its
// own: each instruction set's Loop::run below is `flatten`, so this is inlined into it.
template <typename scalar_t, typename V, bool kZeroGrad, bool kAmsgrad>
inline void vector_loop(const AdamwRun& run, const AdamwConstants<opmath_of<scalar_t>>& c) {
  constexpr int64_t W = V::kLanes;
  const AdamwConstants<V> vc = broadcast<V>(c);
  auto* param = static_cast<scalar_t*>(run.param);
  const auto* grad = static_cast<const scalar_t*>(run.grad);
  auto* exp_avg = static_cast<scalar_t*>(run.exp_avg);
  auto* exp_avg_sq = static_cast<scalar_t*>(run.exp_avg_sq);
  auto* max_exp_avg_sq = static_cast<scalar_t*>(run.max_exp_avg_sq);
  int64_t i = 0;
  for (; i + W <= run.numel; i += W) {
    prefetch_ahead(param + i);
    if constexpr (!kZeroGrad) prefetch_ahead(grad + i);
    prefetch_ahead(exp_avg + i);
    prefetch_ahead(exp_avg_sq + i);
    if constexpr (kAmsgrad) prefetch_ahead(max_exp_avg_sq + i);
    V p = V::load(param + i);
    const V g = kZeroGrad ? V::set1(0) : V::round_as(grad, V::load(grad + i) * vc.grad_scale);
    V m = V::load(exp_avg + i);
    V v = V::load(exp_avg_sq + i);
    if constexpr (kAmsgrad) {
      V v_max = V::load(max_exp_avg_sq + i);
      adamw_element(p, g, m, v, &v_max, vc);
      V::store(max_exp_avg_sq + i, v_max);
    } else {
      adamw_element(p, g, m, v, static_cast<V*>(nullptr), vc);
    }
    V::store(param + i, p);
    V::store(exp_avg + i, m);
    V::store(exp_avg_sq + i, v);
  }
  adamw_elements<scalar_t>(run, c, i);
}

// Picks the loop instance for the run: ZeroGrad x Amsgrad.
template <typename scalar_t, typename V, template <typename, typename, bool, bool> class Loop>
void dispatch_loop(const AdamwRun& run, const AdamwStep& step) {
  const auto c =
      adamw_constants<opmath_of<scalar_t>>(step.group, step.bias, step.grad_scale, step.maximize);
  const bool zero = run.grad == nullptr;
  const bool amsgrad = run.max_exp_avg_sq != nullptr;
  if (zero) {
    amsgrad ? Loop<scalar_t, V, true, true>::run(run, c)
            : Loop<scalar_t, V, true, false>::run(run, c);
  } else {
    amsgrad ? Loop<scalar_t, V, false, true>::run(run, c)
            : Loop<scalar_t, V, false, false>::run(run, c);
  }
}

#ifdef GRADSTAB_X86_KERNELS
// GCC 12 reports the placeholder operands inside its own AVX-512 intrinsics as "may be used
// uninitialized" once they are inlined (GCC bug 105593); no value of ours is.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// ------------------------------------------------------------------------------------------------
// AVX-512 (AVX512F; F16C for float16)

#define GRADSTAB_AVX512 __attribute__((target("avx512f,avx2,f16c")))

namespace avx512 {

// Sixteen float32 values rounded to nearest-even to bfloat16, NaN to 0x7FC0 (c10::BFloat16).
GRADSTAB_AVX512 inline __m256i bf16_from_float(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(
      _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, rounded, _mm512_set1_epi32(0x7FC0)));
}

struct F512 {
  static constexpr int64_t kLanes = 16;
  __m512 x;

  GRADSTAB_AVX512 static F512 set1(float value) { return {_mm512_set1_ps(value)}; }
  GRADSTAB_AVX512 static F512 load(const float* p) { return {_mm512_loadu_ps(p)}; }
  GRADSTAB_AVX512 static F512 load(const c10::Half* p) {
    return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
  }
  GRADSTAB_AVX512 static F512 load(const c10::BFloat16* p) {
    const __m512i wide =
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return {_mm512_castsi512_ps(_mm512_slli_epi32(wide, 16))};
  }
  GRADSTAB_AVX512 static F512 round_as(const float*, const F512& v) { return v; }
  GRADSTAB_AVX512 static F512 round_as(const c10::Half*, const F512& v) {
    return {_mm512_cvtph_ps(_mm512_cvtps_ph(v.x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC))};
  }
  GRADSTAB_AVX512 static F512 round_as(const c10::BFloat16*, const F512& v) {
    const __m512i wide = _mm512_cvtepu16_epi32(bf16_from_float(v.x));
    return {_mm512_castsi512_ps(_mm512_slli_epi32(wide, 16))};
  }
  GRADSTAB_AVX512 static void store(float* p, const F512& v) { _mm512_storeu_ps(p, v.x); }
  GRADSTAB_AVX512 static void store(c10::Half* p, const F512& v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                        _mm512_cvtps_ph(v.x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  GRADSTAB_AVX512 static void store(c10::BFloat16* p, const F512& v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bf16_from_float(v.x));
  }
};

struct D512 {
  static constexpr int64_t kLanes = 8;
  __m512d x;

  GRADSTAB_AVX512 static D512 set1(double value) { return {_mm512_set1_pd(value)}; }
  GRADSTAB_AVX512 static D512 load(const double* p) { return {_mm512_loadu_pd(p)}; }
  GRADSTAB_AVX512 static D512 round_as(const double*, const D512& v) { return v; }
  GRADSTAB_AVX512 static void store(double* p, const D512& v) { _mm512_storeu_pd(p, v.x); }
};

GRADSTAB_AVX512 inline F512 operator+(const F512& a, const F512& b) {
  return {_mm512_add_ps(a.x, b.x)};
}
GRADSTAB_AVX512 inline F512 operator-(const F512& a, const F512& b) {
  return {_mm512_sub_ps(a.x, b.x)};
}
GRADSTAB_AVX512 inline F512 operator*(const F512& a, const F512& b) {
  return {_mm512_mul_ps(a.x, b.x)};
}
GRADSTAB_AVX512 inline F512 operator/(const F512& a, const F512& b) {
  return {_mm512_div_ps(a.x, b.x)};
}
GRADSTAB_AVX512 inline F512 sqrt_of(const F512& a) {
  return {_mm512_sqrt_ps(a.x)};
}
GRADSTAB_AVX512 inline F512 nan_max(const F512& a, const F512& b) {
  const __mmask16 take_a =
      _mm512_cmp_ps_mask(a.x, b.x, _CMP_GT_OQ) | _mm512_cmp_ps_mask(a.x, a.x, _CMP_UNORD_Q);
  return {_mm512_mask_blend_ps(take_a, b.x, a.x)};
}

GRADSTAB_AVX512 inline D512 operator+(const D512& a, const D512& b) {
  return {_mm512_add_pd(a.x, b.x)};
}
GRADSTAB_AVX512 inline D512 operator-(const D512& a, const D512& b) {
  return {_mm512_sub_pd(a.x, b.x)};
}
GRADSTAB_AVX512 inline D512 operator*(const D512& a, const D512& b) {
  return {_mm512_mul_pd(a.x, b.x)};
}
GRADSTAB_AVX512 inline D512 operator/(const D512& a, const D512& b) {
  return {_mm512_div_pd(a.x, b.x)};
}
GRADSTAB_AVX512 inline D512 sqrt_of(const D512& a) {
  return {_mm512_sqrt_pd(a.x)};
}
GRADSTAB_AVX512 inline D512 nan_max(const D512& a, const D512& b) {
  const __mmask8 take_a =
      _mm512_cmp_pd_mask(a.x, b.x, _CMP_GT_OQ) | _mm512_cmp_pd_mask(a.x, a.x, _CMP_UNORD_Q);
  return {_mm512_mask_blend_pd(take_a, b.x, a.x)};
}

template <typename scalar_t, typename V, bool kZeroGrad, bool kAmsgrad>
struct Loop {
  GRADSTAB_AVX512 __attribute__((flatten)) static void run(
      const AdamwRun& r, const AdamwConstants<opmath_of<scalar_t>>& c) {
    vector_loop<scalar_t, V, kZeroGrad, kAmsgrad>(r, c);
  }
};

template <typename scalar_t>
void adamw(const AdamwRun& run, const AdamwStep& step) {
  using V = std::conditional_t<std::is_same_v<scalar_t, double>, D512, F512>;
  dispatch_loop<scalar_t, V, Loop>(run, step);
}

}  // namespace avx512

// ------------------------------------------------------------------------------------------------
// AVX2 (with F16C for float16)

#define GRADSTAB_AVX2 __attribute__((target("avx2,f16c")))

namespace avx2 {

// Eight float32 values rounded to nearest-even to bfloat16, NaN to 0x7FC0 (c10::BFloat16).
GRADSTAB_AVX2 inline __m128i bf16_from_float(__m256 x) {
  const __m256i bits = _mm256_castps_si256(x);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i rounded = _mm256_srli_epi32(
      _mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
  // packus works within 128-bit halves: gather the two useful 64-bit pieces into the low half.
  const __m256i packed = _mm256_packus_epi32(rounded, rounded);
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0b1000));
}

struct F256 {
  static constexpr int64_t kLanes = 8;
  __m256 x;

  GRADSTAB_AVX2 static F256 set1(float value) { return {_mm256_set1_ps(value)}; }
  GRADSTAB_AVX2 static F256 load(const float* p) { return {_mm256_loadu_ps(p)}; }
  GRADSTAB_AVX2 static F256 load(const c10::Half* p) {
    return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
  }
  GRADSTAB_AVX2 static F256 load(const c10::BFloat16* p) {
    const __m256i wide =
        _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(wide, 16))};
  }
  GRADSTAB_AVX2 static F256 round_as(const float*, const F256& v) { return v; }
  GRADSTAB_AVX2 static F256 round_as(const c10::Half*, const F256& v) {
    return {_mm256_cvtph_ps(_mm256_cvtps_ph(v.x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC))};
  }
  GRADSTAB_AVX2 static F256 round_as(const c10::BFloat16*, const F256& v) {
    const __m256i wide = _mm256_cvtepu16_epi32(bf16_from_float(v.x));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(wide, 16))};
  }
  GRADSTAB_AVX2 static void store(float* p, const F256& v) { _mm256_storeu_ps(p, v.x); }
  GRADSTAB_AVX2 static void store(c10::Half* p, const F256& v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm256_cvtps_ph(v.x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  GRADSTAB_AVX2 static void store(c10::BFloat16* p, const F256& v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), bf16_from_float(v.x));
  }
};

struct D256 {
  static constexpr int64_t kLanes = 4;
  __m256d x;

  GRADSTAB_AVX2 static D256 set1(double value) { return {_mm256_set1_pd(value)}; }
  GRADSTAB_AVX2 static D256 load(const double* p) { return {_mm256_loadu_pd(p)}; }
  GRADSTAB_AVX2 static D256 round_as(const double*, const D256& v) { return v; }
  GRADSTAB_AVX2 static void store(double* p, const D256& v) { _mm256_storeu_pd(p, v.x); }
};

GRADSTAB_AVX2 inline F256 operator+(const F256& a, const F256& b) {
  return {_mm256_add_ps(a.x, b.x)};
}
GRADSTAB_AVX2 inline F256 operator-(const F256& a, const F256& b) {
  return {_mm256_sub_ps(a.x, b.x)};
}
GRADSTAB_AVX2 inline F256 operator*(const F256& a, const F256& b) {
  return {_mm256_mul_ps(a.x, b.x)};
}
GRADSTAB_AVX2 inline F256 operator/(const F256& a, const F256& b) {
  return {_mm256_div_ps(a.x, b.x)};
}
GRADSTAB_AVX2 inline F256 sqrt_of(const F256& a) {
  return {_mm256_sqrt_ps(a.x)};
}
GRADSTAB_AVX2 inline F256 nan_max(const F256& a, const F256& b) {
  const __m256 take_a =
      _mm256_or_ps(_mm256_cmp_ps(a.x, b.x, _CMP_GT_OQ), _mm256_cmp_ps(a.x, a.x, _CMP_UNORD_Q));
  return {_mm256_blendv_ps(b.x, a.x, take_a)};
}

GRADSTAB_AVX2 inline D256 operator+(const D256& a, const D256& b) {
  return {_mm256_add_pd(a.x, b.x)};
}
GRADSTAB_AVX2 inline D256 operator-(const D256& a, const D256& b) {
  return {_mm256_sub_pd(a.x, b.x)};
}
GRADSTAB_AVX2 inline D256 operator*(const D256& a, const D256& b) {
  return {_mm256_mul_pd(a.x, b.x)};
}
GRADSTAB_AVX2 inline D256 operator/(const D256& a, const D256& b) {
  return {_mm256_div_pd(a.x, b.x)};
}
GRADSTAB_AVX2 inline D256 sqrt_of(const D256& a) {
  return {_mm256_sqrt_pd(a.x)};
}
GRADSTAB_AVX2 inline D256 nan_max(const D256& a, const D256& b) {
  const __m256d take_a =
      _mm256_or_pd(_mm256_cmp_pd(a.x, b.x, _CMP_GT_OQ), _mm256_cmp_pd(a.x, a.x, _CMP_UNORD_Q));
  return {_mm256_blendv_pd(b.x, a.x, take_a)};
}

template <typename scalar_t, typename V, bool kZeroGrad, bool kAmsgrad>
struct Loop {
  GRADSTAB_AVX2 __attribute__((flatten)) static void run(
      const AdamwRun& r, const AdamwConstants<opmath_of<scalar_t>>& c) {
    vector_loop<scalar_t, V, kZeroGrad, kAmsgrad>(r, c);
  }
};

template <typename scalar_t>
void adamw(const AdamwRun& run, const AdamwStep& step) {
  using V = std::conditional_t<std::is_same_v<scalar_t, double>, D256, F256>;
  dispatch_loop<scalar_t, V, Loop>(run, step);
}

}  // namespace avx2

#pragma GCC diagnostic pop
#endif  // GRADSTAB_X86_KERNELS

// ------------------------------------------------------------------------------------------------
// Choice of instruction set: the one kernels.h chose.

// Indexed by [kernel_table_row()][kernel_table_column(dtype)] (kernels.h).
constexpr AdamwFn kAdamwTable[][4] = {
    {&adamw_generic<float>, &adamw_generic<double>, &adamw_generic<c10::Half>,
     &adamw_generic<c10::BFloat16>},
#ifdef GRADSTAB_X86_KERNELS
    {&avx2::adamw<float>, &avx2::adamw<double>, &avx2::adamw<c10::Half>,
     &avx2::adamw<c10::BFloat16>},
    {&avx512::adamw<float>, &avx512::adamw<double>, &avx512::adamw<c10::Half>,
     &avx512::adamw<c10::BFloat16>},
#endif
};

}  // namespace

AdamwFn adamw_kernel_for(at::ScalarType dtype) {
  const int column = kernel_table_column(dtype);
  TORCH_CHECK(column >= 0, "gradstab: no AdamW kernel for dtype ", dtype);
  return kAdamwTable[kernel_table_row()][column];
}

}  // namespace cpu
}  // namespace gradstab
