#include "adamw_args.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>

#include <cmath>

#include "stabilize_args.h"

namespace gradstab {

namespace {

void check_group_value(double value, const char* name, size_t group, bool below_one) {
  TORCH_CHECK_VALUE(std::isfinite(value) && value >= 0.0 && (!below_one || value < 1.0), kAdamwOp,
                    ": ", name, "[", group, "] must be ", below_one ? "in [0, 1)" : ">= 0",
                    ", got ", value);
}

void check_list_size(at::TensorList list, const char* name, size_t expected) {
  TORCH_CHECK_VALUE(list.size() == expected, kAdamwOp, ": ", name, " has ", list.size(),
                    " tensors, expected ", expected);
}

// A tensor the step writes: dense, on `device`, its elements in distinct memory.
void check_written(const at::Tensor& t, const char* name, size_t i, c10::Device device) {
  TORCH_CHECK(t.defined(), kAdamwOp, ": ", name, "[", i, "] is undefined");
  TORCH_CHECK(t.layout() == at::kStrided, kAdamwOp, ": ", name, "[", i, "] has layout ", t.layout(),
              "; only dense (strided) tensors are supported");
  TORCH_CHECK(t.device() == device, kAdamwOp, ": ", name, "[", i, "] is on ", t.device(),
              ", expected ", device);
  TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, kAdamwOp, ": ", name, "[", i,
              "] has elements that share memory (an expanded tensor) and cannot be updated in "
              "place");
  TORCH_CHECK(!(t.requires_grad() && at::GradMode::is_enabled()), kAdamwOp, ": ", name, "[", i,
              "] requires grad and grad mode is on; call it under torch.no_grad()");
}

// A tensor that must match params[i] in shape, dtype and device.
void check_like_param(const at::Tensor& t, const char* name, size_t i, const at::Tensor& param) {
  TORCH_CHECK(t.defined(), kAdamwOp, ": ", name, "[", i, "] is undefined");
  TORCH_CHECK(t.layout() == at::kStrided, kAdamwOp, ": ", name, "[", i, "] has layout ", t.layout(),
              "; only dense (strided) tensors are supported");
  TORCH_CHECK(t.device() == param.device(), kAdamwOp, ": ", name, "[", i, "] is on ", t.device(),
              " but params[", i, "] is on ", param.device());
  TORCH_CHECK(t.scalar_type() == param.scalar_type(), kAdamwOp, ": ", name, "[", i, "] has dtype ",
              t.scalar_type(), " but params[", i, "] has dtype ", param.scalar_type());
  TORCH_CHECK(t.sizes() == param.sizes(), kAdamwOp, ": ", name, "[", i, "] has shape ", t.sizes(),
              " but params[", i, "] has shape ", param.sizes());
}

void check_scalar_tensor(const std::optional<at::Tensor>& t, const char* name, c10::Device device) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->numel() == 1 && at::isFloatingType(t->scalar_type()) && t->device() == device,
              kAdamwOp, ": ", name, " must be a one-element floating tensor on ", device, ", got ",
              t->scalar_type(), " of shape ", t->sizes(), " on ", t->device());
}

}  // namespace

AdamwGroups make_adamw_groups(int64_t num_tensors, at::IntArrayRef group_sizes,
                              at::ArrayRef<double> lr, at::ArrayRef<double> beta1,
                              at::ArrayRef<double> beta2, at::ArrayRef<double> weight_decay,
                              at::ArrayRef<double> eps) {
  const size_t num_groups = group_sizes.size();
  const std::pair<const char*, size_t> lists[] = {{"lr", lr.size()},
                                                  {"beta1", beta1.size()},
                                                  {"beta2", beta2.size()},
                                                  {"weight_decay", weight_decay.size()},
                                                  {"eps", eps.size()}};
  for (const auto& [name, size] : lists) {
    TORCH_CHECK_VALUE(size == num_groups, kAdamwOp, ": ", name, " has ", size,
                      " entries but group_sizes has ", num_groups, "; give one per param group");
  }
  AdamwGroups out;
  out.groups.reserve(num_groups);
  out.group_of.reserve(num_tensors);
  for (size_t j = 0; j < num_groups; ++j) {
    TORCH_CHECK_VALUE(group_sizes[j] >= 0, kAdamwOp, ": group_sizes[", j, "] is ", group_sizes[j],
                      ", expected >= 0");
    check_group_value(lr[j], "lr", j, false);
    check_group_value(beta1[j], "beta1", j, true);
    check_group_value(beta2[j], "beta2", j, true);
    check_group_value(weight_decay[j], "weight_decay", j, false);
    check_group_value(eps[j], "eps", j, false);
    out.groups.push_back({lr[j], beta1[j], beta2[j], weight_decay[j], eps[j]});
    TORCH_CHECK_VALUE(static_cast<int64_t>(out.group_of.size()) + group_sizes[j] <= num_tensors,
                      kAdamwOp, ": group_sizes add up to more than the ", num_tensors, " params");
    out.group_of.insert(out.group_of.end(), group_sizes[j], static_cast<int32_t>(j));
  }
  TORCH_CHECK_VALUE(static_cast<int64_t>(out.group_of.size()) == num_tensors, kAdamwOp,
                    ": group_sizes add up to ", out.group_of.size(), " but there are ", num_tensors,
                    " params");
  return out;
}

