// A problem for the fused linear-attention kernels (kernels/linear_attention), shared by their emulator tests
// (test_linear_attention_kernels.cpp) and the counting of what they do (kernel_counts.cpp): random inputs in a
// strided layout, the kernels run as the host runs them (both schedules), and a float64 reference.
#pragma once

#include "helpers.h"
#include "linear_attention/causal_backward.cuh"
#include "linear_attention/causal_forward.cuh"
#include "linear_attention/noncausal_backward.cuh"
#include "linear_attention/segment_sums.cuh"
#include "linear_attention/state_output.cuh"

#include <cmath>
#include <limits>
#include <map>
#include <string>
#include <type_traits>
#include <vector>

namespace flowformer::simt_tests {

namespace kernels = flowformer::linear_attention_kernels;
namespace simt = flowformer::simt;

inline double phi(FeatureMap f, double x) {
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

inline double phi_derivative(FeatureMap f, double x) {
  switch (f) {
    case FeatureMap::Sigmoid:
      return phi(f, x) * (1 - phi(f, x));
    case FeatureMap::Elu1:
      return x > 0 ? 1 : std::exp(x);
    case FeatureMap::Relu:
      return x > 0 ? 1 : 0;
    case FeatureMap::Identity:
      break;
  }
  return 1;
}

struct Case {
  std::vector<int64_t> lengths;  // packed sequences (cu_seqlens) when `packed`, else B sequences of lengths[0]
  bool packed;
  int H, D, M;
  FeatureMap feature_map = FeatureMap::Elu1;
  bool normalize = true;
  bool initial_state = true;
  float value_lo = -1, value_hi = 3;  // a mean of 1: outputs far from 0, so that the dden terms matter
  float dout_hi = 2;                  // dout in [0, dout_hi]: correlated with the outputs, large dden terms
  int64_t negative_query_period = 0;  // > 0: the queries of every such row are all negative (zero relu features)
  kernels::Segments backward_segments{1, 0};  // G > 1: the backward's split schedule, as the host runs it
};

using Outputs = std::map<std::string, std::vector<double>>;  // name -> values (read back from T or float)

template <typename T>
int value_tiles(const Case& c) {  // the backward's
  return c.M / kernels::backward_value_tile(c.D, c.M, sizeof(T));
}

// The kernels' element type of T (bf16, half or float).
template <typename T>
constexpr kernels::Element element_of() {
  return std::is_same_v<T, float> ? kernels::Element::float32
         : std::is_same_v<T, simt::half> ? kernels::Element::half
                                         : kernels::Element::bf16;
}

// The spec's tolerance of the inputs' dtype (float32: three tf32 products must keep float32's accuracy).
template <typename T>
double tolerance() {
  return std::is_same_v<T, float> ? 1e-5 : std::is_same_v<T, simt::half> ? 5e-3 : 2e-2;
}

// ||out - expected|| / ||expected|| over a kernel's outputs (T read back as float), or -1 if one is not finite
// (an unwritten or poisoned element).
template <typename T>
double relative_error(const std::vector<T>& out, const std::vector<double>& expected) {
  double diff = 0, norm = 0;
  for (std::size_t i = 0; i < out.size(); ++i) {
    const double x = float(out[i]);
    if (!std::isfinite(x)) {
      return -1;
    }
    diff += (x - expected[i]) * (x - expected[i]);
    norm += expected[i] * expected[i];
  }
  return std::sqrt(diff / norm);
}

// The sum of `parts` (shares of n floats, one per value tile) in tile order, as the host adds them.
inline std::vector<float> add_shares(const std::vector<float>& parts, std::size_t n) {
  std::vector<float> sum(parts.begin(), parts.begin() + std::ptrdiff_t(n));
  for (std::size_t j = 1; j * n < parts.size(); ++j) {
    for (std::size_t i = 0; i < n; ++i) {
      sum[i] += parts[j * n + i];
    }
  }
  return sum;
}

// dq, dk (or, with value tiles, their float shares, poisoned) of a backward, as the host sets them.
template <typename T>
struct GradientBuffers {
  std::vector<T>& dq;
  std::vector<T>& dk;
  std::vector<float> dq_parts, dk_parts;

  GradientBuffers(const Case& c, std::vector<T>& dq_, std::vector<T>& dk_) : dq(dq_), dk(dk_) {
    if (value_tiles<T>(c) > 1) {
      dq_parts.assign(value_tiles<T>(c) * dq.size(), std::numeric_limits<float>::quiet_NaN());
      dk_parts.assign(value_tiles<T>(c) * dk.size(), std::numeric_limits<float>::quiet_NaN());
    }
  }
  void set(kernels::Gradients& g) {
    g.dq = dq.data();
    g.dk = dk.data();
    g.dq_parts = dq_parts.empty() ? nullptr : dq_parts.data();
    g.dk_parts = dk_parts.empty() ? nullptr : dk_parts.data();
  }
  void finish() {
    if (!dq_parts.empty()) {
      const auto q = add_shares(dq_parts, dq.size()), k = add_shares(dk_parts, dk.size());
      std::copy(q.begin(), q.end(), dq.begin());
      std::copy(k.begin(), k.end(), dk.begin());
    }
  }
};

// Inputs laid out (B, L, H, width): rows strided by H * width, as a (B, H, L, width) view of them.
template <typename T>
struct Problem {
  Case c;
  int64_t B, L, N;
  std::vector<int64_t> cu;
  std::vector<T> q, k, v, dout;
  std::vector<float> kv0, z0, dkv, dz;

  explicit Problem(const Case& c_) : c(c_) {
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
    fill(dout, c.M, 16, 0, c.dout_hi);
    for (int64_t row = 0; c.negative_query_period > 0 && row < B * L; ++row) {
      if (row % L % c.negative_query_period == c.negative_query_period - 1) {
        for (int64_t i = row * c.H * c.D; i < (row + 1) * c.H * c.D; ++i) {
          q[i] = T(-std::fabs(float(q[i])) - 0.1f);
        }
      }
    }
    kv0 = random_floats(std::size_t(N * c.H * c.D * c.M), 14);
    z0 = random_floats(std::size_t(N * c.H * c.D), 15, 0.5f, 1.5f);
    dkv = random_floats(kv0.size(), 17);
    dz = random_floats(z0.size(), 18);
  }

  template <typename Params>
  void inputs(Params& p) const {
    p.q = q.data();
    p.k = k.data();
    p.v = v.data();
    for (int i = 0; i < 3; ++i) {  // (B, H, L) strides of a (B, L, H, width) layout
      const int64_t per_row[3] = {L * c.H, 1, c.H};
      p.q_stride[i] = p.k_stride[i] = per_row[i] * c.D;
      p.v_stride[i] = per_row[i] * c.M;
    }
    p.cu_seqlens = c.packed ? cu.data() : nullptr;
    p.L = L;
    p.N = int(N);
    p.H = c.H;
    p.D = c.D;
    p.M = c.M;
    p.feature_map = c.feature_map;
    p.normalize = c.normalize;
    p.eps = 1e-6f;
    p.element = element_of<T>();
  }

  // The kernels' results, every output poisoned with NaN first.
  Outputs forward() const {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    std::vector<T> out(std::size_t(B * c.H * L * c.M), T(nan));
    std::vector<float> kv(kv0.size(), nan), z(z0.size(), nan);
    kernels::CausalForwardParams p{};
    inputs(p);
    p.out = out.data();
    p.kv0 = c.initial_state ? kv0.data() : nullptr;
    p.z0 = c.initial_state ? z0.data() : nullptr;
    p.kv_final = kv.data();
    p.z_final = z.data();
    p.segments = 1;
    kernels::run_for_head_dim<kernels::emulated::CausalForward>(p, nullptr);
    return {{"out", widen(out)}, {"kv", widen(kv)}, {"z", widen(z)}};
  }

  // The backward's passes; with segments as the host runs them (csrc/linear_attention/fused.h): the forward's
  // segment sums scanned in order give each segment its incoming state, the query pass's segment sums scanned
  // from the end give each segment its incoming gradient and the initial state's.
  Outputs backward() const {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    std::vector<T> dq(q.size(), T(nan)), dk(k.size(), T(nan)), dv(v.size(), T(nan));
    const int tiles = value_tiles<T>(c);
    std::vector<float> dkv0(kv0.size(), nan), dz0(z0.size(), nan), inv_den(B * c.H * L, nan);
    std::vector<float> dden(tiles * B * c.H * L, nan);
    GradientBuffers<T> grads(c, dq, dk);
    kernels::CausalBackwardParams p{};
    inputs(p);
    static_cast<kernels::Segments&>(p) = c.backward_segments;
    grads.set(p);
    p.dout = dout.data();
    std::copy(p.v_stride, p.v_stride + 3, p.dout_stride);
    p.kv0 = c.initial_state ? kv0.data() : nullptr;
    p.z0 = c.initial_state ? z0.data() : nullptr;
    p.dkv_final = c.initial_state ? dkv.data() : nullptr;
    p.dz_final = c.initial_state ? dz.data() : nullptr;
    p.dv = dv.data();
    p.dkv0 = dkv0.data();
    p.dz0 = dz0.data();
    p.inv_den = inv_den.data();
    p.dden = dden.data();
    const int64_t G = p.segments, matrix = c.H * c.D * c.M, vector = c.H * c.D;
    std::vector<float> kv_in(N * G * matrix, nan), z_in(N * G * vector, nan);
    std::vector<float> dkv_in(kv_in.size(), nan), dz_in(tiles * z_in.size(), nan);
    if (G > 1) {
      kernels::SegmentSumsParams s{};
      inputs(s);
      static_cast<kernels::Segments&>(s) = c.backward_segments;
      s.kv = kv_in.data();
      s.z = z_in.data();
      kernels::run_for_head_dim<kernels::emulated::SegmentSums>(s, nullptr);
      scan(kv_in, p.kv0, matrix, false);
      scan(z_in, p.z0, vector, false);
      p.kv0 = kv_in.data();
      p.z0 = z_in.data();
      p.dkv_sums = dkv_in.data();
      p.dz_sums = dz_in.data();
    }
    kernels::run_for_head_dim<kernels::emulated::CausalQueryGrads>(p, nullptr);
    const std::vector<float> dden_sum = add_shares(dden, inv_den.size());
    p.dden = const_cast<float*>(dden_sum.data());  // read only by the key pass
    if (G > 1) {
      dz_in = add_shares(dz_in, z_in.size());
      dkv0 = scan(dkv_in, p.dkv_final, matrix, true);
      dz0 = scan(dz_in, p.dz_final, vector, true);
      p.dkv_final = dkv_in.data();
      p.dz_final = dz_in.data();
      p.dkv0 = p.dz0 = nullptr;
      p.dkv_sums = p.dz_sums = nullptr;
    }
    kernels::run_for_head_dim<kernels::emulated::CausalKeyGrads>(p, nullptr);
    grads.finish();
    // dq, dk, dv come (B, H, L, .) contiguous: back to the inputs' (B, L, H, .) order
    return {{"dq", reorder(widen(dq), c.D)}, {"dk", reorder(widen(dk), c.D)}, {"dv", reorder(widen(dv), c.M)},
            {"dkv0", widen(dkv0)}, {"dz0", widen(dz0)}};
  }

  // The exclusive scan of (N, G, size) segment sums over each sequence's segments (in order or reversed), in
  // place, from the (N, size) `initial` (or zeros); returns the totals (N, size).
  std::vector<float> scan(std::vector<float>& parts, const float* initial, int64_t size, bool reversed) const {
    const int64_t G = c.backward_segments.segments;
    std::vector<float> running(N * size, 0.f);
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t i = 0; i < size; ++i) {
        running[n * size + i] = initial != nullptr ? initial[n * size + i] : 0.f;
      }
      for (int64_t step = 0; step < G; ++step) {
        float* part = parts.data() + (n * G + (reversed ? G - 1 - step : step)) * size;
        for (int64_t i = 0; i < size; ++i) {
          const float incoming = running[n * size + i];
          running[n * size + i] += part[i];
          part[i] = incoming;
        }
      }
    }
    return running;
  }

