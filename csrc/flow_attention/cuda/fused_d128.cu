// The fused kernels of Flow-Attention for head dim 128, nvcc build (kernels/flow_attention).
#include "flow_attention/causal_chain.cuh"
#include "flow_attention/causal_forward.cuh"
#include "flow_attention/causal_key_grads.cuh"
#include "flow_attention/causal_query_grads.cuh"
#include "flow_attention/noncausal_backward.cuh"
#include "flow_attention/noncausal_keys.cuh"
#include "flow_attention/noncausal_output.cuh"
#include "flow_attention/noncausal_sums.cuh"

template struct flowformer::flow_attention_kernels::cuda::CausalForward<128>;
template struct flowformer::flow_attention_kernels::cuda::CausalQueryGrads<128>;
template struct flowformer::flow_attention_kernels::cuda::CausalKeyGrads<128>;
template struct flowformer::flow_attention_kernels::cuda::CausalChain<128>;
template struct flowformer::flow_attention_kernels::cuda::VectorSums<128>;
template struct flowformer::flow_attention_kernels::cuda::KeySums<128>;
template struct flowformer::flow_attention_kernels::cuda::QueryOutput<128>;
template struct flowformer::flow_attention_kernels::cuda::QueryGrads<128>;
template struct flowformer::flow_attention_kernels::cuda::KeyGrads<128>;
