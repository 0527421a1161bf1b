// The fused kernels of Flow-Attention for head dim 32, SIMT emulator build (kernels/flow_attention).
#include "flow_attention/causal_chain.cuh"
#include "flow_attention/causal_forward.cuh"
#include "flow_attention/causal_key_grads.cuh"
#include "flow_attention/causal_query_grads.cuh"
#include "flow_attention/noncausal_backward.cuh"
#include "flow_attention/noncausal_keys.cuh"
#include "flow_attention/noncausal_output.cuh"
#include "flow_attention/noncausal_sums.cuh"

template struct flowformer::flow_attention_kernels::emulated::CausalForward<32>;
template struct flowformer::flow_attention_kernels::emulated::CausalQueryGrads<32>;
template struct flowformer::flow_attention_kernels::emulated::CausalKeyGrads<32>;
template struct flowformer::flow_attention_kernels::emulated::CausalChain<32>;
template struct flowformer::flow_attention_kernels::emulated::VectorSums<32>;
template struct flowformer::flow_attention_kernels::emulated::KeySums<32>;
template struct flowformer::flow_attention_kernels::emulated::QueryOutput<32>;
template struct flowformer::flow_attention_kernels::emulated::QueryGrads<32>;
template struct flowformer::flow_attention_kernels::emulated::KeyGrads<32>;
