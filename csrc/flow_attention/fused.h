// The fused kernels of Flow-Attention (kernels/flow_attention: the causal forward, the non-causal forward's
// passes and backward; the causal backward's passes in fused_causal_backward.h) on tensors: which calls they
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
  void (*causal_query_grads)(const kernels::CausalQueryGradsParams&);
  void (*causal_key_grads)(const kernels::CausalKeyGradsParams&);
  void (*causal_chain)(const kernels::CausalChainParams&);
  void (*vector_sums)(const kernels::VectorSumsParams&);
  void (*key_sums)(const kernels::KeySumsParams&);
  void (*query_output)(const kernels::QueryOutputParams&);
  void (*segment_scan)(const kernels::SegmentScanParams&);
  void (*query_grads)(const kernels::NoncausalBackwardParams&);
  void (*key_grads)(const kernels::NoncausalBackwardParams&);
  std::size_t shared_limit;
  int64_t multiprocessors;
};

// The clamp of the conserved source as the kernels take it (inf: none).
inline float kernel_clamp(double clamp) { return std::isinf(clamp) ? INFINITY : static_cast<float>(clamp); }

// The causal forward takes the inputs of the fused kernels (chunk_inputs::takes_inputs) within the shared memory
// (cu: the values of cu_seqlens, or empty).
inline bool takes_causal(const at::Tensor& query, const at::Tensor& value, const Build& build,
                         const std::vector<int64_t>& cu = {}) {
  if (!chunk_inputs::takes_inputs(query, value, cu)) {
    return false;
  }
  const int D = int(query.size(3)), M = int(value.size(3));
  const std::size_t bytes = chunk_inputs::element_bytes_of(query);
  return kernels::causal_forward_block_bytes(D, kernels::causal_value_tile(D, M, bytes), bytes) <= build.shared_limit;
}

// The non-causal forward takes the inputs of the fused kernels within the shared memory.
inline bool takes_noncausal(const at::Tensor& query, const at::Tensor& value, const Build& build) {
  if (!chunk_inputs::takes_inputs(query, value, {})) {
    return false;
  }
  const int D = int(query.size(3)), M = int(value.size(3));
  const std::size_t bytes = chunk_inputs::element_bytes_of(query);
  const int BM = chunk::value_tile(D, M, bytes);
  const std::size_t elements = std::max({kernels::vector_sums_elements(D), kernels::key_sums_elements(D, BM),
                                         kernels::query_output_elements(D, BM)});
  return bytes * elements + sizeof(float) * kernels::kNoncausalStaticFloats <= build.shared_limit;
}

// The valid rows of each batch element, (B) floats: `rows` less the padded ones (pad: (B, rows) flags, or
// undefined).
inline at::Tensor valid_rows(const at::Tensor& pad, int64_t batch, int64_t rows, const at::TensorOptions& options) {
  if (!pad.defined()) {
    return at::full({batch}, double(rows), options);
  }
  return at::logical_not(pad).sum(1).to(options.dtype());
}

// A non-causal call's inputs, padding flags and shapes, and the parameters of a pass over one side's rows.
struct NoncausalCall {
  chunk_inputs::InputTensors in;
  at::Tensor query_pad, key_pad;
  int64_t N, H, L, S, D, M;
  at::TensorOptions floats;

  NoncausalCall(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, FeatureMap feature_map,
                double eps, const Mask& query_padding_mask, const Mask& key_padding_mask)
      : in(query, key, value, feature_map, /*normalize=*/true, eps, {}),
        query_pad(chunk_inputs::contiguous_or_undefined(query_padding_mask)),
        key_pad(chunk_inputs::contiguous_or_undefined(key_padding_mask)),
        N(query.size(0)), H(query.size(1)), L(query.size(2)), S(key.size(2)), D(query.size(3)), M(value.size(3)),
        floats(in.state_options()) {}

