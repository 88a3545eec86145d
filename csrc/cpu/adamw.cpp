// CPU kernel of gradstab::stabilized_adamw_: one call takes a whole list of params through one
// StabilizedAdamW step (docs/adamw.md). The gradients are read, never written.
//
// NOTE: [CPU AdamW work plan]
// Each gradient's norm is computed as stabilize.cpp computes it (chunks of kChunkElems summed in
// chunk order, each in the fixed order of kernels.h), so the state update, stabilize_step of
// stabilize_math.h, sees the very norm the stabilize_ op would. Then AdamW runs on the param with
// the gradient multiplied by its factor as it is read (adamw_kernels.h).
//
// Default path (one norm per gradient, no "raise", no skipped step): ONE parallel region for
// the whole step. The threads take work items from one queue, in order:
// - a gradient of at most kFusedMaxBytes is one item, done in one visit while it is in cache:
//   norm, state update, AdamW; memory sees its gradient once;
// - a larger one is cut into norm items (one chunk each) and update items (one chunk each). The
//   thread that adds the last chunk sum of a tensor (an atomic count) runs its state update and
//   publishes its factor with a release store; an update item waits (acquire) for that flag. The
//   update items of a tensor are queued after the norm items of the NEXT large tensor, so the
//   wait is rare.
// No deadlock: items are taken in queue order and norm items never wait, so when a thread takes
// an update item, every norm item of its tensor is already held by a running thread.
// The global norm, "raise" (which must see every norm before changing anything) and a skipped
// step (found_inf > 0: only the norms are computed) take two regions instead: all norm items,
// then the state update on the calling thread, then all update items.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "../adamw_args.h"
#include "../stabilize_args.h"
#include "../stabilize_math.h"
#include "adamw_kernels.h"
#include "kernels.h"
#include "power_table.h"

namespace gradstab {
namespace {

using cpu::kChunkElems;
using cpu::kFusedMaxBytes;
// Steps lighter than this (bytes of gradients, params and moments) run on the calling thread:
// waking the other threads costs more.
constexpr int64_t kMinParallelBytes = 1 << 18;
// Spins (with a pause) before a waiting update item yields its core.
constexpr int kSpinsBeforeYield = 256;

// A param and its tensors as the kernels see them: flat runs of `numel` elements.
struct FlatParam {
  cpu::AdamwRun run;  // with the gradient, whatever the stabilizer decides
  float* step;
  int64_t elem_size;
  const cpu::DtypeKernels* norm_kernels;
  cpu::AdamwFn adamw;
  int32_t group;
  bool fused;
  int64_t first_chunk;  // its first slot in the chunk sums
  int64_t num_chunks;
};

std::vector<FlatParam> flatten_params(at::TensorList params, at::TensorList grads,
                                      at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                      at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                                      const std::vector<int32_t>& group_of, Copies& copies) {
  const bool amsgrad = !max_exp_avg_sqs.empty();
  std::vector<FlatParam> flat;
  flat.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    at::Tensor param = params[i];
    if (!param.is_non_overlapping_and_dense()) {
      const at::Tensor copy = param.contiguous();
      copies.written.emplace_back(param, copy);
      param = copy;
    }
    const at::Tensor grad = laid_out_like(grads[i], param, false, copies);
    const at::Tensor exp_avg = laid_out_like(exp_avgs[i], param, true, copies);
    const at::Tensor exp_avg_sq = laid_out_like(exp_avg_sqs[i], param, true, copies);
    const at::Tensor max_exp_avg_sq =
        amsgrad ? laid_out_like(max_exp_avg_sqs[i], param, true, copies) : at::Tensor();
    FlatParam f{};
    f.run = {param.data_ptr(),
             grad.const_data_ptr(),
             exp_avg.data_ptr(),
             exp_avg_sq.data_ptr(),
             amsgrad ? max_exp_avg_sq.data_ptr() : nullptr,
             param.numel()};
    f.step = state_steps[i].data_ptr<float>();
    f.elem_size = static_cast<int64_t>(param.element_size());
    f.norm_kernels = &cpu::kernels_for(param.scalar_type());
    f.adamw = cpu::adamw_kernel_for(param.scalar_type());
    f.group = group_of[i];
    flat.push_back(f);
  }
  return flat;
}

enum class ItemKind : uint8_t { kFused, kNorm, kUpdate };

// A piece of work: chunk [begin, end) of a tensor (its chunk sum goes to `slot`), or the whole
// tensor for kFused.
struct Item {
  ItemKind kind;
  int64_t tensor;
  int64_t begin;
  int64_t end;
  int64_t slot;
};

// Calls f(item) for every item, in queue order, on the threads (see the NOTE above).
template <typename F>
void run_queue(const std::vector<Item>& items, int64_t bytes, const F& f) {
  const int64_t n = static_cast<int64_t>(items.size());
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  if (bytes < kMinParallelBytes || threads <= 1 || at::in_parallel_region()) {
    for (const Item& item : items) f(item);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t i = next++; i < n; i = next++) f(items[i]);
  });
}

