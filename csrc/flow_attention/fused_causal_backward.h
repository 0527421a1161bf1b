// The causal Flow-Attention backward on the fused kernels (kernels/flow_attention/DESIGN.md, "Causal backward"):
// three passes, the value tiles' shares added in tile order by the host between them.
//   1. queries in order (causal_query_grads.cuh): the forward again, the rows' scalars and the chunks' starting
//      vectors recorded, the shares of dg_t and of g_t S_t dout_t;
//   2. keys in reverse (causal_key_grads.cuh): dv, the shares of dc_t and of c_t R_t v_t, S's part of the incoming
//      state's gradient;
//   3. the chain of scalars (causal_chain.cuh): dq, dk through phi', the rest of the incoming state's gradient.
// Few long sequences split each pass into segments, each by its own plan: pass 1 from each segment's incoming
// state, which the forward's split schedule makes first (its four sums passes and scans); pass 2 from each
// segment's R after it, from a sums walk of every segment and a reverse scan; the chain from each segment's
// carries after it, from three levels (ChainPass) of walks and reverse scans. Three launches and a few small ATen
// ops a call (nineteen split), packed sequences and segments included.
#pragma once

#include "flow_attention/fused.h"

namespace flowformer::flow_attention_fused {

// The causal backward takes the inputs of the forward within the shared memory of each pass's blocks.
inline bool takes_causal_backward(const at::Tensor& query, const at::Tensor& value, const Build& build,
                                  const std::vector<int64_t>& cu = {}) {
  return takes_causal(query, value, build, cu) &&
         kernels::causal_backward_block_bytes(int(query.size(3)), int(value.size(3)),
                                              chunk_inputs::element_bytes_of(query)) <= build.shared_limit;
}

// The gradients of causal_flow_attention (arguments checked, takes_causal_backward): those of query, key, value
// and of the incoming state (N, H, size) floats (of zeros where state is none; undefined unless want_state).
// grad_state: the final state's gradient, or none (zeros). cu: the values of cu_seqlens, or empty.
inline flow_attention_ops::StateGrads causal_backward(const Build& build, const at::Tensor& grad_out,
                                                      const Mask& grad_state, const at::Tensor& query,
                                                      const at::Tensor& key, const at::Tensor& value,
                                                      FeatureMap feature_map, double eps, double clamp,
                                                      const Mask& state, const Mask& query_padding_mask,
                                                      const Mask& key_padding_mask, bool want_state,
                                                      const std::vector<int64_t>& cu = {}) {
  const chunk_inputs::InputTensors in(query, key, value, feature_map, /*normalize=*/true, eps, cu);
  const int64_t B = query.size(0), H = query.size(1), L = query.size(2), D = query.size(3), M = value.size(3);
  const int64_t rows = B * H * L, N = in.N(), longest = chunk_inputs::longest_sequence(L, cu);
  const int64_t state_size = RecurrentState{D, M}.size();
  const std::size_t bytes = chunk_inputs::element_bytes_of(query);
  const int64_t query_tiles = M / kernels::causal_value_tile(int(D), int(M), bytes);
  const int64_t key_tiles = M / chunk::backward_value_tile(int(D), int(M), bytes);
  const at::TensorOptions floats = in.state_options();
  const at::Tensor pad = either_padding(query_padding_mask, key_padding_mask);
  const at::Tensor state0 = chunk_inputs::contiguous_or_undefined(state);
  const at::Tensor dstate_final =
      grad_state.has_value() ? grad_state->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor dout = chunk_inputs::aligned_rows(grad_out.to(query.scalar_type()));
  at::Tensor dq = new_output(c10::fromIntArrayRefSlow({B, H, L, D}), query.options());
  at::Tensor dk = new_output(c10::fromIntArrayRefSlow({B, H, L, D}), query.options());
  at::Tensor dv = new_output(c10::fromIntArrayRefSlow({B, H, L, M}), query.options());
  at::Tensor dstate0;
  if (want_state) {
    dstate0 = new_output(c10::fromIntArrayRefSlow({N, H, state_size}), floats);
  }
  float* const dstate0_data = want_state ? dstate0.mutable_data_ptr<float>() : nullptr;
  const auto with_inputs = [&](auto params) {
    static_cast<kernels::Inputs&>(params) = in.params;
    static_cast<kernels::Segments&>(params) = kernels::Segments{1, 0};
    params.pad = pad.defined() ? pad.const_data_ptr<bool>() : nullptr;
    return params;
  };
  const auto with_dout = [&](auto& params) {
    params.dout = dout.const_data_ptr();
    for (int i = 0; i < 3; ++i) {
      params.dout_stride[i] = dout.stride(i);
    }
  };
  // Pass 1: queries in order, from each segment's incoming state where split.
  const at::Tensor records = at::empty({kernels::kCausalRowScalars, rows}, floats);
  const at::Tensor chunk_starts =
      at::empty({B * H, kernels::causal_chunk_slots(L, int(N), !cu.empty()), 4, D}, floats);
  const at::Tensor dg_parts = at::empty({query_tiles, rows}, floats);
  const at::Tensor dq_parts = at::empty({query_tiles, rows, D}, floats);
  kernels::CausalQueryGradsParams queries{};
  static_cast<kernels::CausalForwardParams&>(queries) = with_inputs(kernels::CausalForwardParams{});
  queries.clamp = kernel_clamp(clamp);
  queries.out = nullptr;
  queries.state0 = chunk_inputs::data_or_null(state0);
  queries.state_final = nullptr;
  with_dout(queries);
  queries.dq_parts = dq_parts.mutable_data_ptr<float>();
  queries.dg_parts = dg_parts.mutable_data_ptr<float>();
  queries.rows = records.mutable_data_ptr<float>();
  queries.chunk_starts = chunk_starts.mutable_data_ptr<float>();
  static_cast<kernels::Segments&>(queries) =
      chunk::plan_segments(N * H * query_tiles, longest, build.multiprocessors, kernels::kCausalQueryGradsBytes);
  at::Tensor segment_states;
  if (queries.segments > 1) {
    segment_states = at::zeros({N, queries.segments, H, state_size}, floats);
    kernels::run_split_sums(queries, segment_states.mutable_data_ptr<float>(),
                            at::empty_like(segment_states).mutable_data_ptr<float>(), queries.state0,
                            build.causal_forward, build.segment_scan);
    queries.state0 = segment_states.const_data_ptr<float>();
  }
  build.causal_query_grads(queries);
  // Pass 2: keys in reverse, from each segment's R after it where split.
  const at::Tensor dc_parts = at::empty({key_tiles, rows}, floats);
  const at::Tensor dk_parts = at::empty({key_tiles, rows, D}, floats);
  kernels::CausalKeyGradsParams keys = with_inputs(kernels::CausalKeyGradsParams{});
  with_dout(keys);
  keys.rows = records.const_data_ptr<float>();
  keys.dstate_final = chunk_inputs::data_or_null(dstate_final);
  keys.dv = dv.mutable_data_ptr();
  keys.dk_parts = dk_parts.mutable_data_ptr<float>();
  keys.dc_parts = dc_parts.mutable_data_ptr<float>();
  keys.dstate0 = dstate0_data;
  static_cast<kernels::Segments&>(keys) = chunk::plan_segments(N * H * key_tiles, longest, build.multiprocessors,
                                                               kernels::kCausalKeyGradsBytes);
  at::Tensor segment_sums, segment_after;
  if (keys.segments > 1) {
    segment_sums = at::empty({N, keys.segments, H, state_size}, floats);
    segment_after = at::empty_like(segment_sums);
    kernels::CausalKeyGradsParams sums = keys;
    sums.sums = true;
    sums.dstate_final = nullptr;
    sums.dstate0 = segment_sums.mutable_data_ptr<float>();
    build.causal_key_grads(sums);
    kernels::SegmentScanParams scan{kernels::CausalPass::state, int(N), keys.segments, int(H), int(D), int(M),
                                    keys.dstate_final, sums.dstate0, segment_after.mutable_data_ptr<float>(),
                                    /*reverse=*/true, keys.dstate0};
    build.segment_scan(scan);
    keys.dstate_final = segment_after.const_data_ptr<float>();
    keys.dstate0 = nullptr;
  }
  build.causal_key_grads(keys);
  // Pass 3: the chain, from the passes' shares added in tile order.
  const at::Tensor dg = chunk_inputs::add_in_order(dg_parts, 0).contiguous();
  const at::Tensor dq_shares = chunk_inputs::add_in_order(dq_parts, 0).contiguous();
  const at::Tensor dc = chunk_inputs::add_in_order(dc_parts, 0).contiguous();
  const at::Tensor dk_shares = chunk_inputs::add_in_order(dk_parts, 0).contiguous();
  kernels::CausalChainParams chain = with_inputs(kernels::CausalChainParams{});
  chain.clamp = kernel_clamp(clamp);
  chain.rows = records.const_data_ptr<float>();
  chain.chunk_starts = chunk_starts.const_data_ptr<float>();
  chain.dg_shares = dg.const_data_ptr<float>();
  chain.dq_shares = dq_shares.const_data_ptr<float>();
  chain.dc_shares = dc.const_data_ptr<float>();
  chain.dk_shares = dk_shares.const_data_ptr<float>();
  chain.state0 = chunk_inputs::data_or_null(state0);
  chain.dstate_final = chunk_inputs::data_or_null(dstate_final);
  chain.dq = dq.mutable_data_ptr();
  chain.dk = dk.mutable_data_ptr();
  chain.dstate0 = dstate0_data;
  static_cast<kernels::Segments&>(chain) =
      chunk::plan_segments(N * H, longest, build.multiprocessors, kernels::kCausalChainBytes);
  at::Tensor carries;
  if (chain.segments > 1) {  // the carries after each segment, a level at a time
    carries = at::zeros({N, chain.segments, H, state_size}, floats);
    const at::Tensor before = at::zeros_like(carries);
    kernels::CausalChainParams level = chain;
    level.dstate0 = nullptr;
    level.carries_before = before.mutable_data_ptr<float>();
    kernels::SegmentScanParams scan{kernels::CausalPass::competition, int(N), chain.segments, int(H), int(D),
                                    int(M), chain.dstate_final, before.const_data_ptr<float>(),
                                    carries.mutable_data_ptr<float>(), /*reverse=*/true};
    for (const auto [pass, columns] : {std::pair{kernels::ChainPass::competition, kernels::CausalPass::competition},
                                       std::pair{kernels::ChainPass::vectors, kernels::CausalPass::flows},
                                       std::pair{kernels::ChainPass::vectors, kernels::CausalPass::counts}}) {
      level.pass = pass;
      level.carries_after = pass == kernels::ChainPass::competition ? nullptr : carries.const_data_ptr<float>();
      build.causal_chain(level);
      scan.pass = columns;
      build.segment_scan(scan);
    }
    chain.carries_after = carries.const_data_ptr<float>();
  }
  build.causal_chain(chain);
  return {dq, dk, dv, dstate0};
}

// causal_flow_attention_backward (arguments checked) on a build: the fused passes where they take the call, else
// packed sequences one call a sequence (flow_attention_ops::causal_with_state_backward_packed), else portable().
template <typename Portable>
flow_attention_ops::StateGrads causal_with_state_backward(
    const Build& build, const char* op, const at::Tensor& grad_out, const Mask& grad_state, const at::Tensor& query,
    const at::Tensor& key, const at::Tensor& value, c10::string_view feature_map, double eps, double clamp,
    const Mask& state, const Mask& query_padding_mask, const Mask& key_padding_mask, const Mask& cu_seqlens,
    const Portable& portable) {
  const std::vector<int64_t> cu = cu_seqlens_values(op, cu_seqlens, query.size(2));
  if (takes_causal_backward(query, value, build, cu)) {
    return causal_backward(build, grad_out, grad_state, query, key, value, parse_feature_map(op, feature_map), eps,
                           clamp, state, query_padding_mask, key_padding_mask, true, cu);
  }
  if (cu_seqlens.has_value()) {
    return flow_attention_ops::causal_with_state_backward_packed(grad_out, grad_state, query, key, value, feature_map,
                                                                 eps, clamp, state, query_padding_mask,
                                                                 key_padding_mask, *cu_seqlens);
  }
  return portable();
}

}  // namespace flowformer::flow_attention_fused
