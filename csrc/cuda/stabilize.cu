// CUDA kernel of gradstab::stabilize_: one call stabilizes a whole list of gradients on one
// device in two kernel launches (plus one small copy of metadata), on the current stream, with no
// host sync (except for nonfinite="raise", which must read the norms before changing anything).
//
// Launch 1 is norm_step.cuh's norm_kernel (NOTE: [fused norm and state update] there): the
// float64 norms, the state update and a decision per tensor. Launch 2, scale_kernel, has the same
// grid and applies each tensor's decision to its chunks.
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
#include "norm_step.cuh"

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

// The kernel arguments of a step: stabilize_ has no per-tensor work of its own.
struct StabilizeArgs {
  NormStep norm;
  __device__ void finish_tensor_step(int64_t) const {}
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

__global__ void __launch_bounds__(kThreads) scale_kernel(const NormStep a) {
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
  at::Tensor norms = at::empty({num_tensors}, m.options());
  if (num_tensors == 0) return norms;  // nothing to write: with no gradient the norm is 0
  const bool raise = cfg.nonfinite == kNonfiniteRaise;
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(device.index());
  check_raise_not_captured("gradstab::stabilize_", raise, stream.stream());

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
  const at::Tensor found_inf_value = readable_scalar(found_inf);
  ChunkedList list(flat, stream);
  const StabilizeArgs args{
      make_norm_step(list, norms, m, v, k, found_inf_value, at::Tensor(), global_norm, raise, cfg)};
  launch_step(args, list, stream.stream(), raise, found_inf_value,
              [&](dim3 grid) { scale_kernel<<<grid, kThreads, 0, stream.stream()>>>(args.norm); });

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
