// A copy of one of Flow-Attention's fused kernels with one bug planted (plant_bug.py, by CMake), run against the
// float64 reference of the problem whose kernels include that copy (CMake defines FLOWFORMER_PLANTED_IN_ and its
// name): the causal forward (flow_problem.h), the non-causal passes (flow_noncausal_problem.h), the non-causal
// backward's (flow_noncausal_backward_problem.h) or the causal backward's (flow_causal_backward_problem.h). Exits 0
// ("caught") when the error exceeds float32's tolerance (gradients: twice it), which the kernels as written meet
// (test_flow_attention_kernels.cpp, test_flow_causal_backward_kernels.cpp).
#if defined(FLOWFORMER_PLANTED_IN_CAUSAL)
#include "flow_attention/causal_segments.cuh"
#include "flow_problem.h"
#elif defined(FLOWFORMER_PLANTED_IN_NONCAUSAL)
#include "flow_noncausal_problem.h"
#elif defined(FLOWFORMER_PLANTED_IN_BACKWARD)
#include "flow_noncausal_backward_problem.h"
#elif defined(FLOWFORMER_PLANTED_IN_CAUSAL_BACKWARD)
#include "flow_causal_backward_problem.h"

#include <algorithm>
#include <cmath>
#else
#error "FLOWFORMER_PLANTED_IN_CAUSAL, _NONCAUSAL, _BACKWARD or _CAUSAL_BACKWARD"
#endif

#include <cstdio>

int main() {
  namespace tests = flowformer::simt_tests;
#if defined(FLOWFORMER_PLANTED_IN_CAUSAL)
  const double error = tests::FlowProblem<float>(tests::FlowCase{}).error(70), tolerance = 1e-5;
#elif defined(FLOWFORMER_PLANTED_IN_NONCAUSAL)
  const double error = tests::NoncausalProblem<float, 16>(tests::NoncausalCase{}).error(), tolerance = 1e-5;
#elif defined(FLOWFORMER_PLANTED_IN_BACKWARD)
  const double error = tests::NoncausalBackwardProblem<float, 16>(tests::NoncausalCase{}).backward_error();
  const double tolerance = 2e-5;
#else
  // the causal backward's three passes from 5 rows' state, the competition's maximum moving (the test's case)
  tests::FlowCase c;
  c.clamp = INFINITY;
  c.eps = 0.01f;
  const tests::FlowQueryGradsProblem<float> problem(c, /*rising=*/true);
  double error = 0;
  for (const auto& errors : {problem.errors(5), problem.key_errors(5), problem.backward_errors(5)}) {
    for (const auto& [name, e] : errors) {
      error = e < 0 || error < 0 ? -1 : std::max(error, e);
    }
  }
  const double tolerance = 2e-5;
#endif
  std::printf("relative error %.3e (float32's tolerance %.0e)\n", error, tolerance);
  if (error >= 0 && error <= tolerance) {
    std::printf("planted bug NOT caught\n");
    return 1;
  }
  std::printf("planted bug caught\n");
  return 0;
}
