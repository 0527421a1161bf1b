#include <flowformer/nn.h>

#include <torch/nn/functional/linear.h>
#include <torch/nn/init.h>
#include <torch/serialize.h>

#include <fstream>
#include <iterator>

namespace flowformer::nn {

FlowAttentionImpl::FlowAttentionImpl(int64_t embed_dim, int64_t num_heads, bool bias, std::string feature_map,
                                     double eps, double clamp)
    : embed_dim(embed_dim), num_heads(num_heads), feature_map(std::move(feature_map)), eps(eps), clamp(clamp) {
  TORCH_CHECK(embed_dim > 0 && num_heads > 0 && embed_dim % num_heads == 0, "flowformer::nn::FlowAttention: ",
              "embed_dim (", embed_dim, ") must be a positive multiple of num_heads (", num_heads, ")");
  in_proj_weight = register_parameter("in_proj_weight", torch::empty({3 * embed_dim, embed_dim}));
  torch::nn::init::xavier_uniform_(in_proj_weight);
  if (bias) {
    in_proj_bias = register_parameter("in_proj_bias", torch::zeros({3 * embed_dim}));
  }
  out_proj = register_module("out_proj", torch::nn::Linear(torch::nn::LinearOptions(embed_dim, embed_dim).bias(bias)));
  if (bias) {
    torch::NoGradGuard no_grad;
    out_proj->bias.zero_();
  }
}

at::Tensor FlowAttentionImpl::forward(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                      const std::optional<at::Tensor>& key_padding_mask, bool causal) {
  TORCH_CHECK(query.dim() == 3 && query.size(2) == embed_dim, "flowformer::nn::FlowAttention: query must be ",
              "(B, L, E = ", embed_dim, "), got shape ", query.sizes());
  const bool self_attention = query.is_same(key) && key.is_same(value);
  const auto w = in_proj_weight.chunk(3);
  const auto b = in_proj_bias.defined() ? in_proj_bias.chunk(3) : std::vector<at::Tensor>(3);
  const int64_t head_dim = embed_dim / num_heads;
  auto heads = [&](const at::Tensor& x, int i) {  // (B, n, E) -> (B, H, n, E / H)
    return torch::nn::functional::linear(x, w[i], b[i]).view({x.size(0), x.size(1), num_heads, head_dim})
        .transpose(1, 2);
  };
  FlowAttentionOptions options;
  options.causal = causal;
  options.feature_map = feature_map;
  options.eps = eps;
  options.clamp = clamp;
  options.key_padding_mask = key_padding_mask;
  if (self_attention) {
    options.query_padding_mask = key_padding_mask;
  }
  const at::Tensor out = flow_attention(heads(query, 0), heads(key, 1), heads(value, 2), options);
  return out_proj(out.transpose(1, 2).reshape({query.size(0), query.size(1), embed_dim}));
}

std::shared_ptr<FlowAttentionImpl> FlowAttentionImpl::load(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  TORCH_CHECK(file, "flowformer::nn::FlowAttention::load: cannot open ", path);
  const std::vector<char> bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  const c10::IValue saved = torch::pickle_load(bytes);
  TORCH_CHECK(saved.isGenericDict(), "flowformer::nn::FlowAttention::load: ", path,
              " is not a file written by flowformer.nn.save_for_cpp");
  const auto dict = saved.toGenericDict();
  auto get = [&](const char* name) {
    TORCH_CHECK(dict.contains(name), "flowformer::nn::FlowAttention::load: ", path, " has no '", name, "'");
    return dict.at(name);
  };
  TORCH_CHECK(get("format").toStringRef() == "flowformer.FlowAttention/1", "flowformer::nn::FlowAttention::load: ",
              path, " has format '", get("format").toStringRef(), "', expected 'flowformer.FlowAttention/1'");
  auto module = std::make_shared<FlowAttentionImpl>(get("embed_dim").toInt(), get("num_heads").toInt(),
                                                    get("bias").toBool(), get("feature_map").toStringRef(),
                                                    get("eps").toDouble(), get("clamp").toDouble());
  const auto state = get("state_dict").toGenericDict();
  torch::NoGradGuard no_grad;
  for (auto& item : module->named_parameters()) {
    TORCH_CHECK(state.contains(item.key()), "flowformer::nn::FlowAttention::load: ", path, " has no tensor '",
                item.key(), "'");
    const at::Tensor saved_tensor = state.at(item.key()).toTensor();
    TORCH_CHECK(saved_tensor.sizes() == item.value().sizes(), "flowformer::nn::FlowAttention::load: '", item.key(),
                "' has shape ", saved_tensor.sizes(), ", expected ", item.value().sizes());
    item.value().copy_(saved_tensor);
  }
  return module;
}

}  // namespace flowformer::nn
