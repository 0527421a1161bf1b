// Non-causal Flow-Attention's fused passes (kernels/flow_attention/noncausal_*.cuh) in the emulator, driven as the
// glue drives them (csrc/flow_attention/fused.h: each pass over segments of its side, the segments' sums added in
// order, the competition's against their largest maximum), against a float64 reference written from the spec
// (spec/flow_attention.md, non-causal mode) on the same rounded inputs: L != S, padding on both sides, a key
// segment with no valid key, keys whose sources Oh_j grow late in the sequence (so that the competition's maximum
// rises within a block's walk and between segments). Shared by the emulator's tests
// (test_flow_attention_kernels.cpp) and the planted-bug copies of the kernels (flow_planted_bug.cpp).
#pragma once

#include "flow_attention/noncausal_keys.cuh"
#include "flow_attention/noncausal_output.cuh"
#include "flow_attention/noncausal_sums.cuh"
#include "fused_problem.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

namespace flowformer::simt_tests {

struct NoncausalCase {
  int64_t L = 150, S = 200;  // queries and keys of each of the N = 2 batch elements
  int H = 2, M = 32;
  FeatureMap feature_map = FeatureMap::Elu1;
  float eps = 0.5f;  // large: every eps term counts
  float clamp = INFINITY;
  int64_t query_segment_rows = 64, key_segment_rows = 128;  // 0: whole sequences
};

template <typename T, int D>
struct NoncausalProblem {
  static constexpr int64_t N = 2;
  NoncausalCase c;
  std::vector<T> q, k, v;                 // (N, H, L, D), (N, H, S, D), (N, H, S, M)
  std::unique_ptr<bool[]> qpad, kpad;     // (N, L), (N, S)

  explicit NoncausalProblem(const NoncausalCase& nc) : c(nc) {
    const auto rows = [&](int64_t count, uint64_t seed) {
      const std::vector<float> x = random_floats(std::size_t(count), seed, -2.f, 2.f);
      return std::vector<T>(x.begin(), x.end());
    };
    q = rows(N * c.H * c.L * D, 41);
    k = rows(N * c.H * c.S * D, 42);
    for (int64_t row = 0; row < N * c.H * c.S; ++row) {  // keys 100 .. : larger features, larger Oh_j
      for (int d = 0; row % c.S >= 100 && d < D; ++d) {
        k[std::size_t(row * D + d)] = T(float(k[std::size_t(row * D + d)]) + 1.f);
      }
    }
    v = rows(N * c.H * c.S * c.M, 43);
    const auto flags = [&](int64_t count, uint64_t seed) {
      const std::vector<float> u = random_floats(std::size_t(count), seed, 0.f, 1.f);
      std::unique_ptr<bool[]> pad(new bool[u.size()]);
      for (std::size_t i = 0; i < u.size(); ++i) {
        pad[i] = u[i] < 0.15f;
      }
      return pad;
    };
    qpad = flags(N * c.L, 44);
    kpad = flags(N * c.S, 45);
    std::fill(kpad.get() + c.S, kpad.get() + c.S + 128, true);  // element 1: its first key segment without a key
  }

  // A pass's parameters over the side's segments.
  template <typename Params>
  Params side(bool keys) const {
    Params p{};
    const int64_t rows = keys ? c.S : c.L, segment_rows = keys ? c.key_segment_rows : c.query_segment_rows;
    p.q = q.data();
    p.k = k.data();
    p.v = v.data();
    for (int i = 0; i < 3; ++i) {
      const int64_t query_rows[3] = {c.H * c.L, c.L, 1}, key_rows[3] = {c.H * c.S, c.S, 1};
      p.q_stride[i] = query_rows[i] * D;
      p.k_stride[i] = key_rows[i] * D;
      p.v_stride[i] = key_rows[i] * c.M;
    }
    p.cu_seqlens = nullptr;
    p.L = rows;
    p.N = int(N);
    p.H = c.H;
    p.D = D;
    p.M = c.M;
    p.feature_map = c.feature_map;
    p.eps = c.eps;
    p.element = element_of<T>();
    p.segments = segment_rows > 0 ? int((rows + segment_rows - 1) / segment_rows) : 1;
    p.segment_rows = segment_rows;
    p.keys = keys;
    p.pad = keys ? kpad.get() : qpad.get();
    return p;
  }

