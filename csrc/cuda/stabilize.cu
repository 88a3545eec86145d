// CUDA kernel of gradstab::stabilize_: one call stabilizes a whole list of gradients on one
// device in two kernel launches (plus one small copy of metadata), on the current stream, with no
// host sync (except for nonfinite="raise", which must read the norms before changing anything).
//
// NOTE: [fused norm and state update]
// Launch 1, norm_kernel, has one block per chunk of the list (multi_tensor.cuh). A block sums
// the squares of its chunk in float64 in a fixed order (NOTE: [thread order of a chunk], then
// block_sum) and stores the sum in the chunk's own slot: no floating-point atomics anywhere. It
// then increments its tensor's completion counter (an integer atomic); the block that brings it
// to the tensor's chunk count is the last one, so every slot of the tensor is written, and it
// adds those slots in a fixed order, again whatever the block that happens to be last. That
// block writes the tensor's norm and, for granularity "param", runs stabilize_step
// (stabilize_math.h, shared with the CPU) and stores the decision for the tensor. For the global
// norm the same pattern repeats one level up: the block that finishes the last tensor adds the
// tensors' sums in order and makes the one decision. Memory ordering: thread 0 writes the slot,
// __threadfence() (release), increments the counter; in the last block thread 0 sees the count,
// __threadfence() (acquire), then __syncthreads() passes that on to the block, whose threads
// read the slots with ld.global.cg (from L2: a line of slots cached in this SM's L1 by an
// earlier finisher could be stale).
// Launch 2, scale_kernel, has the same grid and applies each tensor's decision to its chunks.
// Same input, same bits: the order of every addition is fixed by the data layout alone.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

#include "../stabilize_args.h"
#include "../stabilize_math.h"
#include "kernel_utils.cuh"
#include "multi_tensor.cuh"

#define GRADSTAB_STRINGIFY_(...) #__VA_ARGS__
#define GRADSTAB_STRINGIFY(...) GRADSTAB_STRINGIFY_(__VA_ARGS__)

