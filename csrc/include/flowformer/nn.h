// torch::nn modules of flowformer for C++ programs.
#pragma once

#include <flowformer/flow_attention.h>

#include <torch/nn/module.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include <optional>
#include <string>

namespace flowformer::nn {

// Flow-Attention with the projections of nn.MultiheadAttention: the C++ counterpart of the Python
// flowformer.nn.FlowAttention (packed in_proj_weight (3E, E), in_proj_bias (3E), out_proj), for inputs
// (B, L, E) batch first. Its weights load from a file written in Python by
// flowformer.nn.save_for_cpp(module, path) (torch.save of a dict: "format" = "flowformer.FlowAttention/1",
// embed_dim, num_heads, bias, feature_map, eps, clamp, and "state_dict", the module's tensors by name).
class FlowAttentionImpl : public torch::nn::Module {
 public:
  FlowAttentionImpl(int64_t embed_dim, int64_t num_heads, bool bias = true, std::string feature_map = "sigmoid",
                    double eps = 1e-6, double clamp = 1.0);

  // query (B, L, E), key and value (B, S, E) -> (B, L, E). key_padding_mask: bool (B, S), true marks
  // padding; in self-attention (query, key and value the same tensor) it pads the queries too.
  at::Tensor forward(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                     const std::optional<at::Tensor>& key_padding_mask = std::nullopt, bool causal = false);

  // A module with the configuration and weights of a file written by flowformer.nn.save_for_cpp.
  static std::shared_ptr<FlowAttentionImpl> load(const std::string& path);

  int64_t embed_dim, num_heads;
  std::string feature_map;
  double eps, clamp;
  torch::Tensor in_proj_weight, in_proj_bias;
  torch::nn::Linear out_proj{nullptr};
};

TORCH_MODULE(FlowAttention);

}  // namespace flowformer::nn
