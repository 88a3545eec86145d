// The per-tensor state update of GradientStabilizer (DESIGN.md section 1), shared by every
// compiled backend so that the CPU and CUDA kernels cannot drift apart.
//
// Symbols follow the paper: n is the gradient norm, m and v the running first and second moments of
// n, k the number of valid updates, gamma1 and gamma2 their decay rates.
#pragma once

#include <cmath>
#include <cstdint>

#include "integer_power.h"

namespace gradstab {

// The integer codes of the op's `nonfinite` argument.
enum NonfinitePolicy : int64_t { kNonfiniteZero = 0, kNonfiniteSkip = 1, kNonfiniteRaise = 2 };

// What a kernel does to a gradient after the state update.
enum GradAction : int32_t { kLeaveGrad = 0, kScaleGrad = 1, kZeroGrad = 2 };

// Norms above this are fed to the statistics clamped, so that n^2 stays finite in float64 (only
// float64 gradients can get there: a float32-accumulated norm is below 3.4e38).
constexpr double kMaxStatNorm = 1e150;

GRADSTAB_HOST_DEVICE inline bool is_finite(double x) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return isfinite(x);
#else
  return std::isfinite(x);
#endif
}

struct StabilizerConfig {
  double gamma1;
  double gamma2;
  double eps;
  bool bias_correction;
  bool has_spike_guard;
  double spike_guard;
  int64_t nonfinite;
};

// gamma^k for the bias correction, computed where it is needed by integer_power (NOTE:
// [integer power]: the same bits on every backend). The CPU kernel passes a PowerTable instead
// (the same calls, made once per step for the values of k in use).
struct DirectPowers {
  GRADSTAB_HOST_DEVICE double gamma1_pow(const StabilizerConfig& cfg, int64_t k) const {
    return integer_power(cfg.gamma1, k);
  }
  GRADSTAB_HOST_DEVICE double gamma2_pow(const StabilizerConfig& cfg, int64_t k) const {
    return integer_power(cfg.gamma2, k);
  }
};

struct StepDecision {
  int32_t action;  // a GradAction
  double factor;   // the multiplier for kScaleGrad
};

// Updates (m, v, k) in place for one gradient of norm `norm` and says what to do to the gradient.
// `found_inf` means a loss scaler will skip this step: nothing may change. The raise policy is
// enforced by the caller before this is reached; here it behaves like "skip".
// `powers` supplies gamma1^k and gamma2^k (DirectPowers: integer_power).
template <typename Powers = DirectPowers>
GRADSTAB_HOST_DEVICE inline StepDecision stabilize_step(double norm, bool found_inf,
                                                        const StabilizerConfig& cfg, double* m,
                                                        double* v, int64_t* k,
                                                        const Powers& powers = Powers()) {
  if (found_inf) return {kLeaveGrad, 1.0};
  if (!is_finite(norm)) {
    return cfg.nonfinite == kNonfiniteZero ? StepDecision{kZeroGrad, 0.0}
                                           : StepDecision{kLeaveGrad, 1.0};
  }
  if (!(norm > 0.0)) return {kLeaveGrad, 1.0};

  double stat_norm = norm < kMaxStatNorm ? norm : kMaxStatNorm;
  if (cfg.has_spike_guard && *k > 0) {
    double v_prev = *v;
    if (cfg.bias_correction) v_prev /= 1.0 - powers.gamma2_pow(cfg, *k);
    double bound = cfg.spike_guard * sqrt(v_prev);
    if (stat_norm > bound) stat_norm = bound;
  }

  *k += 1;
  *m = cfg.gamma1 * *m + (1.0 - cfg.gamma1) * stat_norm;
  *v = cfg.gamma2 * *v + (1.0 - cfg.gamma2) * stat_norm * stat_norm;
  double m_hat = *m;
  double v_hat = *v;
  if (cfg.bias_correction) {
    m_hat /= 1.0 - powers.gamma1_pow(cfg, *k);
    v_hat /= 1.0 - powers.gamma2_pow(cfg, *k);
  }
  double target_norm = m_hat / (sqrt(v_hat) + cfg.eps);
  return {kScaleGrad, target_norm / (norm > cfg.eps ? norm : cfg.eps)};
}

}  // namespace gradstab
