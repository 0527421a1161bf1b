// Causal Flow-Attention's fused forward (kernels/flow_attention/causal_forward.cuh) in the emulator against a
// float64 reference written step by step from the spec (spec/flow_attention.md, causal mode), on the same
// rounded inputs: random rows, padding flags, an incoming state from a first run. Shared by the emulator's tests
// (test_flow_attention_kernels.cpp) and the planted-bug copies of the kernel (flow_planted_bug.cpp), which include
// causal_segments.cuh for run()'s split schedule (its scan kernel is a plain function: one definition a program).
#pragma once

#include "flow_attention/causal_forward.cuh"
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

  // The padding flags of rows [first, first + length) of each sequence, (N, length).
  std::unique_ptr<bool[]> piece_pad(int64_t first, int64_t length) const {
    std::unique_ptr<bool[]> piece(new bool[std::size_t(N * length)]);
    for (int64_t n = 0; n < N; ++n) {
      std::copy(pad.get() + n * c.L + first, pad.get() + n * c.L + first + length, piece.get() + n * length);
    }
    return piece;
  }

  // The forward's parameters over rows [first, first + length) of each sequence (a (N, H, length, .) view of the
  // (N, H, L, .) inputs, `piece` its padding flags) from `state0` (nullptr: zeros), final states to `state`.
  flow_kernels::CausalForwardParams params(int64_t first, int64_t length, const bool* piece, const float* state0,
                                           float* state) const {
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
    p.pad = piece;
    p.clamp = c.clamp;
    p.state0 = state0;
    p.state_final = state;
    return p;
  }

  // The kernel from `state0` (nullptr: zeros) over rows [first, first + length) of each sequence: out rows
  // (N, H, length, M) (poisoned with NaN first) and the final states.
  std::pair<std::vector<T>, std::vector<float>> run(const float* state0, int64_t first, int64_t length) const {
    std::vector<T> out(std::size_t(N * c.H * length * c.M), T(std::numeric_limits<float>::quiet_NaN()));
    std::vector<float> state(std::size_t(N * c.H * layout.size()), std::numeric_limits<float>::quiet_NaN());
    const std::unique_ptr<bool[]> piece = piece_pad(first, length);
    flow_kernels::CausalForwardParams p = params(first, length, piece.get(), state0, state.data());
    p.out = out.data();
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

  // The chain at one row of the spec's causal recurrence (float64): the features, the sums after the row (before:
  // K, Q, A, B before it), the row's scalars (c = 0, g = 0 where padded) and S after the row.
  struct Chain {
    bool valid;
    std::vector<double> q, k, K, Q, A, B, before, S;  // before: K, Q, A, B in a row (4 D)
    double n = 0, I = 0, O = 0, a = 0, r = 0, cw = 0, g = 0, m = -INFINITY, E = 0;
  };
  // visit(n, h, t, chain) at every row t < rows of each (sequence, head), padded rows too.
  template <typename Visit>
  void walk(int64_t rows, const Visit& visit) const {
    const int D = c.D, M = c.M;
    const double e = c.eps;
    for (int64_t n = 0; n < N; ++n) {
      for (int h = 0; h < c.H; ++h) {
        Chain x;
        for (auto* vector : {&x.q, &x.k, &x.K, &x.Q, &x.A, &x.B}) {
          vector->assign(std::size_t(D), 0.0);
        }
        x.S.assign(std::size_t(D) * M, 0.0);
        for (int64_t t = 0; t < rows; ++t) {
          x.before.clear();
          for (const auto* vector : {&x.K, &x.Q, &x.A, &x.B}) {
            x.before.insert(x.before.end(), vector->begin(), vector->end());
          }
          x.valid = !pad[n * c.L + t];
          x.I = x.O = x.cw = x.g = 0;
          if (x.valid) {
            const int64_t row = (n * c.H + h) * c.L + t;
            for (int d = 0; d < D; ++d) {
              x.q[d] = phi(c.feature_map, float(q[row * D + d]));
              x.k[d] = phi(c.feature_map, float(k[row * D + d]));
              x.K[d] += x.k[d];
              x.Q[d] += x.q[d];
            }
            x.n += 1;
            const auto dot_eps = [&](const std::vector<double>& a, const std::vector<double>& b) {
              double s = 0;
              for (int d = 0; d < D; ++d) {
                s += (a[d] + e) * (b[d] + e);
              }
              return s;
            };
            x.I = x.n / dot_eps(x.q, x.K);
            x.O = x.n / dot_eps(x.k, x.Q);
            for (int d = 0; d < D; ++d) {
              x.A[d] += x.O * x.k[d];
              x.B[d] += x.I * x.q[d];
            }
            const double Ih = dot_eps(x.q, x.A) / x.n;
            x.r = dot_eps(x.k, x.B) / x.n;
            const double Oh = std::clamp(x.r, -double(c.clamp), double(c.clamp));
            const double top = std::max(x.m, Oh);
            x.E = (x.E > 0 ? x.E * std::exp(x.m - top) : 0.0) + std::exp(Oh - top);
            x.m = top;
            x.cw = x.n * std::exp(Oh - x.m) / x.E;
            x.a = 1 / (1 + std::exp(-Ih));
            x.g = x.a * x.I / x.n;
            for (int d = 0; d < D; ++d) {
              for (int j = 0; j < M; ++j) {
                x.S[std::size_t(d) * M + j] += x.k[d] * x.cw * double(v[row * M + j]);
              }
            }
          }
          visit(n, h, t, x);
        }
      }
    }
  }

  // The spec's causal recurrence in float64 over rows [first, first + length), carrying on from the first rows.
  std::vector<double> reference(int64_t first, int64_t length) const {
    std::vector<double> out(std::size_t(N * c.H * length * c.M), 0.0);
    walk(first + length, [&](int64_t n, int h, int64_t t, const Chain& x) {
      if (t < first || !x.valid) {
        return;
      }
      for (int j = 0; j < c.M; ++j) {
        double s = 0;
        for (int d = 0; d < c.D; ++d) {
          s += x.q[d] * x.S[std::size_t(d) * c.M + j];
        }
        out[std::size_t(((n * c.H + h) * length + (t - first)) * c.M + j)] = x.g * s;
      }
    });
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
