// The fused kernels of Flow-Attention for head dim 16, SIMT emulator build (kernels/flow_attention).
#include "flow_attention/causal_forward.cuh"

template struct flowformer::flow_attention_kernels::emulated::CausalForward<16>;
