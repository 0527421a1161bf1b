// CUDA backend of flowformer::flow_attention and its backward, on the current stream of the inputs' device: the
// fused kernels (flow_attention/fused.h, fused_causal_backward.h: both modes, forward and backward) where they
// apply, else the portable kernels of flow_attention/flow_attention_portable.h, one CUDA thread per item.
#include "common/checks.h"
#include "common/cuda_executor.cuh"
#include "flow_attention/flow_attention_ops.h"
#include "flow_attention/flow_attention_portable.h"
#include "flow_attention/fused_causal_backward.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

namespace flowformer::flow_attention_cuda {
namespace {

using flow_attention_ops::Mask;
namespace kernels = flow_attention_kernels;

// The fused kernels' CUDA build, on the current stream of the current device (the caller holds its guard).
flow_attention_fused::Build fused_build() {
  const c10::DeviceIndex device = c10::cuda::current_device();
  int shared_limit = 0, multiprocessors = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&shared_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device));
  return {[](const kernels::CausalForwardParams& p) {
            kernels::run_for_head_dim<kernels::cuda::CausalForward>(p, c10::cuda::getCurrentCUDAStream().stream());
          },
          [](const kernels::CausalQueryGradsParams& p) {
            kernels::run_for_head_dim<kernels::cuda::CausalQueryGrads>(p, c10::cuda::getCurrentCUDAStream().stream());
          },
          [](const kernels::CausalKeyGradsParams& p) {
            kernels::run_for_head_dim<kernels::cuda::CausalKeyGrads>(p, c10::cuda::getCurrentCUDAStream().stream());
          },
          [](const kernels::CausalChainParams& p) {
            kernels::run_for_head_dim<kernels::cuda::CausalChain>(p, c10::cuda::getCurrentCUDAStream().stream());
          },
          [](const kernels::VectorSumsParams& p) {
            kernels::run_for_head_dim<kernels::cuda::VectorSums>(p, c10::cuda::getCurrentCUDAStream().stream());
          },
          [](const kernels::KeySumsParams& p) {
            kernels::run_for_head_dim<kernels::cuda::KeySums>(p, c10::cuda::getCurrentCUDAStream().stream());
          },
          [](const kernels::QueryOutputParams& p) {
            kernels::run_for_head_dim<kernels::cuda::QueryOutput>(p, c10::cuda::getCurrentCUDAStream().stream());
          },
          [](const kernels::SegmentScanParams& p) {
            kernels::cuda::SegmentScan::run(p, c10::cuda::getCurrentCUDAStream().stream());
          },
          [](const kernels::NoncausalBackwardParams& p) {
            kernels::run_for_head_dim<kernels::cuda::QueryGrads>(p, c10::cuda::getCurrentCUDAStream().stream());
          },
          [](const kernels::NoncausalBackwardParams& p) {
            kernels::run_for_head_dim<kernels::cuda::KeyGrads>(p, c10::cuda::getCurrentCUDAStream().stream());
          },
          std::size_t(shared_limit), multiprocessors};
}

at::Tensor forward_cuda(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, bool causal,
                        c10::string_view feature_map, double eps, double clamp, const Mask& query_padding_mask,
                        const Mask& key_padding_mask) {
  const char* op = flow_attention_ops::kForward;
  flow_attention_ops::check_args(op, query, key, value, causal, feature_map, eps, clamp, query_padding_mask,
                                 key_padding_mask);
  const c10::cuda::CUDAGuard guard(query.device());
  const flow_attention_fused::Build build = fused_build();
  if (causal && flow_attention_fused::takes_causal(query, value, build)) {
    return flow_attention_fused::causal_forward(build, query, key, value, parse_feature_map(op, feature_map), eps,
                                                clamp, {}, query_padding_mask, key_padding_mask, false)
        .first;
  }
  if (!causal && flow_attention_fused::takes_noncausal(query, value, build)) {
    return flow_attention_fused::noncausal_forward(build, query, key, value, parse_feature_map(op, feature_map), eps,
                                                   clamp, query_padding_mask, key_padding_mask);
  }
  const auto problem = flow_attention_portable::make_problem(op, query, key, value, causal, feature_map, eps, clamp,
                                                             query_padding_mask, key_padding_mask);
  return flow_attention_portable::forward(portable::CudaExecutor{}, problem);
}

