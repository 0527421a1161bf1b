// CUDA backend of the linear-attention ops: linear_attention/linear_attention_portable.h (the fused
// tensor-core kernels where they apply, else the portable item kernels, one CUDA thread per item), on the
// current stream of the inputs' device.
#include "common/cuda_executor.cuh"
#include "linear_attention/linear_attention_ops.h"
#include "linear_attention/linear_attention_portable.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <vector>

namespace flowformer::linear_attention_cuda {
namespace {

namespace ops = linear_attention_ops;
namespace portable_ops = linear_attention_portable;
using ops::Optional;

namespace kernels = linear_attention_kernels;

void* stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// The fused kernels' CUDA build, on the current stream of the current device (the caller holds its guard).
linear_attention_fused::Build fused_build() {
  const c10::DeviceIndex device = c10::cuda::current_device();
  int shared_limit = 0, multiprocessors = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&shared_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device));
  return {[](const kernels::CausalForwardParams& p) {
            kernels::run_for_head_dim<kernels::cuda::CausalForward>(p, stream());
          },
          [](const kernels::CausalBackwardParams& p) {
            kernels::run_for_head_dim<kernels::cuda::CausalQueryGrads>(p, stream());
          },
          [](const kernels::CausalBackwardParams& p) {
            kernels::run_for_head_dim<kernels::cuda::CausalKeyGrads>(p, stream());
          },
          [](const kernels::SegmentSumsParams& p) { kernels::run_for_head_dim<kernels::cuda::SegmentSums>(p, stream()); },
          [](const kernels::StateOutputParams& p) { kernels::run_for_head_dim<kernels::cuda::StateOutput>(p, stream()); },
          [](const kernels::NoncausalBackwardParams& p) {
            kernels::run_for_head_dim<kernels::cuda::NoncausalQueryGrads>(p, stream());
          },
          [](const kernels::NoncausalBackwardParams& p) {
            kernels::run_for_head_dim<kernels::cuda::NoncausalKeyGrads>(p, stream());
          },
          std::size_t(shared_limit), multiprocessors};
}

// Packed sequences: the values of cu_seqlens are checked on the host: a CUDA cu_seqlens costs one small
// device-to-host copy (N + 1 integers, waiting for the stream) per call (a CPU one does not).
ops::CausalResult causal_cuda(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                              c10::string_view feature_map, bool normalize, double eps, const Optional& initial_kv,
                              const Optional& initial_z, const Optional& cu_seqlens) {
  ops::check_causal_args(ops::kCausal, query, key, value, feature_map, eps, initial_kv, initial_z, cu_seqlens);
  const c10::cuda::CUDAGuard guard(query.device());
  const std::vector<int64_t> cu = flowformer::cu_seqlens_values(ops::kCausal, cu_seqlens, query.size(2));
  return portable_ops::causal(portable::CudaExecutor{}, query, key, value, feature_map, normalize, eps, initial_kv,
                              initial_z, cu, fused_build(), ops::kCausal);
}

ops::CausalGrads causal_backward_cuda(const at::Tensor& grad_out, const Optional& grad_final_kv,
                                      const Optional& grad_final_z, const at::Tensor& query, const at::Tensor& key,
                                      const at::Tensor& value, c10::string_view feature_map, bool normalize,
                                      double eps, const Optional& initial_kv, const Optional& initial_z,
                                      const Optional& cu_seqlens) {
  const char* op = ops::kCausalBackward;
  ops::check_causal_args(op, query, key, value, feature_map, eps, initial_kv, initial_z, cu_seqlens);
  ops::check_causal_grads(grad_out, grad_final_kv, grad_final_z, query, value, cu_seqlens);
  const c10::cuda::CUDAGuard guard(query.device());
  const std::vector<int64_t> cu = flowformer::cu_seqlens_values(op, cu_seqlens, query.size(2));
  return portable_ops::causal_backward(portable::CudaExecutor{}, grad_out, grad_final_kv, grad_final_z, query, key,
                                       value, feature_map, normalize, eps, initial_kv, initial_z, cu, fused_build(),
                                       op);
}

at::Tensor noncausal_cuda(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                          c10::string_view feature_map, double eps, const Optional& key_padding_mask) {
  ops::check_noncausal_args(ops::kNoncausal, query, key, value, feature_map, eps, key_padding_mask);
  const c10::cuda::CUDAGuard guard(query.device());
  return portable_ops::noncausal(portable::CudaExecutor{}, query, key, value, feature_map, eps, key_padding_mask,
                                 fused_build(), ops::kNoncausal);
}

ops::Grads noncausal_backward_cuda(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
                                   const at::Tensor& value, c10::string_view feature_map, double eps,
                                   const Optional& key_padding_mask) {
  ops::check_noncausal_args(ops::kNoncausalBackward, query, key, value, feature_map, eps, key_padding_mask);
  ops::check_noncausal_grad(grad_out, query, value);
  const c10::cuda::CUDAGuard guard(query.device());
  return portable_ops::noncausal_backward(portable::CudaExecutor{}, grad_out, query, key, value, feature_map, eps,
                                          key_padding_mask, fused_build(), ops::kNoncausalBackward);
}

}  // namespace

TORCH_LIBRARY_IMPL(flowformer, CUDA, m) {
  m.impl("causal_linear_attention", TORCH_FN(causal_cuda));
  m.impl("causal_linear_attention_backward", TORCH_FN(causal_backward_cuda));
  m.impl("linear_attention", TORCH_FN(noncausal_cuda));
  m.impl("linear_attention_backward", TORCH_FN(noncausal_backward_cuda));
}

}  // namespace flowformer::linear_attention_cuda
