// Host side of the multi-tensor launcher: planning, the metadata upload and the lifetime of the
// buffer under CUDA graph capture. See NOTE: [metadata upload and CUDA graphs] in
// multi_tensor.cuh.
#include <ATen/core/CachingHostAllocator.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstring>
#include <mutex>
#include <utility>

#include "multi_tensor.cuh"

namespace gradstab {
namespace cuda {
namespace {

struct RetiredBuffers {
  std::mutex mutex;
  std::vector<at::Tensor> buffers;
};

RetiredBuffers& retired() {
  // Never destroyed: a graph may be destroyed during interpreter shutdown.
  static auto* instance = new RetiredBuffers();
  return *instance;
}

// Runs on a CUDA-internal thread once a graph that owned the buffer is gone; may not call CUDA.
void retire_buffer(void* owned) {
  auto* buffer = static_cast<at::Tensor*>(owned);
  {
    std::lock_guard<std::mutex> lock(retired().mutex);
    retired().buffers.push_back(std::move(*buffer));
  }
  delete buffer;
}

// A non-blocking stream per device, used only to allocate and fill buffers at capture time: it
// can never be the stream being captured, and the caching allocator serves it from its ordinary
// pool.
cudaStream_t upload_stream(c10::DeviceIndex device) {
  static std::mutex mutex;
  static std::vector<cudaStream_t> streams(c10::cuda::device_count(), nullptr);
  std::lock_guard<std::mutex> lock(mutex);
  cudaStream_t& stream = streams.at(device);
  if (stream == nullptr) {
    C10_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  }
  return stream;
}

}  // namespace

void release_retired_buffers() {
  std::vector<at::Tensor> buffers;
  {
    std::lock_guard<std::mutex> lock(retired().mutex);
    buffers.swap(retired().buffers);
  }
}

DtypeCode dtype_code(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return kCodeFloat;
    case at::kDouble:
      return kCodeDouble;
    case at::kHalf:
      return kCodeHalf;
    case at::kBFloat16:
      return kCodeBFloat16;
    default:
      TORCH_CHECK(false, "gradstab: no CUDA kernel for dtype ", dtype);
  }
}

bool is_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  TORCH_CHECK(status != cudaStreamCaptureStatusInvalidated,
              "gradstab: the current stream's CUDA graph capture was invalidated");
  return status == cudaStreamCaptureStatusActive;
}

ChunkedList::ChunkedList(const std::vector<at::Tensor>& tensors, c10::cuda::CUDAStream stream,
                         ExtraRegions extra)
    : num_tensors_(static_cast<int64_t>(tensors.size())),
      stream_(stream),
      extra_(std::move(extra)) {
  first_chunk_.resize(num_tensors_ + 1);
  first_chunk_[0] = 0;
  for (int64_t t = 0; t < num_tensors_; ++t) {
    first_chunk_[t + 1] = first_chunk_[t] + chunks_of(tensors[t].numel());
  }
  num_chunks_ = first_chunk_[num_tensors_];
  TORCH_CHECK(num_chunks_ <= kMaxChunks, "gradstab: the gradients hold ", num_chunks_,
              " chunks of ", kChunkElems, " elements; one call takes at most ", kMaxChunks);
  layout_ = plan_layout(num_tensors_, num_chunks_, extra_.upload_bytes, extra_.scratch_bytes);
  capturing_ = is_capturing(stream_.stream());
  const auto bytes = static_cast<int64_t>(layout_.total_bytes);
  const auto options = at::TensorOptions().dtype(at::kByte).device(stream_.device());

  if (!capturing_) {
    buffer_ = at::empty({bytes}, options);
    at::HostAllocator* host_allocator = at::getHostAllocator(at::kCUDA);
    at::DataPtr staging = host_allocator->allocate(layout_.upload_bytes);
    stage(static_cast<uint8_t*>(staging.get()), tensors);
    C10_CUDA_CHECK(cudaMemcpyAsync(buffer_.data_ptr(), staging.get(), layout_.upload_bytes,
                                   cudaMemcpyHostToDevice, stream_.stream()));
    // The pinned block is reused only once the copy is done.
    TORCH_CHECK(
        host_allocator->record_event(staging.get(), staging.get_context(), stream_.unwrap()),
        "gradstab: the pinned staging buffer does not come from the caching host allocator");
    return;
  }

  std::vector<uint8_t> staging(layout_.upload_bytes);
  stage(staging.data(), tensors);
  const c10::cuda::CUDAStreamCaptureModeGuard relaxed(cudaStreamCaptureModeRelaxed);
  const cudaStream_t upload = upload_stream(stream_.device_index());
  {
    const c10::cuda::CUDAStreamGuard on_upload(
        c10::cuda::getStreamFromExternal(upload, stream_.device_index()));
    buffer_ = at::empty({bytes}, options);
  }
  C10_CUDA_CHECK(cudaMemcpyAsync(buffer_.data_ptr(), staging.data(), layout_.upload_bytes,
                                 cudaMemcpyHostToDevice, upload));
  C10_CUDA_CHECK(cudaStreamSynchronize(upload));
}

void ChunkedList::stage(uint8_t* host, const std::vector<at::Tensor>& tensors) const {
  std::memset(host, 0, layout_.upload_bytes);  // the counters start at zero
  std::memcpy(host + layout_.first_chunk, first_chunk_.data(),
              first_chunk_.size() * sizeof(int64_t));
  auto* data = reinterpret_cast<void**>(host + layout_.data);
  auto* numel = reinterpret_cast<int64_t*>(host + layout_.numel);
  auto* dtype = host + layout_.dtype;
  for (int64_t t = 0; t < num_tensors_; ++t) {
    data[t] = tensors[t].data_ptr();
    numel[t] = tensors[t].numel();
    dtype[t] = dtype_code(tensors[t].scalar_type());
  }
  if (extra_.upload_bytes > 0) extra_.fill(host + layout_.extra_upload);
}

TensorListView ChunkedList::view() const {
  return {num_tensors_, region<const int64_t>(layout_.first_chunk),
          region<void* const>(layout_.data), region<const int64_t>(layout_.numel),
          region<const uint8_t>(layout_.dtype)};
}

at::Tensor ChunkedList::region_tensor(size_t offset, int64_t count, at::ScalarType dtype) const {
  const int64_t item = static_cast<int64_t>(c10::elementSize(dtype));
  return buffer_.narrow(0, static_cast<int64_t>(offset), count * item).view(dtype);
}

void ChunkedList::finish() {
  if (!capturing_) return;
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  cudaGraph_t graph = nullptr;
  C10_CUDA_CHECK(cudaStreamGetCaptureInfo(stream_.stream(), &status, nullptr, &graph));
  TORCH_CHECK(status == cudaStreamCaptureStatusActive && graph != nullptr,
              "gradstab: the CUDA graph capture ended while gradstab::stabilize_ was running");
  auto* owned = new at::Tensor(buffer_);
  cudaUserObject_t object = nullptr;
  const cudaError_t created =
      cudaUserObjectCreate(&object, owned, &retire_buffer, 1, cudaUserObjectNoDestructorSync);
  if (created != cudaSuccess) delete owned;
  C10_CUDA_CHECK(created);
  const cudaError_t retained = cudaGraphRetainUserObject(graph, object, 1, cudaGraphUserObjectMove);
  // On failure our reference is still ours: dropping it queues the buffer for release.
  if (retained != cudaSuccess) C10_CUDA_CHECK_WARN(cudaUserObjectRelease(object, 1));
  C10_CUDA_CHECK(retained);
}

}  // namespace cuda
}  // namespace gradstab
