// The fused kernels of linear attention (kernels/linear_attention) in the emulator, against a float64 reference
// on the same inputs (bf16, half; float32 as three tf32 products, within float32's tolerance).
// Causal forward and backward: packed sequences (empty ones, lengths across chunks), several value tiles,
// strided rows, initial states and final-state gradients, both normalisations, every feature map, half
// states past the half range. Non-causal (segment sums, then the state output): padded keys holding NaN,
// segments of both passes. Every output poisoned first, no hazard (a hazard throws), and the same bits under
// every schedule.
#include "fused_problem.h"

#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

namespace kernels = flowformer::linear_attention_kernels;
namespace simt = flowformer::simt;
using flowformer::FeatureMap;
using flowformer::simt_tests::add_shares;
using flowformer::simt_tests::all_schedules;
using flowformer::simt_tests::Case;
using flowformer::simt_tests::GradientBuffers;
using flowformer::simt_tests::NamedSchedule;
using flowformer::simt_tests::Outputs;
using flowformer::simt_tests::phi;
using flowformer::simt_tests::phi_derivative;
using flowformer::simt_tests::Problem;
using flowformer::simt_tests::random_floats;
using flowformer::simt_tests::tolerance;
using flowformer::simt_tests::value_tiles;

namespace {

double relative_error(const std::vector<double>& actual, const std::vector<double>& expected) {
  double e = 0, n = 0;
  for (std::size_t i = 0; i < actual.size(); ++i) {
    REQUIRE(std::isfinite(actual[i]));  // also: every element was written (poisoned with NaN)
    e += (actual[i] - expected[i]) * (actual[i] - expected[i]);
    n += expected[i] * expected[i];
  }
  return n > 0 ? std::sqrt(e / n) : std::sqrt(e);  // all-zero expectations (dz0 without states): absolute
}

enum class Pass { Forward, Backward, Both };

// Each output within the spec's tolerance of its dtype (gradients: twice the forward's), and bitwise the same
// under every schedule.
template <typename T>
void check(const Case& c, const std::vector<NamedSchedule>& schedules, Pass pass = Pass::Both) {
  const Problem<T> problem(c);
  const Outputs expected = problem.reference();
  const double tol = tolerance<T>();
  Outputs first;
  for (const auto& schedule : schedules) {
    INFO("schedule " << schedule.name << ", D " << c.D << " M " << c.M << " H " << c.H);
    simt::OptionsScope scope(schedule.options);
    Outputs results;
    if (pass != Pass::Backward) {
      results.merge(problem.forward());
    }
    if (pass != Pass::Forward) {
      results.merge(problem.backward());
    }
    for (const auto& [name, values] : results) {
      INFO(name);
      CHECK(relative_error(values, expected.at(name)) < (name[0] == 'd' ? 2 * tol : tol));
    }
    if (first.empty()) {
      first = results;
    } else {  // no atomics, fixed order: the same bits whatever the schedule
      CHECK(first == results);
    }
  }
}

std::vector<NamedSchedule> two_schedules() {
  const auto all = all_schedules();
  return {all.front(), all.back()};
}

// Non-causal: out_t = phi(q_t)^T S / (phi(q_t)^T z + eps) with S, z the sums over the keys that are not padded
// (key_pad (B, L) of a batch of equal lengths); the keys' sums by `sums` segments (added in segment order, as
// the host does), the outputs by `rows` segments; the backward too where it takes the head dims.
struct Noncausal {
  std::unique_ptr<bool[]> key_pad;
  kernels::Segments sums, rows;
};

template <typename T>
Outputs noncausal_backward(const Problem<T>& problem, const Noncausal& n, const std::vector<float>& kv,
                           const std::vector<float>& z);

template <typename T>
Outputs run_noncausal(const Problem<T>& problem, const Noncausal& n) {
  const Case& c = problem.c;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const int64_t N = problem.N, G = n.sums.segments, state = c.H * c.D * c.M;
  std::vector<float> kv_parts(N * G * state, nan), z_parts(N * G * c.H * c.D, nan);
  kernels::SegmentSumsParams s{};
  problem.inputs(s);
  static_cast<kernels::Segments&>(s) = n.sums;
  s.key_pad = n.key_pad.get();
  s.kv = kv_parts.data();
  s.z = z_parts.data();
  kernels::run_for_head_dim<kernels::emulated::SegmentSums>(s, nullptr);
  std::vector<float> kv(N * state, 0.f), z(N * c.H * c.D, 0.f);
  for (int64_t b = 0; b < N; ++b) {
    for (int64_t g = 0; g < G; ++g) {
      for (int64_t i = 0; i < state; ++i) {
        kv[b * state + i] += kv_parts[(b * G + g) * state + i];
      }
      for (int64_t i = 0; i < c.H * c.D; ++i) {
        z[b * c.H * c.D + i] += z_parts[(b * G + g) * c.H * c.D + i];
      }
    }
  }
  std::vector<T> out(std::size_t(problem.B * c.H * problem.L * c.M), T(nan));
  kernels::StateOutputParams o{};
  problem.inputs(o);
  static_cast<kernels::Segments&>(o) = n.rows;
  o.out = out.data();
  o.kv = kv.data();
  o.z = z.data();
  kernels::run_for_head_dim<kernels::emulated::StateOutput>(o, nullptr);
  Outputs results{{"out", Problem<T>::widen(out)}, {"kv", Problem<T>::widen(kv)}, {"z", Problem<T>::widen(z)}};
  if (kernels::fused_backward_dims(c.D, c.M, /*causal=*/false)) {
    results.merge(noncausal_backward(problem, n, kv, z));
  }
  return results;
}

// The backward's two passes from the forward's sums: the queries' (by `rows` segments, their sums of dS, dz
// added in order), then the keys' (by `sums` segments).
template <typename T>
Outputs noncausal_backward(const Problem<T>& problem, const Noncausal& n, const std::vector<float>& kv,
                           const std::vector<float>& z) {
  const Case& c = problem.c;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const int64_t N = problem.N, G = n.rows.segments, state = c.H * c.D * c.M, vector = c.H * c.D;
  std::vector<T> dq(problem.q.size(), T(nan)), dk(problem.k.size(), T(nan)), dv(problem.v.size(), T(nan));
  std::vector<float> dkv_parts(N * G * state, nan), dz_parts(value_tiles<T>(c) * N * G * vector, nan);
  GradientBuffers<T> grads(c, dq, dk);
  kernels::NoncausalBackwardParams q{};
  problem.inputs(q);
  static_cast<kernels::Segments&>(q) = n.rows;
  grads.set(q);
  q.dout = problem.dout.data();
  std::copy(q.v_stride, q.v_stride + 3, q.dout_stride);
  q.kv = kv.data();
  q.z = z.data();
  q.dkv = dkv_parts.data();
  q.dz = dz_parts.data();
  kernels::run_for_head_dim<kernels::emulated::NoncausalQueryGrads>(q, nullptr);
  dz_parts = add_shares(dz_parts, std::size_t(N * G * vector));  // the value tiles' shares
  std::vector<float> dkv(N * state, 0.f), dz(N * vector, 0.f);
  for (int64_t b = 0; b < N; ++b) {
    for (int64_t g = 0; g < G; ++g) {
      for (int64_t i = 0; i < state; ++i) {
        dkv[b * state + i] += dkv_parts[(b * G + g) * state + i];
      }
      for (int64_t i = 0; i < vector; ++i) {
        dz[b * vector + i] += dz_parts[(b * G + g) * vector + i];
      }
    }
  }
  kernels::NoncausalBackwardParams k = q;
  static_cast<kernels::Segments&>(k) = n.sums;
  k.key_pad = n.key_pad.get();
  k.kv = dkv.data();
  k.z = dz.data();
  k.dv = dv.data();
  kernels::run_for_head_dim<kernels::emulated::NoncausalKeyGrads>(k, nullptr);
  grads.finish();
  return {{"dq", problem.reorder(Problem<T>::widen(dq), c.D)}, {"dk", problem.reorder(Problem<T>::widen(dk), c.D)},
          {"dv", problem.reorder(Problem<T>::widen(dv), c.M)}};
}

template <typename T>
Outputs noncausal_reference(const Problem<T>& problem, const bool* key_pad) {
  const Case& c = problem.c;
  const int64_t B = problem.B, L = problem.L, H = c.H, D = c.D, M = c.M;
  Outputs r{{"out", std::vector<double>(B * H * L * M)}, {"kv", std::vector<double>(B * H * D * M)},
            {"z", std::vector<double>(B * H * D)}, {"dq", std::vector<double>(problem.q.size())},
            {"dk", std::vector<double>(problem.k.size())}, {"dv", std::vector<double>(problem.v.size())}};
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      const auto row = [&](int64_t t) { return (b * L + t) * H + h; };
      double* S = &r["kv"][(b * H + h) * D * M];
      double* z = &r["z"][(b * H + h) * D];
      for (int64_t j = 0; j < L; ++j) {
        if (key_pad[b * L + j]) {
          continue;
        }
        for (int64_t d = 0; d < D; ++d) {
          const double k = phi(c.feature_map, float(problem.k[row(j) * D + d]));
          z[d] += k;
          for (int64_t m = 0; m < M; ++m) {
            S[d * M + m] += k * float(problem.v[row(j) * M + m]);
          }
        }
      }
      for (int64_t t = 0; t < L; ++t) {
        double den = 1e-6;
        std::vector<double> num(M);
        for (int64_t d = 0; d < D; ++d) {
          const double q = phi(c.feature_map, float(problem.q[row(t) * D + d]));
          den += q * z[d];
          for (int64_t m = 0; m < M; ++m) {
            num[m] += q * S[d * M + m];
          }
        }
        for (int64_t m = 0; m < M; ++m) {
          r["out"][((b * H + h) * L + t) * M + m] = num[m] / den;
        }
      }
      // The gradients: dnum_t = dout_t / den_t, dden_t = -<dout_t, out_t> / den_t;
      // dq_t = phi'(query_t) (S dnum_t + dden_t z), dS = sum_t q_t dnum_t^T, dz = sum_t dden_t q_t;
      // dk_j = phi'(key_j) (dS v_j + dz), dv_j = dS^T k_j for keys that are not padded (else 0).
      std::vector<double> dS(D * M), dz(D);
      for (int64_t t = 0; t < L; ++t) {
        std::vector<double> q(D), dnum(M);
        double den = 1e-6, dot = 0;
        for (int64_t d = 0; d < D; ++d) {
          q[d] = phi(c.feature_map, float(problem.q[row(t) * D + d]));
          den += q[d] * z[d];
        }
        for (int64_t m = 0; m < M; ++m) {
          dnum[m] = float(problem.dout[row(t) * M + m]) / den;
          dot += float(problem.dout[row(t) * M + m]) * r["out"][((b * H + h) * L + t) * M + m];
        }
        const double dden = -dot / den;
        for (int64_t d = 0; d < D; ++d) {
          double g = dden * z[d];
          for (int64_t m = 0; m < M; ++m) {
            g += S[d * M + m] * dnum[m];
            dS[d * M + m] += q[d] * dnum[m];
          }
          dz[d] += dden * q[d];
          r["dq"][row(t) * D + d] = g * phi_derivative(c.feature_map, float(problem.q[row(t) * D + d]));
        }
      }
      for (int64_t j = 0; j < L; ++j) {
        const bool padded = key_pad[b * L + j];
        for (int64_t d = 0; d < D; ++d) {
          double g = dz[d];
          for (int64_t m = 0; m < M; ++m) {
            g += dS[d * M + m] * float(problem.v[row(j) * M + m]);
          }
          r["dk"][row(j) * D + d] = padded ? 0 : g * phi_derivative(c.feature_map, float(problem.k[row(j) * D + d]));
        }
        for (int64_t m = 0; m < M; ++m) {
          double g = 0;
          for (int64_t d = 0; d < D; ++d) {
            g += dS[d * M + m] * phi(c.feature_map, float(problem.k[row(j) * D + d]));
          }
          r["dv"][row(j) * M + m] = padded ? 0 : g;
        }
      }
    }
  }
  return r;
}

