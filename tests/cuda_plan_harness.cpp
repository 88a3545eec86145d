// Runs the index arithmetic of the CUDA multi-tensor launcher (csrc/cuda/multi_tensor_plan.h) on
// the host, where no GPU is needed: chunk planning, the chunk -> tensor search, 64-bit chunk
// spans, the per-thread element order of a chunk (every element exactly once, loads before
// uses) and the buffer layout. Built and run by tests/test_cuda_plan.py; exits non-zero and
// says what failed on the first wrong answer.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "cuda/multi_tensor_plan.h"

using namespace gradstab::cuda;

namespace {

int64_t checks = 0;

#define EXPECT(cond, ...)                                                    \
  do {                                                                       \
    ++checks;                                                                \
    if (!(cond)) {                                                           \
      std::fprintf(stderr, "FAILED %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                                     \
      std::fprintf(stderr, "\n");                                            \
      std::exit(1);                                                          \
    }                                                                        \
  } while (0)

std::vector<int64_t> prefix_chunks(const std::vector<int64_t>& numels) {
  std::vector<int64_t> first(numels.size() + 1, 0);
  for (size_t t = 0; t < numels.size(); ++t) first[t + 1] = first[t] + chunks_of(numels[t]);
  return first;
}

void check_chunks_of() {
  EXPECT(chunks_of(0) == 1, "an empty tensor owns one chunk");
  EXPECT(chunks_of(1) == 1, "numel 1");
  EXPECT(chunks_of(kChunkElems - 1) == 1, "one short of a chunk");
  EXPECT(chunks_of(kChunkElems) == 1, "one chunk");
  EXPECT(chunks_of(kChunkElems + 1) == 2, "one past a chunk");
  const int64_t big = (int64_t{1} << 31) + 12345;
  EXPECT(chunks_of(big) == (big + kChunkElems - 1) / kChunkElems, "%lld", (long long)big);
}

// Every chunk of every tensor maps back to its tensor, and the spans of a tensor tile it.
void check_list(const std::vector<int64_t>& numels) {
  const std::vector<int64_t> first = prefix_chunks(numels);
  const int64_t num_tensors = static_cast<int64_t>(numels.size());
  for (int64_t t = 0; t < num_tensors; ++t) {
    int64_t covered = 0;
    for (int64_t c = first[t]; c < first[t + 1]; ++c) {
      const int64_t found = tensor_of_chunk(first.data(), num_tensors, c);
      EXPECT(found == t, "chunk %lld belongs to tensor %lld, search says %lld", (long long)c,
             (long long)t, (long long)found);
      const ChunkSpan span = chunk_span(numels[t], c - first[t]);
      EXPECT(span.begin == covered, "tensor %lld chunk %lld begins at %lld, expected %lld",
             (long long)t, (long long)c, (long long)span.begin, (long long)covered);
      EXPECT(span.len >= 0 && span.len <= kChunkElems, "len %d", span.len);
      EXPECT(span.len > 0 || numels[t] == 0, "only an empty tensor has an empty chunk");
      covered += span.len;
    }
    EXPECT(covered == numels[t], "tensor %lld: chunks cover %lld of %lld elements", (long long)t,
           (long long)covered, (long long)numels[t]);
  }
}

void check_lists() {
  check_list({0});
  check_list({1});
  check_list({kChunkElems});
  check_list({0, 0, 0});
  check_list({5, 0, kChunkElems + 1, 0, 3 * kChunkElems, 1});
  // More than 2^31 elements: chunk offsets need 64 bits.
  check_list({(int64_t{1} << 31) + 7, 3, (int64_t{1} << 32) + kChunkElems - 1});
  std::mt19937_64 rng(12345);
  for (int round = 0; round < 20; ++round) {
    std::vector<int64_t> numels(1 + rng() % 700);
    for (int64_t& n : numels) {
      const int kind = static_cast<int>(rng() % 4);
      n = kind == 0   ? 0
          : kind == 1 ? static_cast<int64_t>(rng() % 50)
                      : static_cast<int64_t>(rng() % (5 * kChunkElems));
    }
    check_list(numels);
  }
}

// NOTE: [thread order of a chunk], checked for every thread of a block.
template <int W>
void check_visit(int32_t len, int num_threads) {
  std::vector<int> visits(static_cast<size_t>(len), 0);
  for (int tid = 0; tid < num_threads; ++tid) {
    int32_t loaded[kUnroll];
    for (int32_t& l : loaded) l = -1;
    int32_t last_element = -1;
    auto touch = [&](int32_t e) {
      EXPECT(e >= 0 && e < len, "element %d outside [0, %d)", e, len);
      EXPECT(e > last_element, "thread %d visits %d after %d", tid, e, last_element);
      last_element = e;
      ++visits[e];
    };
    visit_chunk<W>(
        tid, num_threads, len,
        [&](int u, int32_t vec) {
          EXPECT(vec % num_threads == tid, "thread %d loads vector %d", tid, vec);
          loaded[u] = vec;
        },
        [&](int u, int32_t vec) {
          EXPECT(loaded[u] == vec, "slot %d holds vector %d, used as %d", u, loaded[u], vec);
          for (int j = 0; j < W; ++j) touch(vec * W + j);
        },
        [&](int32_t begin, int32_t end) {
          EXPECT(end - begin < W && end == len, "tail [%d, %d) of %d", begin, end, len);
          EXPECT(tid == len / W % num_threads, "the tail belongs to thread %d, not %d",
                 len / W % num_threads, tid);
          for (int32_t e = begin; e < end; ++e) touch(e);
        });
  }
  for (int32_t e = 0; e < len; ++e) {
    EXPECT(visits[e] == 1, "W=%d len=%d: element %d visited %d times", W, len, e, visits[e]);
  }
}

template <int W>
void check_visits() {
  const int32_t block = kThreads * W;
  const int32_t sizes[] = {0,
                           1,
                           W - 1,
                           W,
                           W + 1,
                           block - 1,
                           block,
                           block + 1,
                           block * kUnroll - 1,
                           block * kUnroll,
                           block * kUnroll + W + 1,
                           12345,
                           static_cast<int32_t>(kChunkElems) - 1,
                           static_cast<int32_t>(kChunkElems)};
  for (int32_t len : sizes) {
    if (len >= 0 && len <= kChunkElems) check_visit<W>(len, kThreads);
  }
  check_visit<W>(1000, 32);
}

void check_layout(int64_t num_tensors, int64_t num_chunks, size_t extra_bytes = 0,
                  size_t scratch_bytes = 0) {
  const ListLayout l = plan_layout(num_tensors, num_chunks, extra_bytes, scratch_bytes);
  const size_t t = static_cast<size_t>(num_tensors);
  struct Region {
    size_t offset;
    size_t bytes;
  } regions[] = {
      {l.first_chunk, (t + 1) * 8},
      {l.data, t * sizeof(void*)},
      {l.numel, t * 8},
      {l.dtype, t},
      {l.tensor_done, t * 4},
      {l.list_done, 4},
      {l.extra_upload, extra_bytes},
      {l.partial, static_cast<size_t>(num_chunks) * 8},
      {l.sumsq, (t + 1) * 8},
      {l.decision, t * sizeof(Decision)},
      {l.extra_scratch, scratch_bytes},
  };
  size_t end = 0;
  for (const Region& r : regions) {
    EXPECT(r.offset % 16 == 0, "region at %zu is not 16-byte aligned", r.offset);
    EXPECT(r.offset >= end, "region at %zu overlaps the previous one (ends at %zu)", r.offset, end);
    end = r.offset + r.bytes;
  }
  EXPECT(l.upload_bytes >= l.extra_upload + extra_bytes && l.upload_bytes <= l.partial,
         "the upload must cover the metadata and counters and nothing the kernels write");
  EXPECT(l.total_bytes >= end, "total %zu < %zu", l.total_bytes, end);
  EXPECT(sizeof(Decision) == 16, "Decision is %zu bytes", sizeof(Decision));
}

}  // namespace

int main() {
  check_chunks_of();
  check_lists();
  check_visits<2>();  // float64
  check_visits<4>();  // float32
  check_visits<8>();  // float16, bfloat16
  check_layout(1, 1);
  check_layout(3, 7);
  check_layout(5000, 5000);
  check_layout(291, 102400);
  check_layout(3, 7, 1);  // stabilized_adamw_'s pointers and groups, and its bias corrections
  check_layout(3, 7, 1, 1);
  check_layout(291, 102400, 291 * 48 + 5 * 40, 291 * 16);
  std::printf("%lld checks passed\n", static_cast<long long>(checks));
  return 0;
}
