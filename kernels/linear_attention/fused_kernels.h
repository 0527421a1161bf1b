// The fused kernels of linear attention (causal_forward.cuh, causal_backward.cuh, segment_sums.cuh,
// state_output.cuh, noncausal_backward.cuh): their parameters and entry points, shared by the kernels' two builds (nvcc: cuda::, the
// SIMT emulator: emulated::) and the torch glue (csrc/linear_attention/fused.h). Torch-free.
#pragma once

#include "chunk/inputs.h"
#include "chunk/shape.h"
#include "common/feature_map_kind.h"

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace flowformer::linear_attention_kernels {

using chunk::Element;  // the inputs, their type and the segments of a call (chunk/inputs.h)
using chunk::fused_head_dim;  // D, M in {16, ..., 256}; float32 D <= kMaxFloatD (chunk/shape.h)
using chunk::kMaxFloatD;
using chunk::element_bytes;
using chunk::Inputs;
using chunk::run_for_head_dim;
using chunk::Segments;
using chunk::Gradients;
using chunk::gradient_columns;  // dq, dk, dv, or value tiles' shares of dq, dk (chunk/inputs.h)

// The causal forward; with G > 1 the states are per segment, (N G, H, ...), segment g of sequence n at n G + g.
struct CausalForwardParams : Inputs, Segments {
  void* out;          // (B, H, L, M) contiguous, the inputs' dtype
  const float* kv0;   // (N G, H, D, M) initial states, or nullptr (zeros)
  const float* z0;    // (N G, H, D), or nullptr
  float* kv_final;    // (N G, H, D, M), or nullptr (not wanted)
  float* z_final;     // (N G, H, D)
};

// The sums of each segment's keys and values: kv = sum_j phi(k_j) v_j^T and z = sum_j phi(k_j) over its rows j
// that are not padded (the state pass of the causal split schedule, the reduction of the non-causal op).
struct SegmentSumsParams : Inputs, Segments {
  const bool* key_pad;  // (B, L) contiguous, true where a key is padding, or nullptr (none)
  float* kv;            // (N G, H, D, M)
  float* z;             // (N G, H, D)
};

// The output of every row from one state per sequence (the non-causal op): out_t = phi(q_t)^T S /
// (phi(q_t)^T z + eps) (no denominator without normalisation); segments only spread the rows over blocks.
struct StateOutputParams : Inputs, Segments {
  void* out;          // (B, H, L, M) contiguous, the inputs' dtype
  const float* kv;    // (N, H, D, M)
  const float* z;     // (N, H, D)
};

// The non-causal backward, in two passes over segments (the forward's sums S, z recomputed by segment_sums),
// a block a (segment, head, value tile). With q, k = phi(query), phi(key):
// - queries (rows of q and dout, L = the queries' length; kv, z = S, z): den_t = <q_t, z> + eps,
//   P_t = S dout_t, dden_t = -<q_t, P_t> / den_t^2, dq_t = phi'(query_t) (P_t / den_t + dden_t z), and each
//   segment's sums dkv = sum_t q_t dout_t^T / den_t, dz = sum_t dden_t q_t (the gradients of S and z);
// - keys (rows of k and v, L = the keys' length; kv, z = the sums of those, dS and dz):
//   dk_j = phi'(key_j) (dS v_j + dz), dv_j = dS^T k_j, both 0 for padded keys.
// With value tiles, dden_t and dz are sums over the tiles too: each tile's dz sums are its share.
struct NoncausalBackwardParams : Inputs, Segments, Gradients {
  const void* dout;      // (B, H, L, M), rows as the inputs' (queries)
  int64_t dout_stride[3];
  const bool* key_pad;   // (B, L) contiguous, or nullptr (keys)
  const float* kv;       // (N, H, D, M)
  const float* z;        // (N, H, D)
  float* dkv;            // (N G, H, D, M) (queries)
  float* dz;             // (M / BM, N G, H, D)
};

// The causal backward's two passes (causal_backward.cuh): queries (dq), then keys (dk, dv, the initial state's
// gradients). With G > 1 (the split schedule) the states are per segment, (N G, H, ...) as in the forward: kv0, z0
// each segment's incoming state, dkv_final, dz_final the gradient flowing into each segment from its end; the
// query pass also writes each segment's sums of q_t dnum_t^T and dden_t q_t, and the host scans them. With
// value tiles, the query pass's dden_t and dz sums are each tile's share (the host adds them for the key pass).
struct CausalBackwardParams : Inputs, Segments, Gradients {
  const void* dout;            // (B, H, L, M), rows as the inputs'
  int64_t dout_stride[3];
  const float *kv0, *z0;       // the initial state, or nullptr (zeros)
  const float *dkv_final, *dz_final;  // gradients of the final state, or nullptr (zeros)
  float *dkv0, *dz0;           // (N, H, D, M), (N, H, D), or nullptr (not wanted: segments)
  float *dkv_sums, *dz_sums;   // (N G, H, D, M), (M / BM, N G, H, D) (segments), or nullptr (G = 1)
  float* inv_den;              // (B, H, L) work space: 1 / den_t
  float* dden;                 // (M / BM, B, H, L) work space: dden_t = -<dout_t, out_t> / den_t (keys: (B, H, L))
};

using chunk::kChunkRows;  // a block of chunk::kThreads threads walks its rows in chunks of 64 (chunk/shape.h)

using chunk::value_tile;           // the state's columns a block carries (chunk/shape.h)
using chunk::backward_value_tile;  // and a backward pass's
// Dynamic shared memory of a forward block, for inputs of `bytes` bytes an element: q and k tiles (2 stages),
// v tiles (2 stages), the state's hi and lo parts (lo: half only); rows padded by 8 elements (16 bytes
// for 16-bit elements) against bank conflicts.
constexpr std::size_t causal_forward_shared_bytes(int D, int BM, std::size_t bytes) {
  return bytes * (4 * kChunkRows * (D + 8) + 2 * kChunkRows * (BM + 8) + 2 * D * (BM + 8));
}
// The split schedule (chunk::plan_segments): a pass computes each segment's sums, a scan over the segments in
// order gives each its incoming state, and the fused pass runs every segment from it (the non-causal op: the
// sums are added in order; its output pass splits alike). The split's price, in (B, H, L)-row tensors read or
// written: the causal ops pay a pass over k and v for the
// segments' sums (the forward 6 instead of q, k, v, out; the backward 13 instead of its two passes' q, k, v,
// dout and dq, dk, dv); the non-causal ones sum k and v by segments anyway. If a multiprocessor's block
// streams its share of the bandwidth, `blocks` of them take multiprocessors / blocks times the whole device's
// time, so the split pays where that exceeds split / whole: at B H = 128 (issue 14's shape S1, 132
// multiprocessors) the causal forward stays whole (its split would move 1.5x the bytes).
using chunk::plan_segments;
using chunk::ScheduleBytes;
constexpr ScheduleBytes kCausalForwardBytes{4, 6};
constexpr ScheduleBytes kCausalBackwardBytes{11, 13};
constexpr ScheduleBytes kNoncausalBytes{1, 1};

// Dynamic shared memory of a segment-sums block (k and v tiles, 2 stages) and of a state-output block (q tiles,
// 2 stages, the state's two parts), for inputs of `bytes` bytes an element.
constexpr std::size_t segment_sums_shared_bytes(int D, int BM, std::size_t bytes) {
  return bytes * (2 * kChunkRows * (D + 8) + 2 * kChunkRows * (BM + 8));
}
constexpr std::size_t state_output_shared_bytes(int D, int BM, std::size_t bytes) {
  return bytes * (2 * kChunkRows * (D + 8) + 2 * D * (BM + 8));
}

// Dynamic shared memory of a non-causal backward block (value tile BM), for inputs of `bytes` bytes an
// element: two input tiles of width D and two of width BM (2 stages each), a feature tile, the state's two parts.
constexpr std::size_t noncausal_backward_shared_bytes(int D, int BM, std::size_t bytes) {
  return bytes * (3 * kChunkRows * (D + 8) + 2 * kChunkRows * (BM + 8) + 2 * D * (BM + 8));
}

// The backwards take D, M in {16, 32, 64, 128, 256}. Dynamic shared memory of either causal pass (value tile
// BM), for inputs of `bytes` bytes an element: q, k, v, dout tiles (2 stages), one feature tile, the state's
// two parts.
constexpr int kMaxCausalBackwardD = 256;
constexpr bool fused_backward_dims(int64_t D, int64_t M, bool causal) {
  return fused_head_dim(D) && fused_head_dim(M) && (!causal || D <= kMaxCausalBackwardD);
}
constexpr std::size_t causal_backward_shared_bytes(int D, int BM, std::size_t bytes) {
  return bytes * (5 * kChunkRows * (D + 8) + 4 * kChunkRows * (BM + 8) + 2 * D * (BM + 8));
}
// All of a causal backward block's shared memory: the dynamic part and the static float arrays (two vectors of
// D floats and three of 64, the warps' maxima).
constexpr std::size_t causal_backward_block_bytes(int D, int BM, std::size_t bytes) {
  return causal_backward_shared_bytes(D, BM, bytes) + std::size_t(4) * (2 * D + 3 * kChunkRows + 4);
}

// The kernels for head dim D, in each build: explicitly instantiated one D a file (csrc/linear_attention/
// cuda/fused_d*.cu for nvcc, cpu/emulated_fused_d*.cpp for the emulator). `stream` is a cudaStream_t
// (ignored by the emulator, which runs synchronously); a failed launch throws.
#define FF_FUSED_KERNEL(Name, Params)                   \
  template <int D>                                      \
  struct Name {                                         \
    static void run(const Params& p, void* stream);     \
  };
#define FF_FUSED_KERNELS                                          \
  FF_FUSED_KERNEL(CausalForward, CausalForwardParams)             \
  FF_FUSED_KERNEL(CausalQueryGrads, CausalBackwardParams)         \
  FF_FUSED_KERNEL(CausalKeyGrads, CausalBackwardParams)           \
  FF_FUSED_KERNEL(SegmentSums, SegmentSumsParams)                 \
  FF_FUSED_KERNEL(StateOutput, StateOutputParams)                 \
  FF_FUSED_KERNEL(NoncausalQueryGrads, NoncausalBackwardParams)   \
  FF_FUSED_KERNEL(NoncausalKeyGrads, NoncausalBackwardParams)
namespace cuda {
FF_FUSED_KERNELS
}  // namespace cuda
namespace emulated {
FF_FUSED_KERNELS
}  // namespace emulated
#undef FF_FUSED_KERNELS
#undef FF_FUSED_KERNEL

}  // namespace flowformer::linear_attention_kernels
