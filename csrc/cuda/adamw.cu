// CUDA kernel of gradstab::stabilized_adamw_: one StabilizedAdamW step (docs/adamw.md) for a list
// of params on one device in two kernel launches (plus one small copy of metadata), on the
// current stream, with no host sync (except for nonfinite="raise", which must read the norms
// before changing anything). The gradients are read, never written.
//
// NOTE: [CUDA AdamW]
// The grads are the launcher's tensor list (multi_tensor.cuh); the pointers of the params,
// moments and step counts, the group of each tensor and the groups' hyperparameters travel in
// the same upload (ExtraUpload). Launch 1, adamw_norm_kernel, follows stabilize.cu's norm kernel
// (NOTE: [fused norm and state update] there): float64 chunk sums in a fixed order, and the block
// that completes a tensor adds them, counts the tensor's step and, for granularity "param", runs
// stabilize_step (stabilize_math.h) on the norm over the loss scale; for "global" the block that
// completes the last tensor decides for all. Launch 2, adamw_update_kernel, has the same grid:
// each block reads its tensor's decision and step count, computes the AdamW constants and runs
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

namespace gradstab {
namespace cuda {
namespace {

// The AdamW metadata of the list, in the launcher's extra upload (one entry per tensor, then
// one per param group).
struct AdamwTensors {
  void* const* param;
  void* const* exp_avg;
  void* const* exp_avg_sq;
  void* const* max_exp_avg_sq;  // null without amsgrad
  float* const* step;
  const int32_t* group;
  const AdamwGroup* groups;
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
  size_t at = 0;
  auto take = [&at](size_t bytes) {
    const size_t start = at;
    at = align16(at + bytes);
    return start;
  };
  l.param = take(t * sizeof(void*));
  l.exp_avg = take(t * sizeof(void*));
  l.exp_avg_sq = take(t * sizeof(void*));
  l.max_exp_avg_sq = take(amsgrad ? t * sizeof(void*) : 0);
  l.step = take(t * sizeof(float*));
  l.group = take(t * sizeof(int32_t));
  l.groups = take(static_cast<size_t>(num_groups) * sizeof(AdamwGroup));
  l.bytes = at;
  return l;
}

// Everything the kernels of one step read and write.
struct AdamwArgs {
  TensorListView list;  // the grads
  AdamwTensors adam;
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
  const void* grad_scale;  // nullptr when the op got none
  int32_t grad_scale_dtype;
  bool global_norm;
  bool update_state;  // false for nonfinite="raise": adamw_decide_kernel runs after the check
  bool maximize;
  StabilizerConfig cfg;
};

__device__ bool step_skipped(const AdamwArgs& a) {
  return a.found_inf != nullptr && read_as_double(a.found_inf, a.found_inf_dtype) > 0.0;
}

// 1 / loss scale rounded to float32, as GradScaler.unscale_ computes it.
__device__ double inverse_scale(const AdamwArgs& a) {
  if (a.grad_scale == nullptr) return 1.0;
  return static_cast<double>(
      static_cast<float>(1.0 / read_as_double(a.grad_scale, a.grad_scale_dtype)));
}

__device__ void count_step(const AdamwArgs& a, int64_t t) {
  if (!step_skipped(a)) *a.adam.step[t] += 1.0f;
}

// The state update of one slot (a tensor, or the whole list) and the decision for its grads.
__device__ void decide(const AdamwArgs& a, int64_t slot, double norm) {
  const StepDecision d =
      stabilize_step(norm, step_skipped(a), a.cfg, a.m + slot, a.v + slot, a.k + slot);
  a.decision[slot] = Decision{d.factor, d.action, 0};
}

// Run by the block that wrote the last chunk sum of tensor t (the protocol of stabilize.cu's
// finish_tensor); all threads of the block call it.
__device__ void finish_tensor(const AdamwArgs& a, int64_t t, double* scratch) {
  __shared__ bool finishes_list;
  const int64_t first = a.list.first_chunk[t];
  const double sumsq = sum_from_l2(a.partial + first, a.list.first_chunk[t + 1] - first, scratch);
  if (threadIdx.x == 0) {
    a.tensor_done[t] = 0;  // every chunk of t has counted: ready for the next replay of a graph
    a.sumsq[t] = sumsq;
    const double norm = sqrt(sumsq) * inverse_scale(a);
    a.norms[t] = static_cast<float>(norm);
    if (a.update_state) {
      count_step(a, t);
      if (!a.global_norm) decide(a, t, norm);
    }
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
    if (a.update_state) decide(a, 0, sqrt(total) * inverse_scale(a));
  }
}

__global__ void __launch_bounds__(kThreads) adamw_norm_kernel(const AdamwArgs a) {
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
  finish_tensor(a, ref.tensor, scratch);
}

// For nonfinite="raise": the step counts and state updates, once the host has seen that every
// norm is finite. One thread per tensor.
__global__ void adamw_decide_kernel(const AdamwArgs a) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= a.list.num_tensors) return;
  count_step(a, t);
  const double inv_scale = inverse_scale(a);
  if (!a.global_norm) {
    decide(a, t, sqrt(a.sumsq[t]) * inv_scale);
  } else if (t == 0) {
    decide(a, 0, sqrt(a.sumsq[a.list.num_tensors]) * inv_scale);
  }
}

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
  const ChunkRef ref = locate_chunk(a.list, blockIdx.x);
  if (ref.span.len == 0 || step_skipped(a)) return;
  const int64_t t = ref.tensor;
  const Decision d = a.decision[a.global_norm ? 0 : t];
  const double grad_scale = (d.action == kScaleGrad ? d.factor : 1.0) * inverse_scale(a);
  const AdamwGroup group = a.adam.groups[a.adam.group[t]];
  const double step = static_cast<double>(*a.adam.step[t]);
  const int64_t begin = ref.span.begin;
  dispatch_dtype(a.list.dtype[t], [&](auto* typed) {
    using scalar_t = std::remove_pointer_t<decltype(typed)>;
    using opmath_t = typename AccType<scalar_t>::type;
    const AdamwConstants<opmath_t> c =
        adamw_constants<opmath_t>(group, step, grad_scale, a.maximize);
    const AdamwChunk<scalar_t> x{
        static_cast<scalar_t*>(a.adam.param[t]) + begin,
        d.action == kZeroGrad ? nullptr : static_cast<const scalar_t*>(a.list.data[t]) + begin,
        static_cast<scalar_t*>(a.adam.exp_avg[t]) + begin,
        static_cast<scalar_t*>(a.adam.exp_avg_sq[t]) + begin,
        kAmsgrad ? static_cast<scalar_t*>(a.adam.max_exp_avg_sq[t]) + begin : nullptr};
    __builtin_assume(__isGlobal(x.param));
    const bool aligned = is_vector_aligned(x.param) &&
                         is_vector_aligned(static_cast<const scalar_t*>(a.list.data[t]) + begin) &&
                         is_vector_aligned(x.exp_avg) && is_vector_aligned(x.exp_avg_sq) &&
                         (!kAmsgrad || is_vector_aligned(x.max_exp_avg_sq));
    if (aligned) {
      adamw_chunk<true, kAmsgrad>(x, ref.span.len, c);
    } else {
      adamw_chunk<false, kAmsgrad>(x, ref.span.len, c);
    }
  });
}

