// Host side of the first launch both CUDA ops share (norm_step.cuh).
#include "norm_step.cuh"

#include <c10/util/Exception.h>

#include <cmath>
#include <vector>

#include "../stabilize_args.h"

namespace gradstab {
namespace cuda {

at::Tensor readable_scalar(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return at::Tensor();
  const auto dtype = t->scalar_type();
  const bool readable =
      dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16;
  return readable ? *t : t->to(at::kFloat);
}

NormStep make_norm_step(const ChunkedList& list, at::Tensor& norms, at::Tensor& m, at::Tensor& v,
                        at::Tensor& k, const at::Tensor& found_inf, const at::Tensor& grad_scale,
                        bool global_norm, bool raise, const StabilizerConfig& cfg) {
  const ListLayout& layout = list.layout();
  NormStep a{};
  a.list = list.view();
  a.partial = list.region<double>(layout.partial);
  a.sumsq = list.region<double>(layout.sumsq);
  a.decision = list.region<Decision>(layout.decision);
  a.tensor_done = list.region<uint32_t>(layout.tensor_done);
  a.list_done = list.region<uint32_t>(layout.list_done);
  a.norms = norms.data_ptr<double>();
  a.m = m.data_ptr<double>();
  a.v = v.data_ptr<double>();
  a.k = k.data_ptr<int64_t>();
  a.found_inf = found_inf.defined() ? found_inf.const_data_ptr() : nullptr;
  a.found_inf_dtype = found_inf.defined() ? dtype_code(found_inf.scalar_type()) : kCodeFloat;
  a.grad_scale = grad_scale.defined() ? grad_scale.const_data_ptr() : nullptr;
  a.grad_scale_dtype = grad_scale.defined() ? dtype_code(grad_scale.scalar_type()) : kCodeFloat;
  a.global_norm = global_norm;
  a.update_state = !raise;
  a.cfg = cfg;
  return a;
}

void check_raise_not_captured(const char* op, bool raise, cudaStream_t stream) {
  TORCH_CHECK(!(raise && is_capturing(stream)), op,
              ": nonfinite='raise' reads the norms on the host and cannot be captured in a CUDA "
              "graph; use 'zero' or 'skip'");
}

void raise_if_nonfinite(const ChunkedList& list, const at::Tensor& found_inf, bool global_norm) {
  const int64_t num_tensors = list.num_tensors();
  const at::Tensor sums =
      list.region_tensor(list.layout().sumsq, num_tensors + 1, at::kDouble).cpu();
  if (found_inf.defined() && found_inf.item<double>() > 0.0) return;
  const double* s = sums.const_data_ptr<double>();
  const std::vector<double> tensor_sums(s, s + num_tensors);
  bool bad = global_norm && !std::isfinite(s[num_tensors]);
  for (double x : tensor_sums) bad = bad || !std::isfinite(x);
  TORCH_CHECK(!bad, nonfinite_message(tensor_sums));
}

}  // namespace cuda
}  // namespace gradstab
