// The shared math of the kernels (csrc/stabilize_math.h, csrc/adamw_math.h, csrc/integer_power.h)
// built by the host compiler in a translation unit of its own, free of CUDA and torch, and driven
// with norms: what the CUDA kernels compute from the same norms, here on the host. Run by
// tests/test_cuda_shared_math.py, which compares every bit with the CPU kernels' results.
//
// Reads whitespace-separated tokens on stdin (numbers in any strtod format; the test writes hex
// floats), writes hex floats on stdout. Two modes:
//
//   stabilize  gamma1 gamma2 eps bias_correction spike_guard nonfinite  slots
//              (m v k) x slots  steps  (found_inf norm x slots) x steps
//     -> per step and slot: m v k action factor          (spike_guard nan: none)
//
//   adamw      dtype(32|64) amsgrad maximize  gamma1 gamma2 eps bias_correction spike_guard
//              nonfinite  lr beta1 beta2 weight_decay adam_eps  inv_scale  tensors
//              (m v k step norm numel (p g exp_avg exp_avg_sq max_exp_avg_sq) x numel) x tensors
//     -> per tensor: m v k step, then per element: p exp_avg exp_avg_sq max_exp_avg_sq
//
// The adamw mode is one step of gradstab::stabilized_adamw_ with one norm per gradient and no
// skipped step: the state update, the step count, the bias corrections, the constants and
// adamw_element on every element, in the order the kernels use them.
#include <cinttypes>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "adamw_math.h"
#include "stabilize_math.h"

namespace {

using gradstab::AdamwConstants;
using gradstab::AdamwGroup;
using gradstab::StabilizerConfig;
using gradstab::StepDecision;

double read_double() {
  char token[128];
  if (std::scanf("%127s", token) != 1) {
    std::fprintf(stderr, "unexpected end of input\n");
    std::exit(2);
  }
  char* end = nullptr;
  const double value = std::strtod(token, &end);
  if (*end != '\0') {
    std::fprintf(stderr, "not a number: %s\n", token);
    std::exit(2);
  }
  return value;
}

int64_t read_int() {
  return static_cast<int64_t>(read_double());
}

StabilizerConfig read_config() {
  StabilizerConfig cfg{};
  cfg.gamma1 = read_double();
  cfg.gamma2 = read_double();
  cfg.eps = read_double();
  cfg.bias_correction = read_int() != 0;
  cfg.spike_guard = read_double();
  cfg.has_spike_guard = !std::isnan(cfg.spike_guard);
  cfg.nonfinite = read_int();
  return cfg;
}

void stabilize_mode() {
  const StabilizerConfig cfg = read_config();
  const int64_t slots = read_int();
  double m[4096];
  double v[4096];
  int64_t k[4096];
  if (slots > 4096) std::exit(2);
  for (int64_t s = 0; s < slots; ++s) {
    m[s] = read_double();
    v[s] = read_double();
    k[s] = read_int();
  }
  const int64_t steps = read_int();
  for (int64_t step = 0; step < steps; ++step) {
    const bool found_inf = read_int() != 0;
    for (int64_t s = 0; s < slots; ++s) {
      const double norm = read_double();
      const StepDecision d = gradstab::stabilize_step(norm, found_inf, cfg, m + s, v + s, k + s);
      std::printf("%a %a %" PRId64 " %d %a\n", m[s], v[s], k[s], d.action, d.factor);
    }
  }
}

template <typename T>
void adamw_tensors(bool amsgrad, bool maximize, const StabilizerConfig& cfg,
                   const AdamwGroup& group, double inv_scale) {
  const int64_t tensors = read_int();
  for (int64_t t = 0; t < tensors; ++t) {
    double m = read_double();
    double v = read_double();
    int64_t k = read_int();
    float step = static_cast<float>(read_double());
    const double norm = read_double();
    const StepDecision d = gradstab::stabilize_step(norm * inv_scale, false, cfg, &m, &v, &k);
    step += 1.0f;
    const double grad_scale = d.action == gradstab::kScaleGrad ? d.factor * inv_scale : inv_scale;
    const AdamwConstants<T> c = gradstab::adamw_constants<T>(
        group, gradstab::adamw_bias(group, static_cast<double>(step)), grad_scale, maximize);
    std::printf("%a %a %" PRId64 " %a\n", m, v, k, static_cast<double>(step));
    const int64_t numel = read_int();
    for (int64_t i = 0; i < numel; ++i) {
      T p = static_cast<T>(read_double());
      const T stored_grad = static_cast<T>(read_double());
      T exp_avg = static_cast<T>(read_double());
      T exp_avg_sq = static_cast<T>(read_double());
      T max_exp_avg_sq = static_cast<T>(read_double());
      const T g = d.action == gradstab::kZeroGrad
                      ? T(0)
                      : gradstab::stabilized_grad<T, T>(stored_grad, c.grad_scale);
      gradstab::adamw_element(p, g, exp_avg, exp_avg_sq, amsgrad ? &max_exp_avg_sq : nullptr, c);
      std::printf("%a %a %a %a\n", static_cast<double>(p), static_cast<double>(exp_avg),
                  static_cast<double>(exp_avg_sq), static_cast<double>(max_exp_avg_sq));
    }
  }
}

void adamw_mode() {
  const int64_t bits = read_int();
  const bool amsgrad = read_int() != 0;
  const bool maximize = read_int() != 0;
  const StabilizerConfig cfg = read_config();
  AdamwGroup group{};
  group.lr = read_double();
  group.beta1 = read_double();
  group.beta2 = read_double();
  group.weight_decay = read_double();
  group.eps = read_double();
  const double inv_scale = read_double();
  if (bits == 32) {
    adamw_tensors<float>(amsgrad, maximize, cfg, group, inv_scale);
  } else {
    adamw_tensors<double>(amsgrad, maximize, cfg, group, inv_scale);
  }
}

}  // namespace

int main() {
  char mode[32];
  if (std::scanf("%31s", mode) != 1) return 2;
  if (std::strcmp(mode, "stabilize") == 0) {
    stabilize_mode();
  } else if (std::strcmp(mode, "adamw") == 0) {
    adamw_mode();
  } else {
    std::fprintf(stderr, "unknown mode %s\n", mode);
    return 2;
  }
  return 0;
}
