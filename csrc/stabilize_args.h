// Argument checks shared by every backend of gradstab::stabilize_. Every failure names the
// argument (and the index of the offending gradient) and happens before anything is written.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>
#include <vector>

#include "stabilize_math.h"

namespace gradstab {

// Checks the scalar arguments and packs them for stabilize_step; errors name `op` and, for
// stabilized_adamw_, `eps_name` (its stab_eps).
StabilizerConfig make_config(double gamma1, double gamma2, double eps, bool bias_correction,
                             int64_t nonfinite, std::optional<double> spike_guard,
                             const char* op = "gradstab::stabilize_", const char* eps_name = "eps");

// Checks that the state tensor `name` of `op` is a contiguous 1-D tensor of `size` elements of
// `dtype` on `device`.
void check_state(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t size,
                 c10::Device device, const char* op);

// Checks that grads are dense float16/bfloat16/float32/float64 tensors on `device`, that m, v, k
// hold one entry per grad (one in all when global_norm) with the right dtypes, and that found_inf
// is a one-element floating tensor on `device`. For CUDA, `device` includes the index.
void check_tensors(at::TensorList grads, const at::Tensor& m, const at::Tensor& v,
                   const at::Tensor& k, const std::optional<at::Tensor>& found_inf,
                   bool global_norm, c10::Device device);

// Bumps the version counters of the tensors the op writes (see NOTE: [no autograd for
// stabilize_] in csrc/autograd.cpp).
void bump_versions(at::TensorList grads, const at::Tensor& m, const at::Tensor& v,
                   const at::Tensor& k);

// The error of nonfinite="raise": names grads[i] for every non-finite entry of `values` (norms
// or sums of squares), or the global norm when they are all finite.
std::string nonfinite_message(const std::vector<double>& values);

}  // namespace gradstab
