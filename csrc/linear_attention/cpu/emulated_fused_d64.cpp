// The fused kernels of linear attention for head dim 64, SIMT emulator build (kernels/linear_attention).
#include "linear_attention/causal_backward.cuh"
#include "linear_attention/causal_forward.cuh"
#include "linear_attention/noncausal_backward.cuh"
#include "linear_attention/segment_sums.cuh"
#include "linear_attention/state_output.cuh"

template struct flowformer::linear_attention_kernels::emulated::CausalForward<64>;
template struct flowformer::linear_attention_kernels::emulated::CausalQueryGrads<64>;
template struct flowformer::linear_attention_kernels::emulated::CausalKeyGrads<64>;
template struct flowformer::linear_attention_kernels::emulated::SegmentSums<64>;
template struct flowformer::linear_attention_kernels::emulated::StateOutput<64>;
template struct flowformer::linear_attention_kernels::emulated::NoncausalQueryGrads<64>;
template struct flowformer::linear_attention_kernels::emulated::NoncausalKeyGrads<64>;
