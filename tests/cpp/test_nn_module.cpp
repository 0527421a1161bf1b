// flowformer::nn::FlowAttention: forward equals the projections around flowformer::flow_attention,
// self-attention pads queries too, and loading reports a clear error.
#include <flowformer/flowformer.h>

#include <catch2/catch.hpp>
#include <torch/torch.h>

TEST_CASE("nn::FlowAttention is the projections around flow_attention", "[nn]") {
  torch::manual_seed(7);
  flowformer::nn::FlowAttention module(16, 4, /*bias=*/true, "sigmoid", 1e-6, 5.0);
  const auto x = torch::randn({2, 9, 16});
  auto pad = torch::zeros({2, 9}, torch::kBool);
  pad[1].narrow(0, 6, 3).fill_(true);
  const auto out = module->forward(x, x, x, pad, /*causal=*/true);

  const auto w = module->in_proj_weight.chunk(3);
  const auto b = module->in_proj_bias.chunk(3);
  auto heads = [&](int i) { return torch::linear(x, w[i], b[i]).view({2, 9, 4, 4}).transpose(1, 2); };
  flowformer::FlowAttentionOptions options;
  options.causal = true;
  options.clamp = 5.0;
  options.query_padding_mask = pad;
  options.key_padding_mask = pad;
  const auto expected = module->out_proj(flowformer::flow_attention(heads(0), heads(1), heads(2), options)
                                             .transpose(1, 2).reshape({2, 9, 16}));
  CHECK(torch::allclose(out, expected, 1e-6, 1e-6));
}

TEST_CASE("nn::FlowAttention::load names the problem", "[nn]") {
  CHECK_THROWS_WITH(flowformer::nn::FlowAttentionImpl::load("/nonexistent/flow_attention.pt"),
                    Catch::Contains("cannot open /nonexistent/flow_attention.pt"));
}
