// Causal Flow-Attention's fused forward (kernels/flow_attention/causal_forward.cuh) in the emulator against a
// float64 reference written step by step from the spec (spec/flow_attention.md, causal mode), on the same
// rounded inputs: random rows, padding flags, an incoming state from a first run. Shared by the emulator's tests
// (test_flow_attention_kernels.cpp) and the planted-bug copies of the kernel (flow_planted_bug.cpp).
#pragma once

#include "flow_attention/causal_forward.cuh"
#include "flow_attention/causal_segments.cuh"
#include "fused_problem.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <utility>
#include <vector>

namespace flowformer::simt_tests {

namespace flow_kernels = flow_attention_kernels;

struct FlowCase {
  int64_t L = 150;  // rows of each of the N = 2 sequences (batch elements)
  int H = 2, D = 16, M = 32;
  FeatureMap feature_map = FeatureMap::Elu1;
  float eps = 0.5f;  // large: every eps term counts
  float clamp = 1.f;
  int64_t segment_rows = 0;  // > 0: the split schedule over segments of these rows (a multiple of 64), as the host
                             // runs it (run_split_passes)
};

template <typename T>
struct FlowProblem {
  static constexpr int64_t N = 2;
  FlowCase c;
  std::vector<T> q, k, v;
  std::unique_ptr<bool[]> pad;  // (N, L)
  RecurrentState layout;

  explicit FlowProblem(const FlowCase& fc) : c(fc), layout{fc.D, fc.M} {
    const auto rows = [&](int64_t width, uint64_t seed) {
      const std::vector<float> x = random_floats(std::size_t(N * c.H * c.L * width), seed, -2.f, 2.f);
      return std::vector<T>(x.begin(), x.end());
    };
    q = rows(c.D, 31);
    k = rows(c.D, 32);
    v = rows(c.M, 33);
    const std::vector<float> u = random_floats(std::size_t(N * c.L), 34, 0.f, 1.f);
    pad.reset(new bool[std::size_t(N * c.L)]);
    for (std::size_t i = 0; i < u.size(); ++i) {
      pad[i] = u[i] < 0.15f;
    }
  }

  // The kernel from `state0` (nullptr: zeros) over rows [first, first + length) of each sequence: out rows
  // (N, H, length, M) (poisoned with NaN first) and the final states.
  std::pair<std::vector<T>, std::vector<float>> run(const float* state0, int64_t first, int64_t length) const {
    std::vector<T> out(std::size_t(N * c.H * length * c.M), T(std::numeric_limits<float>::quiet_NaN()));
    std::vector<float> state(std::size_t(N * c.H * layout.size()), std::numeric_limits<float>::quiet_NaN());
    // the rows of the piece as a (N, H, length, .) view of the (N, H, L, .) inputs, the padding flags copied
    std::unique_ptr<bool[]> piece_pad(new bool[std::size_t(N * length)]);
    for (int64_t n = 0; n < N; ++n) {
      std::copy(pad.get() + n * c.L + first, pad.get() + n * c.L + first + length, piece_pad.get() + n * length);
    }
    flow_kernels::CausalForwardParams p{};
    p.q = q.data() + first * c.D;
    p.k = k.data() + first * c.D;
    p.v = v.data() + first * c.M;
    for (int i = 0; i < 3; ++i) {
      const int64_t per_row[3] = {c.H * c.L, c.L, 1};
      p.q_stride[i] = p.k_stride[i] = per_row[i] * c.D;
      p.v_stride[i] = per_row[i] * c.M;
    }
    p.cu_seqlens = nullptr;
    p.L = length;
    p.N = int(N);
    p.H = c.H;
    p.D = c.D;
    p.M = c.M;
    p.feature_map = c.feature_map;
    p.eps = c.eps;
    p.element = element_of<T>();
    p.segments = 1;
    p.pad = piece_pad.get();
    p.clamp = c.clamp;
    p.out = out.data();
    p.state0 = state0;
    p.state_final = state.data();
    if (c.segment_rows == 0 || length <= c.segment_rows) {
      flow_kernels::run_for_head_dim<flow_kernels::emulated::CausalForward>(p, nullptr);
      return {out, state};
    }
    // The split schedule, as the host runs it.
    p.segments = int((length + c.segment_rows - 1) / c.segment_rows);
    p.segment_rows = c.segment_rows;
    const std::size_t states = std::size_t(N * p.segments * c.H * layout.size());
    std::vector<float> starts(states, 0.f), ends(states, std::numeric_limits<float>::quiet_NaN());
    flow_kernels::run_split_passes(
        p, starts.data(), ends.data(), state0,
        [](const flow_kernels::CausalForwardParams& q) {
          flow_kernels::run_for_head_dim<flow_kernels::emulated::CausalForward>(q, nullptr);
        },
        [](const flow_kernels::SegmentScanParams& scan) { flow_kernels::emulated::SegmentScan::run(scan, nullptr); });
    for (int64_t n = 0; n < N; ++n) {  // the state after a sequence: after its last segment
      const float* last = ends.data() + ((n * p.segments + p.segments - 1) * c.H) * layout.size();
      std::copy(last, last + c.H * layout.size(), state.data() + n * c.H * layout.size());
    }
    return {out, state};
  }

