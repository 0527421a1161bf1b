// The fused kernels of Flow-Attention (causal_forward.cuh and its split schedule's causal_segments.cuh; the
// non-causal passes noncausal_sums.cuh, noncausal_keys.cuh, noncausal_output.cuh; the non-causal backward's,
// noncausal_backward.cuh): their parameters and entry
// points, shared by the kernels' two builds (nvcc: cuda::, the SIMT emulator: emulated::) and the torch glue
// (csrc/flow_attention/fused.h). Torch-free.
#pragma once

#include "chunk/inputs.h"
#include "chunk/shape.h"
#include "flow_attention/state_layout.h"

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace flowformer::flow_attention_kernels {

using chunk::Element;
using chunk::fused_head_dim;  // D, M in {16, ..., 256}; float32 D <= kMaxFloatD (chunk/shape.h)
using chunk::kMaxFloatD;
using chunk::element_bytes;
using chunk::gradient_columns;
using chunk::Inputs;
using chunk::kChunkRows;
using chunk::run_for_head_dim;
using chunk::Segments;

// The causal forward's passes. Whole sequences (segments = 1) take the output pass alone. The split schedule
// runs every segment from its incoming state five times, each pass finishing parts of the next pass's incoming
// states (DESIGN.md): the segments' sums of n, K, Q; with those, of A, B; with those, the competition's (m, E);
// with those, of S; then the output.
enum class CausalPass : int { counts, flows, competition, state, output };

// Causal Flow-Attention, forward, from a recurrent state (state_layout.h) per unit (sequence n, segment g:
// unit n G + g): Inputs' eps is the normalisers' eps (normalize unused).
struct CausalForwardParams : Inputs, Segments {
  CausalPass pass = CausalPass::output;
  const bool* pad;          // (B, L) contiguous, true where a position is padding (either mask), or nullptr
  float clamp;              // of the conserved source, > 0 (inf: none)
  void* out;                // (B, H, L, M) contiguous, the inputs' dtype (the output pass; else unused)
  const float* state0;      // (N G, H, RecurrentState::size()) incoming states, or nullptr (the empty prefix)
  float* state_final;       // (N G, H, RecurrentState::size()) states after the unit, or nullptr (not wanted)
};
// The split schedule of the causal forward (chunk::plan_segments): five passes over q, k and v, one output.
constexpr chunk::ScheduleBytes kCausalForwardBytes{4, 16};
// After each pass but the output, the scan of the columns it finished (causal_segments.cuh): every segment's
// incoming state from the initial one and the states after the earlier segments (which the pass started from
// zeros there, or from no competition). States (N G, H, RecurrentState::size()) floats. The causal backward's keys
// pass walks the segments from the last (reverse): its S columns are the gradient R, each segment's incoming R the
// final state's dS and the later segments' sums, and the total R before the first segment is dS of the incoming
// state.
struct SegmentScanParams {
  CausalPass pass;       // counts (n, K, Q), flows (A, B), competition (m, E) or state (S)
  int N, G, H, D, M;     // sequences, segments a sequence, heads, head dims
  const float* initial;  // (N, H, size) initial states, or nullptr (zeros)
  const float* ends;     // the states the pass left after each segment (walked from its incoming zeros)
  float* starts;         // the incoming states: the pass's columns are set
  bool reverse = false;  // the segments in reverse order; the competition's: the chain's (P, m) (causal_segments.cuh)
  float* total = nullptr;  // (N, H, size): the pass's columns summed over every segment after initial, or nullptr
};
// The split schedule's sums (DESIGN.md), on the host: p the call's parameters with segments > 1 (its pass, out,
// state0 and state_final set here), `starts` the segments' incoming states (N G, H, size), zeros, `ends` the
// states after each segment (the last segment's: the sequence's final state, but S), `initial` the initial states
// (N, H, size) or nullptr; forward(params) and scan(params) launch the two kernels. The first four passes, each
// followed by its scan: `starts` is then every segment's whole incoming state, which the output pass (or the
// backward's queries pass) walks from.
template <typename Forward, typename Scan>
void run_split_sums(CausalForwardParams p, float* starts, float* ends, const float* initial, const Forward& forward,
                    const Scan& scan) {
  p.out = nullptr;
  p.state0 = starts;
  p.state_final = ends;
  SegmentScanParams columns{CausalPass::counts, p.N, p.segments, p.H, p.D, p.M, initial, ends, starts};
  for (const CausalPass pass : {CausalPass::counts, CausalPass::flows, CausalPass::competition, CausalPass::state}) {
    p.pass = columns.pass = pass;
    forward(p);
    scan(columns);
  }
}
// The split schedule's five passes: the sums, then the output from the whole incoming states (`ends` then holds
// the states after each segment).
template <typename Forward, typename Scan>
void run_split_passes(CausalForwardParams p, float* starts, float* ends, const float* initial, const Forward& forward,
                      const Scan& scan) {
  run_split_sums(p, starts, ends, initial, forward, scan);
  p.pass = CausalPass::output;
  p.state0 = starts;
  p.state_final = ends;
  forward(p);
}

// Columns (threads a (sequence, head)) of a pass's scan: the competition's pair is one. Host and device code.
#if defined(__CUDACC__)
__host__ __device__
#endif
constexpr int64_t segment_scan_columns(CausalPass pass, int D, int M) {
  return pass == CausalPass::counts ? 1 + 2 * D : pass == CausalPass::flows ? 2 * D
                                                : pass == CausalPass::competition ? 1 : int64_t(D) * M;
}

// The non-causal forward's passes (DESIGN.md), each over segments of one side's rows: the queries (q, L =
// Inputs::L rows) or the keys (k and v, L = the keys' length); Inputs' eps is the normalisers' eps. Sequences
// are batches (no cu_seqlens).
struct NoncausalSide : Inputs, Segments {
  bool keys;         // the side: keys (k, v) or queries (q)
  const bool* pad;   // (B, L) contiguous padding flags of the side, or nullptr
};
// Passes 1 and 2: per segment sums = sum_j w_j x_j over the side's valid rows x_j (phi(q_i) or phi(k_j)), with
// w_j = 1 (other = nullptr) or w_j = 1 / <x_j + eps, other + eps> (I_i with other = sum k; the keys' O_j are
// pass 3's).
struct VectorSumsParams : NoncausalSide {
  const float* other;  // (N, H, D), or nullptr
  float* sums;         // (N G, H, D)
};
// Pass 3 (keys): per segment, with Oh_j = clamp(<k_j + eps, B + eps>) over its valid keys j, the maximum m of
// the Oh_j, E = sum_j exp(Oh_j - m) and W = sum_j exp(Oh_j - m) k_j v_j^T (m = -inf, E = 0, W = 0: no valid key);
// and pass 2's keys' side, A = sum_j O_j k_j with O_j = 1 / <k_j + eps, Q + eps>.
struct KeySumsParams : NoncausalSide {
  float clamp;       // > 0 (inf: none)
  const float* Q;    // (N, H, D): sum_i q_i
  const float* B;    // (N, H, D): sum_i I_i q_i
  float* A;          // (N G, H, D)
  float* W;          // (N G, H, D, M)
  float *max, *E;    // (N G, H)
};
// Pass 4 (queries): out_i = phi(q_i)^T W scale_n,h sigmoid(<q_i + eps, A + eps> allocation_n) /
// <q_i + eps, K + eps> for the valid queries i, 0 for the padded ones.
struct QueryOutputParams : NoncausalSide {
  const float *K, *A;       // (N, H, D): sum_j k_j, sum_j O_j k_j
  const float* W;           // (N, H, D, M): the keys' sums, all segments' added against one maximum
  const float* allocation;  // (N): L_n / S_n, the valid queries over the valid keys
  const float* scale;       // (N, H): S_n / E, or 0 where no key or no query is valid
  void* out;                // (B, H, L, M) contiguous, the inputs' dtype
};
// The split schedule of every pass (chunk::plan_segments): a split moves no more bytes than a whole walk.
constexpr chunk::ScheduleBytes kNoncausalBytes{1, 1};
// Columns of W (value tile) a block of passes 3 and 4 carries: chunk::value_tile, as linear attention's passes.
// Dynamic shared memory of the passes' blocks, in elements of the inputs' type: the side's rows (2 stages);
// pass 3 the v tiles too, pass 4 W's two parts.
constexpr std::size_t vector_sums_elements(int D) { return 2 * kChunkRows * (D + 8); }
constexpr std::size_t key_sums_elements(int D, int BM) { return 2 * kChunkRows * (D + 8) + 2 * kChunkRows * (BM + 8); }
constexpr std::size_t query_output_elements(int D, int BM) { return 2 * kChunkRows * (D + 8) + 2 * D * (BM + 8); }
// Static shared floats of the passes' blocks: a float a chunk row (pass 3 Oh, pass 4 the row scales) and one a
// warp (their maxima).
constexpr std::size_t kNoncausalStaticFloats = kChunkRows + chunk::kWarps;

// The non-causal backward's passes (DESIGN.md), each over segments of one side's rows, after the forward's sums
// (all segments added, the competition's scale S / E inside W = sum_j c_j k_j v_j^T): queries (q, dout), keys
// (k, v), queries, keys. A block a (segment, head, value tile of BM columns) of the side, with the tile's columns
// of W (queries) or dW (keys) as its state; what contracts over M (dg, dc, dq, dk and the sums they weigh) is the
// tile's share, which the host adds in tile order (chunk::Gradients for dq, dk). With g_i = a_i I_i:
//  queries 1: dW = sum_i g_i q_i dout_i^T, dg_i = <q_i^T W, dout_i>, dA = sum_i dg_i s_i (q_i + eps) with
//             s_i = I_i a_i (1 - a_i) L / S;
//  keys 1:    dv_j = c_j dW^T k_j, dc_j = <dW^T k_j, v_j>, dr_j = c_j (dc_j - <dW, W> / S) where |r_j| <= clamp (r_j
//             = <k_j + eps, B + eps>), dB = sum_j dr_j (k_j + eps), dQ = -sum_j <dA, k_j> O_j^2 (k_j + eps);
//  queries 2: dI_i = dg_i a_i + <dB, q_i>, dq_i = g_i W dout_i + dg_i s_i (A + eps) + I_i dB - dI_i I_i^2 (K + eps)
//             + dQ, dK = -sum_i dI_i I_i^2 (q_i + eps);
//  keys 2:    dk_j = c_j dW v_j + dr_j (B + eps) + O_j dA - <dA, k_j> O_j^2 (Q + eps) + dK;
// dq and dk through phi'; 0 for padded rows (and rows of an element without a valid key or query: W = 0, c = 0).
struct NoncausalBackwardParams : NoncausalSide, chunk::Gradients {
  bool second;              // the side's second pass
  float clamp;              // of the conserved source, > 0 (inf: none)
  const void* dout;         // (B, H, L, M): the output's gradient, rows as the queries'
  int64_t dout_stride[3];
  const float* state;       // (N, H, D, M): W (queries) or dW (keys)
  const float *K, *Q, *A, *B;      // (N, H, D): the forward's sums
  const float *dA, *dB, *dQ, *dK;  // (N, H, D): the earlier passes' gradients (those a pass reads)
  const float* allocation;  // (N): L_n / S_n (queries)
  const float *max, *scale, *total;  // (N, H): the competition's maximum m, S_n / E, <dW, W> / S_n (keys)
  float* dW;                // (N G, H, D, M): queries 1
  float* shares;            // (M / BM, N G, H, D): the tiles' shares of dA (queries 1), dB (keys 1), dK (queries 2)
  float* dQ_sums;           // (N G, H, D): dQ (keys 1)
};
// Columns of W or dW (value tile) a backward block carries: chunk::backward_value_tile.
// Dynamic shared memory of a backward block, in elements of the inputs' type: the raw rows of width D (2
// stages) and their features, the rows of dout or v (2 stages), the state's two parts.
constexpr std::size_t noncausal_backward_elements(int D, int BM) {
  return 3 * kChunkRows * (D + 8) + 2 * kChunkRows * (BM + 8) + 2 * D * (BM + 8);
}
// Static shared floats of a backward block: four D-vectors, seven floats a chunk row, one a warp.
constexpr int kBackwardRowScalars = 7;
#if defined(__CUDACC__)
__host__ __device__
#endif
constexpr std::size_t noncausal_backward_static_floats(int D) {
  return 4 * std::size_t(D) + kBackwardRowScalars * kChunkRows + chunk::kWarps;
}

// Columns of the state S (value tile) one block carries, for inputs of `bytes` bytes an element: the block also
// holds two 64 x 64 score matrices in registers (G and H), so 64 columns only up to D = 32 (16-bit) and 32 beyond.
constexpr int causal_value_tile(int D, int M, std::size_t bytes) {
  const int cap = bytes == 2 ? (D <= 64 ? 64 : D == 128 ? 32 : 16) : (D <= 64 ? 32 : 16);
  return M < cap ? M : cap;
}
// Dynamic shared memory of a causal forward block, in elements of the inputs' type: q and k tiles (2 stages),
// v tiles (2 stages), the state's hi and lo parts, the vectors' parts (D x 16) and the rows' flows (64 x 16, 8
// used); rows padded by 8 elements against bank conflicts.
constexpr std::size_t causal_forward_elements(int D, int BM) {
  return 4 * kChunkRows * (D + 8) + 2 * kChunkRows * (BM + 8) + 2 * D * (BM + 8) + (D + kChunkRows) * (16 + 8);
}
// All of a causal forward block's shared memory: the dynamic part and the static floats (the vectors K, Q, A,
// B: 4 D; the rows' n, conserved sources and flows: 4 x 64; the warps' totals: 5 x 4; the warps' maxima: 4).
constexpr std::size_t causal_forward_block_bytes(int D, int BM, std::size_t bytes) {
  return bytes * causal_forward_elements(D, BM) + std::size_t(4) * (4 * D + 4 * kChunkRows + 24);
}

// The causal backward's first pass (DESIGN.md, "Causal backward"): the forward again from each unit's incoming
// state (the split schedule: the forward's sums first, run_split_sums), a block a (unit, head, value tile), and
// with each chunk's rows t (dout_t zero where padded):
//   dg_t = <dout_t, q_t^T S_t>                              the tile's share (the forward's numerator dotted)
//   dq_t = g_t S_t dout_t = g_t (S_0 dout_t + sum_{j<=t} k_j c_j <v_j, dout_t>)   the tile's share, before phi'
// and, tile 0 only, the rows' scalars of the chain (CausalRowScalar) and K, Q, A, B at each chunk's start.
enum CausalRowScalar : int { row_n, row_I, row_O, row_a, row_r, row_c, row_g, row_m, row_E, kCausalRowScalars };
struct CausalQueryGradsParams : CausalForwardParams {
  const void* dout;         // (B, H, L, M): the output's gradient, its rows' last dimension contiguous
  int64_t dout_stride[3];
  float* dq_parts;          // (M / BM, B H L, D): the tiles' shares of the features' gradient g_t S_t dout_t
  float* dg_parts;          // (M / BM, B H L): the tiles' shares of dg_t
  float* rows;              // (kCausalRowScalars, B H L): n, I, O, a, r (unclamped), c, g, m, E of every row
  float* chunk_starts;      // (B H, causal_chunk_slots, 4, D): K, Q, A, B before each chunk (causal_chunk_slot)
};
// The split schedule of the queries pass: its whole walk reads q, k, v and dout and writes dq's float share; a
// split adds the forward's sums (q and k three times, then q, k and v).
constexpr chunk::ScheduleBytes kCausalQueryGradsBytes{6, 15};
// Chunk slots a (batch, head) has in chunk_starts: a sequence of a packed batch (cu_seqlens) may start inside a
// chunk, so each sequence's chunk c takes slot floor(first / 64) + n + c there; batched sequences take c.
#if defined(__CUDACC__)
__host__ __device__
#endif
constexpr int64_t causal_chunk_slots(int64_t L, int N, bool packed) {
  return (L + kChunkRows - 1) / kChunkRows + (packed ? N : 0);
}
// Dynamic shared memory of a causal query-gradients block: the forward's and dout's tiles (2 stages).
constexpr std::size_t causal_query_grads_elements(int D, int BM) {
  return causal_forward_elements(D, BM) + 2 * kChunkRows * (BM + 8);
}

// The causal backward's second pass (keys, in reverse), after the first: a block a (unit, head, value tile),
// R = dS_L + sum_{t' >= t} g_t' q_t' dout_t'^T carried from the unit's end (its tile's columns):
//   dv_t = c_t R_t^T k_t                  whole (the tile's columns)
//   dc_t = <R_t^T k_t, v_t>               the tile's share
//   dk_t = c_t R_t v_t                    the tile's share of the features' gradient, before phi'
// and R before the unit (the incoming state's dS for a whole sequence). The split schedule walks every segment
// twice: `sums` from R = 0, writing only R before it (the segment's sum of g q dout^T); then, after the reverse
// scan of those (SegmentScanParams::reverse), the gradients from R after the segment.
struct CausalKeyGradsParams : Inputs, Segments {
  bool sums;                  // the split schedule's first walk: R before the unit alone (q, dout and g read)
  const bool* pad;            // (B, L) contiguous padding flags, or nullptr
  const void* dout;           // (B, H, L, M): the output's gradient, its rows' last dimension contiguous
  int64_t dout_stride[3];
  const float* rows;          // (kCausalRowScalars, B H L): the first pass's records (g and c read)
  const float* dstate_final;  // (N G, H, RecurrentState::size()): dS after each unit (S's part), or nullptr (0)
  void* dv;                   // (B, H, L, M) contiguous, the inputs' dtype
  float* dk_parts;            // (M / BM, B H L, D): the tiles' shares of c_t R_t v_t
  float* dc_parts;            // (M / BM, B H L): the tiles' shares of dc_t
  float* dstate0;             // (N G, H, RecurrentState::size()): R before each unit is written (S's part), or nullptr
};
// The split schedule of the keys pass: its whole walk reads q, k, v and dout and writes dv and dk's float share;
// a split reads q and dout again (the sums walk).
constexpr chunk::ScheduleBytes kCausalKeyGradsBytes{7, 9};
// Dynamic shared memory of a causal key-gradients block: q, k, v and dout (2 stages each) and R's two parts.
constexpr std::size_t causal_key_grads_elements(int D, int BM) {
  return 4 * kChunkRows * (D + 8) + 4 * kChunkRows * (BM + 8) + 2 * D * (BM + 8);
}

// The causal backward's third pass, the chain of scalars (causal_chain.cuh), after the first two: a block a
// (unit, head) walks the rows in reverse and writes dq and dk (through phi') and the incoming state's
// gradients but S's (the keys pass writes that). Its carries after a unit: the competition's P (with the m it
// is against), the reverse sums RA, RB, RK, RQ; packed as a state (state_layout.h): P in E's column, m in m's, RA,
// RB, RK, RQ in A's, B's, K's, Q's. The split schedule (DESIGN.md) finds every segment's carries after it in
// levels, a walk of every segment each (its carries before it to carries_before), then a scan in reverse:
//   competition: (P, m) from none after the unit (P = 0, m = +inf), the records alone read;
//   vectors:     RA, RB from the exact (P, m) and RA = RB = 0; then RK, RQ from those and RK = RQ = 0;
//   gradients:   dq, dk (every unit from its whole carries).
// The unit that ends its sequence starts from the final state's (P, m) in every level.
enum class ChainPass : int { competition, vectors, gradients };
struct CausalChainParams : Inputs, Segments {
  ChainPass pass = ChainPass::gradients;  // gradients for whole sequences
  const float* carries_after = nullptr;   // (N G, H, size): the carries after each unit (P, m, RA..RQ), or nullptr
                                          // (whole sequences: the final state's; the competition's level: none)
  float* carries_before = nullptr;        // (N G, H, size): the levels' carries before each unit, or nullptr
  const bool* pad;            // (B, L) contiguous padding flags, or nullptr
  float clamp;                // of the conserved source, > 0 (inf: none)
  const float* rows;          // (kCausalRowScalars, B H L): the queries pass's records
  const float* chunk_starts;  // the queries pass's K, Q, A, B at each chunk's start
  const float *dg_shares, *dq_shares;  // (B H L), (B H L, D): the queries pass's, its value tiles' added in order
  const float *dc_shares, *dk_shares;  // the keys pass's, alike
  const float* state0;        // (N, H, RecurrentState::size()) incoming states, or nullptr
  const float* dstate_final;  // (N, H, RecurrentState::size()) the final state's gradient, or nullptr (zeros)
  void *dq, *dk;              // (B, H, L, D) contiguous, the inputs' dtype
  float* dstate0;             // (N, H, RecurrentState::size()): all but S's part written (by each sequence's first
                              // unit, gradients), or nullptr
};
// The split schedule of the chain: its whole walk reads q, k, the records and the float shares of dq, dk and writes
// dq, dk; a split reads q and k twice more (the vectors' levels) and the records three times.
constexpr chunk::ScheduleBytes kCausalChainBytes{9, 15};
// The chain's per-row floats in its static shared memory (causal_chain.cuh's ChainRow).
constexpr int kCausalChainRowFields = kCausalRowScalars + 11;
// The stages of a chain block's raw q and k: one for float32 from D = 128 (two would need 236 KB at D = 128).
constexpr int causal_chain_stages(int D, std::size_t bytes) { return bytes == 4 && D >= 128 ? 1 : 2; }
// Dynamic shared memory of a chain block, in elements of `bytes`: the raw q and k (each its stages) and their
// features, the vectors' parts (D x 16) and the weights' (64 x 16).
constexpr std::size_t causal_chain_elements(int D, std::size_t bytes) {
  return (2 * causal_chain_stages(D, bytes) + 2) * kChunkRows * (D + 8) + (D + kChunkRows) * (16 + 8);
}

// All of the shared memory of the causal backward's largest block, for head dims D, M and inputs of `bytes`
// bytes an element: each pass's dynamic tiles (its own value tile) and static floats (pass 1: the forward's; pass
// 2: the rows' g and c, the warps' maxima; pass 3: the vectors 8 D, the chain's rows, the warps' maxima).
constexpr std::size_t causal_backward_block_bytes(int D, int M, std::size_t bytes) {
  const int BM1 = causal_value_tile(D, M, bytes), BM2 = chunk::backward_value_tile(D, M, bytes);
  const std::size_t queries =
      bytes * causal_query_grads_elements(D, BM1) + causal_forward_block_bytes(D, BM1, bytes) -
      bytes * causal_forward_elements(D, BM1);
  const std::size_t keys = bytes * causal_key_grads_elements(D, BM2) + 4 * (2 * kChunkRows + chunk::kWarps);
  const std::size_t chain = bytes * causal_chain_elements(D, bytes) + 4 * (8 * D + kCausalChainRowFields * kChunkRows + 8 * chunk::kWarps);
  return queries > keys ? (queries > chain ? queries : chain) : (keys > chain ? keys : chain);
}

// The kernels for head dim D, in each build: explicitly instantiated one D a file (csrc/flow_attention/
// cuda/fused_d*.cu for nvcc, cpu/emulated_fused_d*.cpp for the emulator); the segments' scan, one for all, in
// fused_segments.cu and emulated_fused_segments.cpp. `stream` is a cudaStream_t (ignored
// by the emulator, which runs synchronously); a failed launch throws.
#define FF_FLOW_KERNEL(Name, Params)              \
  template <int D>                                \
  struct Name {                                   \
    static void run(const Params& p, void* stream); \
  };
#define FF_FLOW_KERNELS                                \
  FF_FLOW_KERNEL(CausalForward, CausalForwardParams)   \
  FF_FLOW_KERNEL(CausalQueryGrads, CausalQueryGradsParams) \
  FF_FLOW_KERNEL(CausalKeyGrads, CausalKeyGradsParams) \
  FF_FLOW_KERNEL(CausalChain, CausalChainParams) \
  FF_FLOW_KERNEL(VectorSums, VectorSumsParams)         \
  FF_FLOW_KERNEL(KeySums, KeySumsParams)               \
  FF_FLOW_KERNEL(QueryOutput, QueryOutputParams)       \
  FF_FLOW_KERNEL(QueryGrads, NoncausalBackwardParams)  \
  FF_FLOW_KERNEL(KeyGrads, NoncausalBackwardParams)
#define FF_FLOW_SCAN                                                \
  struct SegmentScan {                                              \
    static void run(const SegmentScanParams& p, void* stream);      \
  };
namespace cuda {
FF_FLOW_KERNELS
FF_FLOW_SCAN
}  // namespace cuda
namespace emulated {
FF_FLOW_KERNELS
FF_FLOW_SCAN
}  // namespace emulated
#undef FF_FLOW_SCAN
#undef FF_FLOW_KERNELS
#undef FF_FLOW_KERNEL

}  // namespace flowformer::flow_attention_kernels
