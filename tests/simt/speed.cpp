// The emulator's speed, without sanitizers: thread switches per second on a barrier-bound kernel, and the
// time of the mma GEMM sample. Prints one line each; the numbers go into the README.
#include "samples/mma_gemm.cuh"
#include "simt/simt.h"

#include <chrono>
#include <cstdio>
#include <vector>

namespace simt = flowformer::simt;
namespace samples = flowformer::simt_samples::emulated;

namespace {

__global__ void barrier_loop(int rounds, int* out) {
  int x = int(threadIdx.x);
  for (int r = 0; r < rounds; ++r) {
    __syncthreads();
    x += r;
  }
  out[threadIdx.x] = x;
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

int main() {
  std::vector<int> out(256);
  auto start = std::chrono::steady_clock::now();
  const auto stats = simt::launch("barrier_loop", barrier_loop, {simt::Dim3(16), simt::Dim3(256)}, 2000, out.data());
  const double elapsed = seconds_since(start);
  std::printf("simt speed: %.1f million thread switches per second (%s context switch, %llu switches in %.3f s)\n",
              double(stats.switches) / elapsed / 1e6, simt::fiber_implementation(),
              static_cast<unsigned long long>(stats.switches), elapsed);

  const int m = 256, n = 256, k = 256;
  std::vector<simt::bf16> a(std::size_t(m) * k, simt::bf16(0.5f)), b(std::size_t(k) * n, simt::bf16(0.25f));
  std::vector<float> c(std::size_t(m) * n);
  start = std::chrono::steady_clock::now();
  const auto gemm = samples::run_mma_gemm<simt::bf16>({a.data(), b.data(), c.data(), m, n, k});
  const double gemm_seconds = seconds_since(start);
  std::printf("simt speed: mma GEMM %dx%dx%d bf16 in %.3f s (%llu switches, %.1f million per second)\n", m, n, k,
              gemm_seconds, static_cast<unsigned long long>(gemm.switches), double(gemm.switches) / gemm_seconds / 1e6);
  return c[0] == 0.5f * 0.25f * k ? 0 : 1;
}
