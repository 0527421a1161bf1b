// Uses no symbol of libflowformer: the op must be registered just by linking flowformer::flowformer.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <iostream>

int main() {
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow("flowformer::flow_attention", "");
  const auto q = torch::rand({1, 2, 5, 4});
  const auto k = torch::rand({1, 2, 5, 4});
  const auto v = torch::rand({1, 2, 5, 3});
  at::Tensor out = op.typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool,
                                       c10::string_view, double, double, const std::optional<at::Tensor>&,
                                       const std::optional<at::Tensor>&)>()
                       .call(q, k, v, true, "sigmoid", 1e-6, 1.0, std::nullopt, std::nullopt);
  if (out.sizes() != at::IntArrayRef({1, 2, 5, 3}) || !out.isfinite().all().item<bool>()) {
    std::cerr << "unexpected output " << out.sizes() << "\n";
    return 1;
  }
  std::cout << "flowformer::flow_attention found through the dispatcher: ok\n";
  return 0;
}