// Keys padded every `period` rows (and the whole last `tail` rows of batch 0), those keys and values NaN:
// padding must contribute nothing, whatever it holds.
template <typename T>
std::unique_ptr<bool[]> pad_keys(Problem<T>& problem, int64_t period, int64_t tail) {
  const Case& c = problem.c;
  auto pad = std::make_unique<bool[]>(std::size_t(problem.B * problem.L));
  for (int64_t b = 0; b < problem.B; ++b) {
    for (int64_t j = 0; j < problem.L; ++j) {
      const bool padded = j % period == period - 1 || (b == 0 && j >= problem.L - tail);
      pad[b * problem.L + j] = padded;
      for (int h = 0; padded && h < c.H; ++h) {
        const int64_t row = (b * problem.L + j) * c.H + h;
        std::fill_n(problem.k.begin() + row * c.D, c.D, T(std::numeric_limits<float>::quiet_NaN()));
        std::fill_n(problem.v.begin() + row * c.M, c.M, T(std::numeric_limits<float>::quiet_NaN()));
      }
    }
  }
  return pad;
}

// Within the forward's tolerance for every segmentation, and bitwise the same under every schedule.
template <typename T>
void check_noncausal(const Case& c, const std::vector<kernels::Segments>& segmentations,
                     const std::vector<NamedSchedule>& schedules, int64_t padded_tail = 70) {
  Problem<T> problem(c);
  Noncausal n{pad_keys(problem, 7, padded_tail), {}, {}};
  const Outputs expected = noncausal_reference(problem, n.key_pad.get());
  const double tol = tolerance<T>();
  for (const kernels::Segments& segments : segmentations) {
    n.sums = n.rows = segments;
    Outputs first;
    for (const auto& schedule : schedules) {
      INFO("schedule " << schedule.name << ", D " << c.D << " M " << c.M << ", segments " << segments.segments);
      simt::OptionsScope scope(schedule.options);
      const Outputs results = run_noncausal(problem, n);
      CHECK(results.size() == (kernels::fused_backward_dims(c.D, c.M, /*causal=*/false) ? 6u : 3u));
      for (const auto& [name, values] : results) {
        INFO(name);
        CHECK(relative_error(values, expected.at(name)) < (name[0] == 'd' ? 2 * tol : tol));
      }
      if (first.empty()) {
        first = results;
      } else {
        CHECK(first == results);
      }
    }
  }
}

}  // namespace

