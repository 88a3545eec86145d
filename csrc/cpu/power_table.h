// gamma1^k and gamma2^k for the bias correction of a whole step, computed once per step.
#pragma once

#include <algorithm>
#include <cstdint>

#include "../stabilize_math.h"

namespace gradstab {
namespace cpu {

// NOTE: [power table]
// stabilize_step needs gamma1^k and gamma2^k for each tensor's count k (and gamma2^(k-1) with
// spike_guard): two or three calls of integer_power (NOTE: [integer power]), 0.1 to 0.4 us each,
// far more than the rest of the state update. The counts of a list's tensors are nearly always
// equal (they differ only after a non-finite or zero gradient), so the table holds the powers for
// the few counts in use, made by the same calls as DirectPowers (the same bits); any other count
// falls back to DirectPowers.
class PowerTable {
 public:
  // For a step on the counts k[0, n) (before the step).
  PowerTable(const StabilizerConfig& cfg, const int64_t* k, int64_t n) {
    if (!cfg.bias_correction || n == 0) return;
    const auto [lo, hi] = std::minmax_element(k, k + n);
    // Unsigned, so that counts edited into a checkpoint cannot overflow the difference.
    if (static_cast<uint64_t>(*hi) - static_cast<uint64_t>(*lo) > kMaxEntries - 2) return;
    // The step reads gamma2^k (spike_guard, before the update) and gamma^(k+1) (after it).
    first_ = cfg.has_spike_guard ? *lo : *lo + 1;
    size_ = static_cast<uint64_t>(*hi + 2 - first_);
    const DirectPowers direct;
    for (uint64_t i = 0; i < size_; ++i) {
      gamma1_pow_[i] = direct.gamma1_pow(cfg, first_ + static_cast<int64_t>(i));
      gamma2_pow_[i] = direct.gamma2_pow(cfg, first_ + static_cast<int64_t>(i));
    }
  }

  double gamma1_pow(const StabilizerConfig& cfg, int64_t k) const {
    const uint64_t i = static_cast<uint64_t>(k - first_);
    return i < size_ ? gamma1_pow_[i] : DirectPowers().gamma1_pow(cfg, k);
  }
  double gamma2_pow(const StabilizerConfig& cfg, int64_t k) const {
    const uint64_t i = static_cast<uint64_t>(k - first_);
    return i < size_ ? gamma2_pow_[i] : DirectPowers().gamma2_pow(cfg, k);
  }

 private:
  static constexpr int64_t kMaxEntries = 8;
  int64_t first_ = 0;
  uint64_t size_ = 0;
  double gamma1_pow_[kMaxEntries];
  double gamma2_pow_[kMaxEntries];
};

}  // namespace cpu
}  // namespace gradstab
