// The fused kernels of linear attention for head dim 16, SIMT emulator build (kernels/linear_attention).
#include "linear_attention/causal_backward.cuh"
#include "linear_attention/causal_forward.cuh"
#include "linear_attention/noncausal_backward.cuh"
#include "linear_attention/segment_sums.cuh"
#include "linear_attention/state_output.cuh"

template struct flowformer::linear_attention_kernels::emulated::CausalForward<16>;
template struct flowformer::linear_attention_kernels::emulated::CausalQueryGrads<16>;
template struct flowformer::linear_attention_kernels::emulated::CausalKeyGrads<16>;
template struct flowformer::linear_attention_kernels::emulated::SegmentSums<16>;
template struct flowformer::linear_attention_kernels::emulated::StateOutput<16>;
template struct flowformer::linear_attention_kernels::emulated::NoncausalQueryGrads<16>;
template struct flowformer::linear_attention_kernels::emulated::NoncausalKeyGrads<16>;
