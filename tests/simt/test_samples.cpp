// The sample kernels give correct results under every schedule, with no hazard reported.
#include "helpers.h"
#include "samples/block_reduce.cuh"
#include "samples/mma_gemm.cuh"
#include "samples/tiled_matmul.cuh"

#include <catch2/catch.hpp>

#include <cmath>
#include <limits>

namespace samples = flowformer::simt_samples::emulated;
namespace simt = flowformer::simt;
using flowformer::simt_tests::all_schedules;
using flowformer::simt_tests::random_floats;
using flowformer::simt_tests::reference_matmul;

TEST_CASE("tiled matrix product in shared memory: exact under every schedule") {
  const int m = 37, n = 45, k = 50;  // not multiples of the tile: partial tiles at every edge
  const auto a = random_floats(std::size_t(m) * k, 1), b = random_floats(std::size_t(k) * n, 2);
  const auto expected = reference_matmul(a, b, m, n, k);
  std::vector<float> first;
  for (const auto& schedule : all_schedules()) {
    INFO("schedule " << schedule.name);
    simt::OptionsScope scope(schedule.options);
    std::vector<float> c(std::size_t(m) * n, std::numeric_limits<float>::quiet_NaN());
    const auto stats = samples::run_tiled_matmul<16>({a.data(), b.data(), c.data(), m, n, k});
    CHECK(stats.hazards.empty());
    CHECK(stats.blocks == 3 * 3);
    for (std::size_t i = 0; i < c.size(); ++i) {
      REQUIRE(std::abs(c[i] - expected[i]) <= 1e-5 * (1 + std::abs(expected[i])));
    }
    if (first.empty()) {
      first = c;
    } else {
      CHECK(c == first);  // the same operations in the same order whatever the schedule
    }
  }
}

TEST_CASE("block reduction with shuffles and ballots: exact under every schedule") {
  const int64_t chunk = 4 * 256, blocks = 5, n = chunk * blocks;
  const auto x = random_floats(std::size_t(n), 3);
  for (const auto& schedule : all_schedules()) {
    INFO("schedule " << schedule.name);
    simt::OptionsScope scope(schedule.options);
    std::vector<float> sums(blocks, std::numeric_limits<float>::quiet_NaN());
    std::vector<int> positives(blocks, -1);
    const auto stats = samples::run_block_reduce<256>({x.data(), n, chunk, sums.data(), positives.data()});
    CHECK(stats.hazards.empty());
    for (int64_t b = 0; b < blocks; ++b) {
      double sum = 0;
      int count = 0;
      for (int64_t i = b * chunk; i < (b + 1) * chunk; ++i) {
        sum += x[std::size_t(i)];
        count += x[std::size_t(i)] > 0.f;
      }
      CHECK(std::abs(sums[std::size_t(b)] - sum) < 1e-4);
      CHECK(positives[std::size_t(b)] == count);
    }
  }
}

template <typename T>
void check_mma_gemm(int m, int n, int k, uint64_t seed) {
  std::vector<T> a(std::size_t(m) * k), b(std::size_t(k) * n);
  const auto af = random_floats(a.size(), seed), bf = random_floats(b.size(), seed + 1);
  for (std::size_t i = 0; i < a.size(); ++i) {
    a[i] = T(af[i]);
  }
  for (std::size_t i = 0; i < b.size(); ++i) {
    b[i] = T(bf[i]);
  }
  const auto expected = reference_matmul(a, b, m, n, k);  // of the rounded inputs: products are exact
  std::vector<float> first;
  for (const auto& schedule : all_schedules()) {
    INFO("schedule " << schedule.name << ", m " << m << " n " << n << " k " << k);
    simt::OptionsScope scope(schedule.options);
    std::vector<float> c(std::size_t(m) * n, std::numeric_limits<float>::quiet_NaN());
    const auto stats = samples::run_mma_gemm<T>({a.data(), b.data(), c.data(), m, n, k});
    CHECK(stats.hazards.empty());
    double worst = 0;
    for (std::size_t i = 0; i < c.size(); ++i) {
      worst = std::max(worst, std::abs(c[i] - expected[i]) / (1 + std::abs(expected[i])));
    }
    CHECK(worst < 1e-5);  // float accumulation of exact products
    if (first.empty()) {
      first = c;
    } else {
      CHECK(c == first);
    }
  }
}

TEST_CASE("mma.sync GEMM with cp.async double buffering and ldmatrix: bf16") {
  check_mma_gemm<simt::bf16>(128, 64, 96, 10);  // two block rows, three K steps
  check_mma_gemm<simt::bf16>(70, 72, 40, 11);   // partial tiles in M, N and K: zero-filled
}

TEST_CASE("mma.sync GEMM: half") {
  check_mma_gemm<simt::half>(64, 128, 64, 12);
}
