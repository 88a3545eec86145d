// The non-backend dispatch keys of gradstab::stabilize_ and gradstab::stabilized_adamw_.
//
// NOTE: [no autograd for stabilize_]
// The op rescales gradients in place; it is not differentiable and runs under torch.no_grad().
// PyTorch's default handling of a custom op at the Autograd and ADInplaceOrView keys neither
// bumps the version counters of the tensors it writes (so autograd would not notice that a saved
// tensor changed) nor refuses inputs that require grad. The op falls through both keys, and its
// backend kernels do those two things themselves: check_tensors refuses gradients that require
// grad while grad mode is on, and bump_versions marks every tensor written.
#include <torch/library.h>

TORCH_LIBRARY_IMPL(gradstab, Autograd, m) {
  m.impl("stabilize_", torch::CppFunction::makeFallthrough());
  m.impl("stabilized_adamw_", torch::CppFunction::makeFallthrough());
}

TORCH_LIBRARY_IMPL(gradstab, ADInplaceOrView, m) {
  m.impl("stabilize_", torch::CppFunction::makeFallthrough());
  m.impl("stabilized_adamw_", torch::CppFunction::makeFallthrough());
}
