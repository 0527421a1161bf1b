// The fused kernels of Flow-Attention (kernels/flow_attention: the causal forward) on tensors: which calls they
// take, and their launches from checked arguments. The CUDA backend runs them on the GPU, the test mode
// FLOWFORMER_EMULATE_CUDA=1 in the SIMT emulator; the calls they do not take go the portable way
// (flow_attention_portable.h).
#pragma once

#include "common/checks.h"
#include "common/chunk_inputs.h"
#include "common/feature_map.h"
#include "flow_attention/flow_attention_ops.h"
#include "flow_attention/fused_kernels.h"
#include "flow_attention/state_layout.h"

#include <ATen/ATen.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

namespace flowformer::flow_attention_fused {

namespace kernels = flow_attention_kernels;
using Mask = std::optional<at::Tensor>;

// One build of the kernels (run_for_head_dim<cuda::CausalForward> on the current stream, or the emulated
// one) and how much shared memory a block may have there.
struct Build {
  void (*causal_forward)(const kernels::CausalForwardParams&);
  std::size_t shared_limit;
};

// The causal forward takes bf16, half and float32 (D <= 128) inputs with D, M in {16, 32, 64, 128, 256}, within
// the shared memory, heads and sequences that fit a grid (cu: the values of cu_seqlens, or empty).
inline bool takes_causal(const at::Tensor& query, const at::Tensor& value, const Build& build,
                         const std::vector<int64_t>& cu = {}) {
  const at::ScalarType type = query.scalar_type();
  const int64_t D = query.size(3), M = value.size(3);
  const bool typed = type == at::kBFloat16 || type == at::kHalf || (type == at::kFloat && D <= kernels::kMaxFloatD);
  if (!typed || !kernels::fused_head_dim(D) || !kernels::fused_head_dim(M)) {
    return false;
  }
  const std::size_t bytes = chunk_inputs::element_bytes_of(query);
  const int64_t sequences = cu.empty() ? query.size(0) : int64_t(cu.size()) - 1;
  return sequences < std::numeric_limits<int32_t>::max() && query.size(1) <= 65535 &&
         kernels::causal_forward_block_bytes(int(D), kernels::value_tile(int(D), int(M), bytes), bytes) <=
             build.shared_limit;
}

// Causal Flow-Attention from a packed recurrent state (state_layout.h; none: the empty prefix): out, and the
// state after the last position (undefined unless want_state). A position is padding if either mask marks it.
// cu: the checked values of cu_seqlens (packed sequences, B = 1, each from its own row of state: one launch for
// all), or empty.
inline std::pair<at::Tensor, at::Tensor> causal_forward(const Build& build, const at::Tensor& query,
                                                        const at::Tensor& key, const at::Tensor& value,
                                                        FeatureMap feature_map, double eps, double clamp,
                                                        const Mask& state, const Mask& query_padding_mask,
                                                        const Mask& key_padding_mask, bool want_state,
                                                        const std::vector<int64_t>& cu = {}) {
  const chunk_inputs::InputTensors in(query, key, value, feature_map, /*normalize=*/true, eps, cu);
  const int64_t H = query.size(1), L = query.size(2), D = query.size(3), M = value.size(3);
  at::Tensor pad;
  if (query_padding_mask.has_value() && key_padding_mask.has_value()) {
    pad = at::logical_or(*query_padding_mask, *key_padding_mask).contiguous();
  } else if (query_padding_mask.has_value() || key_padding_mask.has_value()) {
    pad = (query_padding_mask.has_value() ? *query_padding_mask : *key_padding_mask).contiguous();
  }
  const at::Tensor state0 = chunk_inputs::contiguous_or_undefined(state);
  at::Tensor out = new_output(c10::fromIntArrayRefSlow({query.size(0), H, L, M}), query.options());
  at::Tensor final_state;
  if (want_state) {
    final_state = new_output(c10::fromIntArrayRefSlow({in.N(), H, RecurrentState{D, M}.size()}), in.state_options());
  }
  kernels::CausalForwardParams p{};
  static_cast<kernels::Inputs&>(p) = in.params;
  p.segments = 1;
  p.segment_rows = 0;
  p.pad = pad.defined() ? pad.const_data_ptr<bool>() : nullptr;
  p.clamp = std::isinf(clamp) ? INFINITY : static_cast<float>(clamp);
  p.out = out.mutable_data_ptr();
  p.state0 = chunk_inputs::data_or_null(state0);
  p.state_final = final_state.defined() ? final_state.mutable_data_ptr<float>() : nullptr;
  build.causal_forward(p);
  return {out, final_state};
}

// causal_flow_attention (arguments checked) on a build: the fused kernel where it takes the call, else packed
// sequences one call a sequence (flow_attention_ops::causal_with_state_packed), else portable() (the portable
// item kernels on the backend's executor). A CUDA cu_seqlens costs one small copy to the host (its values).
template <typename Portable>
std::tuple<at::Tensor, at::Tensor> causal_with_state(const Build& build, const char* op, const at::Tensor& query,
                                                     const at::Tensor& key, const at::Tensor& value,
                                                     c10::string_view feature_map, double eps, double clamp,
                                                     const Mask& state, const Mask& query_padding_mask,
                                                     const Mask& key_padding_mask, const Mask& cu_seqlens,
                                                     const Portable& portable) {
  const std::vector<int64_t> cu = cu_seqlens_values(op, cu_seqlens, query.size(2));
  if (takes_causal(query, value, build, cu)) {
    return causal_forward(build, query, key, value, parse_feature_map(op, feature_map), eps, clamp, state,
                          query_padding_mask, key_padding_mask, true, cu);
  }
  if (cu_seqlens.has_value()) {
    return flow_attention_ops::causal_with_state_packed(query, key, value, feature_map, eps, clamp, state,
                                                        query_padding_mask, key_padding_mask, *cu_seqlens);
  }
  return portable();
}

}  // namespace flowformer::flow_attention_fused
