// CUDA kernel of gradstab::stabilized_adamw_: one StabilizedAdamW step (docs/adamw.md) for a list
// of params on one device in two kernel launches (plus one small copy of metadata), on the
// current stream, with no host sync (except for nonfinite="raise", which must read the norms
// before changing anything). The gradients are read, never written.
//
// NOTE: [CUDA AdamW]
// The grads are the launcher's tensor list (multi_tensor.cuh); the pointers of the params,
// moments and step counts, the group of each tensor and the groups' hyperparameters travel in
// the same upload (ExtraRegions). Launch 1 is norm_step.cuh's norm_kernel (NOTE: [fused norm and
// state update] there): float64 chunk sums in a fixed order, and the block that completes a
// tensor adds them, counts the tensor's step and stores its bias corrections (adamw_bias, with
// the powers made by two lanes at once), and, for granularity "param", runs stabilize_step
// (stabilize_math.h) on the norm over the loss scale; for "global" the block that completes the
// last tensor decides for all. Launch 2, adamw_update_kernel, has the same grid: each block reads
// its tensor's decision and bias corrections, computes the AdamW constants and runs
// adamw_element (adamw_math.h, the very code of the CPU kernels) on its chunk of param, grad and
// moments, 16-byte accesses where every one of them allows. found_inf is read on the device:
// > 0 leaves everything (moments, weights, steps, statistics) as it was.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "../adamw_args.h"
#include "../adamw_math.h"
#include "../stabilize_args.h"
#include "../stabilize_math.h"
#include "kernel_utils.cuh"
#include "multi_tensor.cuh"
#include "norm_step.cuh"

namespace gradstab {
namespace cuda {
namespace {

// The AdamW metadata of the list, in the launcher's extra upload (one entry per tensor, then
// one per param group), and the bias corrections the first launch writes into its extra scratch.
struct AdamwTensors {
  void* const* param;
  void* const* exp_avg;
  void* const* exp_avg_sq;
  void* const* max_exp_avg_sq;  // null without amsgrad
  float* const* step;
  const int32_t* group;
  const AdamwGroup* groups;
  AdamwBias* bias;  // [T], written by the first launch: at each tensor's new step count
};

// Byte offsets of those arrays in the extra upload.
struct AdamwLayout {
  size_t param;
  size_t exp_avg;
  size_t exp_avg_sq;
  size_t max_exp_avg_sq;
  size_t step;
  size_t group;
  size_t groups;
  size_t bytes;
};

AdamwLayout plan_adamw_layout(int64_t num_tensors, int64_t num_groups, bool amsgrad) {
  const size_t t = static_cast<size_t>(num_tensors);
  AdamwLayout l{};
  RegionCursor cursor;
  l.param = cursor.take(t * sizeof(void*));
  l.exp_avg = cursor.take(t * sizeof(void*));
  l.exp_avg_sq = cursor.take(t * sizeof(void*));
  l.max_exp_avg_sq = cursor.take(amsgrad ? t * sizeof(void*) : 0);
  l.step = cursor.take(t * sizeof(float*));
  l.group = cursor.take(t * sizeof(int32_t));
  l.groups = cursor.take(static_cast<size_t>(num_groups) * sizeof(AdamwGroup));
  l.bytes = cursor.end();
  return l;
}

// The kernel arguments of a step.
struct AdamwArgs {
  NormStep norm;  // the grads, the stabilizer's state, found_inf and grad_scale
  AdamwTensors adam;
  bool maximize;

