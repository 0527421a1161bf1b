#include "flow_attention/cpu/emulate_cuda.h"

#include "flow_attention/flow_attention_portable.h"
#include "flow_attention/fused_causal_backward.h"

#include "common/host_executor.h"
#include "common/emulated_executor.h"  // last: simt.h defines CUDA names as macros

namespace flowformer::flow_attention_cpu {
namespace {

namespace kernels = flow_attention_kernels;

// The fused kernels' emulator build, with the shared memory of the emulated architecture and an H200's 132
// multiprocessors (so that the tests take the split schedule where a GPU would).
flow_attention_fused::Build emulated_fused_build() {
  return {[](const kernels::CausalForwardParams& p) {
            kernels::run_for_head_dim<kernels::emulated::CausalForward>(p, nullptr);
          },
          [](const kernels::CausalQueryGradsParams& p) {
            kernels::run_for_head_dim<kernels::emulated::CausalQueryGrads>(p, nullptr);
          },
          [](const kernels::CausalKeyGradsParams& p) {
            kernels::run_for_head_dim<kernels::emulated::CausalKeyGrads>(p, nullptr);
          },
          [](const kernels::CausalChainParams& p) {
            kernels::run_for_head_dim<kernels::emulated::CausalChain>(p, nullptr);
          },
          [](const kernels::VectorSumsParams& p) { kernels::run_for_head_dim<kernels::emulated::VectorSums>(p, nullptr); },
          [](const kernels::KeySumsParams& p) { kernels::run_for_head_dim<kernels::emulated::KeySums>(p, nullptr); },
          [](const kernels::QueryOutputParams& p) {
            kernels::run_for_head_dim<kernels::emulated::QueryOutput>(p, nullptr);
          },
          [](const kernels::SegmentScanParams& p) { kernels::emulated::SegmentScan::run(p, nullptr); },
          [](const kernels::NoncausalBackwardParams& p) {
            kernels::run_for_head_dim<kernels::emulated::QueryGrads>(p, nullptr);
          },
          [](const kernels::NoncausalBackwardParams& p) {
            kernels::run_for_head_dim<kernels::emulated::KeyGrads>(p, nullptr);
          },
          simt::shared_memory_limit(simt::current_options().arch), 132};
}

}  // namespace

at::Tensor emulated_forward(const char* op, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                            bool causal, c10::string_view feature_map, double eps, double clamp,
                            const flow_attention_ops::Mask& query_padding_mask,
                            const flow_attention_ops::Mask& key_padding_mask) {
  const flow_attention_fused::Build build = emulated_fused_build();
  if (causal && flow_attention_fused::takes_causal(query, value, build)) {
    return flow_attention_fused::causal_forward(build, query, key, value, parse_feature_map(op, feature_map), eps,
                                                clamp, {}, query_padding_mask, key_padding_mask, false)
        .first;
  }
  if (!causal && flow_attention_fused::takes_noncausal(query, value, build)) {
    return flow_attention_fused::noncausal_forward(build, query, key, value, parse_feature_map(op, feature_map), eps,
                                                   clamp, query_padding_mask, key_padding_mask);
  }
  const auto problem = flow_attention_portable::make_problem(op, query, key, value, causal, feature_map, eps, clamp,
                                                             query_padding_mask, key_padding_mask);
  return flow_attention_portable::forward(portable::EmulatedExecutor{}, problem);
}

flow_attention_ops::Grads emulated_backward(const char* op, const at::Tensor& grad_out, const at::Tensor& query,
                                            const at::Tensor& key, const at::Tensor& value, bool causal,
                                            c10::string_view feature_map, double eps, double clamp,
                                            const flow_attention_ops::Mask& query_padding_mask,
                                            const flow_attention_ops::Mask& key_padding_mask) {
  const flow_attention_fused::Build build = emulated_fused_build();
  if (causal && flow_attention_fused::takes_causal_backward(query, value, build)) {
    auto [dq, dk, dv, dstate0] = flow_attention_fused::causal_backward(
        build, grad_out, {}, query, key, value, parse_feature_map(op, feature_map), eps, clamp, {},
        query_padding_mask, key_padding_mask, false);
    return {dq, dk, dv};
  }
  if (!causal && flow_attention_fused::takes_noncausal_backward(query, value, build)) {
    return flow_attention_fused::noncausal_backward(build, grad_out, query, key, value,
                                                    parse_feature_map(op, feature_map), eps, clamp,
                                                    query_padding_mask, key_padding_mask);
  }
  const auto problem = flow_attention_portable::make_problem(op, query, key, value, causal, feature_map, eps, clamp,
                                                             query_padding_mask, key_padding_mask);
  return flow_attention_portable::backward(portable::EmulatedExecutor{}, problem, grad_out);
}

std::tuple<at::Tensor, at::Tensor> emulated_forward_with_state(
    const char* op, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    c10::string_view feature_map, double eps, double clamp, const flow_attention_ops::Mask& state,
    const flow_attention_ops::Mask& query_padding_mask, const flow_attention_ops::Mask& key_padding_mask,
    const flow_attention_ops::Mask& cu_seqlens) {
  return flow_attention_fused::causal_with_state(
      emulated_fused_build(), op, query, key, value, feature_map, eps, clamp, state, query_padding_mask,
      key_padding_mask, cu_seqlens, [&]() -> std::tuple<at::Tensor, at::Tensor> {
        const auto problem = flow_attention_portable::make_problem(op, query, key, value, true, feature_map, eps,
                                                                   clamp, query_padding_mask, key_padding_mask);
        return flow_attention_portable::forward_with_state(portable::EmulatedExecutor{}, problem,
                                                           state.value_or(at::Tensor()));
      });
}

flow_attention_ops::StateGrads emulated_backward_with_state(
    const at::Tensor& grad_out, const flow_attention_ops::Mask& grad_state, const at::Tensor& query,
    const at::Tensor& key, const at::Tensor& value, c10::string_view feature_map, double eps, double clamp,
    const flow_attention_ops::Mask& state, const flow_attention_ops::Mask& query_padding_mask,
    const flow_attention_ops::Mask& key_padding_mask, const flow_attention_ops::Mask& cu_seqlens) {
  return flow_attention_fused::causal_with_state_backward(
      emulated_fused_build(), flow_attention_ops::kCausalStateBackward, grad_out, grad_state, query, key, value,
      feature_map, eps, clamp, state, query_padding_mask, key_padding_mask, cu_seqlens, [&] {
        return portable_backward_with_state(true, grad_out, grad_state, query, key, value, feature_map, eps, clamp,
                                            state, query_padding_mask, key_padding_mask);
      });
}

flow_attention_ops::StateGrads portable_backward_with_state(
    bool emulated, const at::Tensor& grad_out, const flow_attention_ops::Mask& grad_state, const at::Tensor& query,
    const at::Tensor& key, const at::Tensor& value, c10::string_view feature_map, double eps, double clamp,
    const flow_attention_ops::Mask& state, const flow_attention_ops::Mask& query_padding_mask,
    const flow_attention_ops::Mask& key_padding_mask) {
  const auto problem = flow_attention_portable::make_problem(flow_attention_ops::kCausalStateBackward, query, key,
                                                             value, true, feature_map, eps, clamp, query_padding_mask,
                                                             key_padding_mask);
  if (emulated) {
    return flow_attention_portable::backward_with_state(portable::EmulatedExecutor{}, problem, grad_out, state,
                                                        grad_state);
  }
  return flow_attention_portable::backward_with_state(portable::HostExecutor{}, problem, grad_out, state, grad_state);
}

}  // namespace flowformer::flow_attention_cpu
