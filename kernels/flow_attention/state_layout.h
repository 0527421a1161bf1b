// The recurrent state of causal Flow-Attention (spec/flow_attention.md, "Recurrent state of the causal
// mode"), packed per (batch, head) into one row of 3 + 4 D + D M numbers in the accumulation type:
//   [n, m, E, K (D), Q (D), A (D), B (D), S (D x M, row-major)]
// n the number of valid positions so far, K = sum k, Q = sum q, A = sum O k, B = sum I q,
// S = sum k (c v)^T, and the competition's normaliser sum_j exp(source_j) = E exp(m) held against its
// running maximum m (0 while n = 0). A zero row is the state before the first position.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FF_STATE_LAYOUT_HD __host__ __device__  // the fused kernels read and write states (flow_attention/)
#else
#define FF_STATE_LAYOUT_HD
#endif

namespace flowformer {

struct RecurrentState {
  int64_t D, M;

  FF_STATE_LAYOUT_HD static constexpr int64_t n() { return 0; }
  FF_STATE_LAYOUT_HD static constexpr int64_t m() { return 1; }
  FF_STATE_LAYOUT_HD static constexpr int64_t E() { return 2; }
  FF_STATE_LAYOUT_HD constexpr int64_t K() const { return 3; }
  FF_STATE_LAYOUT_HD constexpr int64_t Q() const { return 3 + D; }
  FF_STATE_LAYOUT_HD constexpr int64_t A() const { return 3 + 2 * D; }
  FF_STATE_LAYOUT_HD constexpr int64_t B() const { return 3 + 3 * D; }
  FF_STATE_LAYOUT_HD constexpr int64_t S() const { return 3 + 4 * D; }
  FF_STATE_LAYOUT_HD constexpr int64_t size() const { return 3 + 4 * D + D * M; }
};

}  // namespace flowformer

#undef FF_STATE_LAYOUT_HD
