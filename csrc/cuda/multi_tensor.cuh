// The chunked multi-tensor launcher: one 1-D grid covers every chunk of every tensor of a list,
// whatever the number of tensors and their sizes. multi_tensor_plan.h holds the index arithmetic;
// this file holds what needs CUDA: the device view of the list, the upload of its metadata, and
// the block-wide reduction the kernels share.
//
// NOTE: [metadata upload and CUDA graphs]
// The kernels need, per tensor, its data pointer, element count, dtype and first chunk: O(T)
// bytes, far beyond what kernel arguments can carry for thousands of tensors. They are written
// into the head of one device buffer (the caching allocator's) together with zeroed completion
// counters; the rest of the buffer is scratch that the kernels fill (chunk partial sums, tensor
// sums of squares, decisions).
//
// Eager (the default path): the head is staged in pinned memory from the caching host allocator
// and copied with one cudaMemcpyAsync on the current stream; the pinned block is handed back
// with an event recorded on that stream, so it is reused only after the copy. No host sync, no
// allocation outside the two caching allocators.
//
// Under stream capture the metadata must still be right at every replay, and it depends only on
// the tensor list, which a graph fixes (its replays see the same addresses). So the buffer is
// filled once, at capture time, and not by a graph node: it is allocated on a private upload
// stream (so that it comes from the ordinary pool, not from the graph's pool, where memory that
// earlier nodes of the graph use as scratch could be handed out again and overwritten at
// replay), filled by a synchronous copy on that stream (under relaxed capture mode for this
// thread; capture time is not the hot path), and handed to the graph as a CUDA user object, so
// it lives exactly as long as the graph: when the graph and its executable instances are
// destroyed (after their pending launches) CUDA calls our destructor, which may not call CUDA, so
// it only queues the buffer; the next call of the op frees the queue. The graph itself holds only
// the kernels. The completion counters are reset by the block that finishes with them, so every
// replay finds them at zero.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <functional>
#include <vector>

#include "multi_tensor_plan.h"

namespace gradstab {
namespace cuda {

// The list as the kernels see it; every pointer points into the uploaded head of the buffer.
struct TensorListView {
  int64_t num_tensors;
  const int64_t* first_chunk;
  void* const* data;
  const int64_t* numel;
  const uint8_t* dtype;
};

// Where block `chunk` of the grid works.
struct ChunkRef {
  int64_t tensor;
  int64_t chunk_in_tensor;
  ChunkSpan span;
};

__device__ inline ChunkRef locate_chunk(const TensorListView& list, int64_t chunk) {
  const int64_t t = tensor_of_chunk(list.first_chunk, list.num_tensors, chunk);
  const int64_t in_tensor = chunk - list.first_chunk[t];
  return {t, in_tensor, chunk_span(list.numel[t], in_tensor)};
}

DtypeCode dtype_code(at::ScalarType dtype);

// Regions of the caller's own in the same buffer: `upload_bytes` of metadata at
// layout().extra_upload, written on the host by `fill` (into zeroed memory) and uploaded with the
// list's, and `scratch_bytes` at layout().extra_scratch for its kernels to write.
struct ExtraRegions {
  size_t upload_bytes = 0;
  std::function<void(uint8_t* host)> fill;
  size_t scratch_bytes = 0;
};

// A list of non-overlapping-and-dense tensors on one CUDA device, chunked, with its metadata
// uploaded (see the NOTE above) for kernels on `stream`, the device's current stream. Read the
// scratch regions through region(); call finish() after the last kernel that uses the buffer.
class ChunkedList {
 public:
  ChunkedList(const std::vector<at::Tensor>& tensors, c10::cuda::CUDAStream stream,
              ExtraRegions extra = {});

  int64_t num_tensors() const { return num_tensors_; }
  int64_t num_chunks() const { return num_chunks_; }
  const ListLayout& layout() const { return layout_; }
  bool capturing() const { return capturing_; }
  TensorListView view() const;

  template <typename T>
  T* region(size_t offset) const {
    return reinterpret_cast<T*>(static_cast<uint8_t*>(buffer_.data_ptr()) + offset);
  }
  // A tensor view of a scratch region (for the host-side check of nonfinite="raise").
  at::Tensor region_tensor(size_t offset, int64_t count, at::ScalarType dtype) const;

  // Under capture: hands the buffer to the graph being captured, which keeps it alive.
  void finish();

 private:
  void stage(uint8_t* host, const std::vector<at::Tensor>& tensors) const;

  int64_t num_tensors_;
  int64_t num_chunks_;
  std::vector<int64_t> first_chunk_;
  ListLayout layout_;
  bool capturing_;
  c10::cuda::CUDAStream stream_;
  ExtraRegions extra_;
  at::Tensor buffer_;
};

// Whether work on `stream` is being captured into a CUDA graph.
bool is_capturing(cudaStream_t stream);

// Frees the buffers of destroyed CUDA graphs (see the NOTE above).
void release_retired_buffers();

// Sum over the block, in a fixed order whatever the timing: a shuffle tree within each warp,
// then one over the warps' sums. The result is valid in thread 0. `scratch` holds kThreads / 32
// doubles; all threads of the block must call this.
__device__ inline double block_sum(double x, double* scratch) {
  constexpr int kWarps = kThreads / 32;
  static_assert(kThreads % 32 == 0 && kWarps <= 32, "block_sum needs whole warps, at most 32");
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_down_sync(0xffffffffu, x, offset);
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  __syncthreads();  // an earlier call may still be reading `scratch`
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  if (warp == 0) {
    x = lane < kWarps ? scratch[lane] : 0.0;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_down_sync(0xffffffffu, x, offset);
  }
  return x;
}

}  // namespace cuda
}  // namespace gradstab
