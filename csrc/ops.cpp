// The schemas of gradstab's operators: one TORCH_LIBRARY block and nothing else. Kernels are
// registered per backend with TORCH_LIBRARY_IMPL in csrc/cpu/ and csrc/cuda/.
#include <torch/library.h>

TORCH_LIBRARY(gradstab, m) {
  // One GradientStabilizer step for a list of gradients on one device (DESIGN.md section 1).
  // m, v: float64 running moments of the norm; k: int64 valid-update counts; one entry per grad,
  // or a single entry when global_norm. nonfinite: 0 zero, 1 skip, 2 raise. Returns the float64
  // per-grad norms before scaling.
  m.def(
      "stabilize_(Tensor(a!)[] grads, Tensor(b!) m, Tensor(c!) v, Tensor(d!) k, Tensor? found_inf, "
      "float gamma1, float gamma2, float eps, bool bias_correction, bool global_norm, "
      "int nonfinite, float? spike_guard) -> Tensor");
  // One StabilizedAdamW step (docs/adamw.md) for lists on one device: the norms of the grads and
  // the stabilizer's state update as in stabilize_, then AdamW on every param with its grad
  // multiplied by its factor as it is read; the grads are not written. Tensor t belongs to param
  // group j when sum(group_sizes[:j]) <= t < sum(group_sizes[:j + 1]); lr, beta1, beta2,
  // weight_decay and eps hold one entry per group. state_steps: float32 one-element step counts,
  // incremented unless found_inf > 0, in which case nothing changes. max_exp_avg_sqs: one per
  // param with amsgrad, else empty. grad_scale: the loss scale the grads carry (they are divided
  // by it as they are read). Returns the float64 norms of the grads divided by grad_scale.
  m.def(
      "stabilized_adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] state_steps, "
      "Tensor(f!) m, Tensor(g!) v, Tensor(h!) k, Tensor? grad_scale, Tensor? found_inf, "
      "int[] group_sizes, float[] lr, float[] beta1, float[] beta2, float[] weight_decay, "
      "float[] eps, bool amsgrad, bool maximize, float gamma1, float gamma2, float stab_eps, "
      "bool bias_correction, bool global_norm, int nonfinite, float? spike_guard) -> Tensor");
}