TEST_CASE("fused causal kernels: packed sequences across chunks, under every schedule", "[fused]") {
  const Case c{{1, 0, 70, 130, 5, 0}, true, 2, 16, 16};
  check<simt::bf16>(c, all_schedules());
  check<simt::half>(c, two_schedules());
}

TEST_CASE("fused causal kernels: head dims and value tiles (the backward's tiles add their shares of dq, dk)",
          "[fused]") {
  for (const auto& [D, M] : {std::pair{64, 32}, std::pair{16, 128}, std::pair{128, 64}}) {
    check<simt::bf16>(Case{{75, 75}, false, 1, D, M}, two_schedules());
  }
  check<simt::half>(Case{{70}, false, 1, 32, 256}, two_schedules());  // 4 tiles
}

TEST_CASE("fused causal kernels: 256-wide heads", "[fused]") {
  check<simt::bf16>(Case{{75}, false, 1, 256, 32}, two_schedules());
  Case split{{150}, false, 1, 256, 16};
  split.backward_segments = {3, 64};  // 64 + 64 + 22 rows
  check<simt::half>(split, two_schedules(), Pass::Backward);
}

TEST_CASE("fused causal kernels: head dims, batches of equal lengths", "[fused]") {
  for (const auto& [D, M] : {std::pair{32, 64}, std::pair{64, 64}, std::pair{128, 32}}) {
    check<simt::bf16>(Case{{75, 75}, false, 1, D, M}, two_schedules());
  }
  check<simt::half>(Case{{129}, false, 2, 32, 32}, two_schedules());
}

