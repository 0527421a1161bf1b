// The AFT ops' backend functions for one executor: argument checks, then aft_portable.h. Included by
// the CPU backend (HostExecutor; EmulatedExecutor in emulation mode: the GPU's item kernel) and the CUDA
// backend (CudaExecutor, with a device guard).
#pragma once

#include "aft/aft_ops.h"
#include "aft/aft_portable.h"
#include "common/emulate_cuda.h"

#include <torch/library.h>

namespace flowformer::aft_portable {

// Emulation: the executor of the test mode (FLOWFORMER_EMULATE_CUDA=1), or void (the CUDA backend).
template <typename Exec, typename Guard, typename Emulation>
struct Backend {
  static at::Tensor full(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                         const at::Tensor& pos_bias, bool causal, int64_t window) {
    aft_ops::check_full_args(aft_ops::kFull, query, key, value, pos_bias, causal, window);
    const Guard guard(query.device());
    return with_aft<Emulation>(Exec{}, query, emulate_cuda_requested(), [&](const auto& aft) {
      return std::get<0>(aft.full_forward(query, key, value, pos_bias, causal, window, false));
    });
  }

  static FullOutputs full_forward(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                  const at::Tensor& pos_bias, bool causal, int64_t window) {
    aft_ops::check_full_args(aft_ops::kFullForward, query, key, value, pos_bias, causal, window);
    const Guard guard(query.device());
    return with_aft<Emulation>(Exec{}, query, emulate_cuda_requested(), [&](const auto& aft) {
      return aft.full_forward(query, key, value, pos_bias, causal, window, true);
    });
  }

  static Grads4 full_backward(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
                              const at::Tensor& value, const at::Tensor& pos_bias, const at::Tensor& y,
                              const at::Tensor& lse, bool causal, int64_t window) {
    aft_ops::check_full_args(aft_ops::kFullBackward, query, key, value, pos_bias, causal, window);
    aft_ops::check_grad_out(aft_ops::kFullBackward, grad_out, query);
    aft_ops::check_full_stats(aft_ops::kFullBackward, y, lse, query);
    const Guard guard(query.device());
    return with_aft<Emulation>(Exec{}, query, emulate_cuda_requested(), [&](const auto& aft) {
      return aft.full_backward(grad_out, query, key, value, pos_bias, y, lse, causal, window);
    });
  }

  static at::Tensor simple(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, bool causal) {
    aft_ops::check_simple_args(aft_ops::kSimple, query, key, value, causal);
    const Guard guard(query.device());
    return with_aft<Emulation>(Exec{}, query, emulate_cuda_requested(), [&](const auto& aft) {
      return aft.simple_forward(query, key, value, causal);
    });
  }

  static Grads3 simple_backward(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
                                const at::Tensor& value, bool causal) {
    aft_ops::check_simple_args(aft_ops::kSimpleBackward, query, key, value, causal);
    aft_ops::check_grad_out(aft_ops::kSimpleBackward, grad_out, query);
    const Guard guard(query.device());
    return with_aft<Emulation>(Exec{}, query, emulate_cuda_requested(), [&](const auto& aft) {
      return aft.simple_backward(grad_out, query, key, value, causal);
    });
  }

  static at::Tensor conv(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                         const at::Tensor& weight) {
    aft_ops::check_conv_args(aft_ops::kConv, query, key, value, weight);
    const Guard guard(query.device());
    return with_aft<Emulation>(Exec{}, query, emulate_cuda_requested(), [&](const auto& aft) {
      return aft.conv_forward(query, key, value, weight);
    });
  }

  static Grads4 conv_backward(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
                              const at::Tensor& value, const at::Tensor& weight) {
    aft_ops::check_conv_args(aft_ops::kConvBackward, query, key, value, weight);
    aft_ops::check_grad_out(aft_ops::kConvBackward, grad_out, query);
    const Guard guard(query.device());
    return with_aft<Emulation>(Exec{}, query, emulate_cuda_requested(), [&](const auto& aft) {
      return aft.conv_backward(grad_out, query, key, value, weight);
    });
  }

  static void register_to(torch::Library& m) {
    m.impl("aft_conv", TORCH_FN(conv));
    m.impl("aft_conv_backward", TORCH_FN(conv_backward));
    m.impl("aft_full", TORCH_FN(full));
    m.impl("aft_full_backward", TORCH_FN(full_backward));
    m.impl("aft_full_forward", TORCH_FN(full_forward));
    m.impl("aft_simple", TORCH_FN(simple));
    m.impl("aft_simple_backward", TORCH_FN(simple_backward));
  }
};

}  // namespace flowformer::aft_portable
