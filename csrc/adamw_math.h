// The per-element AdamW update of gradstab::stabilized_adamw_ (docs/adamw.md), shared by the CPU
// kernels (whose generic loop is this code, and whose vector loops must give the same bits) and
// the CUDA kernel.
//
// One step of AdamW on one element, with c the constants of its tensor for this step
// (adamw_constants):
//
//   g = round(g * c.grad_scale)          the stabilizer's factor / loss scale (-1: maximize)
//   p = p * (1 - lr * weight_decay)      decoupled weight decay
//   m = lerp(m, g, 1 - beta1)            first moment (Adam's exp_avg)
//   v = beta2 * v + (1 - beta2) * g^2    second moment (exp_avg_sq)
//   v_max = max(v_max, v)                amsgrad only; v_max then stands for v below
//   p = p - step_size * m / (sqrt(v) / sqrt(1 - beta2^step) + eps)
//
// with step_size = lr / (1 - beta1^step). `round` rounds to the gradient's dtype: g is then the
// very value StabilizedOptimizer (stabilize, then AdamW) would have written into p.grad. The
// operations after it and their order are those of torch's AdamW for one tensor (lerp_,
// mul_(beta2).addcmul_, sqrt, div, add_(eps), addcdiv_), each rounded to opmath_t: float for
// float32, float16 and bfloat16 values (loaded once, stored once, as torch's fused AdamW does),
// double for float64.
#pragma once

#include <cmath>

#include "stabilize_math.h"

namespace gradstab {

// The hyperparameters of one param group.
struct AdamwGroup {
  double lr;
  double beta1;
  double beta2;
  double weight_decay;
  double eps;
};

// The bias corrections of a tensor at its step count: 1 - beta1^step and 1 - beta2^step.
struct AdamwBias {
  double bias1;
  double bias2;
};

// AdamW's step count as the exponent of the bias corrections. torch counts steps in float32, in
// whole numbers (exact up to 2^24); a fraction is dropped, and a count beyond 2^62, where every
// 1 - beta^step is 1, is taken as 2^62.
GRADSTAB_HOST_DEVICE inline int64_t adamw_step_count(double step) {
  constexpr double kMaxCount = 0x1p62;
  return step >= kMaxCount ? int64_t{1} << 62 : (step >= 1.0 ? static_cast<int64_t>(step) : 0);
}

// From beta1^count and beta2^count, which integer_power computes (NOTE: [integer power]: the same
// bits on every backend; torch's AdamW uses pow, within an ulp of it).
GRADSTAB_HOST_DEVICE inline AdamwBias adamw_bias_from_powers(double beta1_pow, double beta2_pow) {
  return {1.0 - beta1_pow, 1.0 - beta2_pow};
}

GRADSTAB_HOST_DEVICE inline AdamwBias adamw_bias(const AdamwGroup& group, double step) {
  const int64_t count = adamw_step_count(step);
  return adamw_bias_from_powers(integer_power(group.beta1, count),
                                integer_power(group.beta2, count));
}

// What the update of one tensor needs for one step, rounded to the type the math runs in.
template <typename opmath_t>
struct AdamwConstants {
  opmath_t grad_scale;       // multiplies every gradient value as it is read (stabilized_grad)
  opmath_t decay;            // 1 - lr * weight_decay (exactly 1 without weight decay)
  opmath_t lerp_weight;      // 1 - beta1
  opmath_t lerp_complement;  // 1 - lerp_weight, for lerp weights >= 0.5
  bool lerp_from_start;      // |lerp_weight| < 0.5: torch's lerp formula for small weights
  opmath_t beta2;
  opmath_t one_minus_beta2;
  opmath_t bias2_sqrt;  // sqrt(1 - beta2^step)
  opmath_t eps;
  opmath_t neg_step_size;  // -lr / (1 - beta1^step)
};

// The constants of a tensor whose step count (this step included) gives `bias`. `grad_scale` is
// the product of the stabilizer's factor and 1/loss scale; `maximize` negates it.
template <typename opmath_t>
GRADSTAB_HOST_DEVICE inline AdamwConstants<opmath_t> adamw_constants(const AdamwGroup& group,
                                                                     const AdamwBias& bias,
                                                                     double grad_scale,
                                                                     bool maximize) {
  AdamwConstants<opmath_t> c;
  c.grad_scale = static_cast<opmath_t>(maximize ? -grad_scale : grad_scale);
  c.decay = static_cast<opmath_t>(1.0 - group.lr * group.weight_decay);
  c.lerp_weight = static_cast<opmath_t>(1.0 - group.beta1);
  c.lerp_complement = opmath_t(1) - c.lerp_weight;
  c.lerp_from_start = c.lerp_weight < opmath_t(0.5) && c.lerp_weight > opmath_t(-0.5);
  c.beta2 = static_cast<opmath_t>(group.beta2);
  c.one_minus_beta2 = static_cast<opmath_t>(1.0 - group.beta2);
  c.bias2_sqrt = static_cast<opmath_t>(sqrt(bias.bias2));
  c.eps = static_cast<opmath_t>(group.eps);
  c.neg_step_size = static_cast<opmath_t>(-(group.lr / bias.bias1));
  return c;
}

// Square roots in the argument's own precision (a float argument must not be widened to double).
GRADSTAB_HOST_DEVICE inline float sqrt_of(float x) {
  return sqrtf(x);
}
GRADSTAB_HOST_DEVICE inline double sqrt_of(double x) {
  return sqrt(x);
}

// max(a, b) that is NaN when either is (torch.maximum).
template <typename opmath_t>
GRADSTAB_HOST_DEVICE inline opmath_t nan_max(const opmath_t& a, const opmath_t& b) {
  return (a > b || a != a) ? a : b;
}

// The gradient AdamW sees: the stored value times grad_scale, rounded to the gradient's dtype
// scalar_t (what the stabilizer would write into p.grad), in opmath_t.
template <typename scalar_t, typename opmath_t>
GRADSTAB_HOST_DEVICE inline opmath_t stabilized_grad(scalar_t stored, opmath_t grad_scale) {
  return static_cast<opmath_t>(static_cast<scalar_t>(static_cast<opmath_t>(stored) * grad_scale));
}

// One element: p, m, v (and v_max when not null) are updated in place; g is stabilized_grad (0
// for a gradient the stabilizer zeroes).
//
// opmath_t is float or double, or one of the CPU kernel's vector types
// (csrc/cpu/adamw_kernels.cpp), whose operators are the same IEEE operations lane by lane: every
// implementation runs this very code. (Arguments are references so that a vector type is never
// passed by value.)
template <typename opmath_t>
GRADSTAB_HOST_DEVICE inline void adamw_element(opmath_t& p, const opmath_t& g, opmath_t& m,
                                               opmath_t& v, opmath_t* v_max,
                                               const AdamwConstants<opmath_t>& c) {
  p = p * c.decay;
  const opmath_t diff = g - m;
  m = c.lerp_from_start ? m + c.lerp_weight * diff : g - diff * c.lerp_complement;
  v = v * c.beta2 + c.one_minus_beta2 * g * g;
  opmath_t second = v;
  if (v_max != nullptr) {
    *v_max = nan_max(*v_max, v);
    second = *v_max;
  }
  const opmath_t denom = sqrt_of(second) / c.bias2_sqrt + c.eps;
  p = p + c.neg_step_size * m / denom;
}

}  // namespace gradstab
