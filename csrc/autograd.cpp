// The non-backend dispatch keys of gradstab::stabilize_.
//
// NOTE: [no autograd for stabilize_]
// The op rescales gradients in place; it is not differentiable and runs under torch.no_grad().
// Without a kernel for the Autograd and ADInplaceOrView keys, the dispatcher would run PyTorch's
// boxed fallbacks for them, which visit every tensor of the list (about 0.1 us each, a sixth of
// the op's time on a list of 400 small gradients). Falling through skips that; in exchange the
// backend kernels do the two things those fallbacks are for: they refuse gradients that require
// grad while grad mode is on (check_tensors), and they bump the version counters of the tensors
// they write (bump_versions), so autograd still sees the in-place change.
#include <torch/library.h>

TORCH_LIBRARY_IMPL(gradstab, Autograd, m) {
  m.impl("stabilize_", torch::CppFunction::makeFallthrough());
}

TORCH_LIBRARY_IMPL(gradstab, ADInplaceOrView, m) {
  m.impl("stabilize_", torch::CppFunction::makeFallthrough());
}
