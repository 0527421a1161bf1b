// flowformer::causal_linear_attention and flowformer::linear_attention from C++: against the
// recurrence of spec/linear_attention.md written here as plain loops in double, the continuation of
// the state, autograd to the initial state, and errors.
#include <flowformer/flowformer.h>

#include <catch2/catch.hpp>
#include <torch/torch.h>

#include <cmath>

namespace {

double elu1(double x) { return x > 0 ? x + 1 : std::exp(x); }

// One (batch, head): S_t = S_0 + sum k v^T, z_t = z_0 + sum k, out_t = q^T S_t / (q^T z_t + eps).
at::Tensor naive_causal(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, at::Tensor S,
                        at::Tensor z, double eps) {
  const int64_t L = query.size(0), D = query.size(1), M = value.size(1);
  at::Tensor out = torch::zeros({L, M}, torch::kDouble);
  for (int64_t t = 0; t < L; ++t) {
    std::vector<double> q(D), k(D);
    for (int64_t d = 0; d < D; ++d) {
      q[d] = elu1(query[t][d].item<double>());
      k[d] = elu1(key[t][d].item<double>());
    }
    double den = eps;
    for (int64_t d = 0; d < D; ++d) {
      z[d] += k[d];
      den += q[d] * z[d].item<double>();
      for (int64_t m = 0; m < M; ++m) {
        S[d][m] += k[d] * value[t][m].item<double>();
      }
    }
    for (int64_t m = 0; m < M; ++m) {
      double num = 0;
      for (int64_t d = 0; d < D; ++d) {
        num += q[d] * S[d][m].item<double>();
      }
      out[t][m] = num / den;
    }
  }
  return out;
}

double rel_err(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(torch::kDouble) - b).norm().item<double>() / b.norm().item<double>();
}

}  // namespace

TEST_CASE("causal_linear_attention matches the recurrence, with a state", "[linear_attention]") {
  torch::manual_seed(3);
  const int64_t B = 2, H = 2, L = 9, D = 3, M = 4;
  const auto q = torch::randn({B, H, L, D}), k = torch::randn({B, H, L, D}), v = torch::randn({B, H, L, M});
  const auto kv0 = torch::randn({B, H, D, M}), z0 = torch::rand({B, H, D}) + 1;
  flowformer::CausalLinearAttentionOptions options;
  options.initial_kv = kv0;
  options.initial_z = z0;
  const auto result = flowformer::causal_linear_attention(q, k, v, options);
  REQUIRE(result.out.sizes() == torch::IntArrayRef({B, H, L, M}));
  REQUIRE(result.final_kv.sizes() == torch::IntArrayRef({B, H, D, M}));
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      at::Tensor S = kv0[b][h].to(torch::kDouble).clone(), z = z0[b][h].to(torch::kDouble).clone();
      const auto expected = naive_causal(q[b][h].to(torch::kDouble), k[b][h].to(torch::kDouble),
                                         v[b][h].to(torch::kDouble), S, z, options.eps);
      CHECK(rel_err(result.out[b][h], expected) < 1e-5);
      CHECK(rel_err(result.final_kv[b][h], S) < 1e-5);
      CHECK(rel_err(result.final_z[b][h], z) < 1e-5);
    }
  }
}

TEST_CASE("causal_linear_attention continues a sequence and decodes step by step", "[linear_attention]") {
  torch::manual_seed(4);
  const auto q = torch::randn({1, 2, 12, 4}), k = torch::randn({1, 2, 12, 4}), v = torch::randn({1, 2, 12, 3});
  const auto whole = flowformer::causal_linear_attention(q, k, v);
  flowformer::CausalLinearAttentionOptions state;
  std::vector<at::Tensor> steps;
  for (int64_t t = 0; t < 12; ++t) {
    const auto step = flowformer::causal_linear_attention(q.narrow(2, t, 1), k.narrow(2, t, 1), v.narrow(2, t, 1),
                                                          state);
    state.initial_kv = step.final_kv;
    state.initial_z = step.final_z;
    steps.push_back(step.out);
  }
  CHECK(rel_err(torch::cat(steps, 2), whole.out.to(torch::kDouble)) < 1e-5);
  CHECK(rel_err(*state.initial_kv, whole.final_kv.to(torch::kDouble)) < 1e-5);
}

