// flowformer::flow_attention from C++: through the C++ API and the dispatcher, against values
// computed here independently (plain loops over the formulas of spec/flow_attention.md, in double),
// autograd from C++, and errors.
#include <flowformer/flowformer.h>

#include <catch2/catch.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

using Matrix = std::vector<std::vector<double>>;

Matrix rows(const at::Tensor& t) {  // (N, X) double tensor -> rows
  Matrix m(t.size(0), std::vector<double>(t.size(1)));
  for (int64_t i = 0; i < t.size(0); ++i) {
    for (int64_t j = 0; j < t.size(1); ++j) {
      m[i][j] = t[i][j].item<double>();
    }
  }
  return m;
}

double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

double dot_eps(const std::vector<double>& x, const std::vector<double>& y, double eps) {
  double s = 0;
  for (size_t d = 0; d < x.size(); ++d) {
    s += (x[d] + eps) * (y[d] + eps);
  }
  return s;
}

std::vector<double> column_sum(const Matrix& m, size_t upto, const std::vector<double>& weight) {
  std::vector<double> s(m[0].size(), 0.0);
  for (size_t i = 0; i < upto; ++i) {
    for (size_t d = 0; d < s.size(); ++d) {
      s[d] += weight[i] * m[i][d];
    }
  }
  return s;
}

// One (batch, head), no padding, sigmoid features: the spec's formulas, quadratic and plain.
Matrix naive_flow_attention(const Matrix& query, const Matrix& key, const Matrix& value, bool causal, double eps,
                            double clamp) {
  const size_t L = query.size(), S = key.size(), M = value[0].size();
  Matrix q = query, k = key;
  for (auto* m : {&q, &k}) {
    for (auto& r : *m) {
      for (auto& x : r) {
        x = sigmoid(x);
      }
    }
  }
  std::vector<double> ones(std::max(L, S), 1.0), I(L), O(S), sink(L), source(S);
  Matrix out(L, std::vector<double>(M, 0.0));
  if (!causal) {
    for (size_t i = 0; i < L; ++i) I[i] = 1.0 / dot_eps(q[i], column_sum(k, S, ones), eps);
    for (size_t j = 0; j < S; ++j) O[j] = 1.0 / dot_eps(k[j], column_sum(q, L, ones), eps);
    for (size_t i = 0; i < L; ++i) sink[i] = dot_eps(q[i], column_sum(k, S, O), eps);
    for (size_t j = 0; j < S; ++j) source[j] = std::clamp(dot_eps(k[j], column_sum(q, L, I), eps), -clamp, clamp);
    double total = 0;
    for (size_t j = 0; j < S; ++j) total += std::exp(source[j]);
    for (size_t i = 0; i < L; ++i) {
      const double a = sigmoid(sink[i] * double(L) / double(S));
      for (size_t j = 0; j < S; ++j) {
        double qk = 0;
        for (size_t d = 0; d < q[i].size(); ++d) qk += q[i][d] * k[j][d];
        const double c = double(S) * std::exp(source[j]) / total;
        for (size_t m = 0; m < M; ++m) out[i][m] += a * I[i] * qk * c * value[j][m];
      }
    }
    return out;
  }
  for (size_t t = 0; t < L; ++t) {
    const double n = double(t + 1);
    I[t] = n / dot_eps(q[t], column_sum(k, t + 1, ones), eps);
    O[t] = n / dot_eps(k[t], column_sum(q, t + 1, ones), eps);
  }
  std::vector<double> e(L);
  for (size_t t = 0; t < L; ++t) {
    const double n = double(t + 1);
    sink[t] = dot_eps(q[t], column_sum(k, t + 1, O), eps) / n;
    e[t] = std::exp(std::clamp(dot_eps(k[t], column_sum(q, t + 1, I), eps) / n, -clamp, clamp));
  }
  for (size_t t = 0; t < L; ++t) {
    const double n = double(t + 1);
    for (size_t j = 0; j <= t; ++j) {
      double prefix = 0;
      for (size_t i = 0; i <= j; ++i) prefix += e[i];
      const double c = double(j + 1) * e[j] / prefix;
      double qk = 0;
      for (size_t d = 0; d < q[t].size(); ++d) qk += q[t][d] * k[j][d];
      for (size_t m = 0; m < M; ++m) out[t][m] += sigmoid(sink[t]) * I[t] / n * qk * c * value[j][m];
    }
  }
  return out;
}

}  // namespace

