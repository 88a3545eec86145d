// The inner loop of the CPU kernel of gradstab::stabilized_adamw_: AdamW (csrc/adamw_math.h) on
// one dense run of elements of one param, for each dtype, in the instruction set that
// kernels.h chose (kernel_isa()).
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "../adamw_math.h"

namespace gradstab {
namespace cpu {

// Elements [0, numel) of one param and of its gradient and moments, all of the param's dtype and
// laid out alike.
struct AdamwRun {
  void* param;
  const void* grad;  // nullptr: the stabilizer zeroed this gradient, AdamW sees zeros
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;  // nullptr without amsgrad
  int64_t numel;
};

// What a run's tensor takes this step.
struct AdamwStep {
  AdamwGroup group;
  AdamwBias bias;     // at the tensor's step count, this step included
  double grad_scale;  // the stabilizer's factor times 1/loss scale
  bool maximize;
};

using AdamwFn = void (*)(const AdamwRun& run, const AdamwStep& step);

// The update for float32, float64, float16 or bfloat16 params (anything else is refused). All
// instruction sets give the same bits: they run adamw_element on lanes of IEEE operations, with
// no fused multiply-add, and round 16-bit results to nearest-even as c10::Half and
// c10::BFloat16 do.
AdamwFn adamw_kernel_for(at::ScalarType dtype);

}  // namespace cpu
}  // namespace gradstab