TEST_CASE("fused causal kernels: feature maps, normalisation off, no initial state", "[fused]") {
  for (const FeatureMap f : {FeatureMap::Sigmoid, FeatureMap::Relu, FeatureMap::Identity}) {
    Case c{{3, 66}, true, 1, 16, 32};
    c.feature_map = f;
    c.normalize = false;  // identity and relu can make phi(q)^T z + eps near 0: the numerators are compared
    c.initial_state = f != FeatureMap::Sigmoid;
    check<simt::bf16>(c, two_schedules());
  }
}

TEST_CASE("fused causal kernels: half states beyond the half range are scaled, not overflowed", "[fused]") {
  Case c{{200}, false, 1, 16, 16};
  c.value_lo = 1000;  // |S| reaches about 200 * 1.5 * 2500: far past 65504
  c.value_hi = 4000;
  c.dout_hi = 1e-3f;  // gradients within the half range too
  check<simt::half>(c, two_schedules());
}

TEST_CASE("fused causal backward: relu rows with no feature (1 / den = 1 / eps) stay finite in half", "[fused]") {
  // dnum = dout / eps is far past the half range: the key pass multiplies by q / den (0 here) instead.
  Case c{{150}, false, 2, 16, 16};
  c.feature_map = FeatureMap::Relu;
  c.negative_query_period = 5;
  check<simt::half>(c, two_schedules());
  check<simt::bf16>(c, two_schedules());
}

