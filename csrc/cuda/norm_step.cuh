// The first launch of both CUDA ops (stabilize.cu, adamw.cu) and what surrounds it: the float64
// norms of a list of gradients, the state update of stabilize_math.h, the decision for each
// gradient, and the nonfinite="raise" path. Each op adds its second launch, which applies the
// decisions (stabilize_: scale the grads; stabilized_adamw_: the AdamW update).
//
// NOTE: [fused norm and state update]
// Launch 1, norm_kernel, has one block per chunk of the list (multi_tensor.cuh). A block sums
// the squares of its chunk in float64 in a fixed order (NOTE: [thread order of a chunk], then
// block_sum) and stores the sum in the chunk's own slot: no floating-point atomics anywhere. It
// then increments its tensor's completion counter (an integer atomic); the block that brings it
// to the tensor's chunk count is the last one, so every slot of the tensor is written, and it
// adds those slots in a fixed order, again whatever the block that happens to be last. That
// block writes the tensor's norm (over the loss scale, for stabilized_adamw_), does the op's own
// per-tensor work (Op::finish_tensor_step) and, for granularity "param", runs stabilize_step
// (stabilize_math.h, shared with the CPU) and stores the decision for the tensor. For the global
// norm the same pattern repeats one level up: the block that finishes the last tensor adds the
// tensors' sums in order and makes the one decision. Memory ordering: thread 0 writes the slot,
// __threadfence() (release), increments the counter; in the last block thread 0 sees the count,
// __threadfence() (acquire), then __syncthreads() passes that on to the block, whose threads
// read the slots with ld.global.cg (from L2: a line of slots cached in this SM's L1 by an
// earlier finisher could be stale).
// The state update runs in warp 0 of that block: its lanes compute the powers integer_power
// gives (gamma^k, beta^step; NOTE: [integer power]) at once, one each, and lane 0 does the rest.
// Same input, same bits: the order of every addition is fixed by the data layout alone.
//
// An op's kernel arguments are a struct Op with a member `norm` (a NormStep, below) and a
// device function finish_tensor_step(t), run by the 32 lanes of warp 0 once tensor t's norm is
// known and the state is to be updated (not for "raise" before the host has checked the norms).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <optional>
#include <type_traits>

#include "../stabilize_math.h"
#include "kernel_utils.cuh"
#include "multi_tensor.cuh"

namespace gradstab {
namespace cuda {

// Everything the first launch reads and writes.
struct NormStep {
  TensorListView list;    // the gradients
  double* partial;        // [num_chunks]
  double* sumsq;          // [T + 1]: per tensor, then the whole list (global norm only)
  Decision* decision;     // [T], or [1] for the global norm
  uint32_t* tensor_done;  // [T]
  uint32_t* list_done;    // [1]
  double* norms;          // [T], the op's result
  double* m;
  double* v;
  int64_t* k;
  const void* found_inf;  // nullptr when the op got none
  int32_t found_inf_dtype;
  const void* grad_scale;  // nullptr when the op got none (always, for stabilize_)
  int32_t grad_scale_dtype;
  bool global_norm;
  bool update_state;  // false for nonfinite="raise": decide_kernel runs after the host check
  StabilizerConfig cfg;
};

// found_inf > 0: a loss scaler will skip this step, nothing changes.
__device__ inline bool step_skipped(const NormStep& a) {
  return a.found_inf != nullptr && read_as_double(a.found_inf, a.found_inf_dtype) > 0.0;
}

// 1 / loss scale rounded to float32, as GradScaler.unscale_ computes it (1 without one).
__device__ inline double inverse_scale(const NormStep& a) {
  if (a.grad_scale == nullptr) return 1.0;
  return static_cast<double>(
      static_cast<float>(1.0 / read_as_double(a.grad_scale, a.grad_scale_dtype)));
}

// What stabilize_step asks of a count k: gamma1^(k+1), gamma2^(k+1) and gamma2^k (spike_guard),
// made by lanes 0, 1 and 2 of a warp at once. Any other power is computed when asked.
struct StepPowers {
  int64_t k;
  double gamma1_next;
  double gamma2_next;
  double gamma2_now;

