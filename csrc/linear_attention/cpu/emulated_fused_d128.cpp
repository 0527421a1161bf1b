// The fused kernels of linear attention for head dim 128, SIMT emulator build (kernels/linear_attention).
#include "linear_attention/causal_backward.cuh"
#include "linear_attention/causal_forward.cuh"
#include "linear_attention/noncausal_backward.cuh"
#include "linear_attention/segment_sums.cuh"
#include "linear_attention/state_output.cuh"

template struct flowformer::linear_attention_kernels::emulated::CausalForward<128>;
template struct flowformer::linear_attention_kernels::emulated::CausalQueryGrads<128>;
template struct flowformer::linear_attention_kernels::emulated::CausalKeyGrads<128>;
template struct flowformer::linear_attention_kernels::emulated::SegmentSums<128>;
template struct flowformer::linear_attention_kernels::emulated::StateOutput<128>;
template struct flowformer::linear_attention_kernels::emulated::NoncausalQueryGrads<128>;
template struct flowformer::linear_attention_kernels::emulated::NoncausalKeyGrads<128>;
