// The index arithmetic of the multi-tensor launcher (multi_tensor.cuh), free of CUDA and torch
// headers so that the host can run exactly the code the kernels run: tests/cuda_plan_harness.cpp
// compiles this file with g++ and checks it on machines without a GPU.
//
// A list of T tensors is cut into chunks of kChunkElems elements; chunk c of the whole list is
// block c of a 1-D grid. Tensor t owns chunks [first_chunk[t], first_chunk[t + 1]); an empty
// tensor owns one chunk of length 0, so that every tensor has a block that finishes it.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../stabilize_math.h"

namespace gradstab {
namespace cuda {

constexpr int64_t kChunkElems = 1 << 16;
// Threads per block of every kernel of the launcher.
constexpr int kThreads = 256;
// Independent 16-byte loads each thread keeps in flight.
constexpr int kUnroll = 4;
// The grid is 1-D: at most this many chunks in one list.
constexpr int64_t kMaxChunks = 0x7fffffff;

// The dtype of a tensor as the kernels switch on it.
enum DtypeCode : uint8_t { kCodeFloat = 0, kCodeDouble = 1, kCodeHalf = 2, kCodeBFloat16 = 3 };

GRADSTAB_HOST_DEVICE inline int64_t chunks_of(int64_t numel) {
  return numel <= 0 ? 1 : (numel + kChunkElems - 1) / kChunkElems;
}

// The tensor that owns chunk `chunk`: the last t with first_chunk[t] <= chunk. first_chunk holds
// num_tensors + 1 non-decreasing entries with first_chunk[0] == 0 <= chunk < first_chunk[T].
GRADSTAB_HOST_DEVICE inline int64_t tensor_of_chunk(const int64_t* first_chunk, int64_t num_tensors,
                                                    int64_t chunk) {
  int64_t lo = 0;
  int64_t hi = num_tensors;  // invariant: first_chunk[lo] <= chunk < first_chunk[hi]
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (first_chunk[mid] <= chunk) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// The elements [begin, begin + len) of a tensor of `numel` elements that its chunk number
// `chunk_in_tensor` covers. Offsets are 64-bit: a tensor may hold more than 2^31 elements.
struct ChunkSpan {
  int64_t begin;
  int32_t len;
};

GRADSTAB_HOST_DEVICE inline ChunkSpan chunk_span(int64_t numel, int64_t chunk_in_tensor) {
  const int64_t begin = chunk_in_tensor * kChunkElems;
  const int64_t rest = numel - begin;
  return {begin, static_cast<int32_t>(rest < kChunkElems ? (rest > 0 ? rest : 0) : kChunkElems)};
}

// NOTE: [thread order of a chunk]
// A chunk of `len` elements is read as len / W vectors of W elements (16 bytes), then a tail of
// len % W elements. Thread `tid` of `num_threads` takes vectors tid, tid + num_threads, ... in
// that order, Unroll (default kUnroll) at a time (all loads of a batch before the first use, to
// keep several in flight); the tail belongs to the thread whose turn vector number len / W would
// be. Aligned tensors load each vector with one 16-byte access, the others element by element, but
// both visit the same elements in the same order: the floating-point sums, and so every result bit,
// do not depend on the alignment of the data.
//
// load(slot, vec) reads vector `vec` into register slot `slot`; use(slot, vec) consumes it;
// tail(begin, end) handles elements [begin, end). The kernels of stabilize.cu and adamw.cu and
// the host harness go through this function.
template <int W, int Unroll = kUnroll, typename Load, typename Use, typename Tail>
GRADSTAB_HOST_DEVICE inline void visit_chunk(int tid, int num_threads, int32_t len, Load&& load,
                                             Use&& use, Tail&& tail) {
  const int32_t num_vecs = len / W;
  for (int32_t base = tid; base < num_vecs; base += Unroll * num_threads) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int u = 0; u < Unroll; ++u) {
      const int32_t vec = base + u * num_threads;
      if (vec < num_vecs) load(u, vec);
    }
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int u = 0; u < Unroll; ++u) {
      const int32_t vec = base + u * num_threads;
      if (vec < num_vecs) use(u, vec);
    }
  }
  if (num_vecs * W < len && num_vecs % num_threads == tid) tail(num_vecs * W, len);
}

// Whether `ptr` allows 16-byte vector access.
GRADSTAB_HOST_DEVICE inline bool is_vector_aligned(const void* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
}

// Byte offsets of the regions of the one device buffer a step uses. [0, upload_bytes) is written
// from the host before the kernels run (tensor metadata, and zeroed counters); the rest is
// written by the kernels. Every region starts on a 16-byte boundary.
struct ListLayout {
  size_t first_chunk;   // int64_t[T + 1]
  size_t data;          // void*[T]
  size_t numel;         // int64_t[T]
  size_t dtype;         // uint8_t[T] (DtypeCode)
  size_t tensor_done;   // uint32_t[T]: chunks of tensor t whose partial sum is written
  size_t list_done;     // uint32_t[1]: tensors whose sum of squares is written
  size_t extra_upload;  // the caller's own metadata (extra_upload_bytes of plan_layout)
  size_t upload_bytes;
  size_t partial;        // double[num_chunks]: sum of squares of each chunk
  size_t sumsq;          // double[T + 1]: of each tensor, then of the whole list
  size_t decision;       // Decision[T] (Decision[1] for the global norm)
  size_t extra_scratch;  // the caller's own results (extra_scratch_bytes of plan_layout)
  size_t total_bytes;
};

// What the scale kernel does to a tensor: a GradAction and its factor (stabilize_math.h).
struct Decision {
  double factor;
  int32_t action;
  int32_t unused;
};

GRADSTAB_HOST_DEVICE inline size_t align16(size_t n) {
  return (n + 15) / 16 * 16;
}

// Places regions one after another in a buffer, each on a 16-byte boundary.
class RegionCursor {
 public:
  // The offset of a new region of `bytes` bytes.
  size_t take(size_t bytes) {
    const size_t start = end_;
    end_ = align16(end_ + bytes);
    return start;
  }
  size_t end() const { return end_; }

 private:
  size_t end_ = 0;
};

inline ListLayout plan_layout(int64_t num_tensors, int64_t num_chunks,
                              size_t extra_upload_bytes = 0, size_t extra_scratch_bytes = 0) {
  const size_t t = static_cast<size_t>(num_tensors);
  ListLayout l{};
  RegionCursor cursor;
  l.first_chunk = cursor.take((t + 1) * sizeof(int64_t));
  l.data = cursor.take(t * sizeof(void*));
  l.numel = cursor.take(t * sizeof(int64_t));
  l.dtype = cursor.take(t * sizeof(uint8_t));
  l.tensor_done = cursor.take(t * sizeof(uint32_t));
  l.list_done = cursor.take(sizeof(uint32_t));
  l.extra_upload = cursor.take(extra_upload_bytes);
  l.upload_bytes = cursor.end();
  l.partial = cursor.take(static_cast<size_t>(num_chunks) * sizeof(double));
  l.sumsq = cursor.take((t + 1) * sizeof(double));
  l.decision = cursor.take(t * sizeof(Decision));
  l.extra_scratch = cursor.take(extra_scratch_bytes);
  l.total_bytes = cursor.end();
  return l;
}

}  // namespace cuda
}  // namespace gradstab