  // Counts tensor t's step and stores its bias corrections at the new count (NOTE: [CUDA
  // AdamW]); by the 32 lanes of warp 0, lanes 0 and 1 computing the two powers.
  __device__ void finish_tensor_step(int64_t t) const {
    if (step_skipped(norm)) return;
    float* step = adam.step[t];
    const float next = *step + 1.0f;
    const AdamwGroup& group = adam.groups[adam.group[t]];
    const int lane = threadIdx.x % 32;
    const double mine =
        integer_power(lane == 0 ? group.beta1 : group.beta2, adamw_step_count(next));
    const double beta1_pow = __shfl_sync(0xffffffffu, mine, 0);
    const double beta2_pow = __shfl_sync(0xffffffffu, mine, 1);
    if (lane == 0) {
      *step = next;
      adam.bias[t] = adamw_bias_from_powers(beta1_pow, beta2_pow);
    }
  }
};

// One chunk of one param: its tensors advanced to the chunk's first element.
template <typename scalar_t>
struct AdamwChunk {
  scalar_t* param;
  const scalar_t* grad;  // null: the stabilizer zeroed the gradient, AdamW sees zeros
  scalar_t* exp_avg;
  scalar_t* exp_avg_sq;
  scalar_t* max_exp_avg_sq;  // null without amsgrad
};

// adamw_element on one stored value of each tensor.
template <bool kAmsgrad, typename scalar_t, typename opmath_t>
__device__ __forceinline__ void update_value(scalar_t& param, const scalar_t* grad,
                                             scalar_t& exp_avg, scalar_t& exp_avg_sq,
                                             scalar_t* max_exp_avg_sq,
                                             const AdamwConstants<opmath_t>& c) {
  opmath_t p = static_cast<opmath_t>(param);
  const opmath_t g = grad != nullptr ? stabilized_grad(*grad, c.grad_scale) : opmath_t(0);
  opmath_t m = static_cast<opmath_t>(exp_avg);
  opmath_t v = static_cast<opmath_t>(exp_avg_sq);
  if constexpr (kAmsgrad) {
    opmath_t v_max = static_cast<opmath_t>(*max_exp_avg_sq);
    adamw_element(p, g, m, v, &v_max, c);
    *max_exp_avg_sq = static_cast<scalar_t>(v_max);
  } else {
    adamw_element(p, g, m, v, static_cast<opmath_t*>(nullptr), c);
  }
  param = static_cast<scalar_t>(p);
  exp_avg = static_cast<scalar_t>(m);
  exp_avg_sq = static_cast<scalar_t>(v);
}

// Packs of each stream a thread of the update kernel keeps in flight: 4 or 5 streams of
// kUpdateUnroll 16-byte packs, and two blocks per SM (__launch_bounds__) without spills; with
// kUnroll (4) the kernel needs ~230 registers, one block per SM.
constexpr int kUpdateUnroll = 2;

// This thread's elements of the chunk, in the order of NOTE: [thread order of a chunk].
template <bool kAligned, bool kAmsgrad, typename scalar_t, typename opmath_t>
__device__ void adamw_chunk(const AdamwChunk<scalar_t>& x, int32_t len,
                            const AdamwConstants<opmath_t>& c) {
  constexpr int W = Pack<scalar_t>::kWidth;
  Pack<scalar_t> p[kUpdateUnroll];
  Pack<scalar_t> g[kUpdateUnroll];
  Pack<scalar_t> m[kUpdateUnroll];
  Pack<scalar_t> v[kUpdateUnroll];
  Pack<scalar_t> v_max[kAmsgrad ? kUpdateUnroll : 1];
  const bool has_grad = x.grad != nullptr;
  visit_chunk<W, kUpdateUnroll>(
      threadIdx.x, kThreads, len,
      [&](int u, int32_t vec) {
        load_pack<kAligned>(x.param, vec, p[u]);
        if (has_grad) load_pack<kAligned>(x.grad, vec, g[u]);
        load_pack<kAligned>(x.exp_avg, vec, m[u]);
        load_pack<kAligned>(x.exp_avg_sq, vec, v[u]);
        if constexpr (kAmsgrad) load_pack<kAligned>(x.max_exp_avg_sq, vec, v_max[u]);
      },
      [&](int u, int32_t vec) {
#pragma unroll
        for (int j = 0; j < W; ++j) {
          update_value<kAmsgrad>(p[u].val[j], has_grad ? &g[u].val[j] : nullptr, m[u].val[j],
                                 v[u].val[j], kAmsgrad ? &v_max[u].val[j] : nullptr, c);
        }
        store_pack<kAligned>(x.param, vec, p[u]);
        store_pack<kAligned>(x.exp_avg, vec, m[u]);
        store_pack<kAligned>(x.exp_avg_sq, vec, v[u]);
        if constexpr (kAmsgrad) store_pack<kAligned>(x.max_exp_avg_sq, vec, v_max[u]);
      },
      [&](int32_t begin, int32_t end) {
        for (int32_t i = begin; i < end; ++i) {
          update_value<kAmsgrad>(x.param[i], has_grad ? x.grad + i : nullptr, x.exp_avg[i],
                                 x.exp_avg_sq[i], kAmsgrad ? x.max_exp_avg_sq + i : nullptr, c);
        }
      });
}

template <bool kAmsgrad>
__global__ void __launch_bounds__(kThreads, 2) adamw_update_kernel(const AdamwArgs a) {
  const NormStep& n = a.norm;
  const ChunkRef ref = locate_chunk(n.list, blockIdx.x);
  if (ref.span.len == 0 || step_skipped(n)) return;
  const int64_t t = ref.tensor;
  const Decision d = n.decision[n.global_norm ? 0 : t];
  const double grad_scale = (d.action == kScaleGrad ? d.factor : 1.0) * inverse_scale(n);
  const AdamwGroup group = a.adam.groups[a.adam.group[t]];
  const AdamwBias bias = a.adam.bias[t];
  const int64_t begin = ref.span.begin;
  dispatch_dtype(n.list.dtype[t], [&](auto* typed) {
    using scalar_t = std::remove_pointer_t<decltype(typed)>;
    using opmath_t = typename AccType<scalar_t>::type;
    const AdamwConstants<opmath_t> c =
        adamw_constants<opmath_t>(group, bias, grad_scale, a.maximize);
    const AdamwChunk<scalar_t> x{
        static_cast<scalar_t*>(a.adam.param[t]) + begin,
        d.action == kZeroGrad ? nullptr : static_cast<const scalar_t*>(n.list.data[t]) + begin,
        static_cast<scalar_t*>(a.adam.exp_avg[t]) + begin,
        static_cast<scalar_t*>(a.adam.exp_avg_sq[t]) + begin,
        kAmsgrad ? static_cast<scalar_t*>(a.adam.max_exp_avg_sq[t]) + begin : nullptr};
    __builtin_assume(__isGlobal(x.param));
    const bool aligned = is_vector_aligned(x.param) &&
                         is_vector_aligned(static_cast<const scalar_t*>(n.list.data[t]) + begin) &&
                         is_vector_aligned(x.exp_avg) && is_vector_aligned(x.exp_avg_sq) &&
                         (!kAmsgrad || is_vector_aligned(x.max_exp_avg_sq));
    if (aligned) {
      adamw_chunk<true, kAmsgrad>(x, ref.span.len, c);
    } else {
      adamw_chunk<false, kAmsgrad>(x, ref.span.len, c);
    }
  });
}

at::Tensor stabilized_adamw_cuda(
    at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
    at::Tensor& m, at::Tensor& v, at::Tensor& k, const std::optional<at::Tensor>& grad_scale,
    const std::optional<at::Tensor>& found_inf, at::IntArrayRef group_sizes,
    at::ArrayRef<double> lr, at::ArrayRef<double> beta1, at::ArrayRef<double> beta2,
    at::ArrayRef<double> weight_decay, at::ArrayRef<double> eps, bool amsgrad, bool maximize,
    double gamma1, double gamma2, double stab_eps, bool bias_correction, bool global_norm,
    int64_t nonfinite, std::optional<double> spike_guard) {
  const StabilizerConfig cfg = make_config(gamma1, gamma2, stab_eps, bias_correction, nonfinite,
                                           spike_guard, kAdamwOp, "stab_eps");
  const int64_t num_tensors = static_cast<int64_t>(params.size());
  const AdamwGroups groups =
      make_adamw_groups(num_tensors, group_sizes, lr, beta1, beta2, weight_decay, eps);
  const c10::Device device = params.empty() ? m.device() : params[0].device();
  TORCH_CHECK(device.is_cuda(), kAdamwOp, ": expected CUDA tensors, got ", device);
  check_adamw_tensors(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, m, v, k,
                      grad_scale, found_inf, amsgrad, global_norm, device);
  const c10::cuda::CUDAGuard device_guard(device);
  release_retired_buffers();

  at::Tensor norms = at::empty({num_tensors}, m.options());
  if (num_tensors == 0) return norms;
  const bool raise = cfg.nonfinite == kNonfiniteRaise;
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(device.index());
  check_raise_not_captured(kAdamwOp, raise, stream.stream());

  // Tensors not laid out as one dense block like their param go through copies.
  Copies copies;
  std::vector<at::Tensor> flat_params, flat_grads, flat_exp_avgs, flat_exp_avg_sqs, flat_max;
  for (int64_t t = 0; t < num_tensors; ++t) {
    at::Tensor param = params[t];
    if (!param.is_non_overlapping_and_dense()) {
      const at::Tensor copy = param.contiguous();
      copies.written.emplace_back(param, copy);
      param = copy;
    }
    flat_params.push_back(param);
    flat_grads.push_back(laid_out_like(grads[t], param, false, copies));
    flat_exp_avgs.push_back(laid_out_like(exp_avgs[t], param, true, copies));
    flat_exp_avg_sqs.push_back(laid_out_like(exp_avg_sqs[t], param, true, copies));
    if (amsgrad) flat_max.push_back(laid_out_like(max_exp_avg_sqs[t], param, true, copies));
  }
  const at::Tensor found_inf_value = readable_scalar(found_inf);
  const at::Tensor grad_scale_value = readable_scalar(grad_scale);

  const int64_t num_groups = static_cast<int64_t>(groups.groups.size());
  const AdamwLayout adam_layout = plan_adamw_layout(num_tensors, num_groups, amsgrad);
  auto fill = [&](uint8_t* host) {
    auto pointers = [&](size_t offset, const std::vector<at::Tensor>& tensors) {
      auto* out = reinterpret_cast<void**>(host + offset);
      for (size_t t = 0; t < tensors.size(); ++t) out[t] = tensors[t].data_ptr();
    };
    pointers(adam_layout.param, flat_params);
    pointers(adam_layout.exp_avg, flat_exp_avgs);
    pointers(adam_layout.exp_avg_sq, flat_exp_avg_sqs);
    pointers(adam_layout.max_exp_avg_sq, flat_max);
    auto* steps = reinterpret_cast<float**>(host + adam_layout.step);
    for (int64_t t = 0; t < num_tensors; ++t) steps[t] = state_steps[t].data_ptr<float>();
    std::memcpy(host + adam_layout.group, groups.group_of.data(),
                groups.group_of.size() * sizeof(int32_t));
    std::memcpy(host + adam_layout.groups, groups.groups.data(),
                groups.groups.size() * sizeof(AdamwGroup));
  };
  ChunkedList list(flat_grads, stream,
                   ExtraRegions{adam_layout.bytes, fill, num_tensors * sizeof(AdamwBias)});
  const ListLayout& layout = list.layout();
  auto uploaded = [&](size_t offset) { return layout.extra_upload + offset; };

  AdamwArgs args{};
  args.norm = make_norm_step(list, norms, m, v, k, found_inf_value, grad_scale_value, global_norm,
                             raise, cfg);
  args.adam.param = list.region<void* const>(uploaded(adam_layout.param));
  args.adam.exp_avg = list.region<void* const>(uploaded(adam_layout.exp_avg));
  args.adam.exp_avg_sq = list.region<void* const>(uploaded(adam_layout.exp_avg_sq));
  args.adam.max_exp_avg_sq =
      amsgrad ? list.region<void* const>(uploaded(adam_layout.max_exp_avg_sq)) : nullptr;
  args.adam.step = list.region<float* const>(uploaded(adam_layout.step));
  args.adam.group = list.region<const int32_t>(uploaded(adam_layout.group));
  args.adam.groups = list.region<const AdamwGroup>(uploaded(adam_layout.groups));
  args.adam.bias = list.region<AdamwBias>(layout.extra_scratch);
  args.maximize = maximize;

  launch_step(args, list, stream.stream(), raise, found_inf_value, [&](dim3 grid) {
    if (amsgrad) {
      adamw_update_kernel<true><<<grid, kThreads, 0, stream.stream()>>>(args);
    } else {
      adamw_update_kernel<false><<<grid, kThreads, 0, stream.stream()>>>(args);
    }
  });

  for (const auto& [original, copy] : copies.written) original.copy_(copy);
  list.finish();
  bump_adamw_versions(params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, m, v, k);
  return norms;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(gradstab, CUDA, m) {
  m.impl("stabilized_adamw_", &cuda::stabilized_adamw_cuda);
}

}  // namespace gradstab