  // params for a pass over the keys' or the queries' rows, its segments for grids of `units` blocks a segment and
  // head.
  template <typename Params>
  Params side(Params params, bool keys, int64_t units, const Build& build) const {
    static_cast<kernels::Inputs&>(params) = in.params;
    params.L = keys ? S : L;
    static_cast<kernels::Segments&>(params) =
        chunk::plan_segments(N * H * units, params.L, build.multiprocessors, kernels::kNoncausalBytes);
    params.keys = keys;
    const at::Tensor& pad = keys ? key_pad : query_pad;
    params.pad = pad.defined() ? pad.const_data_ptr<bool>() : nullptr;
    return params;
  }
};

// The non-causal forward's sums (passes 1 to 3, four launches): Q, K, B and A (N, H, D), the competition's
// largest maximum (N, H) and W against it (N, H, D, M), the valid queries and keys of each element (N), and the
// output's scales: S_n / E (N, H) and the allocation's L_n / S_n (N), 0 where no key or no query is valid.
struct NoncausalSums {
  at::Tensor Q, K, B, A, W, top, queries, keys, scale, allocation;
};
inline NoncausalSums noncausal_sums(const Build& build, const NoncausalCall& call, double clamp) {
  const int64_t N = call.N, H = call.H, D = call.D, M = call.M;
  const int64_t tiles = M / chunk::value_tile(int(D), int(M), chunk_inputs::element_bytes_of(call.in.q));
  // Passes 1 and 2: the side's sums (w_j = 1, or 1 / <x_j + e, other + e>), (N, H, D); the keys' side of pass 2
  // (A) rides in pass 3.
  const auto vector_sums = [&](bool keys, const at::Tensor& other) {
    kernels::VectorSumsParams p = call.side(kernels::VectorSumsParams{}, keys, 1, build);
    at::Tensor sums = at::empty({N * p.segments, H, D}, call.floats);
    p.other = chunk_inputs::data_or_null(other);
    p.sums = sums.mutable_data_ptr<float>();
    build.vector_sums(p);
    return sums.view({N, p.segments, H, D}).sum(1);
  };
  NoncausalSums x;
  x.Q = vector_sums(false, {});
  x.K = vector_sums(true, {});
  x.B = vector_sums(false, x.K);
  // Pass 3: the competition's (max, E, W) and A per segment, then against the largest maximum (A: added).
  kernels::KeySumsParams keys = call.side(kernels::KeySumsParams{}, true, tiles, build);
  const int64_t G = keys.segments;
  at::Tensor W = at::empty({N * G, H, D, M}, call.floats), top = at::empty({N * G, H}, call.floats),
             E = at::empty({N * G, H}, call.floats), A = at::empty({N * G, H, D}, call.floats);
  keys.clamp = kernel_clamp(clamp);
  keys.Q = x.Q.const_data_ptr<float>();
  keys.B = x.B.const_data_ptr<float>();
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
    top = largest.view({N, H});
  }
  x.A = A;
  x.W = W.contiguous();
  x.top = top.contiguous();
  // Pass 4's scales, where some key and some query are valid.
  x.queries = valid_rows(call.query_pad, N, call.L, call.floats);
  x.keys = valid_rows(call.key_pad, N, call.S, call.floats);
  const at::Tensor some = at::logical_and(x.queries > 0, x.keys > 0).view({N, 1});
  x.scale = at::where(at::logical_and(some, E.view({N, H}) > 0), x.keys.view({N, 1}) / E.view({N, H}),
                      at::zeros({}, call.floats))
                .contiguous();
  x.allocation = at::where(x.keys > 0, x.queries / x.keys, at::zeros({}, call.floats)).contiguous();
  return x;
}