TEST_CASE("flow_attention matches an independent computation", "[flow_attention]") {
  torch::manual_seed(7);
  for (bool causal : {false, true}) {
    const int64_t L = 6, S = causal ? 6 : 5, D = 3, M = 4;
    const auto opts = torch::dtype(torch::kDouble);
    const auto q = torch::randn({2, 2, L, D}, opts), k = torch::randn({2, 2, S, D}, opts);
    const auto v = torch::randn({2, 2, S, M}, opts);
    flowformer::FlowAttentionOptions o;
    o.causal = causal;
    o.clamp = 5.0;
    const auto out = flowformer::flow_attention(q, k, v, o);
    REQUIRE(out.sizes() == at::IntArrayRef({2, 2, L, M}));
    for (int64_t b = 0; b < 2; ++b) {
      for (int64_t h = 0; h < 2; ++h) {
        const Matrix expected = naive_flow_attention(rows(q[b][h]), rows(k[b][h]), rows(v[b][h]), causal, o.eps, 5.0);
        for (int64_t i = 0; i < L; ++i) {
          for (int64_t m = 0; m < M; ++m) {
            CHECK(out[b][h][i][m].item<double>() == Approx(expected[i][m]).epsilon(1e-10).margin(1e-12));
          }
        }
      }
    }
  }
}

TEST_CASE("flow_attention float32 through the dispatcher agrees with float64", "[flow_attention]") {
  const auto q = torch::randn({1, 3, 40, 8}), k = torch::randn({1, 3, 40, 8}), v = torch::randn({1, 3, 40, 5});
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow("flowformer::flow_attention", "");
  const auto out = op.typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool,
                                       c10::string_view, double, double, const std::optional<at::Tensor>&,
                                       const std::optional<at::Tensor>&)>()
                       .call(q, k, v, true, "elu1", 1e-6, 1.0, std::nullopt, std::nullopt);
  flowformer::FlowAttentionOptions o;
  o.causal = true;
  o.feature_map = "elu1";
  const auto ref = flowformer::flow_attention(q.to(torch::kDouble), k.to(torch::kDouble), v.to(torch::kDouble), o);
  CHECK(((out.to(torch::kDouble) - ref).norm() / ref.norm()).item<double>() < 1e-5);
}

TEST_CASE("flow_attention autograd from C++ matches finite differences", "[flow_attention]") {
  for (bool causal : {false, true}) {
    const auto opts = torch::dtype(torch::kDouble);
    auto q = torch::randn({1, 2, 5, 3}, opts).requires_grad_();
    auto k = torch::randn({1, 2, 5, 3}, opts).requires_grad_();
    auto v = torch::randn({1, 2, 5, 2}, opts).requires_grad_();
    const auto w = torch::randn({1, 2, 5, 2}, opts);
    flowformer::FlowAttentionOptions o;
    o.causal = causal;
    o.key_padding_mask = torch::tensor({false, false, false, false, true}).view({1, 5});
    auto loss = [&](const at::Tensor& qq, const at::Tensor& kk, const at::Tensor& vv) {
      return (flowformer::flow_attention(qq, kk, vv, o) * w).sum();
    };
    loss(q, k, v).backward();
    REQUIRE(q.grad().defined());
    REQUIRE(k.grad().defined());
    REQUIRE(v.grad().defined());
    torch::NoGradGuard no_grad;
    const double h = 1e-6;
    std::vector<at::Tensor> inputs{q, k, v};
    for (size_t which = 0; which < 3; ++which) {
      const auto flat = inputs[which].detach().reshape(-1);
      const auto grad = inputs[which].grad().reshape(-1);
      for (int64_t idx = 0; idx < flat.numel(); idx += 3) {
        auto args = std::vector<at::Tensor>{q.detach().clone(), k.detach().clone(), v.detach().clone()};
        args[which].view(-1)[idx] += h;
        const double up = loss(args[0], args[1], args[2]).item<double>();
        args[which].view(-1)[idx] -= 2 * h;
        const double down = loss(args[0], args[1], args[2]).item<double>();
        CHECK(grad[idx].item<double>() == Approx((up - down) / (2 * h)).epsilon(1e-5).margin(1e-8));
      }
    }
    CHECK((k.grad()[0].select(1, 4) == 0).all().item<bool>());  // padded key: zero gradient
  }
}

TEST_CASE("flow_attention rejects bad input with a clear c10::Error", "[flow_attention]") {
  const auto q = torch::randn({2, 2, 4, 3}), k = torch::randn({2, 2, 5, 3}), v = torch::randn({2, 2, 5, 2});
  flowformer::FlowAttentionOptions causal;
  causal.causal = true;
  CHECK_THROWS_WITH(flowformer::flow_attention(q, k, v, causal),
                    Catch::Contains("flowformer::flow_attention: causal=True requires query and key of the same length"));
  CHECK_THROWS_AS(flowformer::flow_attention(q, k.slice(3, 0, 2), v), c10::Error);
  CHECK_THROWS_WITH(flowformer::flow_attention(q, k.slice(3, 0, 2), v),
                    Catch::Contains("key must have feature size D = 3 (as query), got 2"));
  flowformer::FlowAttentionOptions bad_map;
  bad_map.feature_map = "tanh";
  CHECK_THROWS_WITH(flowformer::flow_attention(q, k, v, bad_map), Catch::Contains("feature_map must be one of"));
}
