// The fused causal kernels of linear attention for head dim 16, nvcc build (kernels/linear_attention).
#include "linear_attention/causal_backward.cuh"
#include "linear_attention/causal_forward.cuh"

template struct flowformer::linear_attention_kernels::cuda::CausalForward<16>;
template struct flowformer::linear_attention_kernels::cuda::CausalBackward<16>;