// Non-causal Flow-Attention in four passes, five launches (kernels/flow_attention/DESIGN.md), each over segments
// of one side's rows; the segments' sums are added in their order by the host (a product's sum over the segments,
// against one maximum for the competition's).
inline at::Tensor noncausal_forward(const Build& build, const at::Tensor& query, const at::Tensor& key,
                                    const at::Tensor& value, FeatureMap feature_map, double eps, double clamp,
                                    const Mask& query_padding_mask, const Mask& key_padding_mask) {
  const NoncausalCall call(query, key, value, feature_map, eps, query_padding_mask, key_padding_mask);
  const NoncausalSums x = noncausal_sums(build, call, clamp);
  const int64_t tiles =
      call.M / chunk::value_tile(int(call.D), int(call.M), chunk_inputs::element_bytes_of(query));
  // Pass 4: the output.
  at::Tensor out = new_output(c10::fromIntArrayRefSlow({call.N, call.H, call.L, call.M}), query.options());
  kernels::QueryOutputParams p = call.side(kernels::QueryOutputParams{}, false, tiles, build);
  p.K = x.K.const_data_ptr<float>();
  p.A = x.A.const_data_ptr<float>();
  p.W = x.W.const_data_ptr<float>();
  p.allocation = x.allocation.const_data_ptr<float>();
  p.scale = x.scale.const_data_ptr<float>();
  p.out = out.mutable_data_ptr();
  build.query_output(p);
  return out;
}

// The non-causal backward takes the inputs of the forward within the shared memory of its blocks.
inline bool takes_noncausal_backward(const at::Tensor& query, const at::Tensor& value, const Build& build) {
  const int D = int(query.size(3)), M = int(value.size(3));
  const std::size_t bytes = chunk_inputs::element_bytes_of(query);
  const int BM = chunk::backward_value_tile(D, M, bytes);
  return takes_noncausal(query, value, build) &&
         bytes * kernels::noncausal_backward_elements(D, BM) +
                 sizeof(float) * kernels::noncausal_backward_static_floats(D) <= build.shared_limit;
}

