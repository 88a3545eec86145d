// CPU kernel of gradstab::stabilize_: one call stabilizes a whole list of gradients.
//
// NOTE: [CPU work plan]
// Every gradient is a flat run of elements, cut into chunks of kChunkElems. A tensor's sum of
// squares is the sum of its chunks' sums (each computed in the fixed order of kernels.h), added in
// chunk order: so its norm does not depend on the number of threads nor on how the work is split.
//
// Work items are grouped into blocks of consecutive items of about equal bytes, which the threads
// take one after another (parallel_by_weight): one huge tensor and a thousand small ones are
// spread over the cores alike, with no task per tensor. With one norm per gradient (and no
// "raise"), a gradient of at most kFusedMaxBytes is one item that its thread finishes while the
// data is in its cache: norm, state update, rescale. That reads memory once instead of twice.
// Larger gradients (and every gradient, for the global norm or "raise", which must see all norms
// before changing anything) take two passes: phase one writes each chunk's sum to its own slot,
// the state update runs on the calling thread, and phase two rescales every chunk with its
// tensor's factor.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#include "../stabilize_args.h"
#include "../stabilize_math.h"
#include "kernels.h"
#include "power_table.h"

namespace gradstab {
namespace {

using cpu::kChunkElems;
using cpu::kFusedMaxBytes;
// Lists lighter than this (in bytes, see kItemOverheadBytes) run on the calling thread: waking
// the other threads costs more.
constexpr int64_t kMinParallelBytes = 1 << 18;
// The fixed cost of visiting one item, counted as bytes when the work is split.
constexpr int64_t kItemOverheadBytes = 256;
// Work is handed to the threads in blocks of about 1/kBlocksPerThread of a thread's share, and
// never less than kMinBlockBytes.
constexpr int64_t kBlocksPerThread = 8;
constexpr int64_t kMinBlockBytes = 1 << 16;

// A gradient as the kernels see it: a flat run of `numel` elements at `data`.
struct FlatGrad {
  char* data;
  int64_t numel;
  int64_t elem_size;
  const cpu::DtypeKernels* kernels;
  bool fused;
};

// The gradients whose memory is not one dense block are processed in a contiguous copy that is
// written back at the end: (index, copy) pairs.
using DenseCopies = std::vector<std::pair<int64_t, at::Tensor>>;

std::vector<FlatGrad> flatten_grads(at::TensorList grads, DenseCopies& copies) {
  std::vector<FlatGrad> flat;
  flat.reserve(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    // A non-overlapping and dense tensor occupies exactly numel consecutive elements starting at
    // its data pointer (strides are never negative), in some order: elementwise work can treat
    // it as flat.
    const at::Tensor* work = &g;
    if (!g.is_non_overlapping_and_dense()) {
      copies.emplace_back(static_cast<int64_t>(i), g.contiguous());
      work = &copies.back().second;
    }
    flat.push_back({static_cast<char*>(work->data_ptr()), work->numel(),
                    static_cast<int64_t>(work->element_size()),
                    &cpu::kernels_for(work->scalar_type()), false});
  }
  return flat;
}

// A piece of work: chunk [begin, end) of a tensor, or the whole fused tensor.
struct Item {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// Calls f(i) for every item i of `items` on the threads. The items are grouped into blocks of
// consecutive items of about equal weight (weight(i) = bytes of item i + kItemOverheadBytes),
// about kBlocksPerThread per thread, and each thread takes the next block until none is left: a
// thread slowed down by another process on its core holds up at most one block.
template <typename F>
void parallel_by_weight(const std::vector<Item>& items, const std::vector<FlatGrad>& flat,
                        const F& f) {
  const int64_t n = static_cast<int64_t>(items.size());
  std::vector<int64_t> start(n + 1, 0);  // start[i]: total weight of the items before i
  for (int64_t i = 0; i < n; ++i) {
    const Item& it = items[i];
    start[i + 1] = start[i] + (it.end - it.begin) * flat[it.tensor].elem_size + kItemOverheadBytes;
  }
  const int64_t total = start[n];
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  if (total < kMinParallelBytes || threads <= 1) {
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
  const int64_t block_weight = std::max(kMinBlockBytes, total / (kBlocksPerThread * threads));
  std::vector<int64_t> block_start;  // the first item of each block, then n
  for (int64_t i = 0, bound = 0; i < n; ++i) {
    if (start[i] >= bound) {
      block_start.push_back(i);
      bound = start[i] + block_weight;
    }
  }
  block_start.push_back(n);
  const int64_t num_blocks = static_cast<int64_t>(block_start.size()) - 1;
  std::atomic<int64_t> next_block{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t b = next_block++; b < num_blocks; b = next_block++) {
      for (int64_t i = block_start[b]; i < block_start[b + 1]; ++i) f(i);
    }
  });
}

// Sum of squares of elements [begin, end) of g, which must be whole chunks of it (the last may be
// short), added chunk by chunk in order.
double chunked_sum_squares(const FlatGrad& g, int64_t begin, int64_t end) {
  double total = 0.0;
  for (int64_t b = begin; b < end; b += kChunkElems) {
    total += g.kernels->sum_squares(g.data + b * g.elem_size, std::min(kChunkElems, end - b));
  }
  return total;
}

void apply_decision(const FlatGrad& g, int64_t begin, int64_t end, const StepDecision& d) {
  if (d.action == kLeaveGrad || end <= begin) return;
  char* data = g.data + begin * g.elem_size;
  if (d.action == kZeroGrad) {
    std::memset(data, 0, (end - begin) * g.elem_size);  // +0.0 in every float format
  } else {
    g.kernels->scale(data, end - begin, d.factor);
  }
}

at::Tensor stabilize_cpu(at::TensorList grads, at::Tensor& m, at::Tensor& v, at::Tensor& k,
                         const std::optional<at::Tensor>& found_inf, double gamma1, double gamma2,
                         double eps, bool bias_correction, bool global_norm, int64_t nonfinite,
                         std::optional<double> spike_guard) {
  const StabilizerConfig cfg =
      make_config(gamma1, gamma2, eps, bias_correction, nonfinite, spike_guard);
  check_tensors(grads, m, v, k, found_inf, global_norm, c10::Device(c10::kCPU));
  const bool skip_step = found_inf.has_value() && found_inf->item<double>() > 0.0;
  const bool may_fuse = !global_norm && !skip_step && cfg.nonfinite != kNonfiniteRaise;

  const int64_t num_grads = static_cast<int64_t>(grads.size());
  DenseCopies copies;
  std::vector<FlatGrad> flat = flatten_grads(grads, copies);
  std::vector<Item> items;        // phase one: fused tensors and the chunks of the others
  std::vector<Item> scale_items;  // phase two: the chunks of the others
  for (int64_t t = 0; t < num_grads; ++t) {
    FlatGrad& g = flat[t];
    g.fused = may_fuse && g.numel * g.elem_size <= kFusedMaxBytes;
    if (g.fused) {
      items.push_back({t, 0, g.numel});
      continue;
    }
    for (int64_t b = 0; b < g.numel; b += kChunkElems) {
      items.push_back({t, b, std::min(b + kChunkElems, g.numel)});
    }
  }

  double* m_data = m.data_ptr<double>();
  double* v_data = v.data_ptr<double>();
  int64_t* k_data = k.data_ptr<int64_t>();
  const cpu::PowerTable powers(cfg, k_data, global_norm ? 1 : num_grads);
  std::vector<double> sumsq(num_grads, 0.0);
  std::vector<double> item_sumsq(items.size());
  parallel_by_weight(items, flat, [&](int64_t i) {
    const Item& it = items[i];
    const FlatGrad& g = flat[it.tensor];
    const double s = chunked_sum_squares(g, it.begin, it.end);
    item_sumsq[i] = s;
    if (g.fused) {
      const int64_t t = it.tensor;
      const StepDecision d =
          stabilize_step(std::sqrt(s), false, cfg, m_data + t, v_data + t, k_data + t, powers);
      apply_decision(g, 0, g.numel, d);
    }
  });
  for (size_t i = 0; i < items.size(); ++i) sumsq[items[i].tensor] += item_sumsq[i];

  if (cfg.nonfinite == kNonfiniteRaise && !skip_step) {
    double total = 0.0;
    for (double s : sumsq) total += s;
    bool bad = global_norm && !is_finite(total);
    for (double s : sumsq) bad = bad || !is_finite(s);
    TORCH_CHECK(!bad, nonfinite_message(sumsq));
  }

  std::vector<StepDecision> decisions(num_grads, StepDecision{kLeaveGrad, 1.0});
  if (global_norm) {
    double total = 0.0;
    for (double s : sumsq) total += s;
    const StepDecision d =
        stabilize_step(std::sqrt(total), skip_step, cfg, m_data, v_data, k_data, powers);
    std::fill(decisions.begin(), decisions.end(), d);
  } else {
    for (int64_t t = 0; t < num_grads; ++t) {
      if (flat[t].fused) continue;
      decisions[t] = stabilize_step(std::sqrt(sumsq[t]), skip_step, cfg, m_data + t, v_data + t,
                                    k_data + t, powers);
    }
  }

  for (const Item& it : items) {
    if (!flat[it.tensor].fused && decisions[it.tensor].action != kLeaveGrad) {
      scale_items.push_back(it);
    }
  }
  parallel_by_weight(scale_items, flat, [&](int64_t i) {
    const Item& it = scale_items[i];
    apply_decision(flat[it.tensor], it.begin, it.end, decisions[it.tensor]);
  });
  for (const auto& [t, copy] : copies) {
    // A fused copy was changed unless its norm was zero or its step skipped; writing it back
    // unchanged is harmless.
    if (flat[t].fused || decisions[t].action != kLeaveGrad) grads[t].copy_(copy);
  }

  bump_versions(grads, m, v, k);

  // The norms the state update saw, in float64: a finite gradient's norm can exceed float32's
  // range (docs/design.md, "Huge but finite gradients").
  at::Tensor out = at::empty({num_grads}, m.options());
  double* out_data = out.data_ptr<double>();
  for (int64_t t = 0; t < num_grads; ++t) out_data[t] = std::sqrt(sumsq[t]);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gradstab, CPU, m) {
  m.impl("stabilize_", &stabilize_cpu);
}

}  // namespace gradstab