TEST_CASE("linear attention gradients reach the inputs and the initial state from C++", "[linear_attention]") {
  torch::manual_seed(5);
  const auto q = torch::randn({1, 1, 6, 3}, torch::requires_grad());
  const auto k = torch::randn({1, 1, 6, 3}, torch::requires_grad());
  const auto v = torch::randn({1, 1, 6, 2}, torch::requires_grad());
  const auto kv0 = torch::randn({1, 1, 3, 2}, torch::requires_grad());
  flowformer::CausalLinearAttentionOptions options;
  options.initial_kv = kv0;
  const auto result = flowformer::causal_linear_attention(q, k, v, options);
  (result.out.sum() + result.final_kv.sum()).backward();
  for (const auto* t : {&q, &k, &v, &kv0}) {
    REQUIRE(t->grad().defined());
    CHECK(torch::isfinite(t->grad()).all().item<bool>());
  }
  const auto out = flowformer::linear_attention(q, k, v);
  CHECK(out.sizes() == torch::IntArrayRef({1, 1, 6, 2}));
}

TEST_CASE("causal_linear_attention runs packed sequences (cu_seqlens) as separate runs", "[linear_attention]") {
  torch::manual_seed(6);
  const std::vector<int64_t> cu = {0, 3, 3, 73, 74};  // lengths 3, 0, 70 (two 64-row chunks), 1
  const int64_t N = 4, H = 2, L = 74, D = 3, M = 4;
  const auto q = torch::randn({1, H, L, D}, torch::kDouble), k = torch::randn({1, H, L, D}, torch::kDouble);
  const auto v = torch::randn({1, H, L, M}, torch::kDouble);
  const auto kv0 = torch::randn({N, H, D, M}, torch::dtype(torch::kDouble).requires_grad(true));
  flowformer::CausalLinearAttentionOptions options;
  options.initial_kv = kv0;
  options.cu_seqlens = torch::tensor(cu, torch::kInt);
  const auto packed = flowformer::causal_linear_attention(q, k, v, options);
  REQUIRE(packed.out.sizes() == torch::IntArrayRef({1, H, L, M}));
  REQUIRE(packed.final_kv.sizes() == torch::IntArrayRef({N, H, D, M}));
  REQUIRE(packed.final_z.sizes() == torch::IntArrayRef({N, H, D}));
  for (int64_t n = 0; n < N; ++n) {
    flowformer::CausalLinearAttentionOptions alone;
    alone.initial_kv = kv0.narrow(0, n, 1);
    const int64_t start = cu[n], length = cu[n + 1] - cu[n];
    const auto expected = flowformer::causal_linear_attention(q.narrow(2, start, length), k.narrow(2, start, length),
                                                              v.narrow(2, start, length), alone);
    CHECK(torch::allclose(packed.out.narrow(2, start, length), expected.out, 1e-12, 1e-14));
    CHECK(torch::allclose(packed.final_kv.narrow(0, n, 1), expected.final_kv, 1e-12, 1e-14));
    CHECK(torch::allclose(packed.final_z.narrow(0, n, 1), expected.final_z, 1e-12, 1e-14));
  }
  // The empty sequence returns its initial state, and its initial state's gradient is its final state's.
  CHECK(torch::equal(packed.final_kv[1], kv0[1]));
  packed.final_kv.sum().backward();
  CHECK(torch::equal(kv0.grad()[1], torch::ones({H, D, M}, torch::kDouble)));
}

TEST_CASE("linear attention errors name the op and the argument", "[linear_attention]") {
  const auto q = torch::randn({2, 3, 5, 4}), k = torch::randn({2, 3, 5, 4}), v = torch::randn({2, 3, 5, 6});
  flowformer::CausalLinearAttentionOptions options;
  options.initial_kv = torch::zeros({2, 3, 6, 4});
  CHECK_THROWS_WITH(flowformer::causal_linear_attention(q, k, v, options),
                    Catch::Contains("flowformer::causal_linear_attention: initial_kv must have shape"));
  flowformer::LinearAttentionOptions noncausal;
  noncausal.key_padding_mask = torch::zeros({2, 4}, torch::kBool);
  CHECK_THROWS_WITH(flowformer::linear_attention(q, k, v, noncausal),
                    Catch::Contains("flowformer::linear_attention: key_padding_mask must have shape (B, S)"));
  flowformer::CausalLinearAttentionOptions packed;
  packed.cu_seqlens = torch::tensor({0, 3, 2, 5}, torch::kLong);
  const auto q1 = q.narrow(0, 0, 1), k1 = k.narrow(0, 0, 1), v1 = v.narrow(0, 0, 1);
  CHECK_THROWS_WITH(flowformer::causal_linear_attention(q1, k1, v1, packed),
                    Catch::Contains("flowformer::causal_linear_attention: cu_seqlens must be non-decreasing, got "
                                    "cu_seqlens[2] = 2 < cu_seqlens[1] = 3"));
  packed.cu_seqlens = torch::tensor({0, 5});
  CHECK_THROWS_WITH(flowformer::causal_linear_attention(q, k, v, packed),
                    Catch::Contains("flowformer::causal_linear_attention: query must have batch size B = 1"));
}