// The gradients of non-causal Flow-Attention (noncausal_backward.cuh): the forward's sums again (four launches),
// then four passes (queries: dW, dA; keys: dv, dB, dQ; queries: dq, dK; keys: dk), the segments' sums and the value
// tiles' shares added in order by the host between them. Eight launches and a fixed set of small ATen ops a call.
inline flow_attention_ops::Grads noncausal_backward(const Build& build, const at::Tensor& grad_out,
                                                    const at::Tensor& query, const at::Tensor& key,
                                                    const at::Tensor& value, FeatureMap feature_map, double eps,
                                                    double clamp, const Mask& query_padding_mask,
                                                    const Mask& key_padding_mask) {
  const NoncausalCall call(query, key, value, feature_map, eps, query_padding_mask, key_padding_mask);
  const NoncausalSums x = noncausal_sums(build, call, clamp);
  const int64_t N = call.N, H = call.H, D = call.D, M = call.M;
  const int64_t tiles =
      M / chunk::backward_value_tile(int(D), int(M), chunk_inputs::element_bytes_of(query));
  const at::Tensor W = (x.W * x.scale.view({N, H, 1, 1})).contiguous();  // sum_j c_j k_j v_j^T
  const at::Tensor dout = chunk_inputs::aligned_rows(grad_out.to(query.scalar_type()));
  chunk_inputs::GradientTensors grads(query, value, call.S, tiles);
  // A pass's parameters: its side, the forward's sums, the state.
  const auto pass = [&](bool keys, bool second, const at::Tensor& state) {
    kernels::NoncausalBackwardParams p = call.side(kernels::NoncausalBackwardParams{}, keys, tiles, build);
    grads.set(p);
    p.second = second;
    p.clamp = kernel_clamp(clamp);
    p.dout = dout.const_data_ptr();
    for (int i = 0; i < 3; ++i) {
      p.dout_stride[i] = dout.stride(i);
    }
    p.state = state.const_data_ptr<float>();
    p.K = x.K.const_data_ptr<float>();
    p.Q = x.Q.const_data_ptr<float>();
    p.A = x.A.const_data_ptr<float>();
    p.B = x.B.const_data_ptr<float>();
    p.allocation = x.allocation.const_data_ptr<float>();
    p.max = x.top.const_data_ptr<float>();
    p.scale = x.scale.const_data_ptr<float>();
    return p;
  };
  // The tiles' shares of a (N G, H, D) sum per segment, added in tile order then in segment order.
  const auto shares = [&](int64_t G) { return at::empty({tiles, N, G, H, D}, call.floats); };
  const auto add_shares = [&](const at::Tensor& parts) {
    return chunk_inputs::add_segments(chunk_inputs::add_in_order(parts, 0));
  };
  // Queries 1: dW, dA.
  kernels::NoncausalBackwardParams p = pass(false, false, W);
  at::Tensor dW_parts = at::empty({N, p.segments, H, D, M}, call.floats), dA_parts = shares(p.segments);
  p.dW = dW_parts.mutable_data_ptr<float>();
  p.shares = dA_parts.mutable_data_ptr<float>();
  build.query_grads(p);
  const at::Tensor dW = chunk_inputs::add_segments(dW_parts), dA = add_shares(dA_parts);
  const at::Tensor total =
      at::where(x.keys.view({N, 1}) > 0, (dW * W).sum({2, 3}) / x.keys.view({N, 1}), at::zeros({}, call.floats))
          .contiguous();
  // Keys 1: dv, dB, dQ.
  p = pass(true, false, dW);
  at::Tensor dB_parts = shares(p.segments), dQ_parts = at::empty({N, p.segments, H, D}, call.floats);
  p.dA = dA.const_data_ptr<float>();
  p.total = total.const_data_ptr<float>();
  p.shares = dB_parts.mutable_data_ptr<float>();
  p.dQ_sums = dQ_parts.mutable_data_ptr<float>();
  build.key_grads(p);
  const at::Tensor dB = add_shares(dB_parts), dQ = chunk_inputs::add_segments(dQ_parts);
  // Queries 2: dq, dK.
  p = pass(false, true, W);
  at::Tensor dK_parts = shares(p.segments);
  p.dB = dB.const_data_ptr<float>();
  p.dQ = dQ.const_data_ptr<float>();
  p.shares = dK_parts.mutable_data_ptr<float>();
  build.query_grads(p);
  const at::Tensor dK = add_shares(dK_parts);
  // Keys 2: dk.
  p = pass(true, true, dW);
  p.dA = dA.const_data_ptr<float>();
  p.dK = dK.const_data_ptr<float>();
  p.total = total.const_data_ptr<float>();
  build.key_grads(p);
  grads.finish();
  return {grads.dq, grads.dk, grads.dv};
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

// The causal mode's padding flags (B, L), contiguous: a position is padding if either mask marks it (undefined:
// none).
inline at::Tensor either_padding(const Mask& query_padding_mask, const Mask& key_padding_mask) {
  if (query_padding_mask.has_value() && key_padding_mask.has_value()) {
    return at::logical_or(*query_padding_mask, *key_padding_mask).contiguous();
  }
  if (query_padding_mask.has_value() || key_padding_mask.has_value()) {
    return (query_padding_mask.has_value() ? *query_padding_mask : *key_padding_mask).contiguous();
  }
  return {};
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
  const at::Tensor pad = either_padding(query_padding_mask, key_padding_mask);
  const at::Tensor state0 = chunk_inputs::contiguous_or_undefined(state);
  at::Tensor out = new_output(c10::fromIntArrayRefSlow({query.size(0), H, L, M}), query.options());
  kernels::CausalForwardParams p{};
  static_cast<kernels::Inputs&>(p) = in.params;
  const int64_t tiles = M / kernels::causal_value_tile(int(D), int(M), chunk_inputs::element_bytes_of(query));
  static_cast<kernels::Segments&>(p) =
      chunk::plan_segments(in.N() * H * tiles, chunk_inputs::longest_sequence(L, cu), build.multiprocessors,
                           kernels::kCausalForwardBytes);
  p.pad = pad.defined() ? pad.const_data_ptr<bool>() : nullptr;
  p.clamp = kernel_clamp(clamp);
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
