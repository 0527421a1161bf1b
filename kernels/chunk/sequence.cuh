// A block's walk over its sequence: where the sequence lies (SequenceSpan), the chunks in order with the next
// chunk's cp.async in flight (walk_chunks, two stages), a warp's rows written to global memory (store_rows), and
// the stream a launch runs on (stream_of).
#pragma once

#include "chunk/fragments.cuh"

#include <cstdint>
#include <type_traits>

namespace flowformer::chunk::FF_SIMT_BUILD {

#if defined(__CUDACC__)
inline simt::Stream stream_of(void* stream) { return static_cast<cudaStream_t>(stream); }
#else
inline simt::Stream stream_of(void*) { return {}; }  // emulated launches are synchronous
#endif

// Where one block's sequence lies: batch, first row and length, from cu_seqlens or the batch index.
struct SequenceSpan {
  int64_t batch, first, length;

  FF_DEVICE static SequenceSpan of(const int64_t* cu_seqlens, int n, int64_t L) {
    if (cu_seqlens == nullptr) {
      return {n, 0, L};
    }
    return {0, cu_seqlens[n], cu_seqlens[n + 1] - cu_seqlens[n]};
  }
  // The first row of this sequence in a (B, H, L, .) input with (batch, head, row) strides.
  template <typename T>
  FF_DEVICE const T* rows(const void* x, const int64_t (&stride)[3], int head) const {
    return static_cast<const T*>(x) + batch * stride[0] + head * stride[1] + first * stride[2];
  }
  FF_DEVICE int64_t chunks() const { return (length + kChunkRows - 1) / kChunkRows; }
  // Segment g of `rows` rows (rows = 0: the whole span); past the end it is empty.
  FF_DEVICE SequenceSpan segment(int g, int64_t rows) const {
    if (rows == 0) {
      return *this;
    }
    const int64_t start = g * rows < length ? g * rows : length;
    return {batch, first + start, length - start < rows ? length - start : rows};
  }
};

// Walks `chunks` chunks in order (or reversed): load(c, stage) issues the cp.async of chunk c into a stage,
// body(c, stage) runs once its tiles landed and are visible, with two stages while the next chunk's load (one
// stage: each load waited for, for blocks whose second stage would not fit the shared memory). body ends with a
// barrier after its last read of the stage.
template <int Stages = 2, typename Load, typename Body>
FF_DEVICE void walk_chunks(int64_t chunks, bool reverse, const Load& load, const Body& body) {
  static_assert(Stages == 1 || Stages == 2, "one or two stages");
  const auto chunk = [&](int64_t i) { return reverse ? chunks - 1 - i : i; };
  if (Stages == 2 && chunks > 0) {
    load(chunk(0), 0);
    simt::cp_async_commit();
  }
  for (int64_t i = 0; i < chunks; ++i) {
    const int stage = int(i % Stages);
    if (Stages == 1) {
      load(chunk(i), 0);  // the stage's last readers passed the barrier that ended chunk i - 1
    } else if (i + 1 < chunks) {
      load(chunk(i + 1), 1 - stage);  // that stage's last readers passed the barrier that ended chunk i - 1
    }
    simt::cp_async_commit();
    simt::cp_async_wait<Stages - 1>();
    __syncthreads();
    body(chunk(i), stage);
  }
}

// Writes the columns [0, N) of the warp's rows of a chunk as T pairs (16-bit or float): row r (r < left) at
// rows + r row_stride, element e of n tile n = value(n, e).
template <typename T, int N, typename Value>
FF_DEVICE void store_rows(const Lane& l, T* rows, int64_t row_stride, int64_t left, const Value& value) {
  FF_UNROLL
  for (int i = 0; i < 2; ++i) {
    const int row = l.row(2 * i);
    if (row < left) {
      T* r = rows + row * row_stride;
      FF_UNROLL
      for (int n = 0; n < N / 8; ++n) {
        T* at = r + n * 8 + 2 * l.t;
        if constexpr (std::is_same_v<T, float>) {
          simt::store_global(at, value(n, 2 * i));
          simt::store_global(at + 1, value(n, 2 * i + 1));
        } else {
          simt::store_global(reinterpret_cast<uint32_t*>(at), simt::pack_floats<T>(value(n, 2 * i), value(n, 2 * i + 1)));
        }
      }
    }
  }
}

}  // namespace flowformer::chunk::FF_SIMT_BUILD
