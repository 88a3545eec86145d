// The AdamW loops of adamw_kernels.h: a generic C++ loop over adamw_element (the readable
// reference, and what non-x86 CPUs run) and AVX2 and AVX-512 loops that run the same
// adamw_element on vector types.
//
// NOTE: [one formula, three instruction sets]
// adamw_element (csrc/adamw_math.h) is a template over the type it computes in. Here it is
// instantiated with float and double (generic), and with a vector type, Lanes<S, N> (NOTE:
// [vector lanes]: 16 or 8 floats, 8 or 4 doubles), whose +, -, *, /, sqrt_of and nan_max are
// the IEEE operations lane by lane. So every path runs the same operations in the same order on
// every element, and with no fused multiply-add (-ffp-contract=off, and none in the operators)
// they give the same bits. The loop that calls adamw_element carries the instruction set's
// `target` attribute and is `flatten`, so the whole formula is inlined into a function compiled
// for that instruction set.
#include "adamw_kernels.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstring>
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
// scalar_t and back, as stabilized_grad does. It has no instruction set of its own: each
// instruction set's Loops::run (adamw_vector_loops.h) is `flatten`, so this is inlined into it.
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

// Picks the loop instance for the run, Loops::run<scalar_t, V, kZeroGrad, kAmsgrad>.
template <typename scalar_t, typename V, typename Loops>
void dispatch_loop(const AdamwRun& run, const AdamwStep& step) {
  const auto c =
      adamw_constants<opmath_of<scalar_t>>(step.group, step.bias, step.grad_scale, step.maximize);
  const bool zero = run.grad == nullptr;
  const bool amsgrad = run.max_exp_avg_sq != nullptr;
  if (zero) {
    amsgrad ? Loops::template run<scalar_t, V, true, true>(run, c)
            : Loops::template run<scalar_t, V, true, false>(run, c);
  } else {
    amsgrad ? Loops::template run<scalar_t, V, false, true>(run, c)
            : Loops::template run<scalar_t, V, false, false>(run, c);
  }
}

#ifdef GRADSTAB_X86_KERNELS
// ------------------------------------------------------------------------------------------------
// AVX-512 (AVX512F) and AVX2, with F16C for float16.
//
// NOTE: [vector lanes]
// Both instruction sets run the same source, adamw_vector_loops.h, included twice below: in
// namespace avx512 with kVectorBytes = 64 and in namespace avx2 with kVectorBytes = 32, each
// time under a pragma that compiles every function it defines for that instruction set (as a
// `target` attribute would). Its vector type, Lanes<S>, holds kVectorBytes of float or double in
// GCC's vector extension, whose +, -, *, /, comparisons and lane selects are the IEEE operations
// lane by lane, emitted for the instruction set in force; only the square root and the float16
// conversions (F16C) name intrinsics, of the width in force. bfloat16 is converted with integer
// lanes: widened by a shift, rounded to nearest-even as c10::BFloat16 is, NaN to 0x7FC0. The
// loop that calls adamw_element is `flatten`, so the whole formula is inlined into one function
// of that instruction set. (Written once as generic code with per-width helpers instead, GCC
// lowered the comparisons of nan_max to scalar code outside a target function: 5x slower.)

#define GRADSTAB_PRAGMA(text) _Pragma(#text)
#if defined(__clang__)
#define GRADSTAB_TARGET_BEGIN(isa) \
  GRADSTAB_PRAGMA(clang attribute push(__attribute__((target(isa))), apply_to = function))
#define GRADSTAB_TARGET_END GRADSTAB_PRAGMA(clang attribute pop)
#else
#define GRADSTAB_TARGET_BEGIN(isa) \
  GRADSTAB_PRAGMA(GCC push_options) GRADSTAB_PRAGMA(GCC target(isa))
#define GRADSTAB_TARGET_END GRADSTAB_PRAGMA(GCC pop_options)
#endif

// GCC 12 reports the placeholder operands inside its own AVX-512 intrinsics as "may be used
// uninitialized" once they are inlined (GCC bug 105593); no value of ours is.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace avx512 {
GRADSTAB_TARGET_BEGIN("avx512f,avx2,f16c")
constexpr int kVectorBytes = 64;
#include "adamw_vector_loops.h"
GRADSTAB_TARGET_END
}  // namespace avx512

namespace avx2 {
GRADSTAB_TARGET_BEGIN("avx2,f16c")
constexpr int kVectorBytes = 32;
#include "adamw_vector_loops.h"
GRADSTAB_TARGET_END
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
