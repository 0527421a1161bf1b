// Every planted bug is caught: as a hazard report, a fatal KernelError naming kernel, file and line, or a
// wrong result against the reference.
#include "helpers.h"
#include "samples/block_reduce.cuh"
#include "samples/mma_gemm.cuh"
#include "samples/planted_bugs.cuh"
#include "samples/tiled_matmul.cuh"

#include <catch2/catch.hpp>

#include <cmath>

namespace samples = flowformer::simt_samples::emulated;
namespace simt = flowformer::simt;
using Catch::Matchers::Contains;
using flowformer::simt_tests::all_schedules;
using flowformer::simt_tests::random_floats;
using flowformer::simt_tests::reference_matmul;

namespace {

simt::Options reporting(simt::Options o = {}) {
  o.hazards_are_errors = false;
  return o;
}

bool has(const std::vector<simt::Hazard>& hazards, simt::Hazard::Kind kind) {
  for (const auto& h : hazards) {
    if (h.kind == kind) {
      return true;
    }
  }
  return false;
}

template <typename Kernel, typename... Args>
auto launch_warp(Kernel kernel, unsigned threads, Args... args) {
  return simt::launch("planted", kernel, {simt::Dim3(1), simt::Dim3(threads)}, args...);
}

}  // namespace

TEST_CASE("a missing barrier is reported as a hazard under every schedule") {
  const int m = 32, n = 32, k = 64;
  const auto a = random_floats(std::size_t(m) * k, 5), b = random_floats(std::size_t(k) * n, 6);
  std::vector<float> c(std::size_t(m) * n);
  for (const auto& schedule : all_schedules()) {
    INFO("schedule " << schedule.name);
    simt::OptionsScope scope(reporting(schedule.options));
    const auto stats = samples::run_tiled_matmul<16, true>({a.data(), b.data(), c.data(), m, n, k});
    CHECK(has(stats.hazards, simt::Hazard::Kind::WriteAfterRead));
    REQUIRE(!stats.hazards.empty());
    CHECK_THAT(stats.hazards.front().message, Contains("tiled_matmul.cuh:"));
  }
  // and, by default, a launch with hazards throws
  const auto unchecked = [&] { samples::run_tiled_matmul<16, true>({a.data(), b.data(), c.data(), m, n, k}); };
  CHECK_THROWS_AS(unchecked(), simt::HazardError);
}

TEST_CASE("a barrier reached by part of the block is fatal, naming kernel, file and line") {
  std::vector<float> out(64);
  for (const auto& schedule : all_schedules()) {
    INFO("schedule " << schedule.name);
    simt::OptionsScope scope(schedule.options);
    CHECK_THROWS_WITH(launch_warp(samples::barrier_in_branch, 64, out.data()),
                      Contains("kernel planted") && Contains("planted_bugs.cuh:13") && Contains("barrier"));
  }
}

TEST_CASE("barriers at different call sites are fatal") {
  std::vector<float> out(64);
  CHECK_THROWS_WITH(launch_warp(samples::barriers_at_two_sites, 64, out.data()),
                    Contains("divergent barrier") && Contains("planted_bugs.cuh:21") &&
                        Contains("planted_bugs.cuh:23"));
}

TEST_CASE("a read of uninitialised shared memory is reported") {
  std::vector<float> out(64);
  simt::OptionsScope scope(reporting());
  const auto stats = launch_warp(samples::uninitialised_read, 64, out.data());
  REQUIRE(has(stats.hazards, simt::Hazard::Kind::UninitializedRead));
  CHECK(std::isnan(out[0]));  // the poison: 0xff bytes
  CHECK(out[1] == 1.f);
}

TEST_CASE("out-of-bounds and misaligned shared accesses are fatal") {
  std::vector<float> out(32);
  std::vector<uint32_t> words(32);
  CHECK_THROWS_WITH(launch_warp(samples::out_of_bounds, 32, out.data()),
                    Contains("out-of-bounds") && Contains("planted_bugs.cuh:41"));
  CHECK_THROWS_WITH(launch_warp(samples::misaligned_ldmatrix, 32, words.data()),
                    Contains("misaligned") && Contains("16-byte") && Contains("planted_bugs.cuh:54"));
  CHECK_THROWS_WITH(launch_warp(samples::misaligned_word, 32, out.data()),
                    Contains("misaligned") && Contains("planted_bugs.cuh:63"));
}

TEST_CASE("a warp collective reached by part of its mask is fatal") {
  std::vector<float> out(32);
  for (const auto& schedule : all_schedules()) {
    INFO("schedule " << schedule.name);
    simt::OptionsScope scope(schedule.options);
    CHECK_THROWS_WITH(launch_warp(samples::partial_shuffle, 32, out.data()),
                      Contains("__shfl_down_sync") && Contains("planted_bugs.cuh:70"));
  }
  // the ballot in block_reduce needs every lane in the loop: a chunk that is not a multiple of the block
  const auto x = random_floats(300, 1);
  float sum = 0;
  int positives = 0;
  CHECK_THROWS_WITH(samples::run_block_reduce<256>({x.data(), 300, 300, &sum, &positives}),
                    Contains("__ballot_sync") && Contains("block_reduce.cuh"));
}

TEST_CASE("reading a cp.async destination before waiting for it is reported") {
  const auto in = random_floats(128, 2);
  std::vector<float> out(32);
  simt::OptionsScope scope(reporting());
  const auto stats = launch_warp(samples::read_before_wait, 32, in.data(), out.data());
  CHECK(has(stats.hazards, simt::Hazard::Kind::AsyncCopyInFlight));
}

TEST_CASE("swapped fragment registers give a wrong product") {
  const int m = 64, n = 64, k = 32;
  std::vector<simt::bf16> a(std::size_t(m) * k), b(std::size_t(k) * n);
  const auto af = random_floats(a.size(), 8), bf = random_floats(b.size(), 9);
  for (std::size_t i = 0; i < a.size(); ++i) {
    a[i] = simt::bf16(af[i]);
  }
  for (std::size_t i = 0; i < b.size(); ++i) {
    b[i] = simt::bf16(bf[i]);
  }
  const auto expected = reference_matmul(a, b, m, n, k);
  std::vector<float> right(std::size_t(m) * n), wrong(std::size_t(m) * n);
  samples::run_mma_gemm<simt::bf16, false>({a.data(), b.data(), right.data(), m, n, k});
  samples::run_mma_gemm<simt::bf16, true>({a.data(), b.data(), wrong.data(), m, n, k});
  double right_error = 0, wrong_error = 0;
  for (std::size_t i = 0; i < expected.size(); ++i) {
    right_error = std::max(right_error, std::abs(right[i] - expected[i]));
    wrong_error = std::max(wrong_error, std::abs(wrong[i] - expected[i]));
  }
  CHECK(right_error < 1e-4);
  CHECK(wrong_error > 0.1);
}

TEST_CASE("an mma.m16n8k8 tf32 operand not rounded to tf32 is fatal") {
  std::vector<float> out(32);
  CHECK_THROWS_WITH(launch_warp(samples::unrounded_tf32_operand, 32, out.data()),
                    Contains("not rounded to tf32") && Contains("planted_bugs.cuh:"));
}
