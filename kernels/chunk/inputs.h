// What a chunked kernel's call reads (host and device code, torch-free): the inputs' element type, the inputs
// (N sequences of H heads, rows of D or M elements), and the split of long sequences into segments.
#pragma once

#include "chunk/shape.h"
#include "common/feature_map_kind.h"

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace flowformer::chunk {

// The inputs' dtype: bf16 and half multiply on tensor cores as they are, float32 as three tf32 products.
enum class Element { bf16, half, float32 };
constexpr std::size_t element_bytes(Element e) { return e == Element::float32 ? 4 : 2; }

// The inputs of one call: N sequences of H heads (Element) whose rows (the last axis) have a unit stride and
// start on 16 bytes; strides in elements, per batch, head and row. A kernel that reads only some of q, k, v
// ignores the others.
struct Inputs {
  const void *q, *k, *v;
  int64_t q_stride[3], k_stride[3], v_stride[3];
  const int64_t* cu_seqlens;  // (N + 1) row offsets into batch 0, or nullptr: sequence n is batch n
  int64_t L;                  // rows per batch
  int N, H, D, M;
  FeatureMap feature_map;
  bool normalize;  // linear attention: divide by the normaliser
  float eps;
  Element element;
};

// With segments = G > 1 each sequence runs as G segments of segment_rows rows (the last ones shorter or
// empty), each a block of its own (the split schedule, for few long sequences or for more blocks).
struct Segments {
  int segments;          // G >= 1
  int64_t segment_rows;  // a multiple of kChunkRows, or 0 (G = 1: whole sequences)
};

// The gradients of the inputs. A backward's block carries one value tile (BM columns of a state); dq and dk
// contract over M, so with M / BM > 1 tiles each tile's block writes its share of them as floats,
// (M / BM, B, H, L, D), which the host adds in tile order (and dq, dk go unwritten); else dq_parts and dk_parts
// are nullptr and the block writes dq, dk.
struct Gradients {
  void *dq, *dk, *dv;         // (B, H, L, D), (B, H, L, D), (B, H, L, M) contiguous, the inputs' dtype
  float *dq_parts, *dk_parts;  // (M / BM, B, H, L, D), or nullptr (one tile)
};

// The split schedule: one block a (sequence, head, value tile) walks the whole sequence, but `blocks` of them
// may leave most of the `multiprocessors` idle. Then each sequence is cut into segments (at least
// kMinSegmentRows rows) for about two blocks a multiprocessor; {1, 0}: no split. A split schedule that moves
// `bytes.split` (B, H, L)-row tensors where the whole one moves `bytes.whole` pays where multiprocessors /
// blocks (the time of a grid of `blocks` blocks, each streaming one multiprocessor's share of the bandwidth,
// against the whole device's) exceeds split / whole.
struct ScheduleBytes {
  int64_t whole, split;
};
constexpr int64_t kMinSegmentRows = 256;
constexpr Segments plan_segments(int64_t blocks, int64_t longest, int64_t multiprocessors, ScheduleBytes bytes) {
  if (blocks <= 0 || blocks * bytes.split >= multiprocessors * bytes.whole || longest < 2 * kMinSegmentRows) {
    return {1, 0};
  }
  const int64_t wanted = (2 * multiprocessors + blocks - 1) / blocks;
  const int64_t rows = ((longest + wanted - 1) / wanted + kChunkRows - 1) / kChunkRows * kChunkRows;
  const int64_t segment_rows = rows > kMinSegmentRows ? rows : kMinSegmentRows;
  const int64_t segments = (longest + segment_rows - 1) / segment_rows;
  return segments > 1 ? Segments{int(segments), segment_rows} : Segments{1, 0};  // segments <= 2 multiprocessors
}

// Kernel<p.D>::run(p, stream) for the head dims of the fused kernels, one instantiation a head dim (D in
// {16, 32, 64, 128, 256}).
template <template <int> class Kernel, typename Params>
void run_for_head_dim(const Params& p, void* stream) {
  switch (p.D) {
    case 16:
      return Kernel<16>::run(p, stream);
    case 32:
      return Kernel<32>::run(p, stream);
    case 64:
      return Kernel<64>::run(p, stream);
    case 128:
      return Kernel<128>::run(p, stream);
    case 256:
      return Kernel<256>::run(p, stream);
    default:
      throw std::invalid_argument("flowformer: no fused kernel for head dim " + std::to_string(p.D));
  }
}

}  // namespace flowformer::chunk