TEST_CASE("fused causal backward: the split schedule, segments from their incoming states of both scans", "[fused]") {
  Case packed{{300, 0, 130, 5}, true, 2, 16, 32};  // segments of 128 rows: 128 + 128 + 44, 128 + 2, 5, empty
  packed.backward_segments = {3, 128};
  check<simt::bf16>(packed, two_schedules(), Pass::Backward);
  Case batch{{150}, false, 2, 64, 64};
  batch.backward_segments = {3, 64};  // 64 + 64 + 22 rows
  batch.initial_state = false;
  check<simt::bf16>(batch, two_schedules(), Pass::Backward);
  Case tiles{{150, 20}, true, 1, 64, 128};  // 2 value tiles: dden_t and the dz sums in shares
  tiles.backward_segments = {3, 64};
  check<simt::bf16>(tiles, two_schedules(), Pass::Backward);
  Case relu{{150}, false, 1, 32, 16};
  relu.backward_segments = {2, 128};
  relu.feature_map = FeatureMap::Relu;
  relu.negative_query_period = 5;
  check<simt::half>(relu, two_schedules(), Pass::Backward);
}

TEST_CASE("split schedule: segments for few long sequences, none where the blocks fill the device", "[fused]") {
  using kernels::plan_segments;
  const kernels::ScheduleBytes free = kernels::kNoncausalBytes;
  CHECK(plan_segments(1, 600, 132, free).segments == 3);  // 264 wanted: segments of the minimum 256 rows
  CHECK(plan_segments(1, 600, 132, free).segment_rows == 256);
  CHECK(plan_segments(8, 8192, 132, free).segments == 32);  // 33 wanted: 256 rows each
  CHECK(plan_segments(4, 65536, 132, free).segment_rows == 1024);   // 66 wanted: 993 rows, rounded up to chunks
  CHECK(plan_segments(4, 65536, 132, free).segments == 64);
  CHECK(plan_segments(132, 1 << 20, 132, free).segments == 1);  // enough blocks
  CHECK(plan_segments(1, 511, 132, free).segments == 1);        // too short to split
  // The causal ops' split reads k and v once more: 1.5x the forward's bytes, 13/11 the backward's.
  CHECK(plan_segments(128, 8192, 132, free).segments == 3);  // B H = 128 (S1): 128 of 132 busy, splitting is free
  CHECK(plan_segments(128, 8192, 132, kernels::kCausalForwardBytes).segments == 1);  // S1 stays whole
  CHECK(plan_segments(87, 8192, 132, kernels::kCausalForwardBytes).segments == 4);   // 87 x 6 < 132 x 4
  CHECK(plan_segments(88, 8192, 132, kernels::kCausalForwardBytes).segments == 1);
  CHECK(plan_segments(111, 8192, 132, kernels::kCausalBackwardBytes).segments == 3);  // 111 x 13 < 132 x 11
  CHECK(plan_segments(112, 8192, 132, kernels::kCausalBackwardBytes).segments == 1);
}

