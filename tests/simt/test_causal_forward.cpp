// The fused causal forward of linear attention (kernels/linear_attention/causal_forward.cuh) in the emulator,
// against a float64 reference on the same 16-bit inputs: packed sequences (empty ones, lengths across
// chunks), several value tiles, strided rows, initial states, both normalisations, every feature map, half
// states past the half range; outputs and states poisoned first, no hazard (a hazard throws), and the same
// bits under every schedule.
#include "helpers.h"
#include "linear_attention/causal_forward.cuh"

#include <catch2/catch.hpp>

#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace kernels = flowformer::linear_attention_kernels;
namespace simt = flowformer::simt;
using flowformer::FeatureMap;
using flowformer::simt_tests::all_schedules;
using flowformer::simt_tests::random_floats;

template struct kernels::emulated::CausalForward<16>;
template struct kernels::emulated::CausalForward<32>;
template struct kernels::emulated::CausalForward<64>;

namespace {

double phi(FeatureMap f, double x) {
  switch (f) {
    case FeatureMap::Sigmoid:
      return 1 / (1 + std::exp(-x));
    case FeatureMap::Elu1:
      return x > 0 ? x + 1 : std::exp(x);
    case FeatureMap::Relu:
      return x > 0 ? x : 0;
    case FeatureMap::Identity:
      break;
  }
  return x;
}

struct Case {
  std::vector<int64_t> lengths;  // packed sequences (cu_seqlens) when `packed`, else B sequences of lengths[0]
  bool packed;
  int H, D, M;
  FeatureMap feature_map = FeatureMap::Elu1;
  bool normalize = true;
  bool initial_state = true;
  float value_lo = -2, value_hi = 2;
};

// Inputs laid out (B, L, H, width): rows strided by H * width, as a (B, H, L, width) view of them.
template <typename T>
struct Run {
  Case c;
  int64_t B, L, N;
  std::vector<int64_t> cu;
  std::vector<T> q, k, v, out;
  std::vector<float> kv0, z0, kv, z;

  explicit Run(const Case& c_) : c(c_) {
    N = int64_t(c.lengths.size());
    cu.assign(1, 0);
    for (int64_t len : c.lengths) {
      cu.push_back(cu.back() + len);
    }
    B = c.packed ? 1 : N;
    L = c.packed ? cu.back() : c.lengths[0];
    const auto fill = [&](std::vector<T>& x, int width, uint64_t seed, float lo, float hi) {
      const auto f = random_floats(std::size_t(B * L * c.H * width), seed, lo, hi);
      x.assign(f.begin(), f.end());
    };
    fill(q, c.D, 11, -2, 2);
    fill(k, c.D, 12, -2, 2);
    fill(v, c.M, 13, c.value_lo, c.value_hi);
    kv0 = random_floats(std::size_t(N * c.H * c.D * c.M), 14);
    z0 = random_floats(std::size_t(N * c.H * c.D), 15, 0.5f, 1.5f);
  }

  kernels::CausalForwardParams params() {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    out.assign(std::size_t(B * c.H * L * c.M), T(nan));
    kv.assign(kv0.size(), nan);
    z.assign(z0.size(), nan);
    kernels::CausalForwardParams p{};
    p.q = q.data();
    p.k = k.data();
    p.v = v.data();
    for (int i = 0; i < 3; ++i) {  // (B, H, L) strides of a (B, L, H, width) layout
      const int64_t per_row[3] = {L * c.H, 1, c.H};
      p.q_stride[i] = p.k_stride[i] = per_row[i] * c.D;
      p.v_stride[i] = per_row[i] * c.M;
    }
    p.out = out.data();
    p.kv0 = c.initial_state ? kv0.data() : nullptr;
    p.z0 = c.initial_state ? z0.data() : nullptr;
    p.kv_final = kv.data();
    p.z_final = z.data();
    p.cu_seqlens = c.packed ? cu.data() : nullptr;
    p.L = L;
    p.N = int(N);
    p.H = c.H;
    p.D = c.D;
    p.M = c.M;
    p.feature_map = c.feature_map;
    p.normalize = c.normalize;
    p.eps = 1e-6f;
    p.half = std::is_same_v<T, simt::half>;
    return p;
  }

