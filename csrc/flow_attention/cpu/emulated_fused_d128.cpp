// The fused kernels of Flow-Attention for head dim 128, SIMT emulator build (kernels/flow_attention).
#include "flow_attention/causal_chain.cuh"
#include "flow_attention/causal_forward.cuh"
#include "flow_attention/causal_key_grads.cuh"
#include "flow_attention/causal_query_grads.cuh"
#include "flow_attention/noncausal_backward.cuh"
#include "flow_attention/noncausal_keys.cuh"
#include "flow_attention/noncausal_output.cuh"
#include "flow_attention/noncausal_sums.cuh"

template struct flowformer::flow_attention_kernels::emulated::CausalForward<128>;
template struct flowformer::flow_attention_kernels::emulated::CausalQueryGrads<128>;
template struct flowformer::flow_attention_kernels::emulated::CausalKeyGrads<128>;
template struct flowformer::flow_attention_kernels::emulated::CausalChain<128>;
template struct flowformer::flow_attention_kernels::emulated::VectorSums<128>;
template struct flowformer::flow_attention_kernels::emulated::KeySums<128>;
template struct flowformer::flow_attention_kernels::emulated::QueryOutput<128>;
template struct flowformer::flow_attention_kernels::emulated::QueryGrads<128>;
template struct flowformer::flow_attention_kernels::emulated::KeyGrads<128>;
