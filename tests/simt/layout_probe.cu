// Prints the layout probe's record (samples/layout_probe.cuh): as CUDA (nvcc, run on a GPU) or, compiled
// by the host compiler through layout_probe_emulated.cpp, as the emulator runs it. gpu-check compares the
// two outputs.
#include "samples/layout_probe.cuh"

#include <cstdio>
#include <vector>

namespace samples = flowformer::simt_samples::FF_SIMT_BUILD;

int main() {
  std::vector<uint32_t> record(32 * samples::kProbeWordsPerLane, 0u);
#if defined(__CUDACC__)
  uint32_t* device = nullptr;
  const std::size_t bytes = record.size() * sizeof(uint32_t);
  if (cudaMalloc(&device, bytes) != cudaSuccess) {
    std::fprintf(stderr, "layout probe: no CUDA device\n");
    return 2;
  }
  samples::run_layout_probe(device);
  if (cudaMemcpy(record.data(), device, bytes, cudaMemcpyDeviceToHost) != cudaSuccess) {
    std::fprintf(stderr, "layout probe: the kernel failed\n");
    return 1;
  }
  cudaFree(device);
#else
  samples::run_layout_probe(record.data());
#endif
  for (int lane = 0; lane < 32; ++lane) {
    std::printf("lane %2d:", lane);
    for (int w = 0; w < samples::kProbeWordsPerLane; ++w) {
      std::printf(" %08x", record[std::size_t(lane) * samples::kProbeWordsPerLane + w]);
    }
    std::printf("\n");
  }
  return 0;
}
