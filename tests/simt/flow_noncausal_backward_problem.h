// Non-causal Flow-Attention's fused backward (kernels/flow_attention/noncausal_backward.cuh) in the emulator, its
// four passes driven as the glue drives them (csrc/flow_attention/fused.h: queries, keys, queries, keys over
// segments of each side; the segments' sums and the value tiles' shares added in order between them) from the
// forward's sums made in float64 here, against the gradients written out in float64 from the same sums
// (kernels/flow_attention/DESIGN.md, "Non-causal backward", checked against autograd in
// tests/python/flow_chunked_model.py) on the same rounded inputs as NoncausalProblem's. Shared by the emulator's
// tests (test_flow_attention_kernels.cpp) and the planted-bug copies of the kernels (flow_planted_bug.cpp).
#pragma once

#include "flow_attention/noncausal_backward.cuh"
#include "flow_noncausal_problem.h"

#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace flowformer::simt_tests {

template <typename T, int D>
struct NoncausalBackwardProblem : NoncausalProblem<T, D> {
  using Base = NoncausalProblem<T, D>;
  using Base::c, Base::q, Base::k, Base::v, Base::qpad, Base::kpad;
  static constexpr int64_t N = Base::N;
  std::vector<T> dout;  // (N, H, L, M)

  // The forward's sums (N, H, ...) in float64, the scales, and the reference gradients (N, H, rows, width).
  struct Sums {
    std::vector<double> Q, K, A, B, W, top, scale, allocation, keys;
  };
  struct Gradients {
    std::vector<double> dq, dk, dv;
  };

  explicit NoncausalBackwardProblem(const NoncausalCase& nc) : Base(nc) {
    const std::vector<float> x = random_floats(std::size_t(N * c.H * c.L * c.M), 46, -1.f, 1.f);
    dout.assign(x.begin(), x.end());
  }

  double feature(const std::vector<T>& x, int64_t row, int d) const {
    return phi(c.feature_map, float(x[std::size_t(row * D + d)]));
  }
  double dot_eps(const std::vector<T>& x, int64_t row, const double* y) const {
    double s = 0;
    for (int d = 0; d < D; ++d) {
      s += (feature(x, row, d) + c.eps) * (y[d] + c.eps);
    }
    return s;
  }

