// The fused kernels of Flow-Attention (kernels/flow_attention: the causal forward, the non-causal forward's
// passes) on tensors: which calls they
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

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

namespace flowformer::flow_attention_fused {

namespace kernels = flow_attention_kernels;
using Mask = std::optional<at::Tensor>;

// One build of the kernels (run_for_head_dim<cuda::CausalForward> on the current stream, or the emulated
// one), how much shared memory a block may have there and how many multiprocessors run blocks (the split
// schedules).
struct Build {
  void (*causal_forward)(const kernels::CausalForwardParams&);
  void (*vector_sums)(const kernels::VectorSumsParams&);
  void (*key_sums)(const kernels::KeySumsParams&);
  void (*query_output)(const kernels::QueryOutputParams&);
  void (*segment_scan)(const kernels::SegmentScanParams&);
  std::size_t shared_limit;
  int64_t multiprocessors;
};

// The causal forward takes the inputs of the fused kernels (chunk_inputs::takes_inputs) within the shared memory
// (cu: the values of cu_seqlens, or empty).
inline bool takes_causal(const at::Tensor& query, const at::Tensor& value, const Build& build,
                         const std::vector<int64_t>& cu = {}) {
  if (!chunk_inputs::takes_inputs(query, value, cu)) {
    return false;
  }
  const int D = int(query.size(3)), M = int(value.size(3));
  const std::size_t bytes = chunk_inputs::element_bytes_of(query);
  return kernels::causal_forward_block_bytes(D, kernels::value_tile(D, M, bytes), bytes) <= build.shared_limit;
}

// The non-causal forward takes the inputs of the fused kernels within the shared memory.
inline bool takes_noncausal(const at::Tensor& query, const at::Tensor& value, const Build& build) {
  if (!chunk_inputs::takes_inputs(query, value, {})) {
    return false;
  }
  const int D = int(query.size(3)), M = int(value.size(3));
  const std::size_t bytes = chunk_inputs::element_bytes_of(query);
  const int BM = kernels::noncausal_value_tile(D, M, bytes);
  const std::size_t elements = std::max({kernels::vector_sums_elements(D), kernels::key_sums_elements(D, BM),
                                         kernels::query_output_elements(D, BM)});
  return bytes * elements + sizeof(float) * kernels::kNoncausalStaticFloats <= build.shared_limit;
}

// The valid rows of each batch element, (B) floats: `rows` less the padded ones.
inline at::Tensor valid_rows(const Mask& padding_mask, int64_t batch, int64_t rows, const at::TensorOptions& options) {
  if (!padding_mask.has_value()) {
    return at::full({batch}, double(rows), options);
  }
  return at::logical_not(*padding_mask).sum(1).to(options.dtype());
}

// Non-causal Flow-Attention in four passes, five launches (kernels/flow_attention/DESIGN.md), each over segments
// of one side's rows; the segments' sums are added in their order by the host (a product's sum over the segments,
// against one maximum for the competition's).
inline at::Tensor noncausal_forward(const Build& build, const at::Tensor& query, const at::Tensor& key,
                                    const at::Tensor& value, FeatureMap feature_map, double eps, double clamp,
                                    const Mask& query_padding_mask, const Mask& key_padding_mask) {
  const chunk_inputs::InputTensors in(query, key, value, feature_map, /*normalize=*/true, eps, {});
  const int64_t N = query.size(0), H = query.size(1), L = query.size(2), S = key.size(2), D = query.size(3),
                M = value.size(3);
  const at::Tensor query_pad = chunk_inputs::contiguous_or_undefined(query_padding_mask);
  const at::Tensor key_pad = chunk_inputs::contiguous_or_undefined(key_padding_mask);
  const at::TensorOptions floats = in.state_options();
  const int64_t tiles = M / kernels::noncausal_value_tile(int(D), int(M), chunk_inputs::element_bytes_of(query));
  // One side's parameters, its segments for grids of `units` blocks a segment and head.
  const auto side = [&](auto params, bool keys, int64_t units) {
    static_cast<kernels::Inputs&>(params) = in.params;
    params.L = keys ? S : L;
    static_cast<kernels::Segments&>(params) =
        chunk::plan_segments(N * H * units, params.L, build.multiprocessors, kernels::kNoncausalBytes);
    params.keys = keys;
    const at::Tensor& pad = keys ? key_pad : query_pad;
    params.pad = pad.defined() ? pad.const_data_ptr<bool>() : nullptr;
    return params;
  };
  // Passes 1 and 2: the side's sums (w_j = 1, or 1 / <x_j + e, other + e>), (N, H, D); the keys' side of pass 2
  // (A) rides in pass 3.
  const auto vector_sums = [&](bool keys, const at::Tensor& other) {
    kernels::VectorSumsParams p = side(kernels::VectorSumsParams{}, keys, 1);
    at::Tensor sums = at::empty({N * p.segments, H, D}, floats);
    p.other = chunk_inputs::data_or_null(other);
    p.sums = sums.mutable_data_ptr<float>();
    build.vector_sums(p);
    return sums.view({N, p.segments, H, D}).sum(1);
  };
  const at::Tensor Q = vector_sums(false, {}), K = vector_sums(true, {}), B = vector_sums(false, K);
  // Pass 3: the competition's (max, E, W) and A per segment, then against the largest maximum (A: added).
  kernels::KeySumsParams keys = side(kernels::KeySumsParams{}, true, tiles);
  const int64_t G = keys.segments;
  at::Tensor W = at::empty({N * G, H, D, M}, floats), top = at::empty({N * G, H}, floats),
             E = at::empty({N * G, H}, floats), A = at::empty({N * G, H, D}, floats);
  keys.clamp = std::isinf(clamp) ? INFINITY : static_cast<float>(clamp);
  keys.Q = Q.const_data_ptr<float>();
  keys.B = B.const_data_ptr<float>();
  keys.A = A.mutable_data_ptr<float>();
  keys.W = W.mutable_data_ptr<float>();
  keys.max = top.mutable_data_ptr<float>();
  keys.E = E.mutable_data_ptr<float>();
  build.key_sums(keys);
  if (G > 1) {
    top = top.view({N, G, H});
    const at::Tensor largest = std::get<0>(top.max(1, /*keepdim=*/true));
    const at::Tensor factor = at::where(at::isinf(largest), at::zeros_like(top), at::exp(top - largest));
    E = (E.view({N, G, H}) * factor).sum(1);
    W = (W.view({N, G, H, D, M}) * factor.view({N, G, H, 1, 1})).sum(1);
    A = A.view({N, G, H, D}).sum(1);
  }
  // Pass 4: the output, scaled by S / E where some key and some query are valid.
  const at::Tensor queries = valid_rows(query_padding_mask, N, L, floats);
  const at::Tensor keys_n = valid_rows(key_padding_mask, N, S, floats);
  const at::Tensor some = at::logical_and(queries > 0, keys_n > 0).view({N, 1});
  const at::Tensor scale = at::where(at::logical_and(some, E.view({N, H}) > 0), keys_n.view({N, 1}) / E.view({N, H}),
                                     at::zeros({}, floats))
                               .contiguous();
  const at::Tensor allocation = at::where(keys_n > 0, queries / keys_n, at::zeros({}, floats)).contiguous();
  at::Tensor out = new_output(c10::fromIntArrayRefSlow({N, H, L, M}), query.options());
  kernels::QueryOutputParams p = side(kernels::QueryOutputParams{}, false, tiles);
  p.K = K.const_data_ptr<float>();
  p.A = A.const_data_ptr<float>();
  const at::Tensor W_all = W.contiguous();
  p.W = W_all.const_data_ptr<float>();
  p.allocation = allocation.const_data_ptr<float>();
  p.scale = scale.const_data_ptr<float>();
  p.out = out.mutable_data_ptr();
  build.query_output(p);
  return out;
}

// The causal forward's split schedule (p: the whole call's parameters, segments > 1; state0: (N, H, size) initial
// states, or undefined): five passes of every segment from its incoming state, each but the last followed by the
// scan of the parts of the incoming states it finished (kernels::run_split_passes). Nine launches, whatever the
// segments. Returns the states after each segment (N, G, H, size).
inline at::Tensor split_passes(const Build& build, const kernels::CausalForwardParams& p, const at::Tensor& state0,
                               const at::TensorOptions& floats) {
  const int64_t size = RecurrentState{p.D, p.M}.size();
  const at::Tensor starts = at::zeros({p.N, p.segments, p.H, size}, floats);
  const at::Tensor ends = at::empty({p.N, p.segments, p.H, size}, floats);
  kernels::run_split_passes(p, starts.mutable_data_ptr<float>(), ends.mutable_data_ptr<float>(),
                            chunk_inputs::data_or_null(state0), build.causal_forward, build.segment_scan);
  return ends;
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
  kernels::CausalForwardParams p{};
  static_cast<kernels::Inputs&>(p) = in.params;
  const int64_t tiles = M / kernels::value_tile(int(D), int(M), chunk_inputs::element_bytes_of(query));
  static_cast<kernels::Segments&>(p) =
      chunk::plan_segments(in.N() * H * tiles, chunk_inputs::longest_sequence(L, cu), build.multiprocessors,
                           kernels::kCausalForwardBytes);
  p.pad = pad.defined() ? pad.const_data_ptr<bool>() : nullptr;
  p.clamp = std::isinf(clamp) ? INFINITY : static_cast<float>(clamp);
  p.out = out.mutable_data_ptr();
  p.pass = kernels::CausalPass::output;
  if (p.segments == 1) {
    at::Tensor final_state;
    if (want_state) {
      final_state = new_output(c10::fromIntArrayRefSlow({in.N(), H, RecurrentState{D, M}.size()}), in.state_options());
    }
    p.state0 = chunk_inputs::data_or_null(state0);
    p.state_final = final_state.defined() ? final_state.mutable_data_ptr<float>() : nullptr;
    build.causal_forward(p);
    return {out, final_state};
  }
  const at::Tensor ends = split_passes(build, p, state0, in.state_options());
  return {out, want_state ? ends.select(1, p.segments - 1).contiguous() : at::Tensor()};
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
