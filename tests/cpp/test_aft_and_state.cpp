// The AFT ops and causal_flow_attention from C++: against plain loops over spec/aft.md (in double), the
// continuation of the Flow-Attention state, and errors for bad shapes.
#include <flowformer/flowformer.h>

#include <catch2/catch.hpp>
#include <torch/torch.h>

#include <cmath>
#include <vector>

namespace {

double rel_err(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(torch::kDouble) - b).norm().item<double>() / b.norm().item<double>();
}

// out_t = sigmoid(q_t) sum_{t'} softmax_{t'}(k_t' + w_{t,t'}) v_t' per channel, causal or not.
at::Tensor naive_aft_full(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
                          bool causal) {
  const int64_t B = q.size(0), L = q.size(1), S = k.size(1), C = q.size(2);
  at::Tensor out = torch::zeros({B, L, C}, torch::kDouble);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < L; ++t) {
      for (int64_t c = 0; c < C; ++c) {
        double m = -INFINITY, num = 0, den = 0;
        const int64_t end = causal ? t + 1 : S;
        for (int64_t j = 0; j < end; ++j) {
          m = std::max(m, k[b][j][c].item<double>() + w[t][j].item<double>());
        }
        for (int64_t j = 0; j < end; ++j) {
          const double e = std::exp(k[b][j][c].item<double>() + w[t][j].item<double>() - m);
          num += e * v[b][j][c].item<double>();
          den += e;
        }
        out[b][t][c] = 1.0 / (1.0 + std::exp(-q[b][t][c].item<double>())) * num / den;
      }
    }
  }
  return out;
}

}  // namespace

TEST_CASE("aft_full matches the softmax over positions, causal and not", "[aft]") {
  torch::manual_seed(11);
  const auto q = torch::randn({2, 6, 3}), k = torch::randn({2, 6, 3}) * 20, v = torch::randn({2, 6, 3});
  const auto w = torch::randn({6, 6}) * 10;
  for (bool causal : {false, true}) {
    const auto out = flowformer::aft_full(q, k, v, w, {causal, 0});
    CHECK(rel_err(out, naive_aft_full(q.to(torch::kDouble), k.to(torch::kDouble), v.to(torch::kDouble),
                                      w.to(torch::kDouble), causal)) < 1e-5);
  }
  const auto simple = flowformer::aft_simple(q, k, v, /*causal=*/true);
  CHECK(rel_err(simple, naive_aft_full(q.to(torch::kDouble), k.to(torch::kDouble), v.to(torch::kDouble),
                                       torch::zeros({6, 6}, torch::kDouble), true)) < 1e-5);
  const auto conv = flowformer::aft_conv(torch::randn({1, 4, 4, 4}), torch::randn({1, 4, 4, 4}),
                                         torch::randn({1, 4, 4, 4}), torch::randn({2, 3, 3}));
  CHECK(conv.sizes() == torch::IntArrayRef({1, 4, 4, 4}));
}

TEST_CASE("AFT errors name the op and the argument", "[aft]") {
  const auto x = torch::randn({2, 5, 4});
  CHECK_THROWS_WITH(flowformer::aft_full(x, x, x, torch::zeros({5, 4})),
                    Catch::Contains("flowformer::aft_full: pos_bias must have length S = 5 (as key), got 4"));
  const auto image = torch::randn({1, 3, 3, 4});
  CHECK_THROWS_WITH(flowformer::aft_conv(image, image, image, torch::zeros({3, 3, 3})),
                    Catch::Contains("flowformer::aft_conv: the channels C = 4 must be divisible by heads = 3"));
}

TEST_CASE("causal_flow_attention continues a sequence and checks its state", "[flow_attention]") {
  torch::NoGradGuard no_grad;
  torch::manual_seed(12);
  const auto q = torch::randn({2, 2, 20, 4}), k = torch::randn({2, 2, 20, 4}), v = torch::randn({2, 2, 20, 3});
  flowformer::FlowAttentionOptions causal;
  causal.causal = true;
  const auto whole = flowformer::flow_attention(q, k, v, causal);
  const auto first = flowformer::causal_flow_attention(q.narrow(2, 0, 7), k.narrow(2, 0, 7), v.narrow(2, 0, 7));
  flowformer::CausalFlowAttentionOptions rest;
  rest.state = first.state;
  const auto second = flowformer::causal_flow_attention(q.narrow(2, 7, 13), k.narrow(2, 7, 13), v.narrow(2, 7, 13),
                                                        rest);
  CHECK(rel_err(torch::cat({first.out, second.out}, 2), whole.to(torch::kDouble)) < 1e-5);
  CHECK(second.state.sizes() == torch::IntArrayRef({2, 2, 3 + 4 * 4 + 4 * 3}));
  rest.state = torch::zeros({2, 2, 30});
  CHECK_THROWS_WITH(flowformer::causal_flow_attention(q, k, v, rest),
                    Catch::Contains("flowformer::causal_flow_attention: state must have shape (B, H, 3 + 4 D + D M)"));
}