  int64_t valid(const bool* pad, int64_t n, int64_t rows) const {
    return int64_t(std::count(pad + n * rows, pad + (n + 1) * rows, false));
  }

  // The sums of a (shares, N G, H, width) array of segments' sums (shares: of value tiles), added over the shares
  // then over the segments in order: (N, H, width).
  std::vector<float> add_segments(const std::vector<float>& x, int G, int64_t width, int shares = 1) const {
    std::vector<float> sum(std::size_t(N * c.H * width), 0.f);
    const int64_t per_share = N * G * c.H * width;
    for (int t = 0; t < shares; ++t) {
      for (int64_t n = 0; n < N; ++n) {
        for (int g = 0; g < G; ++g) {
          for (int64_t i = 0; i < c.H * width; ++i) {
            sum[std::size_t(n * c.H * width + i)] += x[std::size_t(t * per_share + (n * G + g) * c.H * width + i)];
          }
        }
      }
    }
    return sum;
  }

  // The four passes, every output poisoned with NaN first: out (N, H, L, M).
  std::vector<T> run() const {
    namespace fk = flow_attention_kernels;
    const float nan = std::numeric_limits<float>::quiet_NaN();
    const auto vector_sums = [&](bool keys, const std::vector<float>* other) {
      auto p = side<fk::VectorSumsParams>(keys);
      std::vector<float> sums(std::size_t(N * p.segments * c.H * D), nan);
      p.other = other != nullptr ? other->data() : nullptr;
      p.sums = sums.data();
      fk::emulated::VectorSums<D>::run(p, nullptr);
      return add_segments(sums, p.segments, D);
    };
    const std::vector<float> Q = vector_sums(false, nullptr), K = vector_sums(true, nullptr);
    const std::vector<float> B = vector_sums(false, &K);
    auto keys = side<fk::KeySumsParams>(true);
    const int G = keys.segments;
    std::vector<float> W(std::size_t(N * G * c.H * D * c.M), nan), top(std::size_t(N * G * c.H), nan), E(top),
        A_segments(std::size_t(N * G * c.H * D), nan);
    keys.clamp = c.clamp;
    keys.Q = Q.data();
    keys.B = B.data();
    keys.A = A_segments.data();
    keys.W = W.data();
    keys.max = top.data();
    keys.E = E.data();
    fk::emulated::KeySums<D>::run(keys, nullptr);
    // the segments' (max, E, W) against their largest maximum
    for (int64_t nh = 0; nh < N * c.H; ++nh) {
      const int64_t n = nh / c.H, h = nh % c.H;
      const auto at = [&](int g) { return (n * G + g) * c.H + h; };
      float largest = -INFINITY;
      for (int g = 0; g < G; ++g) {
        largest = std::max(largest, top[std::size_t(at(g))]);
      }
      for (int g = 0; g < G; ++g) {
        const float f = std::isinf(largest) ? 0.f : std::exp(top[std::size_t(at(g))] - largest);
        E[std::size_t(at(g))] *= f;
        for (int64_t i = 0; i < D * c.M; ++i) {
          W[std::size_t(at(g) * D * c.M + i)] *= f;
        }
      }
    }
    const std::vector<float> W_all = add_segments(W, G, D * c.M), E_all = add_segments(E, G, 1),
                             A = add_segments(A_segments, G, D);
    std::vector<float> allocation(N), scale(std::size_t(N * c.H));
    for (int64_t n = 0; n < N; ++n) {
      const float Lv = float(valid(qpad.get(), n, c.L)), Sv = float(valid(kpad.get(), n, c.S));
      allocation[std::size_t(n)] = Sv > 0 ? Lv / Sv : 0.f;
      for (int h = 0; h < c.H; ++h) {
        const float e = E_all[std::size_t(n * c.H + h)];
        scale[std::size_t(n * c.H + h)] = Lv > 0 && Sv > 0 && e > 0 ? Sv / e : 0.f;
      }
    }
    std::vector<T> out(std::size_t(N * c.H * c.L * c.M), T(nan));
    auto queries = side<fk::QueryOutputParams>(false);
    queries.K = K.data();
    queries.A = A.data();
    queries.W = W_all.data();
    queries.allocation = allocation.data();
    queries.scale = scale.data();
    queries.out = out.data();
    fk::emulated::QueryOutput<D>::run(queries, nullptr);
    return out;
  }

