// Argument checks of gradstab::stabilized_adamw_, shared by its CPU and CUDA kernels. Every
// failure names the argument (and the index of the offending tensor) and happens before anything
// is written.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <utility>
#include <vector>

#include "adamw_math.h"

namespace gradstab {

constexpr const char* kAdamwOp = "gradstab::stabilized_adamw_";

// The param groups of one call: their hyperparameters, and the group of every tensor.
struct AdamwGroups {
  std::vector<AdamwGroup> groups;
  std::vector<int32_t> group_of;  // [num_tensors]
};

// Checks that group_sizes are >= 0 and add up to num_tensors, that lr, beta1, beta2, weight_decay
// and eps hold one entry per group, and each value is in range (lr, eps, weight_decay >= 0,
// betas in [0, 1), all finite), as torch.optim.AdamW requires.
AdamwGroups make_adamw_groups(int64_t num_tensors, at::IntArrayRef group_sizes,
                              at::ArrayRef<double> lr, at::ArrayRef<double> beta1,
                              at::ArrayRef<double> beta2, at::ArrayRef<double> weight_decay,
                              at::ArrayRef<double> eps);

// Checks that the lists have one entry per param (max_exp_avg_sqs: none without amsgrad); that
// params are dense float16/bfloat16/float32/float64 tensors on `device` whose elements do not
// share memory; that grads, exp_avgs, exp_avg_sqs and max_exp_avg_sqs match their param in
// shape, dtype and device; that state_steps are one-element float32 tensors on `device`; that
// m, v, k hold one entry per param (one in all when global_norm); and that grad_scale and
// found_inf are one-element floating tensors on `device`.
void check_adamw_tensors(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                         at::TensorList state_steps, const at::Tensor& m, const at::Tensor& v,
                         const at::Tensor& k, const std::optional<at::Tensor>& grad_scale,
                         const std::optional<at::Tensor>& found_inf, bool amsgrad, bool global_norm,
                         c10::Device device);

// Tensors that are not laid out as one dense block like their param are processed in copies,
// which live until the step is done; after it, each written (original, copy) pair is copied back.
struct Copies {
  std::vector<std::pair<at::Tensor, at::Tensor>> written;
  std::vector<at::Tensor> read;
};

// `t`, or a copy of it laid out like `like` (a non-overlapping and dense tensor of the same
// shape), kept in `copies`.
at::Tensor laid_out_like(const at::Tensor& t, const at::Tensor& like, bool written, Copies& copies);

// Bumps the version counters of every tensor stabilized_adamw_ writes (see NOTE: [no autograd for
// stabilize_] in csrc/autograd.cpp, which applies to this op too).
void bump_adamw_versions(at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                         at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                         const at::Tensor& m, const at::Tensor& v, const at::Tensor& k);

}  // namespace gradstab
