// The schemas of gradstab's operators: one TORCH_LIBRARY block and nothing else. Kernels are
// registered per backend with TORCH_LIBRARY_IMPL in csrc/cpu/ and csrc/cuda/.
#include <torch/library.h>

TORCH_LIBRARY(gradstab, m) {
  // One GradientStabilizer step for a list of gradients on one device (DESIGN.md section 1).
  // m, v: float64 running moments of the norm; k: int64 valid-update counts; one entry per grad,
  // or a single entry when global_norm. nonfinite: 0 zero, 1 skip, 2 raise. Returns the float32
  // per-grad norms before scaling.
  m.def(
      "stabilize_(Tensor(a!)[] grads, Tensor(b!) m, Tensor(c!) v, Tensor(d!) k, Tensor? found_inf, "
      "float gamma1, float gamma2, float eps, bool bias_correction, bool global_norm, "
      "int nonfinite, float? spike_guard) -> Tensor");
}