  // The forward's sums and the gradients, in float64 over the valid rows.
  std::pair<Sums, Gradients> reference() const {
    const int64_t L = c.L, S = c.S, M = c.M;
    const double e = c.eps;
    const std::vector<double> vectors(N * c.H * D), scalars(N * c.H), per_element(N);
    Sums s{vectors, vectors, vectors, vectors, std::vector<double>(N * c.H * D * M), scalars, scalars, per_element,
           per_element};
    Gradients g{std::vector<double>(q.size()), std::vector<double>(k.size()), std::vector<double>(v.size())};
    for (int64_t n = 0; n < N; ++n) {
      const double Lv = double(this->valid(qpad.get(), n, L)), Sv = double(this->valid(kpad.get(), n, S));
      s.keys[std::size_t(n)] = Sv;
      s.allocation[std::size_t(n)] = Sv > 0 ? Lv / Sv : 0;
      for (int h = 0; h < c.H; ++h) {
        const int64_t nh = n * c.H + h;
        double *Q = &s.Q[nh * D], *K = &s.K[nh * D], *A = &s.A[nh * D], *B = &s.B[nh * D], *W = &s.W[nh * D * M];
        const auto query = [&](int64_t i) { return nh * L + i; };
        const auto key = [&](int64_t j) { return nh * S + j; };
        const auto qvalid = [&](int64_t i) { return !qpad[std::size_t(n * L + i)]; };
        const auto kvalid = [&](int64_t j) { return !kpad[std::size_t(n * S + j)]; };
        for (int64_t i = 0; i < L; ++i) {
          for (int d = 0; qvalid(i) && d < D; ++d) {
            Q[d] += feature(q, query(i), d);
          }
        }
        for (int64_t j = 0; j < S; ++j) {
          for (int d = 0; kvalid(j) && d < D; ++d) {
            K[d] += feature(k, key(j), d);
          }
        }
        std::vector<double> I(L), O(S), r(S), a(L), c_(S);
        for (int64_t i = 0; i < L; ++i) {
          I[i] = qvalid(i) ? 1 / dot_eps(q, query(i), K) : 0;
          for (int d = 0; d < D; ++d) {
            B[d] += I[i] * feature(q, query(i), d) * (qvalid(i) ? 1 : 0);
          }
        }
        double m = -INFINITY, E = 0;
        for (int64_t j = 0; j < S; ++j) {
          O[j] = kvalid(j) ? 1 / dot_eps(k, key(j), Q) : 0;
          for (int d = 0; kvalid(j) && d < D; ++d) {
            A[d] += O[j] * feature(k, key(j), d);
          }
          r[j] = dot_eps(k, key(j), B);
          if (kvalid(j)) {
            m = std::max(m, std::clamp(r[j], -double(c.clamp), double(c.clamp)));
          }
        }
        for (int64_t j = 0; j < S; ++j) {
          E += kvalid(j) ? std::exp(std::clamp(r[j], -double(c.clamp), double(c.clamp)) - m) : 0;
        }
        const double scale = Lv > 0 && Sv > 0 && E > 0 ? Sv / E : 0;
        s.top[nh] = m;
        s.scale[nh] = scale;
        for (int64_t j = 0; j < S; ++j) {
          c_[j] = kvalid(j) ? scale * std::exp(std::clamp(r[j], -double(c.clamp), double(c.clamp)) - m) : 0;
          for (int d = 0; d < D; ++d) {
            for (int64_t col = 0; col < M; ++col) {
              W[d * M + col] += c_[j] * feature(k, key(j), d) * double(v[std::size_t(key(j) * M + col)]);
            }
          }
        }
        // queries: dW, dg, dA
        std::vector<double> dW(D * M), dA(D), dB(D), dQ(D), dK(D), dg(L), slope(L), dr(S), dO(S), dI(L);
        for (int64_t i = 0; i < L; ++i) {
          a[i] = 1 / (1 + std::exp(-dot_eps(q, query(i), A) * s.allocation[n]));
          if (!qvalid(i) || scale == 0) {
            continue;
          }
          for (int d = 0; d < D; ++d) {
            const double x = feature(q, query(i), d);
            for (int64_t col = 0; col < M; ++col) {
              const double o = double(dout[std::size_t(query(i) * M + col)]);
              dW[d * M + col] += a[i] * I[i] * x * o;
              dg[i] += o * x * W[d * M + col];
            }
          }
          slope[i] = I[i] * a[i] * (1 - a[i]) * s.allocation[n];
          for (int d = 0; d < D; ++d) {
            dA[d] += dg[i] * slope[i] * (feature(q, query(i), d) + e);
          }
        }
        // keys: dc, dr, dB, dO, dQ
        double total = 0;
        for (int64_t i = 0; i < D * M; ++i) {
          total += dW[i] * W[i];
        }
        for (int64_t j = 0; j < S; ++j) {
          if (!kvalid(j)) {
            continue;
          }
          double dc = 0;
          for (int d = 0; d < D; ++d) {
            for (int64_t col = 0; col < M; ++col) {
              dc += feature(k, key(j), d) * dW[d * M + col] * double(v[std::size_t(key(j) * M + col)]);
            }
            dO[j] += dA[d] * feature(k, key(j), d);
          }
          dr[j] = std::abs(r[j]) <= c.clamp ? c_[j] * (dc - total / Sv) : 0;
          for (int d = 0; d < D; ++d) {
            dB[d] += dr[j] * (feature(k, key(j), d) + e);
            dQ[d] += -dO[j] * O[j] * O[j] * (feature(k, key(j), d) + e);
          }
        }
        // queries: dI, dq, dK
        for (int64_t i = 0; i < L; ++i) {
          if (!qvalid(i)) {
            continue;
          }
          dI[i] = dg[i] * a[i];
          for (int d = 0; d < D; ++d) {
            dI[i] += dB[d] * feature(q, query(i), d);
          }
          for (int d = 0; d < D; ++d) {
            double grad = slope[i] * dg[i] * (A[d] + e) + I[i] * dB[d] - dI[i] * I[i] * I[i] * (K[d] + e) + dQ[d];
            for (int64_t col = 0; col < M; ++col) {
              grad += a[i] * I[i] * W[d * M + col] * double(dout[std::size_t(query(i) * M + col)]);
            }
            dK[d] += -dI[i] * I[i] * I[i] * (feature(q, query(i), d) + e);
            const float x = float(q[std::size_t(query(i) * D + d)]);
            g.dq[std::size_t(query(i) * D + d)] = grad * phi_derivative(c.feature_map, x);
          }
        }
        // keys: dk, dv
        for (int64_t j = 0; j < S; ++j) {
          for (int d = 0; kvalid(j) && d < D; ++d) {
            double grad = dr[j] * (B[d] + e) + O[j] * dA[d] - dO[j] * O[j] * O[j] * (Q[d] + e) + dK[d];
            for (int64_t col = 0; col < M; ++col) {
              grad += c_[j] * dW[d * M + col] * double(v[std::size_t(key(j) * M + col)]);
              g.dv[std::size_t(key(j) * M + col)] += c_[j] * dW[d * M + col] * feature(k, key(j), d);
            }
            const float x = float(k[std::size_t(key(j) * D + d)]);
            g.dk[std::size_t(key(j) * D + d)] = grad * phi_derivative(c.feature_map, x);
          }
        }
      }
    }
    return {s, g};
  }

