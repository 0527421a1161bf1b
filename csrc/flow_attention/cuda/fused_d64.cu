// The fused kernels of Flow-Attention for head dim 64, nvcc build (kernels/flow_attention).
#include "flow_attention/causal_chain.cuh"
#include "flow_attention/causal_forward.cuh"
#include "flow_attention/causal_key_grads.cuh"
#include "flow_attention/causal_query_grads.cuh"
#include "flow_attention/noncausal_backward.cuh"
#include "flow_attention/noncausal_keys.cuh"
#include "flow_attention/noncausal_output.cuh"
#include "flow_attention/noncausal_sums.cuh"

template struct flowformer::flow_attention_kernels::cuda::CausalForward<64>;
template struct flowformer::flow_attention_kernels::cuda::CausalQueryGrads<64>;
template struct flowformer::flow_attention_kernels::cuda::CausalKeyGrads<64>;
template struct flowformer::flow_attention_kernels::cuda::CausalChain<64>;
template struct flowformer::flow_attention_kernels::cuda::VectorSums<64>;
template struct flowformer::flow_attention_kernels::cuda::KeySums<64>;
template struct flowformer::flow_attention_kernels::cuda::QueryOutput<64>;
template struct flowformer::flow_attention_kernels::cuda::QueryGrads<64>;
template struct flowformer::flow_attention_kernels::cuda::KeyGrads<64>;
