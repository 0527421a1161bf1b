// The fused kernels of linear attention for head dim 128, nvcc build (kernels/linear_attention).
#include "linear_attention/causal_backward.cuh"
#include "linear_attention/causal_forward.cuh"
#include "linear_attention/noncausal_backward.cuh"
#include "linear_attention/segment_sums.cuh"
#include "linear_attention/state_output.cuh"

template struct flowformer::linear_attention_kernels::cuda::CausalForward<128>;
template struct flowformer::linear_attention_kernels::cuda::CausalQueryGrads<128>;
template struct flowformer::linear_attention_kernels::cuda::CausalKeyGrads<128>;
template struct flowformer::linear_attention_kernels::cuda::SegmentSums<128>;
template struct flowformer::linear_attention_kernels::cuda::StateOutput<128>;
template struct flowformer::linear_attention_kernels::cuda::NoncausalQueryGrads<128>;
template struct flowformer::linear_attention_kernels::cuda::NoncausalKeyGrads<128>;
