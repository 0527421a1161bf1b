// The fused kernels of head dim 64 (benchmarks/kernel_bounds.py's shapes) in the CUDA build, with the feature map
// fixed to elu + 1 (FLOWFORMER_ONE_FEATURE_MAP, set by CMake): each chunk loop then holds the code a call with
// that map runs, and kernel_bounds.py counts its instructions (`make bounds`).
#include "flow_attention/causal_chain.cuh"
#include "flow_attention/causal_forward.cuh"
#include "flow_attention/causal_key_grads.cuh"
#include "flow_attention/causal_query_grads.cuh"
#include "flow_attention/noncausal_backward.cuh"
#include "flow_attention/noncausal_keys.cuh"
#include "flow_attention/noncausal_output.cuh"
#include "flow_attention/noncausal_sums.cuh"
#include "linear_attention/causal_backward.cuh"
#include "linear_attention/causal_forward.cuh"
#include "linear_attention/noncausal_backward.cuh"
#include "linear_attention/segment_sums.cuh"
#include "linear_attention/state_output.cuh"

namespace flowformer::linear_attention_kernels::cuda {
template struct CausalForward<64>;
template struct CausalQueryGrads<64>;
template struct CausalKeyGrads<64>;
template struct SegmentSums<64>;
template struct StateOutput<64>;
}  // namespace flowformer::linear_attention_kernels::cuda

namespace flowformer::flow_attention_kernels::cuda {
template struct CausalForward<64>;
template struct CausalQueryGrads<64>;
template struct CausalKeyGrads<64>;
template struct CausalChain<64>;
template struct VectorSums<64>;
template struct KeySums<64>;
template struct QueryOutput<64>;
template struct QueryGrads<64>;
template struct KeyGrads<64>;
}  // namespace flowformer::flow_attention_kernels::cuda