  // The spec's non-causal Flow-Attention in float64 over the valid rows: out (N, H, L, M), 0 at padded queries.
  std::vector<double> reference() const {
    std::vector<double> out(std::size_t(N * c.H * c.L * c.M), 0.0);
    const double e = c.eps;
    const auto features = [&](const std::vector<T>& x, int64_t row) {
      std::vector<double> f(D);
      for (int d = 0; d < D; ++d) {
        f[std::size_t(d)] = phi(c.feature_map, float(x[std::size_t(row * D + d)]));
      }
      return f;
    };
    const auto dot_eps = [&](const std::vector<double>& x, const std::vector<double>& y) {
      double s = 0;
      for (int d = 0; d < D; ++d) {
        s += (x[std::size_t(d)] + e) * (y[std::size_t(d)] + e);
      }
      return s;
    };
    for (int64_t n = 0; n < N; ++n) {
      const double Lv = double(valid(qpad.get(), n, c.L)), Sv = double(valid(kpad.get(), n, c.S));
      if (Lv == 0 || Sv == 0) {
        continue;
      }
      for (int h = 0; h < c.H; ++h) {
        // a side's valid rows (of `rows`, flags pad) and their features
        const auto gather = [&](const std::vector<T>& x, const std::unique_ptr<bool[]>& pad, int64_t rows,
                                std::vector<int64_t>& kept, std::vector<std::vector<double>>& f) {
          for (int64_t i = 0; i < rows; ++i) {
            if (!pad[std::size_t(n * rows + i)]) {
              kept.push_back(i);
              f.push_back(features(x, (n * c.H + h) * rows + i));
            }
          }
        };
        std::vector<std::vector<double>> qf, kf;
        std::vector<int64_t> queries, keys;
        gather(q, qpad, c.L, queries, qf);
        gather(k, kpad, c.S, keys, kf);
        std::vector<double> Q(D), K(D), A(D), B(D), I(qf.size()), O(kf.size());
        for (const auto& x : qf) {
          for (int d = 0; d < D; ++d) {
            Q[std::size_t(d)] += x[std::size_t(d)];
          }
        }
        for (const auto& x : kf) {
          for (int d = 0; d < D; ++d) {
            K[std::size_t(d)] += x[std::size_t(d)];
          }
        }
        for (std::size_t i = 0; i < qf.size(); ++i) {
          I[i] = 1 / dot_eps(qf[i], K);
          for (int d = 0; d < D; ++d) {
            B[std::size_t(d)] += I[i] * qf[i][std::size_t(d)];
          }
        }
        for (std::size_t j = 0; j < kf.size(); ++j) {
          O[j] = 1 / dot_eps(kf[j], Q);
          for (int d = 0; d < D; ++d) {
            A[std::size_t(d)] += O[j] * kf[j][std::size_t(d)];
          }
        }
        std::vector<double> Oh(kf.size());
        double m = -INFINITY, E = 0;
        for (std::size_t j = 0; j < kf.size(); ++j) {
          Oh[j] = std::clamp(dot_eps(kf[j], B), -double(c.clamp), double(c.clamp));
          m = std::max(m, Oh[j]);
        }
        for (const double x : Oh) {
          E += std::exp(x - m);
        }
        for (std::size_t i = 0; i < qf.size(); ++i) {
          const double a = 1 / (1 + std::exp(-dot_eps(qf[i], A) * Lv / Sv));
          for (std::size_t j = 0; j < kf.size(); ++j) {
            double s = 0;
            for (int d = 0; d < D; ++d) {
              s += qf[i][std::size_t(d)] * kf[j][std::size_t(d)];
            }
            const double weight = a * I[i] * s * Sv * std::exp(Oh[j] - m) / E;
            const int64_t vrow = (n * c.H + h) * c.S + keys[j];
            double* o = &out[std::size_t(((n * c.H + h) * c.L + queries[i]) * c.M)];
            for (int col = 0; col < c.M; ++col) {
              o[col] += weight * double(v[std::size_t(vrow * c.M + col)]);
            }
          }
        }
      }
    }
    return out;
  }

  // ||kernel - reference|| / ||reference|| (-1: a non-finite or unwritten element).
  double error() const {
    return relative_error(run(), reference());
  }
};

}  // namespace flowformer::simt_tests
