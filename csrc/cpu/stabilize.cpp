// CPU kernel of gradstab::stabilize_: one call stabilizes a whole list of gradients.
//
// NOTE: [chunked two-phase step]
// Every gradient is cut into chunks of kChunkElems elements, so that one parallel loop spreads
// the work evenly whether the list holds one huge tensor or thousands of small ones. Phase one
// writes each chunk's sum of squares (accumulated in float64) to its own slot; the slots of a
// tensor are then added in order, so the norm does not depend on the number of threads. The state
// update of stabilize_math.h runs once per tensor (or once in all, for the global norm) on the
// calling thread, and phase two rescales every chunk with its tensor's factor.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <sstream>
#include <vector>

#include "../stabilize_args.h"
#include "../stabilize_math.h"

namespace gradstab {
namespace {

constexpr int64_t kChunkElems = 1 << 15;
// Lists with fewer elements than this run on the calling thread: waking the pool costs more.
constexpr int64_t kMinParallelElems = 1 << 16;
constexpr int kLanes = 16;

template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

template <typename scalar_t>
double sum_squares(const scalar_t* data, int64_t n) {
  // kLanes independent float64 accumulators: the compiler vectorizes the inner loop, and the
  // fixed order of additions keeps the result bit-identical from run to run.
  double acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      double x = static_cast<double>(static_cast<typename AccType<scalar_t>::type>(data[i + j]));
      acc[j] += x * x;
    }
  }
  for (int j = 0; i < n; ++i, ++j) {
    double x = static_cast<double>(static_cast<typename AccType<scalar_t>::type>(data[i]));
    acc[j] += x * x;
  }
  double total = 0.0;
  for (int j = 0; j < kLanes; ++j) total += acc[j];
  return total;
}

template <typename scalar_t>
void scale_in_place(scalar_t* data, int64_t n, double factor) {
  using acc_t = typename AccType<scalar_t>::type;
  const acc_t f = static_cast<acc_t>(factor);
  for (int64_t i = 0; i < n; ++i) {
    data[i] = static_cast<scalar_t>(static_cast<acc_t>(data[i]) * f);
  }
}

template <typename F>
void dispatch_float_types(at::ScalarType dtype, const F& f) {
  switch (dtype) {
    case at::kFloat:
      f(static_cast<float*>(nullptr));
      break;
    case at::kDouble:
      f(static_cast<double*>(nullptr));
      break;
    case at::kHalf:
      f(static_cast<c10::Half*>(nullptr));
      break;
    case at::kBFloat16:
      f(static_cast<c10::BFloat16*>(nullptr));
      break;
    default:
      TORCH_CHECK(false, "gradstab: unsupported dtype ", dtype);
  }
}

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// A gradient as the kernels see it: a flat run of `numel` elements. For a gradient whose memory
// is not one dense block, `work` is a contiguous copy that is written back at the end.
struct FlatGrad {
  at::Tensor work;
  void* data;
  int64_t numel;
  at::ScalarType dtype;
  bool is_copy;
};

std::vector<FlatGrad> flatten_grads(at::TensorList grads) {
  std::vector<FlatGrad> flat;
  flat.reserve(grads.size());
  for (const at::Tensor& g : grads) {
    // A non-overlapping and dense tensor occupies exactly numel consecutive elements starting at
    // its data pointer (strides are never negative), in some order: elementwise work can treat
    // it as flat.
    bool dense = g.is_non_overlapping_and_dense();
    at::Tensor work = dense ? g : g.contiguous();
    flat.push_back({work, work.data_ptr(), work.numel(), work.scalar_type(), !dense});
  }
  return flat;
}

std::vector<Chunk> make_chunks(const std::vector<FlatGrad>& flat) {
  std::vector<Chunk> chunks;
  for (int64_t t = 0; t < static_cast<int64_t>(flat.size()); ++t) {
    for (int64_t b = 0; b < flat[t].numel; b += kChunkElems) {
      chunks.push_back({t, b, std::min(b + kChunkElems, flat[t].numel)});
    }
  }
  return chunks;
}

template <typename F>
void for_each_chunk(const std::vector<Chunk>& chunks, int64_t total_elems, const F& f) {
  const int64_t n = static_cast<int64_t>(chunks.size());
  const int64_t grain = total_elems < kMinParallelElems ? std::max<int64_t>(n, 1) : 1;
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) f(c);
  });
}

