// Device helpers shared by the kernels of stabilize.cu and adamw.cu: 16-byte packs of elements,
// dtype and alignment dispatch, and the float64 sums of squares of NOTE: [thread order of a
// chunk] (multi_tensor_plan.h).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "multi_tensor.cuh"

namespace gradstab {
namespace cuda {

template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

// W elements of 16 bytes, loaded and stored with one access where the address allows.
template <typename scalar_t>
struct alignas(16) Pack {
  static constexpr int kWidth = 16 / sizeof(scalar_t);
  scalar_t val[kWidth];
};

template <typename scalar_t>
__device__ __forceinline__ double square(scalar_t x) {
  const double d = static_cast<double>(static_cast<typename AccType<scalar_t>::type>(x));
  return d * d;
}

// Calls f with a null pointer of the C++ type of `code`.
template <typename F>
__device__ __forceinline__ void dispatch_dtype(uint8_t code, const F& f) {
  switch (code) {
    case kCodeFloat:
      f(static_cast<float*>(nullptr));
      break;
    case kCodeDouble:
      f(static_cast<double*>(nullptr));
      break;
    case kCodeHalf:
      f(static_cast<c10::Half*>(nullptr));
      break;
    default:
      f(static_cast<c10::BFloat16*>(nullptr));
      break;
  }
}

// Pack number `vec` of x: one 16-byte access when kAligned, else W element accesses.
template <bool kAligned, typename scalar_t>
__device__ __forceinline__ void load_pack(const scalar_t* x, int32_t vec, Pack<scalar_t>& p) {
  if constexpr (kAligned) {
    p = reinterpret_cast<const Pack<scalar_t>*>(x)[vec];
  } else {
#pragma unroll
    for (int j = 0; j < Pack<scalar_t>::kWidth; ++j) p.val[j] = x[vec * Pack<scalar_t>::kWidth + j];
  }
}

template <bool kAligned, typename scalar_t>
__device__ __forceinline__ void store_pack(scalar_t* x, int32_t vec, const Pack<scalar_t>& p) {
  if constexpr (kAligned) {
    reinterpret_cast<Pack<scalar_t>*>(x)[vec] = p;
  } else {
#pragma unroll
    for (int j = 0; j < Pack<scalar_t>::kWidth; ++j) x[vec * Pack<scalar_t>::kWidth + j] = p.val[j];
  }
}

// Calls f(std::true_type{}) when x allows 16-byte access, else f(std::false_type{}).
// x must point to a gradient's data (not null: callers skip empty chunks).
template <typename F>
__device__ __forceinline__ void dispatch_alignment(const void* x, const F& f) {
  // Gradients are in global memory; saying so lets the compiler use global (LDG/STG) rather
  // than generic accesses for a pointer it read from the metadata.
  __builtin_assume(__isGlobal(x));
  if (is_vector_aligned(x)) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// This thread's share of the sum of squares of x[0, len), in float64.
template <bool kAligned, typename scalar_t>
__device__ double thread_sum_squares(const scalar_t* x, int32_t len) {
  constexpr int W = Pack<scalar_t>::kWidth;
  Pack<scalar_t> buf[kUnroll];
  double acc = 0.0;
  visit_chunk<W>(
      threadIdx.x, kThreads, len, [&](int u, int32_t vec) { load_pack<kAligned>(x, vec, buf[u]); },
      [&](int u, int32_t) {
#pragma unroll
        for (int j = 0; j < W; ++j) acc += square(buf[u].val[j]);
      },
      [&](int32_t begin, int32_t end) {
        for (int32_t i = begin; i < end; ++i) acc += square(x[i]);
      });
  return acc;
}

__device__ inline double read_as_double(const void* p, int32_t code) {
  double value = 0.0;
  dispatch_dtype(static_cast<uint8_t>(code), [&](auto* typed) {
    using scalar_t = std::remove_pointer_t<decltype(typed)>;
    value = static_cast<double>(
        static_cast<typename AccType<scalar_t>::type>(*static_cast<const scalar_t*>(p)));
  });
  return value;
}

// Sum of count doubles from L2, in a fixed order; valid in thread 0.
__device__ inline double sum_from_l2(const double* values, int64_t count, double* scratch) {
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < count; i += kThreads) acc += __ldcg(values + i);
  return block_sum(acc, scratch);
}

}  // namespace cuda
}  // namespace gradstab
