// The fused kernels of Flow-Attention for head dim 256, nvcc build (kernels/flow_attention).
#include "flow_attention/causal_chain.cuh"
#include "flow_attention/causal_forward.cuh"
#include "flow_attention/causal_key_grads.cuh"
#include "flow_attention/causal_query_grads.cuh"
#include "flow_attention/noncausal_backward.cuh"
#include "flow_attention/noncausal_keys.cuh"
#include "flow_attention/noncausal_output.cuh"
#include "flow_attention/noncausal_sums.cuh"

template struct flowformer::flow_attention_kernels::cuda::CausalForward<256>;
template struct flowformer::flow_attention_kernels::cuda::CausalQueryGrads<256>;
template struct flowformer::flow_attention_kernels::cuda::CausalKeyGrads<256>;
template struct flowformer::flow_attention_kernels::cuda::CausalChain<256>;
template struct flowformer::flow_attention_kernels::cuda::VectorSums<256>;
template struct flowformer::flow_attention_kernels::cuda::KeySums<256>;
template struct flowformer::flow_attention_kernels::cuda::QueryOutput<256>;
template struct flowformer::flow_attention_kernels::cuda::QueryGrads<256>;
template struct flowformer::flow_attention_kernels::cuda::KeyGrads<256>;
