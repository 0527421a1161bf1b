// The fused Flow-Attention kernels' CUDA build for the static checks (tests/static/flow_attention.toml): every
// head dim, as the library instantiates them (the non-causal backward's too), and the causal split schedule's scan.
#include "flow_attention/causal_forward.cuh"
#include "flow_attention/causal_segments.cuh"
#include "flow_attention/noncausal_backward.cuh"
#include "flow_attention/noncausal_keys.cuh"
#include "flow_attention/noncausal_output.cuh"
#include "flow_attention/noncausal_sums.cuh"

namespace flowformer::flow_attention_kernels::cuda {
#define FF_FLOW_HEAD_DIM(D)          \
  template struct CausalForward<D>;  \
  template struct VectorSums<D>;     \
  template struct KeySums<D>;        \
  template struct QueryOutput<D>;    \
  template struct QueryGrads<D>;     \
  template struct KeyGrads<D>;
FF_FLOW_HEAD_DIM(16)
FF_FLOW_HEAD_DIM(32)
FF_FLOW_HEAD_DIM(64)
FF_FLOW_HEAD_DIM(128)
FF_FLOW_HEAD_DIM(256)
#undef FF_FLOW_HEAD_DIM
}  // namespace flowformer::flow_attention_kernels::cuda