// A readable copy of a one-element floating tensor (float16, bfloat16, float32, float64).
at::Tensor readable(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return at::Tensor();
  const auto dtype = t->scalar_type();
  const bool ok =
      dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16;
  return ok ? *t : t->to(at::kFloat);
}

// nonfinite="raise": reads the sums of squares (one sync) and raises before anything changes.
void raise_if_nonfinite(const ChunkedList& list, const at::Tensor& found_inf, bool global_norm) {
  const int64_t num_tensors = list.num_tensors();
  const at::Tensor sums =
      list.region_tensor(list.layout().sumsq, num_tensors + 1, at::kDouble).cpu();
  if (found_inf.defined() && found_inf.item<double>() > 0.0) return;
  const double* s = sums.const_data_ptr<double>();
  std::vector<double> values(s, s + num_tensors);
  bool bad = global_norm && !std::isfinite(s[num_tensors]);
  for (double x : values) bad = bad || !std::isfinite(x);
  TORCH_CHECK(!bad, nonfinite_message(values));
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

  at::Tensor norms = at::empty({num_tensors}, m.options().dtype(at::kFloat));
  if (num_tensors == 0) return norms;
  const bool raise = cfg.nonfinite == kNonfiniteRaise;
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(device.index());
  TORCH_CHECK(!(raise && is_capturing(stream.stream())), kAdamwOp,
              ": nonfinite='raise' reads the norms on the host and cannot be captured in a CUDA "
              "graph; use 'zero' or 'skip'");

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
  const at::Tensor found_inf_value = readable(found_inf);
  const at::Tensor grad_scale_value = readable(grad_scale);

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
  ChunkedList list(flat_grads, stream, ExtraUpload{adam_layout.bytes, fill});
  const ListLayout& layout = list.layout();

  AdamwArgs args{};
  args.list = list.view();
  args.adam.param = list.region<void* const>(layout.extra + adam_layout.param);
  args.adam.exp_avg = list.region<void* const>(layout.extra + adam_layout.exp_avg);
  args.adam.exp_avg_sq = list.region<void* const>(layout.extra + adam_layout.exp_avg_sq);
  args.adam.max_exp_avg_sq =
      amsgrad ? list.region<void* const>(layout.extra + adam_layout.max_exp_avg_sq) : nullptr;
  args.adam.step = list.region<float* const>(layout.extra + adam_layout.step);
  args.adam.group = list.region<const int32_t>(layout.extra + adam_layout.group);
  args.adam.groups = list.region<const AdamwGroup>(layout.extra + adam_layout.groups);
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
  args.grad_scale = grad_scale_value.defined() ? grad_scale_value.const_data_ptr() : nullptr;
  args.grad_scale_dtype =
      grad_scale_value.defined() ? dtype_code(grad_scale_value.scalar_type()) : kCodeFloat;
  args.global_norm = global_norm;
  args.update_state = !raise;
  args.maximize = maximize;
  args.cfg = cfg;

  const dim3 grid(static_cast<unsigned int>(list.num_chunks()));
  adamw_norm_kernel<<<grid, kThreads, 0, stream.stream()>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (raise) {
    raise_if_nonfinite(list, found_inf_value, global_norm);
    const dim3 decide_grid(static_cast<unsigned int>((num_tensors + kThreads - 1) / kThreads));
    adamw_decide_kernel<<<decide_grid, kThreads, 0, stream.stream()>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (amsgrad) {
    adamw_update_kernel<true><<<grid, kThreads, 0, stream.stream()>>>(args);
  } else {
    adamw_update_kernel<false><<<grid, kThreads, 0, stream.stream()>>>(args);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();

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