namespace gradstab {

std::string cuda_build_info() {
  std::string info = "cuda: " + std::to_string(CUDART_VERSION / 1000) + "." +
                     std::to_string(CUDART_VERSION % 1000 / 10);
#if defined(__CUDA_ARCH_LIST__)
  info += " (arch " GRADSTAB_STRINGIFY(__CUDA_ARCH_LIST__) ")";
#endif
  return info;
}

namespace cuda {
namespace {

// Everything the kernels of one step read and write.
struct StepArgs {
  TensorListView list;
  double* partial;        // [num_chunks]
  double* sumsq;          // [T + 1]: per tensor, then the whole list (global norm only)
  Decision* decision;     // [T], or [1] for the global norm
  uint32_t* tensor_done;  // [T]
  uint32_t* list_done;    // [1]
  float* norms;           // [T], the op's result
  double* m;
  double* v;
  int64_t* k;
  const void* found_inf;  // nullptr when the op got none
  int32_t found_inf_dtype;
  bool global_norm;
  bool update_state;  // false for nonfinite="raise": decide_kernel runs after the host check
  StabilizerConfig cfg;
};

// x[0, len) <- x * factor (computed in float, or in double for double gradients).
template <bool kAligned, typename scalar_t>
__device__ void scale_elements(scalar_t* x, int32_t len, double factor) {
  using acc_t = typename AccType<scalar_t>::type;
  constexpr int W = Pack<scalar_t>::kWidth;
  const acc_t f = static_cast<acc_t>(factor);
  Pack<scalar_t> buf[kUnroll];
  visit_chunk<W>(
      threadIdx.x, kThreads, len, [&](int u, int32_t vec) { load_pack<kAligned>(x, vec, buf[u]); },
      [&](int u, int32_t vec) {
#pragma unroll
        for (int j = 0; j < W; ++j) {
          buf[u].val[j] = static_cast<scalar_t>(static_cast<acc_t>(buf[u].val[j]) * f);
        }
        store_pack<kAligned>(x, vec, buf[u]);
      },
      [&](int32_t begin, int32_t end) {
        for (int32_t i = begin; i < end; ++i) {
          x[i] = static_cast<scalar_t>(static_cast<acc_t>(x[i]) * f);
        }
      });
}

// x[0, len) <- 0.
template <bool kAligned, typename scalar_t>
__device__ void zero_elements(scalar_t* x, int32_t len) {
  constexpr int W = Pack<scalar_t>::kWidth;
  Pack<scalar_t> zero;
#pragma unroll
  for (int j = 0; j < W; ++j) zero.val[j] = scalar_t(0);
  visit_chunk<W>(
      threadIdx.x, kThreads, len, [](int, int32_t) {},
      [&](int, int32_t vec) { store_pack<kAligned>(x, vec, zero); },
      [&](int32_t begin, int32_t end) {
        for (int32_t i = begin; i < end; ++i) x[i] = scalar_t(0);
      });
}

// The state update of one slot (a tensor, or the whole list) and the decision for its grads.
__device__ void decide(const StepArgs& a, int64_t slot, double norm) {
  const bool skip_step =
      a.found_inf != nullptr && read_as_double(a.found_inf, a.found_inf_dtype) > 0.0;
  const StepDecision d = stabilize_step(norm, skip_step, a.cfg, a.m + slot, a.v + slot, a.k + slot);
  a.decision[slot] = Decision{d.factor, d.action, 0};
}

// Run by the block that wrote the last chunk sum of tensor t: see NOTE: [fused norm and state
// update]. All threads of the block call it.
__device__ void finish_tensor(const StepArgs& a, int64_t t, double* scratch) {
  __shared__ bool finishes_list;
  const int64_t first = a.list.first_chunk[t];
  const double sumsq = sum_from_l2(a.partial + first, a.list.first_chunk[t + 1] - first, scratch);
  if (threadIdx.x == 0) {
    a.tensor_done[t] = 0;  // every chunk of t has counted: ready for the next replay of a graph
    a.sumsq[t] = sumsq;
    a.norms[t] = static_cast<float>(sqrt(sumsq));
    if (!a.global_norm && a.update_state) decide(a, t, sqrt(sumsq));
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
    if (a.update_state) decide(a, 0, sqrt(total));
  }
}

__global__ void __launch_bounds__(kThreads) norm_kernel(const StepArgs a) {
  __shared__ double scratch[kThreads / 32];
  __shared__ bool finishes_tensor;
  const ChunkRef ref = locate_chunk(a.list, blockIdx.x);
  void* base = a.list.data[ref.tensor];
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
  finish_tensor(a, ref.tensor, scratch);
}

// For nonfinite="raise": the state update, once the host has seen that every norm is finite.
__global__ void decide_kernel(const StepArgs a) {
  const int64_t slot = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t slots = a.global_norm ? 1 : a.list.num_tensors;
  if (slot >= slots) return;
  decide(a, slot, sqrt(a.sumsq[a.global_norm ? a.list.num_tensors : slot]));
}

__global__ void __launch_bounds__(kThreads) scale_kernel(const StepArgs a) {
  const ChunkRef ref = locate_chunk(a.list, blockIdx.x);
  const Decision d = a.decision[a.global_norm ? 0 : ref.tensor];
  if (d.action == kLeaveGrad || ref.span.len == 0) return;
  void* base = a.list.data[ref.tensor];
  dispatch_dtype(a.list.dtype[ref.tensor], [&](auto* typed) {
    using scalar_t = std::remove_pointer_t<decltype(typed)>;
    scalar_t* x = static_cast<scalar_t*>(base) + ref.span.begin;
    dispatch_alignment(x, [&](auto aligned) {
      if (d.action == kZeroGrad) {
        zero_elements<decltype(aligned)::value>(x, ref.span.len);
      } else {
        scale_elements<decltype(aligned)::value>(x, ref.span.len, d.factor);
      }
    });
  });
}

// The same message as the CPU kernel's, which gradstab.functional turns into FloatingPointError.
// nonfinite="raise": reads the sums of squares (one sync) and raises before anything changes.
void raise_if_nonfinite(const ChunkedList& list, const at::Tensor& found_inf, bool global_norm) {
  const int64_t num_tensors = list.num_tensors();
  const at::Tensor sums =
      list.region_tensor(list.layout().sumsq, num_tensors + 1, at::kDouble).cpu();
  if (found_inf.defined() && found_inf.item<double>() > 0.0) return;
  const double* s = sums.const_data_ptr<double>();
  std::vector<double> norms(num_tensors);
  bool bad = global_norm && !std::isfinite(std::sqrt(s[num_tensors]));
  for (int64_t t = 0; t < num_tensors; ++t) {
    norms[t] = std::sqrt(s[t]);
    bad = bad || !std::isfinite(norms[t]);
  }
  TORCH_CHECK(!bad, nonfinite_message(norms));
}

at::Tensor stabilize_cuda(at::TensorList grads, at::Tensor& m, at::Tensor& v, at::Tensor& k,
                          const std::optional<at::Tensor>& found_inf, double gamma1, double gamma2,
                          double eps, bool bias_correction, bool global_norm, int64_t nonfinite,
                          std::optional<double> spike_guard) {
  const StabilizerConfig cfg =
      make_config(gamma1, gamma2, eps, bias_correction, nonfinite, spike_guard);
  const c10::Device device = grads.empty() ? m.device() : grads[0].device();
  TORCH_CHECK(device.is_cuda(), "gradstab::stabilize_: expected CUDA tensors, got ", device);
  check_tensors(grads, m, v, k, found_inf, global_norm, device);
  const c10::cuda::CUDAGuard device_guard(device);
  release_retired_buffers();

  const int64_t num_tensors = static_cast<int64_t>(grads.size());
  at::Tensor norms = at::empty({num_tensors}, m.options().dtype(at::kFloat));
  if (num_tensors == 0) return norms;  // nothing to write: with no gradient the norm is 0
  const bool raise = cfg.nonfinite == kNonfiniteRaise;
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(device.index());
  TORCH_CHECK(!(raise && is_capturing(stream.stream())),
              "gradstab::stabilize_: nonfinite='raise' reads the norms on the host and cannot be "
              "captured in a CUDA graph; use 'zero' or 'skip'");

  // A gradient that is not one dense block of memory is processed through a contiguous copy.
  std::vector<at::Tensor> flat;
  std::vector<int64_t> copied;
  flat.reserve(num_tensors);
  for (int64_t t = 0; t < num_tensors; ++t) {
    const at::Tensor& g = grads[t];
    if (g.is_non_overlapping_and_dense()) {
      flat.push_back(g);
    } else {
      flat.push_back(g.contiguous());
      copied.push_back(t);
    }
  }
  at::Tensor found_inf_value;
  if (found_inf.has_value()) {
    const auto dtype = found_inf->scalar_type();
    const bool readable =
        dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16;
    found_inf_value = readable ? *found_inf : found_inf->to(at::kFloat);
  }

  ChunkedList list(flat, stream);
  const ListLayout& layout = list.layout();
  StepArgs args{};
  args.list = list.view();
  args.partial = list.region<double>(layout.partial);
  args.sumsq = list.region<double>(layout.sumsq);
  args.decision = list.region<Decision>(layout.decision);
  args.tensor_done = list.region<uint32_t>(layout.tensor_done);
  args.list_done = list.region<uint32_t>(layout.list_done);
  args.norms = norms.data_ptr<float>();
  args.m = m.data_ptr<double>();
  args.v = v.data_ptr<double>();
  args.k = k.data_ptr<int64_t>();
  args.found_inf = found_inf_value.defined() ? found_inf_value.const_data_ptr() : nullptr;
  args.found_inf_dtype =
      found_inf_value.defined() ? dtype_code(found_inf_value.scalar_type()) : kCodeFloat;
  args.global_norm = global_norm;
  args.update_state = !raise;
  args.cfg = cfg;

  const dim3 grid(static_cast<unsigned int>(list.num_chunks()));
  norm_kernel<<<grid, kThreads, 0, stream.stream()>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (raise) {
    raise_if_nonfinite(list, found_inf_value, global_norm);
    const int64_t slots = global_norm ? 1 : num_tensors;
    const dim3 decide_grid(static_cast<unsigned int>((slots + kThreads - 1) / kThreads));
    decide_kernel<<<decide_grid, kThreads, 0, stream.stream()>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  scale_kernel<<<grid, kThreads, 0, stream.stream()>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  for (int64_t t : copied) grads[t].copy_(flat[t]);
  list.finish();
  bump_versions(grads, m, v, k);
  return norms;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(gradstab, CUDA, m) {
  m.impl("stabilize_", &cuda::stabilize_cuda);
}

}  // namespace gradstab