void spin_pause() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_ia32_pause();
#endif
}

// p advanced by `bytes` (null stays null).
template <typename T>
T* advance(T* p, int64_t bytes) {
  using Byte = std::conditional_t<std::is_const_v<T>, const char, char>;
  return p == nullptr ? p : static_cast<T*>(static_cast<Byte*>(p) + bytes);
}

// What the update items of a tensor do this step, fixed by its state update.
struct TensorStep {
  cpu::AdamwStep step;
  bool zero_grad;  // the stabilizer zeroed the gradient (nonfinite="zero"): AdamW sees zeros
};

// Everything one step shares between the threads.
class AdamwStepPlan {
 public:
  AdamwStepPlan(std::vector<FlatParam> flat, const AdamwGroups& groups, const StabilizerConfig& cfg,
                bool maximize, double inv_scale, at::Tensor& m, at::Tensor& v, at::Tensor& k)
      : flat_(std::move(flat)),
        groups_(groups),
        cfg_(cfg),
        maximize_(maximize),
        inv_scale_(inv_scale),
        m_(m.data_ptr<double>()),
        v_(v.data_ptr<double>()),
        k_(k.data_ptr<int64_t>()),
        powers_(cfg, k_, k.numel()),
        steps_(flat_.size()),
        chunks_done_(new std::atomic<int64_t>[flat_.size()]),
        ready_(new std::atomic<bool>[flat_.size()]) {
    for (size_t t = 0; t < flat_.size(); ++t) {
      chunks_done_[t].store(0, std::memory_order_relaxed);
      ready_[t].store(false, std::memory_order_relaxed);
    }
  }

  int64_t num_tensors() const { return static_cast<int64_t>(flat_.size()); }
  const FlatParam& param(int64_t t) const { return flat_[t]; }

  // Decides which gradients are fused and numbers the chunk sums; returns the bytes the step
  // touches.
  int64_t plan_chunks(bool may_fuse) {
    int64_t slots = 0;
    int64_t bytes = 0;
    for (FlatParam& f : flat_) {
      const int64_t grad_bytes = f.run.numel * f.elem_size;
      bytes += grad_bytes * (f.run.max_exp_avg_sq != nullptr ? 5 : 4);
      f.fused = may_fuse && grad_bytes <= kFusedMaxBytes;
      f.first_chunk = slots;
      f.num_chunks = f.fused ? 0 : (f.run.numel + kChunkElems - 1) / kChunkElems;
      slots += f.num_chunks;
    }
    chunk_sums_.assign(slots, 0.0);
    sumsq_.assign(flat_.size(), 0.0);
    plan_biases();
    return bytes;
  }

  // The queue of the one-region path (see the NOTE above).
  std::vector<Item> pipelined_items() const {
    std::vector<Item> items;
    std::vector<Item> pending;  // update items of the last large tensor whose norms are queued
    for (int64_t t = 0; t < num_tensors(); ++t) {
      const FlatParam& f = flat_[t];
      if (f.fused) {
        items.push_back({ItemKind::kFused, t, 0, f.run.numel, 0});
        continue;
      }
      append_chunks(items, ItemKind::kNorm, t);
      items.insert(items.end(), pending.begin(), pending.end());
      pending.clear();
      append_chunks(pending, ItemKind::kUpdate, t);
    }
    items.insert(items.end(), pending.begin(), pending.end());
    return items;
  }

  // All chunks of every tensor, as norm or as update items (the two-region path).
  std::vector<Item> all_items(ItemKind kind) const {
    std::vector<Item> items;
    for (int64_t t = 0; t < num_tensors(); ++t) append_chunks(items, kind, t);
    return items;
  }

