// The emulator's primitives: coordinates, barriers, warp collectives, shared memory, cp.async, launch limits.
#include "helpers.h"
#include "simt/simt.h"

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdlib>
#include <numeric>
#include <string>

namespace simt = flowformer::simt;
using Catch::Matchers::Contains;
using flowformer::simt_tests::all_schedules;

namespace {

__global__ void write_coordinates(unsigned* out) {
  const unsigned block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const unsigned thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const unsigned i = block * blockDim.x * blockDim.y * blockDim.z + thread;
  out[4 * i] = threadIdx.x + 10 * threadIdx.y + 100 * threadIdx.z;
  out[4 * i + 1] = blockIdx.x + 10 * blockIdx.y + 100 * blockIdx.z;
  out[4 * i + 2] = blockDim.x + 10 * blockDim.y + 100 * blockDim.z;
  out[4 * i + 3] = gridDim.x + 10 * gridDim.y + 100 * gridDim.z;
}

// Each round, every thread adds its left neighbour's value of the previous round (a barrier-separated
// stencil): wrong if any thread runs ahead of a barrier.
__global__ void rounds(int* out, int count) {
  FF_SHARED(int, value, 256);
  const int t = int(threadIdx.x), n = int(blockDim.x);
  value[t] = t;
  __syncthreads();
  for (int r = 0; r < count; ++r) {
    const int left = value[(t + n - 1) % n];
    __syncthreads();
    value[t] += left;
    __syncthreads();
  }
  out[t] = value[t];
}

__global__ void shuffles(int* out, int width) {
  const int lane = int(threadIdx.x);
  const int v = 100 + lane;
  out[lane] = __shfl_sync(0xffffffffu, v, 5, width);
  out[32 + lane] = __shfl_up_sync(0xffffffffu, v, 3, width);
  out[64 + lane] = __shfl_down_sync(0xffffffffu, v, 3, width);
  out[96 + lane] = __shfl_xor_sync(0xffffffffu, v, 6, width);
  out[128 + lane] = int(__ballot_sync(0xffffffffu, lane % 3 == 0));
  out[160 + lane] = __any_sync(0xffffffffu, lane == 31) + 2 * __all_sync(0xffffffffu, lane < 31);
}

// Lanes 0-15 and 16-31 shuffle separately (disjoint masks at one call site).
__global__ void half_warps(int* out) {
  const int lane = int(threadIdx.x);
  const unsigned mask = lane < 16 ? 0x0000ffffu : 0xffff0000u;
  out[lane] = __shfl_xor_sync(mask, lane, 1);
}

// Lane 0 publishes through shared memory; with __syncwarp between, the other lanes may read it.
template <bool kSync>
__global__ void publish_in_warp(int* out) {
  FF_SHARED(int, s, 1);
  if (threadIdx.x == 0) {
    s[0] = 42;
  }
  if (kSync) {
    __syncwarp();
  }
  out[threadIdx.x] = s[0];
}

__global__ void dynamic_scratch(float* out) {
  FF_DYNAMIC_SHARED(float, scratch);
  scratch[threadIdx.x] = float(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = scratch[blockDim.x - 1 - threadIdx.x];
}

__global__ void too_much_static(float* out) {
  FF_SHARED(float, big, 13 * 1024);  // 52 KiB
  big[threadIdx.x] = 1.f;
  out[threadIdx.x] = big[threadIdx.x];
}

// Two groups in flight: after wait<1> the first has landed, after wait<0> both; fill = false zero-fills.
__global__ void async_groups(const float* in, float* out) {
  FF_SHARED(float, s, 256);
  const int t = int(threadIdx.x);
  simt::cp_async_16(s + 4 * t, in + 4 * t);
  simt::cp_async_commit();
  simt::cp_async_16(s + 128 + 4 * t, in + 128 + 4 * t, t % 2 == 0);
  simt::cp_async_commit();
  simt::cp_async_wait<1>();
  out[t] = s[4 * t];
  simt::cp_async_wait<0>();
  __syncthreads();
  out[32 + t] = s[128 + (4 * t + 4) % 128];  // another thread's copy: visible after the barrier
}

__global__ void misaligned_async(const float* in) {
  FF_SHARED(float, s, 64);
  simt::cp_async_16(s + 4 * int(threadIdx.x) + 1, in);
  simt::cp_async_wait<0>();
}

__global__ void no_wait(const float* in) {
  FF_SHARED(float, s, 128);
  simt::cp_async_16(s + 4 * int(threadIdx.x), in + 4 * threadIdx.x);
  simt::cp_async_commit();
}

template <typename Kernel, typename... Args>
simt::LaunchStats run(Kernel kernel, simt::Dim3 grid, simt::Dim3 block, std::size_t shared, Args... args) {
  return simt::launch("test_kernel", kernel, {grid, block, shared}, args...);
}

}  // namespace

TEST_CASE("context switch") {
  // ctest runs the tests once linked with each context switch and names the one it expects
  const std::string used = simt::fiber_implementation();
  if (const char* expected = std::getenv("FLOWFORMER_SIMT_EXPECT_FIBER")) {
    CHECK(used == expected);
  } else {
    CHECK((used == "x86-64 assembly" || used == "ucontext"));
  }
}

TEST_CASE("threadIdx, blockIdx, blockDim and gridDim as in CUDA") {
  const simt::Dim3 grid(3, 2, 2), block(4, 3, 2);
  std::vector<unsigned> out(4 * 12 * 24, 0xdeadbeefu);
  run(write_coordinates, grid, block, 0, out.data());
  std::size_t i = 0;
  for (unsigned bz = 0; bz < 2; ++bz)
    for (unsigned by = 0; by < 2; ++by)
      for (unsigned bx = 0; bx < 3; ++bx)
        for (unsigned tz = 0; tz < 2; ++tz)
          for (unsigned ty = 0; ty < 3; ++ty)
            for (unsigned tx = 0; tx < 4; ++tx, ++i) {
              REQUIRE(out[4 * i] == tx + 10 * ty + 100 * tz);
              REQUIRE(out[4 * i + 1] == bx + 10 * by + 100 * bz);
              REQUIRE(out[4 * i + 2] == 4 + 30 + 200);
              REQUIRE(out[4 * i + 3] == 3 + 20 + 200);
            }
}

TEST_CASE("__syncthreads orders every round under every schedule") {
  const int n = 96, count = 5;
  std::vector<int> expected(n);
  std::iota(expected.begin(), expected.end(), 0);
  for (int r = 0; r < count; ++r) {
    std::vector<int> next(n);
    for (int t = 0; t < n; ++t) {
      next[t] = expected[t] + expected[(t + n - 1) % n];
    }
    expected = next;
  }
  for (const auto& schedule : all_schedules()) {
    INFO("schedule " << schedule.name);
    simt::OptionsScope scope(schedule.options);
    std::vector<int> out(n, -1);
    const auto stats = run(rounds, simt::Dim3(1), simt::Dim3(n), 0, out.data(), count);
    CHECK(out == expected);
    CHECK(stats.hazards.empty());
    // every thread is resumed once per barrier and once to start, but the last to reach a barrier goes on
    CHECK(stats.switches >= uint64_t(n) * (2 * count + 2) - (2 * count + 1));
  }
}

TEST_CASE("warp shuffles and votes with CUDA semantics") {
  for (int width : {32, 8}) {
    INFO("width " << width);
    std::vector<int> out(192);
    run(shuffles, simt::Dim3(1), simt::Dim3(32), 0, out.data(), width);
    for (int lane = 0; lane < 32; ++lane) {
      const int segment = lane / width * width, in_segment = lane % width;
      CHECK(out[lane] == 100 + segment + 5 % width);
      CHECK(out[32 + lane] == 100 + (in_segment >= 3 ? lane - 3 : lane));
      CHECK(out[64 + lane] == 100 + (in_segment + 3 < width ? lane + 3 : lane));
      const int x = lane ^ 6;
      CHECK(out[96 + lane] == 100 + (x < segment + width ? x : lane));
      CHECK(unsigned(out[128 + lane]) == 0x49249249u);
      CHECK(out[160 + lane] == 1);  // any: lane 31 is true; all: lane 31 is not below 31
    }
  }
  std::vector<int> out(32);
  run(half_warps, simt::Dim3(1), simt::Dim3(32), 0, out.data());
  for (int lane = 0; lane < 32; ++lane) {
    CHECK(out[lane] == (lane ^ 1));
  }
}

TEST_CASE("__syncwarp orders shared memory within a warp") {
  std::vector<int> out(32);
  CHECK(run(publish_in_warp<true>, simt::Dim3(1), simt::Dim3(32), 0, out.data()).hazards.empty());
  CHECK(out == std::vector<int>(32, 42));
  simt::Options o;
  o.hazards_are_errors = false;
  simt::OptionsScope scope(o);
  const auto stats = run(publish_in_warp<false>, simt::Dim3(1), simt::Dim3(32), 0, out.data());
  REQUIRE(stats.hazards.size() == 1);
  CHECK(stats.hazards[0].kind == simt::Hazard::Kind::ReadAfterWrite);
  CHECK(stats.hazards[0].count == 31);
}

TEST_CASE("dynamic shared memory, and the per-architecture limits") {
  std::vector<float> out(64);
  run(dynamic_scratch, simt::Dim3(2), simt::Dim3(64), 64 * sizeof(float), out.data());
  CHECK(out[0] == 63.f);
  CHECK(out[63] == 0.f);
  // fewer dynamic bytes than the kernel touches: out of bounds
  CHECK_THROWS_WITH(run(dynamic_scratch, simt::Dim3(1), simt::Dim3(64), 32 * sizeof(float), out.data()),
                    Contains("out-of-bounds") && Contains("dynamic"));
  CHECK(simt::shared_memory_limit(80) == 163 * 1024);
  CHECK(simt::shared_memory_limit(90) == 227 * 1024);
  CHECK_NOTHROW(run(dynamic_scratch, simt::Dim3(1), simt::Dim3(64), 200 * 1024, out.data()));
  simt::Options sm80;
  sm80.arch = 80;
  {
    simt::OptionsScope scope(sm80);
    CHECK_THROWS_WITH(run(dynamic_scratch, simt::Dim3(1), simt::Dim3(64), 200 * 1024, out.data()),
                      Contains("sm_80 allows 166912"));
  }
  CHECK_THROWS_WITH(run(too_much_static, simt::Dim3(1), simt::Dim3(32), 0, out.data()), Contains("48 KiB"));
}

TEST_CASE("launch limits: 1024 threads per block, grid bounds") {
  std::vector<unsigned> out(4 * 2048);
  CHECK_NOTHROW(run(write_coordinates, simt::Dim3(1), simt::Dim3(1024), 0, out.data()));
  CHECK_THROWS_WITH(run(write_coordinates, simt::Dim3(1), simt::Dim3(1025), 0, out.data()),
                    Contains("launch of kernel test_kernel") && Contains("1024 threads"));
  CHECK_THROWS_WITH(run(write_coordinates, simt::Dim3(1), simt::Dim3(32, 32, 2), 0, out.data()), Contains("1024"));
  CHECK_THROWS_WITH(run(write_coordinates, simt::Dim3(1, 70000), simt::Dim3(1), 0, out.data()), Contains("65535"));
}

TEST_CASE("cp.async: groups land at their wait, zero fill, alignment") {
  const auto in = flowformer::simt_tests::random_floats(256, 4);
  std::vector<float> out(64);
  for (const auto& schedule : all_schedules()) {
    INFO("schedule " << schedule.name);
    simt::OptionsScope scope(schedule.options);
    CHECK(run(async_groups, simt::Dim3(1), simt::Dim3(32), 0, in.data(), out.data()).hazards.empty());
    for (int t = 0; t < 32; ++t) {
      CHECK(out[t] == in[4 * t]);
      const int source = (4 * t + 4) % 128, writer = source / 4;
      CHECK(out[32 + t] == (writer % 2 == 0 ? in[128 + source] : 0.f));
    }
  }
  CHECK_THROWS_WITH(run(misaligned_async, simt::Dim3(1), simt::Dim3(32), 0, in.data()),
                    Contains("misaligned") && Contains("cp.async"));
  simt::Options o;
  o.hazards_are_errors = false;
  simt::OptionsScope scope(o);
  const auto stats = run(no_wait, simt::Dim3(1), simt::Dim3(32), 0, in.data());
  REQUIRE(stats.hazards.size() == 1);
  CHECK_THAT(stats.hazards[0].message, Contains("never waited for"));
}

TEST_CASE("fast_exp is exp within the MUFU.EX2 approximation's error, subnormal results flushed to zero") {
  for (float x = -87.f; x <= 88.f; x += 0.173f) {
    const double exact = std::exp(double(x));
    // the product x log2 e rounded to float moves the result by about |x| 2^-24 (relative), exp2f by an ulp
    REQUIRE(std::fabs(simt::fast_exp(x) - exact) <= (std::fabs(x) * 0x1p-23 + 0x1p-22) * exact);
  }
  CHECK(simt::fast_exp(0.f) == 1.f);
  CHECK(simt::fast_exp(-88.f) == 0.f);  // exp(-88) = 6e-39: subnormal, flushed as ex2.approx.ftz does
  CHECK(simt::fast_exp(-INFINITY) == 0.f);
  CHECK(std::isinf(simt::fast_exp(89.f)));
  CHECK(std::isnan(simt::fast_exp(NAN)));
}
