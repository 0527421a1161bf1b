// The fused Flow-Attention kernels' CUDA build for the static checks (tests/static/flow_attention.toml): every
// head dim, as the library instantiates them.
#include "flow_attention/causal_forward.cuh"

namespace flowformer::flow_attention_kernels::cuda {
template struct CausalForward<16>;
template struct CausalForward<32>;
template struct CausalForward<64>;
template struct CausalForward<128>;
template struct CausalForward<256>;
}  // namespace flowformer::flow_attention_kernels::cuda