  void run_item(const Item& item) {
    const FlatParam& f = flat_[item.tensor];
    switch (item.kind) {
      case ItemKind::kFused: {
        double sumsq = 0.0;
        for (int64_t b = 0; b < f.run.numel; b += kChunkElems) sumsq += chunk_sumsq(f, b);
        sumsq_[item.tensor] = sumsq;
        finish_tensor(item.tensor, decide(item.tensor, sumsq));
        update(item);
        break;
      }
      case ItemKind::kNorm: {
        chunk_sums_[item.slot] = chunk_sumsq(f, item.begin);
        const int64_t done = chunks_done_[item.tensor].fetch_add(1, std::memory_order_acq_rel) + 1;
        if (done == f.num_chunks) {
          // Every chunk sum of this tensor is written (acq_rel above): add them in order.
          const double sumsq = tensor_sumsq(item.tensor);
          if (publish_decisions_) finish_tensor(item.tensor, decide(item.tensor, sumsq));
        }
        break;
      }
      case ItemKind::kUpdate: {
        std::atomic<bool>& ready = ready_[item.tensor];
        for (int spins = 0; !ready.load(std::memory_order_acquire); ++spins) {
          if (spins < kSpinsBeforeYield) {
            spin_pause();
          } else {
            std::this_thread::yield();
          }
        }
        update(item);
        break;
      }
    }
  }

  // Two-region path: whether the threads run the state updates (false: the calling thread does,
  // through decide_all, after raise_if_nonfinite).
  void set_publish_decisions(bool publish) { publish_decisions_ = publish; }

  void raise_if_nonfinite(bool global_norm) const {
    double total = 0.0;
    for (double s : sumsq_) total += s;
    bool bad = global_norm && !is_finite(total);
    for (double s : sumsq_) bad = bad || !is_finite(s);
    TORCH_CHECK(!bad, nonfinite_message(sumsq_));
  }

  // Two-region path: the state updates, in tensor order, after every norm is known.
  void decide_all(bool global_norm) {
    if (!global_norm) {
      for (int64_t t = 0; t < num_tensors(); ++t) finish_tensor(t, decide(t, sumsq_[t]));
      return;
    }
    double total = 0.0;
    for (double s : sumsq_) total += s;
    const StepDecision d =
        stabilize_step(std::sqrt(total) * inv_scale_, false, cfg_, m_, v_, k_, powers_);
    for (int64_t t = 0; t < num_tensors(); ++t) finish_tensor(t, d);
  }

  // The norms of the gradients over the loss scale, the op's result (float64, as the state
  // update saw them).
  void write_norms(double* out) const {
    for (int64_t t = 0; t < num_tensors(); ++t) out[t] = std::sqrt(sumsq_[t]) * inv_scale_;
  }

 private:
  void append_chunks(std::vector<Item>& items, ItemKind kind, int64_t t) const {
    const FlatParam& f = flat_[t];
    for (int64_t c = 0; c < f.num_chunks; ++c) {
      const int64_t begin = c * kChunkElems;
      items.push_back(
          {kind, t, begin, std::min(begin + kChunkElems, f.run.numel), f.first_chunk + c});
    }
  }

  // The bias corrections at every tensor's count after this step, computed once for each run of
  // tensors with the same group and count (nearly always one run per group): integer_power
  // costs 0.1 to 0.4 us.
  void plan_biases() {
    biases_.resize(flat_.size());
    for (size_t t = 0; t < flat_.size(); ++t) {
      const FlatParam& f = flat_[t];
      const float next = *f.step + 1.0f;  // the count finish_tensor makes
      if (t > 0 && f.group == flat_[t - 1].group && next == *flat_[t - 1].step + 1.0f) {
        biases_[t] = biases_[t - 1];
      } else {
        biases_[t] = adamw_bias(groups_.groups[f.group], next);
      }
    }
  }

  double chunk_sumsq(const FlatParam& f, int64_t begin) const {
    const auto* data = static_cast<const char*>(f.run.grad) + begin * f.elem_size;
    return f.norm_kernels->sum_squares(data, std::min(kChunkElems, f.run.numel - begin));
  }

