// The fused kernels of linear attention for head dim 64, nvcc build (kernels/linear_attention).
#include "linear_attention/causal_backward.cuh"
#include "linear_attention/causal_forward.cuh"
#include "linear_attention/noncausal_backward.cuh"
#include "linear_attention/segment_sums.cuh"
#include "linear_attention/state_output.cuh"

template struct flowformer::linear_attention_kernels::cuda::CausalForward<64>;
template struct flowformer::linear_attention_kernels::cuda::CausalQueryGrads<64>;
template struct flowformer::linear_attention_kernels::cuda::CausalKeyGrads<64>;
template struct flowformer::linear_attention_kernels::cuda::SegmentSums<64>;
template struct flowformer::linear_attention_kernels::cuda::StateOutput<64>;
template struct flowformer::linear_attention_kernels::cuda::NoncausalQueryGrads<64>;
template struct flowformer::linear_attention_kernels::cuda::NoncausalKeyGrads<64>;
