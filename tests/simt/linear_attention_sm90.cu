// The fused linear-attention kernels' CUDA build for the static checks (tests/static/linear_attention.toml):
// every head dim, as the library instantiates them.
#include "linear_attention/causal_backward.cuh"
#include "linear_attention/causal_forward.cuh"
#include "linear_attention/noncausal_backward.cuh"
#include "linear_attention/segment_sums.cuh"
#include "linear_attention/state_output.cuh"

namespace flowformer::linear_attention_kernels::cuda {
template struct CausalForward<16>;
template struct CausalForward<32>;
template struct CausalForward<64>;
template struct CausalForward<128>;
template struct CausalForward<256>;
template struct CausalQueryGrads<16>;
template struct CausalKeyGrads<16>;
template struct CausalQueryGrads<32>;
template struct CausalKeyGrads<32>;
template struct CausalQueryGrads<64>;
template struct CausalKeyGrads<64>;
template struct CausalQueryGrads<128>;
template struct CausalKeyGrads<128>;
template struct CausalQueryGrads<256>;
template struct CausalKeyGrads<256>;
template struct SegmentSums<16>;
template struct SegmentSums<32>;
template struct SegmentSums<64>;
template struct SegmentSums<128>;
template struct SegmentSums<256>;
template struct StateOutput<16>;
template struct StateOutput<32>;
template struct StateOutput<64>;
template struct StateOutput<128>;
template struct StateOutput<256>;
template struct NoncausalQueryGrads<16>;
template struct NoncausalQueryGrads<32>;
template struct NoncausalQueryGrads<64>;
template struct NoncausalQueryGrads<128>;
template struct NoncausalQueryGrads<256>;
template struct NoncausalKeyGrads<16>;
template struct NoncausalKeyGrads<32>;
template struct NoncausalKeyGrads<64>;
template struct NoncausalKeyGrads<128>;
template struct NoncausalKeyGrads<256>;
}  // namespace flowformer::linear_attention_kernels::cuda