  // The four passes from the float64 sums rounded to float, every output poisoned with NaN first: dq, dk, dv.
  std::array<std::vector<T>, 3> run_backward(const Sums& sums) const {
    namespace fk = flow_attention_kernels;
    const float nan = std::numeric_limits<float>::quiet_NaN();
    const auto floats = [](const std::vector<double>& x) { return std::vector<float>(x.begin(), x.end()); };
    const std::vector<float> Q = floats(sums.Q), K = floats(sums.K), A = floats(sums.A), B = floats(sums.B),
                             W = floats(sums.W), top = floats(sums.top), scale = floats(sums.scale),
                             allocation = floats(sums.allocation);
    const int tiles = c.M / flowformer::chunk::backward_value_tile(D, c.M, sizeof(T));
    std::vector<T> dq(q.size(), T(nan)), dk(k.size(), T(nan)), dv(v.size(), T(nan));
    std::vector<float> dq_parts(tiles > 1 ? tiles * q.size() : 0, nan), dk_parts(tiles > 1 ? tiles * k.size() : 0, nan);
    const auto pass = [&](bool keys, bool second, const std::vector<float>& state) {
      auto p = this->template side<fk::NoncausalBackwardParams>(keys);
      p.second = second;
      p.clamp = c.clamp;
      p.dout = dout.data();
      for (int i = 0; i < 3; ++i) {
        const int64_t rows[3] = {c.H * c.L, c.L, 1};
        p.dout_stride[i] = rows[i] * c.M;
      }
      p.dq = dq.data();
      p.dk = dk.data();
      p.dv = dv.data();
      p.dq_parts = tiles > 1 ? dq_parts.data() : nullptr;
      p.dk_parts = tiles > 1 ? dk_parts.data() : nullptr;
      p.state = state.data();
      p.K = K.data();
      p.Q = Q.data();
      p.A = A.data();
      p.B = B.data();
      p.allocation = allocation.data();
      p.max = top.data();
      p.scale = scale.data();
      return p;
    };
    auto p = pass(false, false, W);
    const int Gq = p.segments;
    std::vector<float> dW_parts(std::size_t(N * Gq * c.H * D * c.M), nan);
    std::vector<float> dA_parts(std::size_t(tiles * N * Gq * c.H * D), nan);
    p.dW = dW_parts.data();
    p.shares = dA_parts.data();
    fk::emulated::QueryGrads<D>::run(p, nullptr);
    const std::vector<float> dW = this->add_segments(dW_parts, Gq, D * c.M);
    const std::vector<float> dA = this->add_segments(dA_parts, Gq, D, tiles);
    std::vector<float> total(std::size_t(N * c.H));
    for (int64_t nh = 0; nh < N * c.H; ++nh) {
      double t = 0;
      for (int64_t i = 0; i < D * c.M; ++i) {
        t += double(dW[std::size_t(nh * D * c.M + i)]) * W[std::size_t(nh * D * c.M + i)];
      }
      const double keys = sums.keys[std::size_t(nh / c.H)];
      total[std::size_t(nh)] = keys > 0 ? float(t / keys) : 0.f;
    }
    p = pass(true, false, dW);
    const int Gk = p.segments;
    std::vector<float> dB_parts(std::size_t(tiles * N * Gk * c.H * D), nan);
    std::vector<float> dQ_parts(std::size_t(N * Gk * c.H * D), nan);
    p.dA = dA.data();
    p.total = total.data();
    p.shares = dB_parts.data();
    p.dQ_sums = dQ_parts.data();
    fk::emulated::KeyGrads<D>::run(p, nullptr);
    const std::vector<float> dB = this->add_segments(dB_parts, Gk, D, tiles);
    const std::vector<float> dQ = this->add_segments(dQ_parts, Gk, D);
    p = pass(false, true, W);
    std::vector<float> dK_parts(std::size_t(tiles * N * Gq * c.H * D), nan);
    p.dB = dB.data();
    p.dQ = dQ.data();
    p.shares = dK_parts.data();
    fk::emulated::QueryGrads<D>::run(p, nullptr);
    const std::vector<float> dK = this->add_segments(dK_parts, Gq, D, tiles);
    p = pass(true, true, dW);
    p.dA = dA.data();
    p.dK = dK.data();
    p.total = total.data();
    fk::emulated::KeyGrads<D>::run(p, nullptr);
    if (tiles > 1) {  // the tiles' shares of dq, dk added in tile order
      dq = add_tile_shares(dq_parts, q.size());
      dk = add_tile_shares(dk_parts, k.size());
    }
    return {dq, dk, dv};
  }
  static std::vector<T> add_tile_shares(const std::vector<float>& parts, std::size_t n) {
    const std::vector<float> sum = add_shares(parts, n);
    return std::vector<T>(sum.begin(), sum.end());
  }

  // The largest ||kernel - reference|| / ||reference|| of dq, dk, dv (-1: a non-finite or unwritten element).
  double backward_error() const {
    const auto [sums, expected] = reference();
    const auto got = run_backward(sums);
    double worst = 0;
    for (const auto& [x, y] : {std::pair{&got[0], &expected.dq}, std::pair{&got[1], &expected.dk},
                               std::pair{&got[2], &expected.dv}}) {
      const double error = relative_error(*x, *y);
      if (error < 0) {
        return error;
      }
      worst = std::max(worst, error);
    }
    return worst;
  }
};

}  // namespace flowformer::simt_tests