  template <typename X>
  static std::vector<double> widen(const std::vector<X>& x) {
    std::vector<double> y(x.size());
    for (std::size_t i = 0; i < x.size(); ++i) {
      y[i] = double(float(x[i]));
    }
    return y;
  }
  std::vector<double> reorder(const std::vector<double>& x, int width) const {
    std::vector<double> y(x.size());
    for (int64_t b = 0; b < B; ++b) {
      for (int h = 0; h < c.H; ++h) {
        for (int64_t t = 0; t < L; ++t) {
          for (int i = 0; i < width; ++i) {
            y[((b * L + t) * c.H + h) * width + i] = x[((b * c.H + h) * L + t) * width + i];
          }
        }
      }
    }
    return y;
  }

  // float64: the forward recurrences, then the backward of spec/linear_attention.md by its two scans.
  Outputs reference() const {
    const int H = c.H, D = c.D, M = c.M;
    Outputs r{{"out", std::vector<double>(B * H * L * M)}, {"kv", std::vector<double>(kv0.size())},
              {"z", std::vector<double>(z0.size())}, {"dq", std::vector<double>(q.size())},
              {"dk", std::vector<double>(k.size())}, {"dv", std::vector<double>(v.size())},
              {"dkv0", std::vector<double>(kv0.size())}, {"dz0", std::vector<double>(z0.size())}};
    for (int64_t s = 0; s < N; ++s) {
      const int64_t b = c.packed ? 0 : s, first = c.packed ? cu[s] : 0, len = c.packed ? cu[s + 1] - cu[s] : L;
      for (int h = 0; h < H; ++h) {
        const int64_t state = s * H + h;
        std::vector<double> S(D * M), z(D), den(len), dden(len);
        for (int i = 0; i < D * M; ++i) {
          S[i] = c.initial_state ? kv0[state * D * M + i] : 0;
        }
        for (int d = 0; d < D; ++d) {
          z[d] = c.initial_state ? z0[state * D + d] : 0;
        }
        const auto row = [&](int64_t t) { return (b * L + first + t) * H + h; };
        const auto feat = [&](const std::vector<T>& x, int64_t t, int d) { return phi(c.feature_map, float(x[row(t) * D + d])); };
        for (int64_t t = 0; t < len; ++t) {
          std::vector<double> out(M);
          for (int d = 0; d < D; ++d) {
            z[d] += feat(k, t, d);
            for (int m = 0; m < M; ++m) {
              S[d * M + m] += feat(k, t, d) * float(v[row(t) * M + m]);
            }
          }
          den[t] = 1e-6;
          for (int d = 0; d < D; ++d) {
            den[t] += feat(q, t, d) * z[d];
          }
          den[t] = c.normalize ? den[t] : 1;
          double dot = 0;  // <dout_t, out_t>
          for (int m = 0; m < M; ++m) {
            for (int d = 0; d < D; ++d) {
              out[m] += feat(q, t, d) * S[d * M + m];
            }
            out[m] /= den[t];
            r["out"][((b * H + h) * L + first + t) * M + m] = out[m];
            dot += float(dout[row(t) * M + m]) * out[m];
          }
          dden[t] = c.normalize ? -dot / den[t] : 0;
          for (int d = 0; d < D; ++d) {  // dq_t = S_t dout_t / den_t + dden_t z_t
            double g = dden[t] * z[d];
            for (int m = 0; m < M; ++m) {
              g += S[d * M + m] * float(dout[row(t) * M + m]) / den[t];
            }
            r["dq"][row(t) * D + d] = g * phi_derivative(c.feature_map, float(q[row(t) * D + d]));
          }
        }
        for (int i = 0; i < D * M; ++i) {
          r["kv"][state * D * M + i] = S[i];
          S[i] = c.initial_state ? dkv[state * D * M + i] : 0;  // now R
        }
        for (int d = 0; d < D; ++d) {
          r["z"][state * D + d] = z[d];
          z[d] = c.initial_state ? dz[state * D + d] : 0;  // now r
        }
        for (int64_t t = len - 1; t >= 0; --t) {
          for (int d = 0; d < D; ++d) {
            z[d] += dden[t] * feat(q, t, d);
            for (int m = 0; m < M; ++m) {
              S[d * M + m] += feat(q, t, d) * float(dout[row(t) * M + m]) / den[t];
            }
          }
          for (int d = 0; d < D; ++d) {  // dk_t = R_t v_t + r_t
            double g = z[d];
            for (int m = 0; m < M; ++m) {
              g += S[d * M + m] * float(v[row(t) * M + m]);
            }
            r["dk"][row(t) * D + d] = g * phi_derivative(c.feature_map, float(k[row(t) * D + d]));
          }
          for (int m = 0; m < M; ++m) {  // dv_t = R_t^T k_t
            double g = 0;
            for (int d = 0; d < D; ++d) {
              g += S[d * M + m] * feat(k, t, d);
            }
            r["dv"][row(t) * M + m] = g;
          }
        }
        std::copy(S.begin(), S.end(), r["dkv0"].begin() + state * D * M);
        std::copy(z.begin(), z.end(), r["dz0"].begin() + state * D);
      }
    }
    return r;
  }
};

}  // namespace flowformer::simt_tests