TEST_CASE("causal_flow_attention trains in pieces like one run, from C++", "[flow_attention]") {
  // The gradients through the state (registered in C++) equal those of flow_attention(causal=True).
  torch::manual_seed(13);
  const auto options = torch::TensorOptions().dtype(torch::kDouble);
  const auto q = torch::randn({1, 2, 15, 4}, options), k = torch::randn({1, 2, 15, 4}, options);
  const auto v = torch::randn({1, 2, 15, 3}, options);
  const auto leaves = [&] {
    return std::vector<torch::Tensor>{q.clone().requires_grad_(), k.clone().requires_grad_(),
                                      v.clone().requires_grad_()};
  };
  auto whole = leaves();
  flowformer::FlowAttentionOptions causal;
  causal.causal = true;
  flowformer::flow_attention(whole[0], whole[1], whole[2], causal).sum().backward();
  auto pieces = leaves();
  const auto first = flowformer::causal_flow_attention(pieces[0].narrow(2, 0, 6), pieces[1].narrow(2, 0, 6),
                                                       pieces[2].narrow(2, 0, 6));
  flowformer::CausalFlowAttentionOptions rest;
  rest.state = first.state;
  const auto second = flowformer::causal_flow_attention(pieces[0].narrow(2, 6, 9), pieces[1].narrow(2, 6, 9),
                                                        pieces[2].narrow(2, 6, 9), rest);
  (first.out.sum() + second.out.sum()).backward();
  for (int i = 0; i < 3; ++i) {
    CHECK(rel_err(pieces[i].grad(), whole[i].grad()) < 1e-12);
  }
}

TEST_CASE("causal_flow_attention runs packed sequences from C++, each from its row of the state", "[flow_attention]") {
  // Two batch elements (the first from a state) against the same two sequences packed with an empty one
  // between them: the same outputs, final states and gradients.
  torch::manual_seed(14);
  const auto options = torch::TensorOptions().dtype(torch::kDouble);
  const auto q = torch::randn({2, 2, 8, 4}, options), k = torch::randn({2, 2, 8, 4}, options);
  const auto v = torch::randn({2, 2, 8, 3}, options);
  const auto state = flowformer::causal_flow_attention(q, k, v).state;
  const auto batched_q = q.clone().requires_grad_();
  flowformer::CausalFlowAttentionOptions from_state;
  from_state.state = state;
  const auto batched = flowformer::causal_flow_attention(batched_q, k, v, from_state);
  batched.out.sum().backward();

  const auto pack = [](const torch::Tensor& t) { return torch::cat({t[0], t[1]}, 1).unsqueeze(0); };
  const auto packed_q = pack(q).requires_grad_();
  flowformer::CausalFlowAttentionOptions packed_options;
  packed_options.state = torch::stack({state[0], torch::zeros_like(state[0]), state[1]});
  packed_options.cu_seqlens = torch::tensor({0, 8, 8, 16}, torch::kInt32);
  const auto packed = flowformer::causal_flow_attention(packed_q, pack(k), pack(v), packed_options);
  packed.out.sum().backward();
  CHECK(rel_err(packed.out, pack(batched.out)) < 1e-12);
  CHECK(packed.state.sizes() == torch::IntArrayRef({3, 2, 3 + 4 * 4 + 4 * 3}));
  CHECK(rel_err(packed.state.index({torch::tensor({0, 2})}), batched.state) < 1e-12);
  CHECK(rel_err(packed_q.grad(), pack(batched_q.grad())) < 1e-12);
  packed_options.cu_seqlens = torch::tensor({0, 8, 15, 15});
  CHECK_THROWS_WITH(flowformer::causal_flow_attention(packed_q, pack(k), pack(v), packed_options),
                    Catch::Contains("flowformer::causal_flow_attention: cu_seqlens must end with the total length L = 16"));
  packed_options.cu_seqlens = torch::tensor({0, 16});
  CHECK_THROWS_WITH(flowformer::causal_flow_attention(packed_q, pack(k), pack(v), packed_options),
                    Catch::Contains("flowformer::causal_flow_attention: state must have shape (N, H, 3 + 4 D + D M)"));
}