  // Norm-wise relative errors of out, kv, z against float64 on the same 16-bit inputs.
  std::array<double, 3> errors() const {
    const int H = c.H, D = c.D, M = c.M;
    double e[3] = {}, n[3] = {};
    const auto add = [&](int which, double actual, double expected) {
      REQUIRE(std::isfinite(actual));  // also: every element was written (poisoned with NaN)
      e[which] += (actual - expected) * (actual - expected);
      n[which] += expected * expected;
    };
    for (int64_t s = 0; s < N; ++s) {
      const int64_t b = c.packed ? 0 : s, first = c.packed ? cu[s] : 0, len = c.packed ? cu[s + 1] - cu[s] : L;
      for (int h = 0; h < H; ++h) {
        const int64_t state = (s * H + h);
        std::vector<double> S(D * M), zz(D);
        for (int i = 0; i < D * M; ++i) {
          S[i] = c.initial_state ? kv0[state * D * M + i] : 0;
        }
        for (int d = 0; d < D; ++d) {
          zz[d] = c.initial_state ? z0[state * D + d] : 0;
        }
        for (int64_t t = first; t < first + len; ++t) {
          const int64_t row = (b * L + t) * H + h;
          std::vector<double> fq(D), fk(D);
          for (int d = 0; d < D; ++d) {
            fq[d] = phi(c.feature_map, float(q[row * D + d]));
            fk[d] = phi(c.feature_map, float(k[row * D + d]));
            zz[d] += fk[d];
          }
          double den = 1e-6;
          for (int d = 0; d < D; ++d) {
            den += fq[d] * zz[d];
            for (int m = 0; m < M; ++m) {
              S[d * M + m] += fk[d] * float(v[row * M + m]);
            }
          }
          for (int m = 0; m < M; ++m) {
            double num = 0;
            for (int d = 0; d < D; ++d) {
              num += fq[d] * S[d * M + m];
            }
            add(0, float(out[((b * H + h) * L + t) * M + m]), c.normalize ? num / den : num);
          }
        }
        for (int i = 0; i < D * M; ++i) {
          add(1, kv[state * D * M + i], S[i]);
        }
        for (int d = 0; d < D; ++d) {
          add(2, z[state * D + d], zz[d]);
        }
      }
    }
    return {std::sqrt(e[0] / n[0]), std::sqrt(e[1] / n[1]), std::sqrt(e[2] / n[2])};
  }
};

template <typename T>
void check(const Case& c, const std::vector<flowformer::simt_tests::NamedSchedule>& schedules) {
  Run<T> run(c);
  const double tol = std::is_same_v<T, simt::half> ? 5e-3 : 2e-2;  // spec tolerances of the 16-bit dtypes
  std::vector<T> first_out;
  std::vector<float> first_kv;
  for (const auto& schedule : schedules) {
    INFO("schedule " << schedule.name << ", D " << c.D << " M " << c.M << " H " << c.H);
    simt::OptionsScope scope(schedule.options);
    kernels::run_causal_forward<kernels::emulated::CausalForward>(run.params(), nullptr);
    const auto [out_err, kv_err, z_err] = run.errors();
    CHECK(out_err < tol);
    CHECK(kv_err < tol);
    CHECK(z_err < tol);
    if (first_out.empty()) {
      first_out = run.out;
      first_kv = run.kv;
    } else {  // no atomics, fixed order: the same bits whatever the schedule
      CHECK(std::memcmp(first_out.data(), run.out.data(), first_out.size() * sizeof(T)) == 0);
      CHECK(first_kv == run.kv);
    }
  }
}

std::vector<flowformer::simt_tests::NamedSchedule> two_schedules() {
  const auto all = all_schedules();
  return {all.front(), all.back()};
}

}  // namespace

TEST_CASE("fused causal forward: packed sequences across chunks, under every schedule") {
  const Case c{{1, 0, 70, 130, 5, 0}, true, 2, 16, 16};
  check<simt::bf16>(c, all_schedules());
  check<simt::half>(c, two_schedules());
}

TEST_CASE("fused causal forward: head dims, value tiles, batches of equal lengths") {
  for (const auto& [D, M] : {std::pair{32, 64}, std::pair{64, 32}, std::pair{16, 128}, std::pair{64, 64}}) {
    check<simt::bf16>(Case{{75, 75}, false, 1, D, M}, two_schedules());
  }
  check<simt::half>(Case{{129}, false, 2, 32, 32}, two_schedules());
}

TEST_CASE("fused causal forward: feature maps, normalisation off, no initial state") {
  for (const FeatureMap f : {FeatureMap::Sigmoid, FeatureMap::Relu, FeatureMap::Identity}) {
    Case c{{3, 66}, true, 1, 16, 32};
    c.feature_map = f;
    c.normalize = false;  // identity and relu can make phi(q)^T z + eps near 0: the numerators are compared
    c.initial_state = f != FeatureMap::Sigmoid;
    check<simt::bf16>(c, two_schedules());
  }
}

TEST_CASE("fused causal forward: half states beyond the half range are scaled, not overflowed") {
  Case c{{200}, false, 1, 16, 16};
  c.value_lo = 1000;  // |S| reaches about 200 * 1.5 * 2500: far past 65504
  c.value_hi = 4000;
  check<simt::half>(c, two_schedules());
}
