// The causal Flow-Attention backward's fused kernels (kernels/flow_attention/causal_query_grads.cuh,
// causal_key_grads.cuh) in the emulator, against the spec's recurrence in float64 on the same inputs (bf16, half; float32 as three tf32
// products). Every output poisoned first, no hazard (a hazard throws).
#include "flow_causal_backward_problem.h"

#include <catch2/catch.hpp>

#include <cmath>
#include <tuple>

namespace simt = flowformer::simt;
using flowformer::simt_tests::tolerance;

TEMPLATE_TEST_CASE("causal Flow-Attention's backward queries pass matches the float64 chain", "[fused]", simt::bf16,
                   simt::half, float) {
  // Two sequences with padding (NaN in dout's padded rows), from the state after a first run of 70 rows (the
  // pass's own), eps = 0.5: D = 16 with M = 32 and clamp 1 (some sources cut), D = 64 with M = 64 without a clamp
  // (float32: two value tiles, the shares added in order).
  using flowformer::simt_tests::FlowCase;
  using flowformer::simt_tests::FlowQueryGradsProblem;
  for (const auto& [D, M, clamp] : {std::tuple{16, 32, 1.f}, std::tuple{64, 64, INFINITY}}) {
    FlowCase c;
    c.D = D;
    c.M = M;
    c.clamp = clamp;
    const FlowQueryGradsProblem<TestType> problem(c);
    INFO("D " << D << ", M " << M << ", " << problem.tiles() << " value tiles");
    for (const auto& [name, error] : problem.errors(70)) {
      INFO(name << ": " << error);
      CHECK(error >= 0);
      CHECK(error <= tolerance<TestType>());
    }
  }
}

TEMPLATE_TEST_CASE("causal Flow-Attention's backward keys pass matches the float64 chain", "[fused]", simt::bf16,
                   simt::half, float) {
  // After the queries pass, with a random final state's gradient: dv, the shares of dc and dk (float32 D = 64: two
  // value tiles) and the incoming state's dS. Clamps that keep c_t within half's range (without one, c_t here is
  // about 1e-23 and dv = c_t dw_t underflows half: a limit of the dtype, not of the kernel).
  using flowformer::simt_tests::FlowCase;
  using flowformer::simt_tests::FlowQueryGradsProblem;
  for (const auto& [D, M, clamp] : {std::tuple{16, 32, 1.f}, std::tuple{64, 64, 2.f}}) {
    FlowCase c;
    c.D = D;
    c.M = M;
    c.clamp = clamp;
    const FlowQueryGradsProblem<TestType> problem(c);
    INFO("D " << D << ", M " << M);
    for (const auto& [name, error] : problem.key_errors(70)) {
      INFO(name << ": " << error);
      CHECK(error >= 0);
      CHECK(error <= 2 * tolerance<TestType>());  // gradients: twice the forward's
    }
  }
}

TEMPLATE_TEST_CASE("causal Flow-Attention's backward chain matches the float64 gradients", "[fused]", simt::bf16,
                   simt::half, float) {
  // The three passes with a random final state's gradient: dq and dk through phi', the incoming state's gradients
  // (n, m, E, K, Q, A, B), against the chain in float64 row by row; clamp 1 (sources cut) and clamp 2 (float32 D =
  // 64: two value tiles in passes 1 and 2), clamp inf with keys rising along the sequence and eps 0.01 (the
  // competition's maximum moves); from no state, from 5 rows' (later sources pass its m) and from 70 rows' (none does).
  using flowformer::simt_tests::FlowCase;
  using flowformer::simt_tests::FlowQueryGradsProblem;
  for (const auto& [D, M, clamp, first] :
       {std::tuple{16, 32, 1.f, 70}, std::tuple{64, 64, 2.f, 70}, std::tuple{16, 32, INFINITY, 0},
        std::tuple{16, 32, INFINITY, 5}, std::tuple{64, 64, 2.f, 5}}) {
    FlowCase c;
    c.D = D;
    c.M = M;
    c.clamp = clamp;
    c.eps = clamp == INFINITY ? 0.01f : c.eps;  // a large eps keeps the first source the largest
    const FlowQueryGradsProblem<TestType> problem(c, /*rising=*/clamp == INFINITY);
    INFO("D " << D << ", M " << M << ", clamp " << clamp << ", from " << first << " rows' state");
    for (const auto& [name, error] : problem.backward_errors(first)) {
      INFO(name << ": " << error);
      CHECK(error >= 0);
      CHECK(error <= 2 * tolerance<TestType>());
    }
  }
}
