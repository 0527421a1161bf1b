// The fused kernels of linear attention for head dim 32, SIMT emulator build (kernels/linear_attention).
#include "linear_attention/causal_backward.cuh"
#include "linear_attention/causal_forward.cuh"
#include "linear_attention/noncausal_backward.cuh"
#include "linear_attention/segment_sums.cuh"
#include "linear_attention/state_output.cuh"

template struct flowformer::linear_attention_kernels::emulated::CausalForward<32>;
template struct flowformer::linear_attention_kernels::emulated::CausalQueryGrads<32>;
template struct flowformer::linear_attention_kernels::emulated::CausalKeyGrads<32>;
template struct flowformer::linear_attention_kernels::emulated::SegmentSums<32>;
template struct flowformer::linear_attention_kernels::emulated::StateOutput<32>;
template struct flowformer::linear_attention_kernels::emulated::NoncausalQueryGrads<32>;
template struct flowformer::linear_attention_kernels::emulated::NoncausalKeyGrads<32>;
