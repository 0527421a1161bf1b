// Building blocks of the portable kernels: code written once, compiled by nvcc for the GPU (each "item"
// is one CUDA thread, see csrc/common/cuda_executor.cuh) and by the host compiler for the CPU (items run
// in a parallel loop, see csrc/common/host_executor.h), so the CPU test suite exercises the exact
// algorithm the CUDA kernels run. An item function reads inputs and earlier results and writes its own
// outputs only: no shared memory, no atomics, results independent of the order in which items run.
#pragma once

#include "common/feature_map_kind.h"

#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__)
#define FF_HD __host__ __device__ __forceinline__
#else
#define FF_HD inline
#endif

namespace flowformer::portable {

FF_HD float exp_(float x) { return expf(x); }
FF_HD double exp_(double x) { return exp(x); }
FF_HD float log_(float x) { return logf(x); }
FF_HD double log_(double x) { return log(x); }

// The exponential of the portable kernels (the fused 16-bit kernels pass a faster one to feature<F>).
struct Exp {
  template <typename A>
  FF_HD A operator()(A x) const {
    return exp_(x);
  }
};

// phi(x) of the feature map F (see csrc/common/feature_map.h for the table), with the exponential `exp`.
template <FeatureMap F, typename A, typename ExpFn = Exp>
FF_HD A feature(A x, const ExpFn& exp = {}) {
  if constexpr (F == FeatureMap::Sigmoid) {
    return A(1) / (A(1) + exp(-x));
  } else if constexpr (F == FeatureMap::Elu1) {
    const A e = exp(x);  // for every x, then a select: no branch around it
    return x > A(0) ? x + A(1) : e;
  } else if constexpr (F == FeatureMap::Relu) {
    return x > A(0) ? x : A(0);
  } else {
    return x;
  }
}

// phi'(x) of F, given fx = phi(x).
template <FeatureMap F, typename A>
FF_HD A feature_derivative(A x, A fx) {
  if constexpr (F == FeatureMap::Sigmoid) {
    return fx * (A(1) - fx);
  } else if constexpr (F == FeatureMap::Elu1) {
    return x > A(0) ? A(1) : fx;
  } else if constexpr (F == FeatureMap::Relu) {
    return x > A(0) ? A(1) : A(0);
  } else {
    return A(1);
  }
}

// fn(std::integral_constant<FeatureMap, f>{}): code specialised for the feature map f at compile time, chosen
// once at run time (outside the loops that apply it).
// A build for instruction counts (tests/simt, the bounds' cubin) defines FLOWFORMER_ONE_FEATURE_MAP (Elu1, ...):
// then every f runs that one map's code, so that a chunk loop has the one path a call with it takes.
template <typename Fn>
FF_HD decltype(auto) with_feature_map([[maybe_unused]] FeatureMap f, const Fn& fn) {
#if defined(FLOWFORMER_ONE_FEATURE_MAP)
  return fn(std::integral_constant<FeatureMap, FeatureMap::FLOWFORMER_ONE_FEATURE_MAP>{});
#else
  switch (f) {
    case FeatureMap::Sigmoid:
      return fn(std::integral_constant<FeatureMap, FeatureMap::Sigmoid>{});
    case FeatureMap::Elu1:
      return fn(std::integral_constant<FeatureMap, FeatureMap::Elu1>{});
    case FeatureMap::Relu:
      return fn(std::integral_constant<FeatureMap, FeatureMap::Relu>{});
    case FeatureMap::Identity:
      break;
  }
  return fn(std::integral_constant<FeatureMap, FeatureMap::Identity>{});
#endif
}

// phi(x) and phi'(x) for a feature map known at run time.
template <typename A>
FF_HD A feature(FeatureMap f, A x) {
  return with_feature_map(f, [&](auto map) { return feature<decltype(map)::value>(x); });
}
template <typename A>
FF_HD A feature_derivative(FeatureMap f, A x, A fx) {
  return with_feature_map(f, [&](auto map) { return feature_derivative<decltype(map)::value>(x, fx); });
}

// A softmax-weighted sum accumulated one term at a time against a running maximum m (no overflow):
// s = sum exp(z - m), a = sum exp(z - m) v. Empty: s = 0.
template <typename A>
struct OnlineSoftmax {
  A m = -INFINITY, s = 0, a = 0;

