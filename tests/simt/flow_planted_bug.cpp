// A copy of causal Flow-Attention's fused forward with one bug planted (plant_bug.py, by CMake) against the
// float64 reference of flow_problem.h: exits 0 ("caught") when the error exceeds float32's tolerance, which the
// kernel as written meets (test_fused_kernels.cpp).
#include "flow_problem.h"

#include <cstdio>

int main() {
  const flowformer::simt_tests::FlowProblem<float> problem(flowformer::simt_tests::FlowCase{});
  const double error = problem.error(70);
  std::printf("relative error %.3e\n", error);
  if (error >= 0 && error <= 1e-5) {
    std::printf("planted bug NOT caught\n");
    return 1;
  }
  std::printf("planted bug caught\n");
  return 0;
}
