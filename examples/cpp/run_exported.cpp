// Runs what examples/cpp/export_model.py wrote (its folder is the argument) and compares with Python:
//   - flowformer.pt2: a Flowformer classifier compiled by AOTInductor, loaded with AOTIModelPackageLoader
//     (the flowformer ops it calls are registered in this process by linking flowformer::flowformer);
//   - flow_attention.pt: a FlowAttention module's weights, loaded into flowformer::nn::FlowAttention.
// Exits 1 on a mismatch.
#include <flowformer/flowformer.h>

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/serialize.h>
#include <torch/torch.h>

#include <fstream>
#include <iostream>
#include <iterator>

namespace {

at::Tensor load_tensor(const std::string& path) {  // torch.save({"tensor": t}, path)
  std::ifstream file(path, std::ios::binary);
  const std::vector<char> bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  return torch::pickle_load(bytes).toGenericDict().at("tensor").toTensor();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: run_exported <folder written by examples/cpp/export_model.py>\n";
    return 2;
  }
  const std::string dir = argv[1];
  torch::NoGradGuard no_grad;

  torch::inductor::AOTIModelPackageLoader loader(dir + "/flowformer.pt2");
  const auto logits = loader.run({load_tensor(dir + "/tokens.pt")})[0];
  const double model_error = (logits - load_tensor(dir + "/expected_logits.pt")).abs().max().item<double>();

  auto attention = flowformer::nn::FlowAttentionImpl::load(dir + "/flow_attention.pt");
  const auto x = load_tensor(dir + "/attention_input.pt");
  const auto out = attention->forward(x, x, x, std::nullopt, /*causal=*/true);
  const double module_error = (out - load_tensor(dir + "/expected_attention.pt")).abs().max().item<double>();

  std::cout << "AOTInductor Flowformer: logits " << logits.sizes() << ", max |C++ - Python| " << model_error
            << "; FlowAttention module: max |C++ - Python| " << module_error << "\n";
  return model_error < 1e-4 && module_error < 1e-5 ? 0 : 1;
}