  FF_HD bool empty() const { return s == A(0); }
  FF_HD A average() const { return empty() ? A(0) : a / s; }  // 0 over no term at all
  FF_HD A log_sum() const { return empty() ? A(0) : m + log_(s); }  // log sum exp(z); 0 over no term

  FF_HD void add(A z, A v) {
    if (z > m) {
      const A scale = exp_(m - z);
      s *= scale;
      a *= scale;
      m = z;
    }
    const A e = exp_(z - m);
    s += e;
    a += e * v;
  }
};

// Channel lanes: an item of a per-channel kernel covers up to V consecutive channels of one row, within
// one group of `group` channels (a head; C itself when channels are not grouped). V = 1 on the GPU (one
// thread per channel, coalesced); V > 1 on the CPU, where the host compiler vectorises across the lanes.
template <int V>
struct ChannelBlock {
  int64_t row, c0, n;  // the row (every index but the channel), the first channel, the channels covered

  FF_HD static int64_t items(int64_t rows, int64_t C, int64_t group) {
    return rows * (C / group) * ((group + V - 1) / V);
  }
  FF_HD ChannelBlock(int64_t item, int64_t C, int64_t group) {
    const int64_t per_group = (group + V - 1) / V, per_row = (C / group) * per_group;
    const int64_t block = item % per_row, start = block % per_group * V;
    row = item / per_row;
    c0 = block / per_group * group + start;
    n = group - start < V ? group - start : V;
  }
  // body(count) with count = V as a compile-time constant for a full block (the loops over the lanes get
  // a fixed trip count and vectorise), else the remaining channels.
  template <typename Body>
  FF_HD void run(const Body& body) const {
    if (n == V) {
      body(std::integral_constant<int64_t, V>{});
    } else {
      body(n);
    }
  }
};

// Sums sum_{c < n} term(c) into V interleaved partial sums (V lanes: the host compiler vectorises the
// main loop; one lane on the GPU); lanes_total adds them in a fixed order, so results are deterministic.
template <int V, typename A, typename Term>
FF_HD void add_to_lanes(A (&lanes)[V], int64_t n, const Term& term) {
  int64_t c = 0;
  for (; c + V <= n; c += V) {
    for (int l = 0; l < V; ++l) {
      lanes[l] += term(c + l);
    }
  }
  for (; c < n; ++c) {
    lanes[c % V] += term(c);
  }
}

template <int V, typename A>
FF_HD A lanes_total(const A (&lanes)[V]) {
  A total = 0;
  for (int l = 0; l < V; ++l) {
    total += lanes[l];
  }
  return total;
}

// The rows of one (B, H, n, width) input, any strides but a unit stride along the row, with its
// padding (a row is valid unless one of the two (B, n) bool masks marks it) and optionally phi.
template <typename T>
struct Rows {
  const T* data;
  int64_t stride_b, stride_h, stride_row;
  int64_t H, n, width;
  const bool* pad_a;  // (B, n) or nullptr
  const bool* pad_b;  // (B, n) or nullptr
  bool apply_feature;
  FeatureMap feature_map;

  FF_HD bool valid(int64_t bh, int64_t r) const {
    const int64_t at = (bh / H) * n + r;
    return !(pad_a != nullptr && pad_a[at]) && !(pad_b != nullptr && pad_b[at]);
  }
  FF_HD const T* row(int64_t bh, int64_t r) const {
    return data + (bh / H) * stride_b + (bh % H) * stride_h + r * stride_row;
  }
  // Element c of row r, through phi when apply_feature.
  template <typename A>
  FF_HD A get(int64_t bh, int64_t r, int64_t c) const {
    const A x = static_cast<A>(row(bh, r)[c]);
    return apply_feature ? feature(feature_map, x) : x;
  }
  template <typename A>
  FF_HD A raw(int64_t bh, int64_t r, int64_t c) const {
    return static_cast<A>(row(bh, r)[c]);
  }
};

// Rows are split into chunks of `chunk` rows; chunk c holds rows [c * chunk, min((c + 1) * chunk, n)).
FF_HD int64_t num_chunks(int64_t n, int64_t chunk) { return (n + chunk - 1) / chunk; }

}  // namespace flowformer::portable
