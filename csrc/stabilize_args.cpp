#include "stabilize_args.h"

#include <ATen/MemoryOverlap.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <sstream>

namespace gradstab {

StabilizerConfig make_config(double gamma1, double gamma2, double eps, bool bias_correction,
                             int64_t nonfinite, std::optional<double> spike_guard, const char* op,
                             const char* eps_name) {
  TORCH_CHECK_VALUE(gamma1 >= 0.0 && gamma1 < 1.0, op, ": gamma1 must be in [0, 1), got ", gamma1);
  TORCH_CHECK_VALUE(gamma2 >= 0.0 && gamma2 < 1.0, op, ": gamma2 must be in [0, 1), got ", gamma2);
  TORCH_CHECK_VALUE(eps > 0.0 && std::isfinite(eps), op, ": ", eps_name,
                    " must be a finite number > 0, got ", eps);
  TORCH_CHECK_VALUE(
      nonfinite == kNonfiniteZero || nonfinite == kNonfiniteSkip || nonfinite == kNonfiniteRaise,
      op, ": nonfinite must be 0 (zero), 1 (skip) or 2 (raise), got ", nonfinite);
  if (spike_guard.has_value()) {
    TORCH_CHECK_VALUE(*spike_guard > 0.0 && std::isfinite(*spike_guard), op,
                      ": spike_guard must be a finite number > 0, got ", *spike_guard);
  }
  return StabilizerConfig{
      gamma1,   gamma2, eps, bias_correction, spike_guard.has_value(), spike_guard.value_or(0.0),
      nonfinite};
}

void check_state(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t size,
                 c10::Device device, const char* op) {
  TORCH_CHECK(t.layout() == at::kStrided && t.device() == device, op, ": ", name,
              " must be a dense tensor on ", device, ", got ", t.layout(), " on ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.numel() == size && t.is_contiguous(), op, ": ", name,
              " must be a contiguous 1-D tensor of ", size, " elements, got shape ", t.sizes());
}

void check_tensors(at::TensorList grads, const at::Tensor& m, const at::Tensor& v,
                   const at::Tensor& k, const std::optional<at::Tensor>& found_inf,
                   bool global_norm, c10::Device device) {
  const int64_t num_grads = static_cast<int64_t>(grads.size());
  const bool grad_mode = at::GradMode::is_enabled();
  for (int64_t i = 0; i < num_grads; ++i) {
    const at::Tensor& g = grads[i];
    TORCH_CHECK(g.defined(), "gradstab::stabilize_: grads[", i, "] is undefined");
    TORCH_CHECK(g.layout() == at::kStrided, "gradstab::stabilize_: grads[", i, "] has layout ",
                g.layout(), "; only dense (strided) gradients are supported");
    TORCH_CHECK(g.device() == device, "gradstab::stabilize_: grads[", i, "] is on ", g.device(),
                ", expected ", device);
    auto dtype = g.scalar_type();
    TORCH_CHECK(
        dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
        "gradstab::stabilize_: grads[", i, "] has dtype ", dtype,
        "; supported: float16, bfloat16, float32, float64");
    TORCH_CHECK(!(grad_mode && g.requires_grad()), "gradstab::stabilize_: grads[", i,
                "] requires grad and grad mode is on; call it under torch.no_grad()");
    // Dense tensors (nearly all gradients) cannot overlap; only the others need the full test.
    TORCH_CHECK(
        g.is_non_overlapping_and_dense() || at::has_internal_overlap(g) != at::MemOverlap::Yes,
        "gradstab::stabilize_: grads[", i,
        "] has elements that share memory (an expanded tensor) and cannot be scaled "
        "in place");
  }
  const int64_t state_size = global_norm ? 1 : num_grads;
  const char* op = "gradstab::stabilize_";
  check_state(m, "m", at::kDouble, state_size, device, op);
  check_state(v, "v", at::kDouble, state_size, device, op);
  check_state(k, "k", at::kLong, state_size, device, op);
  if (found_inf.has_value()) {
    const at::Tensor& f = *found_inf;
    TORCH_CHECK(f.numel() == 1 && at::isFloatingType(f.scalar_type()) && f.device() == device,
                "gradstab::stabilize_: found_inf must be a one-element floating tensor on ", device,
                ", got ", f.scalar_type(), " of shape ", f.sizes(), " on ", f.device());
  }
}

void bump_versions(at::TensorList grads, const at::Tensor& m, const at::Tensor& v,
                   const at::Tensor& k) {
  for (const at::Tensor& g : grads) g.unsafeGetTensorImpl()->bump_version();
  for (const at::Tensor* t : {&m, &v, &k}) t->unsafeGetTensorImpl()->bump_version();
}

std::string nonfinite_message(const std::vector<double>& values) {
  std::ostringstream msg;
  msg << "gradstab: non-finite gradient norm with nonfinite='raise' (";
  bool first = true;
  for (size_t i = 0; i < values.size(); ++i) {
    if (!std::isfinite(values[i])) {
      msg << (first ? "grads[" : ", grads[") << i << "]";
      first = false;
    }
  }
  msg << (first ? "the global norm overflowed" : "") << "); nothing was changed";
  return msg.str();
}

}  // namespace gradstab