std::string nonfinite_message(const std::vector<double>& norms) {
  std::ostringstream msg;
  msg << "gradstab: non-finite gradient norm with nonfinite='raise' (";
  bool first = true;
  for (size_t i = 0; i < norms.size(); ++i) {
    if (!is_finite(norms[i])) {
      msg << (first ? "grads[" : ", grads[") << i << "]";
      first = false;
    }
  }
  msg << (first ? "the global norm overflowed" : "") << "); nothing was changed";
  return msg.str();
}

at::Tensor stabilize_cpu(at::TensorList grads, at::Tensor& m, at::Tensor& v, at::Tensor& k,
                         const std::optional<at::Tensor>& found_inf, double gamma1, double gamma2,
                         double eps, bool bias_correction, bool global_norm, int64_t nonfinite,
                         std::optional<double> spike_guard) {
  const StabilizerConfig cfg =
      make_config(gamma1, gamma2, eps, bias_correction, nonfinite, spike_guard);
  check_tensors(grads, m, v, k, found_inf, global_norm, c10::Device(c10::kCPU));

  const int64_t num_grads = static_cast<int64_t>(grads.size());
  std::vector<FlatGrad> flat = flatten_grads(grads);
  std::vector<Chunk> chunks = make_chunks(flat);
  int64_t total_elems = 0;
  for (const FlatGrad& f : flat) total_elems += f.numel;

  std::vector<double> chunk_sumsq(chunks.size());
  for_each_chunk(chunks, total_elems, [&](int64_t c) {
    const Chunk& ch = chunks[c];
    const FlatGrad& g = flat[ch.tensor];
    dispatch_float_types(g.dtype, [&](auto* typed) {
      using scalar_t = std::remove_pointer_t<decltype(typed)>;
      chunk_sumsq[c] =
          sum_squares(static_cast<const scalar_t*>(g.data) + ch.begin, ch.end - ch.begin);
    });
  });

  std::vector<double> sumsq(num_grads, 0.0);
  for (size_t c = 0; c < chunks.size(); ++c) sumsq[chunks[c].tensor] += chunk_sumsq[c];
  std::vector<double> norms(num_grads);
  for (int64_t t = 0; t < num_grads; ++t) norms[t] = std::sqrt(sumsq[t]);

  const bool skip_step = found_inf.has_value() && found_inf->item<double>() > 0.0;

  double global = 0.0;
  if (global_norm) {
    double total = 0.0;
    for (double s : sumsq) total += s;
    global = std::sqrt(total);
  }
  if (cfg.nonfinite == kNonfiniteRaise && !skip_step) {
    bool bad = global_norm && !is_finite(global);
    for (double n : norms) bad = bad || !is_finite(n);
    TORCH_CHECK(!bad, nonfinite_message(norms));
  }

  double* m_data = m.data_ptr<double>();
  double* v_data = v.data_ptr<double>();
  int64_t* k_data = k.data_ptr<int64_t>();
  std::vector<StepDecision> decisions(num_grads);
  if (global_norm) {
    StepDecision d = stabilize_step(global, skip_step, cfg, m_data, v_data, k_data);
    for (auto& slot : decisions) slot = d;
  } else {
    for (int64_t t = 0; t < num_grads; ++t) {
      decisions[t] = stabilize_step(norms[t], skip_step, cfg, m_data + t, v_data + t, k_data + t);
    }
  }

  for_each_chunk(chunks, total_elems, [&](int64_t c) {
    const Chunk& ch = chunks[c];
    const StepDecision& d = decisions[ch.tensor];
    if (d.action == kLeaveGrad) return;
    const FlatGrad& g = flat[ch.tensor];
    dispatch_float_types(g.dtype, [&](auto* typed) {
      using scalar_t = std::remove_pointer_t<decltype(typed)>;
      scalar_t* data = static_cast<scalar_t*>(g.data) + ch.begin;
      if (d.action == kZeroGrad) {
        std::fill(data, data + (ch.end - ch.begin), scalar_t(0));
      } else {
        scale_in_place(data, ch.end - ch.begin, d.factor);
      }
    });
  });
  for (int64_t t = 0; t < num_grads; ++t) {
    if (flat[t].is_copy && decisions[t].action != kLeaveGrad) {
      grads[t].copy_(flat[t].work);
    }
  }

  at::Tensor out = at::empty({num_grads}, m.options().dtype(at::kFloat));
  float* out_data = out.data_ptr<float>();
  for (int64_t t = 0; t < num_grads; ++t) out_data[t] = static_cast<float>(norms[t]);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gradstab, CPU, m) {
  m.impl("stabilize_", &stabilize_cpu);
}

}  // namespace gradstab
