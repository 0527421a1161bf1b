// A copy of one of Flow-Attention's fused kernels with one bug planted (plant_bug.py, by CMake) against the
// float64 references of flow_problem.h (the causal forward), flow_noncausal_problem.h (the non-causal passes) and
// flow_noncausal_backward_problem.h (the non-causal backward's): exits 0 ("caught") when an error exceeds float32's
// tolerance (gradients: twice it), which the kernels as written meet (test_fused_kernels.cpp).
#include "flow_noncausal_backward_problem.h"
#include "flow_noncausal_problem.h"
#include "flow_problem.h"

#include <algorithm>
#include <cstdio>

int main() {
  namespace tests = flowformer::simt_tests;
  const double causal = tests::FlowProblem<float>(tests::FlowCase{}).error(70);
  const double noncausal = tests::NoncausalProblem<float, 16>(tests::NoncausalCase{}).error();
  const double backward = tests::NoncausalBackwardProblem<float, 16>(tests::NoncausalCase{}).backward_error();
  std::printf("relative errors: causal %.3e, non-causal %.3e, non-causal backward %.3e\n", causal, noncausal, backward);
  if (causal >= 0 && noncausal >= 0 && backward >= 0 && std::max(causal, noncausal) <= 1e-5 && backward <= 2e-5) {
    std::printf("planted bug NOT caught\n");
    return 1;
  }
  std::printf("planted bug caught\n");
  return 0;
}
