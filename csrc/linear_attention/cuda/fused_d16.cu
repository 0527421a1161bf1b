// The fused kernels of linear attention for head dim 16, nvcc build (kernels/linear_attention).
#include "linear_attention/causal_backward.cuh"
#include "linear_attention/causal_forward.cuh"
#include "linear_attention/noncausal_backward.cuh"
#include "linear_attention/segment_sums.cuh"
#include "linear_attention/state_output.cuh"

template struct flowformer::linear_attention_kernels::cuda::CausalForward<16>;
template struct flowformer::linear_attention_kernels::cuda::CausalQueryGrads<16>;
template struct flowformer::linear_attention_kernels::cuda::CausalKeyGrads<16>;
template struct flowformer::linear_attention_kernels::cuda::SegmentSums<16>;
template struct flowformer::linear_attention_kernels::cuda::StateOutput<16>;
template struct flowformer::linear_attention_kernels::cuda::NoncausalQueryGrads<16>;
template struct flowformer::linear_attention_kernels::cuda::NoncausalKeyGrads<16>;
