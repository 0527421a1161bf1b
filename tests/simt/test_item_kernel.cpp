// The portable item kernel (kernels/common/item_kernel.cuh) run in the emulator from plain C++ (no torch),
// as the library's test mode runs it: a decoding step of causal linear attention against a float64
// reference, with every output element poisoned first.
#include "common/item_kernel.cuh"
#include "helpers.h"
#include "linear_attention/decode_step.h"

#include <catch2/catch.hpp>

#include <cmath>
#include <limits>

namespace portable = flowformer::portable;
using flowformer::simt_tests::all_schedules;
using flowformer::simt_tests::random_floats;

TEST_CASE("a decoding step of causal linear attention through run_items, under every schedule") {
  const int64_t B = 2, H = 3, D = 5, M = 7, BH = B * H;  // 6 * (7 + 35 + 5) = 282 items: a partial block
  const auto q = random_floats(BH * D, 1, -2, 2), k = random_floats(BH * D, 2, -2, 2), v = random_floats(BH * M, 3);
  const auto kv = random_floats(BH * D * M, 4), z = random_floats(BH * D, 5, 0.5f, 1.5f);
  const auto rows = [&](const std::vector<float>& x, int64_t width, bool feature) {
    return portable::Rows<float>{x.data(), H * width, width, width, H, 1, width, nullptr, nullptr, feature,
                                 flowformer::FeatureMap::Elu1};
  };
  const auto phi = [](double x) { return x > 0 ? x + 1 : std::exp(x); };
  for (const auto& schedule : all_schedules()) {
    INFO("schedule " << schedule.name);
    flowformer::simt::OptionsScope scope(schedule.options);
    const float nan = std::numeric_limits<float>::quiet_NaN();
    std::vector<float> out(BH * M, nan), kv_out(BH * D * M, nan), z_out(BH * D, nan);
    const portable::DecodeStep<float, float> step{rows(q, D, true), rows(k, D, true), rows(v, M, false), BH,
                                                  kv.data(), z.data(), true, 1e-6f, out.data(), kv_out.data(),
                                                  z_out.data()};
    portable::emulated::launch_items(portable::DecodeStep<float, float>::items(BH, D, M), step, {});
    for (int64_t bh = 0; bh < BH; ++bh) {
      for (int64_t m = 0; m < M; ++m) {
        double num = 0, den = 1e-6;
        for (int64_t d = 0; d < D; ++d) {
          const double qd = phi(q[bh * D + d]), kd = phi(k[bh * D + d]);
          const double s = kv[(bh * D + d) * M + m] + kd * v[bh * M + m];
          REQUIRE(std::abs(kv_out[(bh * D + d) * M + m] - s) < 1e-5);
          num += qd * s;
          den += qd * (z[bh * D + d] + kd);
        }
        REQUIRE(std::abs(out[bh * M + m] - num / den) < 1e-5 * (1 + std::abs(num / den)));
      }
      for (int64_t d = 0; d < D; ++d) {
        REQUIRE(std::abs(z_out[bh * D + d] - (z[bh * D + d] + phi(k[bh * D + d]))) < 1e-5);
      }
    }
  }
}
