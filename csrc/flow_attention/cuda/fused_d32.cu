// The fused kernels of Flow-Attention for head dim 32, nvcc build (kernels/flow_attention).
#include "flow_attention/causal_forward.cuh"

template struct flowformer::flow_attention_kernels::cuda::CausalForward<32>;