void check_adamw_tensors(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                         at::TensorList state_steps, const at::Tensor& m, const at::Tensor& v,
                         const at::Tensor& k, const std::optional<at::Tensor>& grad_scale,
                         const std::optional<at::Tensor>& found_inf, bool amsgrad, bool global_norm,
                         c10::Device device) {
  const size_t num_params = params.size();
  check_list_size(grads, "grads", num_params);
  check_list_size(exp_avgs, "exp_avgs", num_params);
  check_list_size(exp_avg_sqs, "exp_avg_sqs", num_params);
  check_list_size(max_exp_avg_sqs, amsgrad ? "max_exp_avg_sqs" : "max_exp_avg_sqs (no amsgrad)",
                  amsgrad ? num_params : 0);
  check_list_size(state_steps, "state_steps", num_params);
  for (size_t i = 0; i < num_params; ++i) {
    const at::Tensor& p = params[i];
    check_written(p, "params", i, device);
    const auto dtype = p.scalar_type();
    TORCH_CHECK(
        dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
        kAdamwOp, ": params[", i, "] has dtype ", dtype,
        "; supported: float16, bfloat16, float32, float64");
    check_like_param(grads[i], "grads", i, p);
    check_like_param(exp_avgs[i], "exp_avgs", i, p);
    check_written(exp_avgs[i], "exp_avgs", i, device);
    check_like_param(exp_avg_sqs[i], "exp_avg_sqs", i, p);
    check_written(exp_avg_sqs[i], "exp_avg_sqs", i, device);
    if (amsgrad) {
      check_like_param(max_exp_avg_sqs[i], "max_exp_avg_sqs", i, p);
      check_written(max_exp_avg_sqs[i], "max_exp_avg_sqs", i, device);
    }
    const at::Tensor& step = state_steps[i];
    TORCH_CHECK(step.defined() && step.numel() == 1 && step.scalar_type() == at::kFloat &&
                    step.device() == device,
                kAdamwOp, ": state_steps[", i, "] must be a one-element float32 tensor on ",
                device);
  }
  const int64_t state_size = global_norm ? 1 : static_cast<int64_t>(num_params);
  check_state(m, "m", at::kDouble, state_size, device, kAdamwOp);
  check_state(v, "v", at::kDouble, state_size, device, kAdamwOp);
  check_state(k, "k", at::kLong, state_size, device, kAdamwOp);
  check_scalar_tensor(grad_scale, "grad_scale", device);
  check_scalar_tensor(found_inf, "found_inf", device);
}

at::Tensor laid_out_like(const at::Tensor& t, const at::Tensor& like, bool written,
                         Copies& copies) {
  if (t.is_non_overlapping_and_dense() && t.strides() == like.strides()) return t;
  at::Tensor copy = at::empty_like(like);
  copy.copy_(t);
  if (written) {
    copies.written.emplace_back(t, copy);
  } else {
    copies.read.push_back(copy);
  }
  return copy;
}

void bump_adamw_versions(at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                         at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                         const at::Tensor& m, const at::Tensor& v, const at::Tensor& k) {
  for (at::TensorList list : {params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps}) {
    for (const at::Tensor& t : list) t.unsafeGetTensorImpl()->bump_version();
  }
  for (const at::Tensor* t : {&m, &v, &k}) t->unsafeGetTensorImpl()->bump_version();
}

}  // namespace gradstab