TEST_CASE("fused non-causal kernels: padded keys, segments of every pass, head dims and value tiles", "[fused]") {
  const std::vector<kernels::Segments> whole_and_split{{1, 0}, {3, 64}};  // split: 64 + 64 + 22 rows
  check_noncausal<simt::bf16>(Case{{150, 150}, false, 2, 16, 32}, whole_and_split, all_schedules());
  check_noncausal<simt::half>(Case{{150}, false, 1, 32, 16}, whole_and_split, two_schedules());
  for (const auto& [D, M] : {std::pair{64, 128}, std::pair{128, 32}, std::pair{256, 16}, std::pair{16, 256}}) {
    check_noncausal<simt::bf16>(Case{{80}, false, 1, D, M}, {{2, 64}}, two_schedules());
  }
}

TEST_CASE("fused non-causal kernels: feature maps", "[fused]") {
  for (const FeatureMap f : {FeatureMap::Sigmoid, FeatureMap::Relu}) {
    Case c{{100}, false, 1, 16, 16};
    c.feature_map = f;
    check_noncausal<simt::bf16>(c, {{1, 0}}, two_schedules());
  }
}

TEST_CASE("fused non-causal backward: a sequence of padded keys only (1 / den = 1 / eps) stays finite in half",
          "[fused]") {
  // dnum = dout / eps is far past the half range: the query pass carries it as 2^-e dnum.
  check_noncausal<simt::half>(Case{{130, 130}, false, 1, 16, 16}, {{1, 0}, {3, 64}}, two_schedules(), 130);
}

TEST_CASE("fused kernels of float32 inputs: three tf32 products keep float32's accuracy", "[fused]") {
  // Plain tf32 products (hi hi alone) lose 5e-5 to 1e-4 here: the tolerance of 1e-5 catches them.
  const Case packed{{1, 0, 70, 130, 5, 0}, true, 2, 16, 16};
  check<float>(packed, all_schedules());
  for (const auto& [D, M] : {std::pair{64, 32}, std::pair{32, 128}, std::pair{128, 64}}) {
    check<float>(Case{{75, 75}, false, 1, D, M}, two_schedules());
  }
  for (const FeatureMap f : {FeatureMap::Sigmoid, FeatureMap::Relu, FeatureMap::Identity}) {
    Case c{{3, 66}, true, 1, 16, 32};
    c.feature_map = f;
    c.normalize = false;
    c.initial_state = f != FeatureMap::Sigmoid;
    check<float>(c, two_schedules());
  }
  Case split{{300, 0, 130, 5}, true, 2, 16, 32};
  split.backward_segments = {3, 128};
  check<float>(split, two_schedules(), Pass::Backward);
  Case relu{{150}, false, 2, 16, 16};  // rows of zero features: 1 / den = 1 / eps
  relu.feature_map = FeatureMap::Relu;
  relu.negative_query_period = 5;
  check<float>(relu, two_schedules());
  const std::vector<kernels::Segments> whole_and_split{{1, 0}, {3, 64}};
  check_noncausal<float>(Case{{150, 150}, false, 2, 16, 32}, whole_and_split, two_schedules());
  check_noncausal<float>(Case{{80}, false, 1, 128, 64}, {{2, 64}}, two_schedules());
}