flow_attention_ops::Grads backward_cuda(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
                                        const at::Tensor& value, bool causal, c10::string_view feature_map,
                                        double eps, double clamp, const Mask& query_padding_mask,
                                        const Mask& key_padding_mask) {
  const char* op = flow_attention_ops::kBackward;
  flow_attention_ops::check_args(op, query, key, value, causal, feature_map, eps, clamp, query_padding_mask,
                                 key_padding_mask);
  flow_attention_ops::check_grad_out(grad_out, query, value);
  const c10::cuda::CUDAGuard guard(query.device());
  const flow_attention_fused::Build build = fused_build();
  if (causal && flow_attention_fused::takes_causal_backward(query, value, build)) {
    auto [dq, dk, dv, dstate0] = flow_attention_fused::causal_backward(
        build, grad_out, {}, query, key, value, parse_feature_map(op, feature_map), eps, clamp, {},
        query_padding_mask, key_padding_mask, false);
    return {dq, dk, dv};
  }
  if (!causal && flow_attention_fused::takes_noncausal_backward(query, value, build)) {
    return flow_attention_fused::noncausal_backward(build, grad_out, query, key, value,
                                                    parse_feature_map(op, feature_map), eps, clamp,
                                                    query_padding_mask, key_padding_mask);
  }
  const auto problem = flow_attention_portable::make_problem(op, query, key, value, causal, feature_map, eps, clamp,
                                                             query_padding_mask, key_padding_mask);
  return flow_attention_portable::backward(portable::CudaExecutor{}, problem, grad_out);
}

std::tuple<at::Tensor, at::Tensor> causal_with_state_cuda(const at::Tensor& query, const at::Tensor& key,
                                                          const at::Tensor& value, c10::string_view feature_map,
                                                          double eps, double clamp, const Mask& state,
                                                          const Mask& query_padding_mask,
                                                          const Mask& key_padding_mask, const Mask& cu_seqlens) {
  const char* op = flow_attention_ops::kCausalState;
  flow_attention_ops::check_state_args(query, key, value, feature_map, eps, clamp, state, query_padding_mask,
                                       key_padding_mask, cu_seqlens);
  const c10::cuda::CUDAGuard guard(query.device());
  return flow_attention_fused::causal_with_state(
      fused_build(), op, query, key, value, feature_map, eps, clamp, state, query_padding_mask, key_padding_mask,
      cu_seqlens, [&]() -> std::tuple<at::Tensor, at::Tensor> {
        const auto problem = flow_attention_portable::make_problem(op, query, key, value, true, feature_map, eps,
                                                                   clamp, query_padding_mask, key_padding_mask);
        return flow_attention_portable::forward_with_state(portable::CudaExecutor{}, problem,
                                                           state.value_or(at::Tensor()));
      });
}

flow_attention_ops::StateGrads causal_with_state_backward_cuda(
    const at::Tensor& grad_out, const Mask& grad_state, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, c10::string_view feature_map, double eps, double clamp, const Mask& state,
    const Mask& query_padding_mask, const Mask& key_padding_mask, const Mask& cu_seqlens) {
  const char* op = flow_attention_ops::kCausalStateBackward;
  flow_attention_ops::check_state_backward_args(grad_out, grad_state, query, key, value, feature_map, eps, clamp,
                                                state, query_padding_mask, key_padding_mask, cu_seqlens);
  const c10::cuda::CUDAGuard guard(query.device());
  return flow_attention_fused::causal_with_state_backward(
      fused_build(), op, grad_out, grad_state, query, key, value, feature_map, eps, clamp, state, query_padding_mask,
      key_padding_mask, cu_seqlens, [&] {
        const auto problem = flow_attention_portable::make_problem(op, query, key, value, true, feature_map, eps,
                                                                   clamp, query_padding_mask, key_padding_mask);
        return flow_attention_portable::backward_with_state(portable::CudaExecutor{}, problem, grad_out, state,
                                                            grad_state);
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(flowformer, CUDA, m) {
  m.impl("causal_flow_attention_backward", TORCH_FN(causal_with_state_backward_cuda));
  m.impl("causal_flow_attention", TORCH_FN(causal_with_state_cuda));
  m.impl("flow_attention", TORCH_FN(forward_cuda));
  m.impl("flow_attention_backward", TORCH_FN(backward_cuda));
}

}  // namespace flowformer::flow_attention_cuda