  // The spec's causal recurrence in float64 over rows [first, first + length), carrying on from the first rows.
  std::vector<double> reference(int64_t first, int64_t length) const {
    std::vector<double> out(std::size_t(N * c.H * length * c.M), 0.0);
    const int D = c.D, M = c.M;
    const double e = c.eps;
    for (int64_t n = 0; n < N; ++n) {
      for (int h = 0; h < c.H; ++h) {
        std::vector<double> K(D), Q(D), A(D), B(D), S(std::size_t(D) * M), qt(D), kt(D);
        double count = 0, m = -INFINITY, E = 0;
        for (int64_t t = 0; t < first + length; ++t) {
          if (pad[n * c.L + t]) {
            continue;
          }
          const int64_t row = (n * c.H + h) * c.L + t;
          for (int d = 0; d < D; ++d) {
            qt[d] = phi(c.feature_map, float(q[row * D + d]));
            kt[d] = phi(c.feature_map, float(k[row * D + d]));
            K[d] += kt[d];
            Q[d] += qt[d];
          }
          count += 1;
          const auto dot_eps = [&](const std::vector<double>& x, const std::vector<double>& y) {
            double s = 0;
            for (int d = 0; d < D; ++d) {
              s += (x[d] + e) * (y[d] + e);
            }
            return s;
          };
          const double I = count / dot_eps(qt, K), O = count / dot_eps(kt, Q);
          for (int d = 0; d < D; ++d) {
            A[d] += O * kt[d];
            B[d] += I * qt[d];
          }
          const double Ih = dot_eps(qt, A) / count;
          const double Oh = std::clamp(dot_eps(kt, B) / count, -double(c.clamp), double(c.clamp));
          const double top = std::max(m, Oh);
          E = (E > 0 ? E * std::exp(m - top) : 0.0) + std::exp(Oh - top);
          m = top;
          const double cw = count * std::exp(Oh - m) / E, a = 1 / (1 + std::exp(-Ih));
          for (int d = 0; d < D; ++d) {
            for (int j = 0; j < M; ++j) {
              S[std::size_t(d) * M + j] += kt[d] * cw * double(v[row * M + j]);
            }
          }
          if (t >= first) {
            for (int j = 0; j < M; ++j) {
              double s = 0;
              for (int d = 0; d < D; ++d) {
                s += qt[d] * S[std::size_t(d) * M + j];
              }
              out[std::size_t(((n * c.H + h) * length + (t - first)) * M + j)] = a * I / count * s;
            }
          }
        }
      }
    }
    return out;
  }

  // ||kernel - reference|| / ||reference|| of the rows after `first`, the kernel from its own state after them
  // (-1: a non-finite or unwritten element).
  double error(int64_t first) const {
    const auto [head, state] = run(nullptr, 0, first);
    const auto [out, final_state] = run(state.data(), first, c.L - first);
    for (const float x : final_state) {
      if (!std::isfinite(x)) {
        return -1;
      }
    }
    return relative_error(out, reference(first, c.L - first));
  }
};

}  // namespace flowformer::simt_tests
