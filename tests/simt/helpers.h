// Shared by the emulator's tests: the schedules every sample runs under, random inputs, float64 references.
#pragma once

#include "simt/emulator.h"
#include "simt/types.h"

#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace flowformer::simt_tests {

struct NamedSchedule {
  std::string name;
  simt::Options options;
};

inline std::vector<NamedSchedule> all_schedules() {
  std::vector<NamedSchedule> schedules;
  simt::Options o;
  schedules.push_back({"forward", o});
  o.schedule = simt::Schedule::Reverse;
  schedules.push_back({"reverse", o});
  for (uint64_t seed : {1u, 2u, 3u}) {
    o.schedule = simt::Schedule::Random;
    o.seed = seed;
    schedules.push_back({"random:" + std::to_string(seed), o});
  }
  o.schedule = simt::Schedule::Random;
  o.seed = 7;
  o.host_threads = 2;
  schedules.push_back({"random:7 on 2 host threads", o});
  return schedules;
}

inline std::vector<float> random_floats(std::size_t n, uint64_t seed, float lo = -1.f, float hi = 1.f) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> x(n);
  for (float& v : x) {
    v = dist(rng);
  }
  return x;
}

// C = A B in float64, A (m x k) and B (k x n) row-major.
template <typename TA, typename TB>
std::vector<double> reference_matmul(const std::vector<TA>& a, const std::vector<TB>& b, int m, int n, int k) {
  std::vector<double> c(std::size_t(m) * n, 0.0);
  for (int i = 0; i < m; ++i) {
    for (int p = 0; p < k; ++p) {
      const double av = double(float(a[std::size_t(i) * k + p]));
      for (int j = 0; j < n; ++j) {
        c[std::size_t(i) * n + j] += av * double(float(b[std::size_t(p) * n + j]));
      }
    }
  }
  return c;
}

}  // namespace flowformer::simt_tests
