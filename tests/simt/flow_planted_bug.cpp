// A copy of one of Flow-Attention's fused kernels with one bug planted (plant_bug.py, by CMake), run against the
// float64 reference of the problem whose kernels include that copy (CMake defines FLOWFORMER_PLANTED_IN_ and its
// name): the causal forward (flow_problem.h), the non-causal passes (flow_noncausal_problem.h) or the non-causal
// backward's (flow_noncausal_backward_problem.h). Exits 0 ("caught") when the error exceeds float32's tolerance
// (gradients: twice it), which the kernels as written meet (test_flow_attention_kernels.cpp).
#if defined(FLOWFORMER_PLANTED_IN_CAUSAL)
#include "flow_problem.h"
#elif defined(FLOWFORMER_PLANTED_IN_NONCAUSAL)
#include "flow_noncausal_problem.h"
#elif defined(FLOWFORMER_PLANTED_IN_BACKWARD)
#include "flow_noncausal_backward_problem.h"
#else
#error "FLOWFORMER_PLANTED_IN_CAUSAL, _NONCAUSAL or _BACKWARD"
#endif

#include <cstdio>

int main() {
  namespace tests = flowformer::simt_tests;
#if defined(FLOWFORMER_PLANTED_IN_CAUSAL)
  const double error = tests::FlowProblem<float>(tests::FlowCase{}).error(70), tolerance = 1e-5;
#elif defined(FLOWFORMER_PLANTED_IN_NONCAUSAL)
  const double error = tests::NoncausalProblem<float, 16>(tests::NoncausalCase{}).error(), tolerance = 1e-5;
#else
  const double error = tests::NoncausalBackwardProblem<float, 16>(tests::NoncausalCase{}).backward_error();
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