  __device__ double gamma1_pow(const StabilizerConfig& cfg, int64_t j) const {
    return j == k + 1 ? gamma1_next : integer_power(cfg.gamma1, j);
  }
  __device__ double gamma2_pow(const StabilizerConfig& cfg, int64_t j) const {
    return j == k + 1 ? gamma2_next : (j == k ? gamma2_now : integer_power(cfg.gamma2, j));
  }
};

// Every lane of the warp must call this; each gets all three powers.
__device__ inline StepPowers warp_step_powers(const StabilizerConfig& cfg, int64_t k) {
  const int lane = threadIdx.x % 32;
  const double x = lane == 0 ? cfg.gamma1 : cfg.gamma2;
  const double mine = cfg.bias_correction ? integer_power(x, lane == 2 ? k : k + 1) : 1.0;
  constexpr unsigned kAll = 0xffffffffu;
  return {k, __shfl_sync(kAll, mine, 0), __shfl_sync(kAll, mine, 1), __shfl_sync(kAll, mine, 2)};
}

// The state update of one slot (a tensor, or the whole list) and the decision for its grads.
// Called by every lane of warp 0; `norm` need only be right in lane 0, which does the update.
__device__ inline void warp_decide(const NormStep& a, int64_t slot, double norm) {
  const StepPowers powers = warp_step_powers(a.cfg, a.k[slot]);
  if (threadIdx.x != 0) return;
  const StepDecision d =
      stabilize_step(norm, step_skipped(a), a.cfg, a.m + slot, a.v + slot, a.k + slot, powers);
  a.decision[slot] = Decision{d.factor, d.action, 0};
}

// Run by the block that wrote the last chunk sum of tensor t: see NOTE: [fused norm and state
// update]. All threads of the block call it.
template <typename Op>
__device__ void finish_tensor(const Op& op, int64_t t, double* scratch) {
  const NormStep& a = op.norm;
  __shared__ bool finishes_list;
  const int64_t first = a.list.first_chunk[t];
  const double sumsq = sum_from_l2(a.partial + first, a.list.first_chunk[t + 1] - first, scratch);
  const double norm = sqrt(sumsq) * inverse_scale(a);  // (right in thread 0)
  if (threadIdx.x < 32 && a.update_state) {
    op.finish_tensor_step(t);
    if (!a.global_norm) warp_decide(a, t, norm);
  }
  if (threadIdx.x == 0) {
    a.tensor_done[t] = 0;  // every chunk of t has counted: ready for the next replay of a graph
    a.sumsq[t] = sumsq;
    a.norms[t] = norm;
    if (a.global_norm) {
      __threadfence();
      const uint32_t done = atomicAdd(a.list_done, 1u);
      finishes_list = done == static_cast<uint32_t>(a.list.num_tensors - 1);
      if (finishes_list) __threadfence();
    }
  }
  if (!a.global_norm) return;
  __syncthreads();
  if (!finishes_list) return;
  const double total = sum_from_l2(a.sumsq, a.list.num_tensors, scratch);
  if (threadIdx.x == 0) {
    *a.list_done = 0;
    a.sumsq[a.list.num_tensors] = total;
  }
  if (threadIdx.x < 32 && a.update_state) warp_decide(a, 0, sqrt(total) * inverse_scale(a));
}

template <typename Op>
__global__ void __launch_bounds__(kThreads) norm_kernel(const Op op) {
  const NormStep& a = op.norm;
  __shared__ double scratch[kThreads / 32];
  __shared__ bool finishes_tensor;
  const ChunkRef ref = locate_chunk(a.list, blockIdx.x);
  const void* base = a.list.data[ref.tensor];
  double acc = 0.0;
  if (ref.span.len > 0) {  // the one chunk of an empty tensor may have no data pointer
    dispatch_dtype(a.list.dtype[ref.tensor], [&](auto* typed) {
      using scalar_t = std::remove_pointer_t<decltype(typed)>;
      const scalar_t* x = static_cast<const scalar_t*>(base) + ref.span.begin;
      dispatch_alignment(x, [&](auto aligned) {
        acc = thread_sum_squares<decltype(aligned)::value>(x, ref.span.len);
      });
    });
  }
  const double chunk_sumsq = block_sum(acc, scratch);
  if (threadIdx.x == 0) {
    a.partial[blockIdx.x] = chunk_sumsq;
    __threadfence();
    const int64_t chunks = a.list.first_chunk[ref.tensor + 1] - a.list.first_chunk[ref.tensor];
    const uint32_t done = atomicAdd(a.tensor_done + ref.tensor, 1u);
    finishes_tensor = done == static_cast<uint32_t>(chunks - 1);
    if (finishes_tensor) __threadfence();  // acquire: the other blocks' slots before our reads
  }
  __syncthreads();
  if (!finishes_tensor) return;
  finish_tensor(op, ref.tensor, scratch);
}

// For nonfinite="raise": the per-tensor work and state updates of norm_kernel, once the host has
// seen that every norm is finite. One warp (block) per tensor.
template <typename Op>
__global__ void __launch_bounds__(32) decide_kernel(const Op op) {
  const NormStep& a = op.norm;
  const int64_t t = blockIdx.x;
  op.finish_tensor_step(t);
  const double inv_scale = inverse_scale(a);
  if (!a.global_norm) {
    warp_decide(a, t, sqrt(a.sumsq[t]) * inv_scale);
  } else if (t == 0) {
    warp_decide(a, 0, sqrt(a.sumsq[a.list.num_tensors]) * inv_scale);
  }
}

// A one-element floating tensor as read_as_double reads it: float16, bfloat16, float32 or
// float64 as it is, another dtype converted to float32; undefined for none.
at::Tensor readable_scalar(const std::optional<at::Tensor>& t);

// The NormStep of `list` (its scratch regions), with the op's result `norms` (float64, one per
// tensor), the state m, v, k, and found_inf and grad_scale from readable_scalar.
NormStep make_norm_step(const ChunkedList& list, at::Tensor& norms, at::Tensor& m, at::Tensor& v,
                        at::Tensor& k, const at::Tensor& found_inf, const at::Tensor& grad_scale,
                        bool global_norm, bool raise, const StabilizerConfig& cfg);

// Refuses nonfinite="raise" under CUDA graph capture (it reads the norms on the host).
void check_raise_not_captured(const char* op, bool raise, cudaStream_t stream);

// nonfinite="raise": reads the sums of squares (one sync) and raises the CPU kernels' message
// (which gradstab.functional turns into FloatingPointError) before anything changes.
void raise_if_nonfinite(const ChunkedList& list, const at::Tensor& found_inf, bool global_norm);

// The launches of one step on `stream`: norm_kernel; for nonfinite="raise" the host check and
// decide_kernel; then apply(grid), the op's second launch on the same grid.
template <typename Op, typename Apply>
void launch_step(const Op& op, const ChunkedList& list, cudaStream_t stream, bool raise,
                 const at::Tensor& found_inf, const Apply& apply) {
  const dim3 grid(static_cast<unsigned int>(list.num_chunks()));
  norm_kernel<<<grid, kThreads, 0, stream>>>(op);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (raise) {
    raise_if_nonfinite(list, found_inf, op.norm.global_norm);
    const dim3 decide_grid(static_cast<unsigned int>(list.num_tensors()));
    decide_kernel<<<decide_grid, 32, 0, stream>>>(op);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  apply(grid);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace gradstab