  double tensor_sumsq(int64_t t) {
    const FlatParam& f = flat_[t];
    double sumsq = 0.0;
    for (int64_t c = 0; c < f.num_chunks; ++c) sumsq += chunk_sums_[f.first_chunk + c];
    sumsq_[t] = sumsq;
    return sumsq;
  }

  StepDecision decide(int64_t t, double sumsq) {
    return stabilize_step(std::sqrt(sumsq) * inv_scale_, false, cfg_, m_ + t, v_ + t, k_ + t,
                          powers_);
  }

  // Counts the step of tensor t and fixes what its update items do; then releases them.
  void finish_tensor(int64_t t, const StepDecision& d) {
    const FlatParam& f = flat_[t];
    *f.step += 1.0f;
    TensorStep& s = steps_[t];
    s.step.group = groups_.groups[f.group];
    s.step.bias = biases_[t];
    s.step.grad_scale = d.action == kScaleGrad ? d.factor * inv_scale_ : inv_scale_;
    s.step.maximize = maximize_;
    s.zero_grad = d.action == kZeroGrad;
    ready_[t].store(true, std::memory_order_release);
  }

  void update(const Item& item) const {
    const FlatParam& f = flat_[item.tensor];
    const TensorStep& s = steps_[item.tensor];
    const int64_t offset = item.begin * f.elem_size;
    const cpu::AdamwRun run{
        advance(f.run.param, offset),          s.zero_grad ? nullptr : advance(f.run.grad, offset),
        advance(f.run.exp_avg, offset),        advance(f.run.exp_avg_sq, offset),
        advance(f.run.max_exp_avg_sq, offset), item.end - item.begin};
    f.adamw(run, s.step);
  }

  std::vector<FlatParam> flat_;
  const AdamwGroups& groups_;
  const StabilizerConfig cfg_;
  const bool maximize_;
  const double inv_scale_;
  double* m_;
  double* v_;
  int64_t* k_;
  const cpu::PowerTable powers_;  // read by the threads' state updates
  std::vector<AdamwBias> biases_;
  std::vector<TensorStep> steps_;
  std::vector<double> chunk_sums_;
  std::vector<double> sumsq_;
  std::unique_ptr<std::atomic<int64_t>[]> chunks_done_;
  std::unique_ptr<std::atomic<bool>[]> ready_;
  bool publish_decisions_ = true;
};

at::Tensor stabilized_adamw_cpu(
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
  check_adamw_tensors(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, m, v, k,
                      grad_scale, found_inf, amsgrad, global_norm, c10::Device(c10::kCPU));
  const bool skip_step = found_inf.has_value() && found_inf->item<double>() > 0.0;
  // 1/scale rounded to float32, as GradScaler.unscale_ computes it: with a power-of-two scale
  // the unscaled values are exact.
  const double inv_scale =
      grad_scale.has_value()
          ? static_cast<double>(static_cast<float>(1.0 / grad_scale->item<double>()))
          : 1.0;

  Copies copies;
  AdamwStepPlan plan(flatten_params(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                                    state_steps, groups.group_of, copies),
                     groups, cfg, maximize, inv_scale, m, v, k);
  const bool two_regions = global_norm || skip_step || cfg.nonfinite == kNonfiniteRaise;
  const int64_t bytes = plan.plan_chunks(!two_regions);
  auto run_item = [&plan](const Item& item) { plan.run_item(item); };
  if (two_regions) {
    plan.set_publish_decisions(false);
    run_queue(plan.all_items(ItemKind::kNorm), bytes / 4, run_item);
    if (!skip_step) {
      if (cfg.nonfinite == kNonfiniteRaise) plan.raise_if_nonfinite(global_norm);
      plan.decide_all(global_norm);
      run_queue(plan.all_items(ItemKind::kUpdate), bytes, run_item);
    }
  } else {
    run_queue(plan.pipelined_items(), bytes, run_item);
  }
  if (!skip_step) {
    for (const auto& [original, copy] : copies.written) original.copy_(copy);
  }
  bump_adamw_versions(params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, m, v, k);

  at::Tensor norms = at::empty({num_tensors}, m.options());
  plan.write_norms(norms.data_ptr<double>());
  return norms;
}

}  // namespace

TORCH_LIBRARY_IMPL(gradstab, CPU, m) {
  m.impl("stabilized_adamw_", &stabilized_adamw_cpu);
}

}  // namespace gradstab
