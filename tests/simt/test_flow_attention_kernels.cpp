// Flow-Attention's fused kernels (kernels/flow_attention) in the emulator, against float64 references on the
// same inputs (bf16, half; float32 as three tf32 products): the causal forward (whole and in the split schedule,
// from a first run's state), the non-causal passes and the non-causal backward's four passes. Every output
// poisoned first, no hazard (a hazard throws).
#include "flow_attention/causal_segments.cuh"
#include "flow_noncausal_backward_problem.h"
#include "flow_noncausal_problem.h"
#include "flow_problem.h"

#include <catch2/catch.hpp>

#include <cmath>
#include <tuple>

namespace simt = flowformer::simt;
using flowformer::simt_tests::tolerance;

TEMPLATE_TEST_CASE("causal Flow-Attention's fused forward matches the float64 recurrence", "[fused]",
                   simt::bf16, simt::half, float) {
  // Two sequences with padding, a first run of 70 rows whose state the second carries on from (eps = 0.5: every
  // eps term counts), D = 16 with M = 32 and D = 64 with M = 64, whole and in the split schedule (segments of 64
  // rows, five passes and their scans, from the first run's state); every output and state poisoned first, no
  // hazard.
  using flowformer::simt_tests::FlowCase;
  using flowformer::simt_tests::FlowProblem;
  for (const auto& [D, M, clamp, segment_rows] :
       {std::tuple{16, 32, 1.f, 0}, std::tuple{64, 64, INFINITY, 0}, std::tuple{16, 32, INFINITY, 64}}) {
    FlowCase c;
    c.D = D;
    c.M = M;
    c.clamp = clamp;
    c.segment_rows = segment_rows;
    INFO("D " << D << ", M " << M << ", segments of " << segment_rows);
    const double error = FlowProblem<TestType>(c).error(70);
    CHECK(error >= 0);
    CHECK(error <= tolerance<TestType>());
  }
}

TEMPLATE_TEST_CASE("non-causal Flow-Attention's fused passes match the float64 reference", "[fused]",
                   simt::bf16, simt::half, float) {
  // Two batch elements, 150 queries and 200 keys with padding on both sides (eps = 0.5: every eps term counts):
  // D = 16, M = 32 without a clamp over segments of each side (a key segment without a valid key), and D = 64,
  // M = 64 (one value tile) over whole sequences with clamp 1; every output poisoned first, no hazard.
  using flowformer::simt_tests::NoncausalCase;
  using flowformer::simt_tests::NoncausalProblem;
  NoncausalCase split;
  const double split_error = NoncausalProblem<TestType, 16>(split).error();
  CHECK(split_error >= 0);
  CHECK(split_error <= tolerance<TestType>());
  NoncausalCase whole;
  whole.M = 64;
  whole.clamp = 1.f;
  whole.query_segment_rows = whole.key_segment_rows = 0;
  const double whole_error = NoncausalProblem<TestType, 64>(whole).error();
  CHECK(whole_error >= 0);
  CHECK(whole_error <= tolerance<TestType>());
}

TEMPLATE_TEST_CASE("non-causal Flow-Attention's fused backward matches the float64 gradients", "[fused]",
                   simt::bf16, simt::half, float) {
  // The four passes from the forward's sums (made in float64): 150 queries and 200 keys of two batch elements with
  // padding on both sides (a key segment without a valid key), eps = 0.5, D = 16, M = 32 over segments of each
  // side without a clamp, and D = 32, M = 128 (two or four value tiles: dq, dk and the sums as the tiles' shares)
  // over whole sequences with clamp 1 (some sources cut); every gradient poisoned first, no hazard.
  using flowformer::simt_tests::NoncausalBackwardProblem;
  using flowformer::simt_tests::NoncausalCase;
  NoncausalCase split;
  const double split_error = NoncausalBackwardProblem<TestType, 16>(split).backward_error();
  CHECK(split_error >= 0);
  CHECK(split_error <= 2 * tolerance<TestType>());  // gradients: twice the forward's
  NoncausalCase tiles;
  tiles.M = 128;
  tiles.clamp = 1.f;
  tiles.query_segment_rows = tiles.key_segment_rows = 0;
  const double tiles_error = NoncausalBackwardProblem<TestType, 32>(tiles).backward_error();
  CHECK(tiles_error >= 0);
  CHECK(tiles_error <= 2 * tolerance<TestType>());
}
