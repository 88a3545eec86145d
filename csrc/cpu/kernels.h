// The inner loops of the CPU kernel: the sum of squares and the in-place rescale of one dense run
// of elements, for each gradient dtype, in the widest instruction set the CPU has.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace gradstab {
namespace cpu {

// NOTE: [summation order]
// Element i of a run goes to float64 accumulator i % kSumLanes (squared in float64, then added:
// no fused multiply-add), and the accumulators are added in index order at the end. Every
// implementation below follows this order exactly, so the generic C++ loop, AVX2 and AVX-512 give
// the same bits; the lanes also let a vector unit keep several independent additions in flight.
constexpr int kSumLanes = 32;

// The work plan of stabilize.cpp (see [CPU work plan] there): a tensor's sum of squares is the
// ordered sum of its chunks of kChunkElems elements; a gradient of at most kFusedMaxBytes is
// stabilized in one visit (norm, state update, rescale) while it is in cache.
constexpr int64_t kChunkElems = 1 << 15;
constexpr int64_t kFusedMaxBytes = 1 << 18;

// sum(x_i^2) over data[0, n), in float64, in the order of [summation order].
using SumSquaresFn = double (*)(const void* data, int64_t n);
// data[i] <- data[i] * factor for i in [0, n): in float64 for float64 data, otherwise in float32
// (factor rounded to float32) and rounded to nearest-even back to the data's dtype. Only finite
// values are ever scaled (a gradient with a non-finite norm is zeroed or left alone).
using ScaleFn = void (*)(void* data, int64_t n, double factor);

struct DtypeKernels {
  SumSquaresFn sum_squares;
  ScaleFn scale;
};

// The kernels for float32, float64, float16 or bfloat16 data (anything else is refused) in the
// instruction set chosen when the library loaded.
const DtypeKernels& kernels_for(at::ScalarType dtype);

// That instruction set: "avx512", "avx2" or "generic". The environment variable GRADSTAB_CPU_ISA
// (read once) can lower it, e.g. to compare implementations.
const char* kernel_isa();

// The row and column of the per-instruction-set, per-dtype tables of kernels (this file's and
// adamw_kernels.h's): the row of the instruction set above (0 generic, 1 avx2, 2 avx512), the
// column of float32, float64, float16, bfloat16 (0 to 3), or -1 for any other dtype.
int kernel_table_row();
int kernel_table_column(at::ScalarType dtype);

}  // namespace cpu
}  // namespace gradstab
