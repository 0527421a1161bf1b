// Generates a sequence token by token with both causal mixers, carrying their recurrent state (constant
// memory per step), and checks every step against the full-sequence output. Exits 1 on a mismatch.
#include <flowformer/flowformer.h>

#include <torch/torch.h>

#include <iostream>

namespace {

double max_error(const at::Tensor& a, const at::Tensor& b) {
  return (a - b).abs().max().item<double>();
}

}  // namespace

int main() {
  torch::NoGradGuard no_grad;
  torch::manual_seed(0);
  const int64_t B = 2, H = 4, L = 64, D = 16;
  const auto q = torch::randn({B, H, L, D}), k = torch::randn({B, H, L, D}), v = torch::randn({B, H, L, D});

  // Linear attention: the state is (kv, z).
  const auto whole_linear = flowformer::causal_linear_attention(q, k, v).out;
  flowformer::CausalLinearAttentionOptions linear;
  std::vector<at::Tensor> linear_steps;
  // Flow-Attention: the state is one (B, H, 3 + 4 D + D M) tensor.
  flowformer::FlowAttentionOptions causal;
  causal.causal = true;
  const auto whole_flow = flowformer::flow_attention(q, k, v, causal);
  flowformer::CausalFlowAttentionOptions flow;
  std::vector<at::Tensor> flow_steps;

  for (int64_t t = 0; t < L; ++t) {
    const auto qt = q.narrow(2, t, 1), kt = k.narrow(2, t, 1), vt = v.narrow(2, t, 1);
    auto step = flowformer::causal_linear_attention(qt, kt, vt, linear);
    linear.initial_kv = step.final_kv;
    linear.initial_z = step.final_z;
    linear_steps.push_back(step.out);
    auto flow_step = flowformer::causal_flow_attention(qt, kt, vt, flow);
    flow.state = flow_step.state;
    flow_steps.push_back(flow_step.out);
  }
  const double linear_error = max_error(torch::cat(linear_steps, 2), whole_linear);
  const double flow_error = max_error(torch::cat(flow_steps, 2), whole_flow);
  std::cout << "decoded " << L << " steps; max |step - full|: linear attention " << linear_error
            << ", Flow-Attention " << flow_error << "; Flow-Attention state " << flow.state->sizes() << "\n";
  return linear_error < 1e-4 && flow_error < 1e-4 ? 0 : 1;
}
