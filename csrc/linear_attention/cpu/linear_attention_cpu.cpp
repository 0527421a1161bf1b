// CPU backend of the linear-attention ops: checks the arguments, converts the inputs to contiguous
// tensors in the accumulation type (float32, or float64 for float64) with the feature map applied,
// allocates the outputs and states (one per sequence: per batch element, or per packed sequence of
// cu_seqlens), and hands the rest to causal.cpp or noncausal.cpp. With
// FLOWFORMER_EMULATE_CUDA=1 it runs the CUDA backend's algorithm instead (common/emulate_cuda.h).
#include "linear_attention/cpu/linear_attention_cpu.h"

#include "common/checks.h"
#include "common/emulate_cuda.h"
#include "linear_attention/linear_attention_ops.h"
#include "linear_attention/linear_attention_portable.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/emulated_executor.h"  // last: simt.h defines CUDA names as macros

namespace flowformer::linear_attention_cpu {
namespace {

namespace ops = linear_attention_ops;
namespace emulated = linear_attention_portable;
namespace kernels = linear_attention_kernels;
using ops::Optional;

// The fused kernels' emulator build, with the shared memory of the emulated architecture and an H200's 132
// multiprocessors (so that the tests take the split schedule where a GPU would).
linear_attention_fused::Build emulated_fused_build() {
  return {[](const kernels::CausalForwardParams& p) {
            kernels::run_for_head_dim<kernels::emulated::CausalForward>(p, nullptr);
          },
          [](const kernels::CausalBackwardParams& p) {
            kernels::run_for_head_dim<kernels::emulated::CausalQueryGrads>(p, nullptr);
          },
          [](const kernels::CausalBackwardParams& p) {
            kernels::run_for_head_dim<kernels::emulated::CausalKeyGrads>(p, nullptr);
          },
          [](const kernels::SegmentSumsParams& p) { kernels::run_for_head_dim<kernels::emulated::SegmentSums>(p, nullptr); },
          [](const kernels::StateOutputParams& p) { kernels::run_for_head_dim<kernels::emulated::StateOutput>(p, nullptr); },
          [](const kernels::NoncausalBackwardParams& p) {
            kernels::run_for_head_dim<kernels::emulated::NoncausalQueryGrads>(p, nullptr);
          },
          [](const kernels::NoncausalBackwardParams& p) {
            kernels::run_for_head_dim<kernels::emulated::NoncausalKeyGrads>(p, nullptr);
          },
          simt::shared_memory_limit(simt::current_options().arch), 132};
}

Inputs convert(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
               c10::string_view feature_map, double eps) {
  Inputs in;
  in.feature_map = parse_feature_map(op, feature_map);
  in.eps = eps;
  const auto acc = accumulate_type(q.scalar_type());
  in.query = q.to(acc).contiguous();
  in.key = k.to(acc).contiguous();
  in.q = apply_feature_map(in.feature_map, in.query).contiguous();
  in.k = apply_feature_map(in.feature_map, in.key).contiguous();
  in.v = v.to(acc).contiguous();
  return in;
}

// A state to update in place: a copy of `given`, or zeros.
at::Tensor state(const Optional& given, at::IntArrayRef sizes, const at::TensorOptions& options) {
  return given.has_value() ? given->clone(at::MemoryFormat::Contiguous) : at::zeros(sizes, options);
}

// The sequences of a causal call: the B batch elements, or the packed ones of cu_seqlens (values checked).
Sequences sequences(const char* op, const at::Tensor& query, const Optional& cu_seqlens) {
  const int64_t B = query.size(0), H = query.size(1), L = query.size(2);
  std::vector<int64_t> cu = flowformer::cu_seqlens_values(op, cu_seqlens, L);
  const int64_t N = cu.empty() ? B : static_cast<int64_t>(cu.size()) - 1;
  return {N, H, L, std::move(cu)};
}

ops::CausalResult causal_cpu(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                             c10::string_view feature_map, bool normalize, double eps, const Optional& initial_kv,
                             const Optional& initial_z, const Optional& cu_seqlens) {
  const char* op = ops::kCausal;
  ops::check_causal_args(op, query, key, value, feature_map, eps, initial_kv, initial_z, cu_seqlens);
  const Sequences seqs = sequences(op, query, cu_seqlens);
  if (emulate_cuda_requested()) {
    return emulated::causal(portable::EmulatedExecutor{}, query, key, value, feature_map, normalize, eps, initial_kv,
                            initial_z, seqs.cu, emulated_fused_build(), op);
  }
  const Inputs in = convert(op, query, key, value, feature_map, eps);
  const int64_t B = query.size(0), H = query.size(1), L = query.size(2), D = query.size(3), M = value.size(3);
  const int64_t N = seqs.count;
  at::Tensor out = new_output(c10::fromIntArrayRefSlow({B, H, L, M}), in.v.options());
  at::Tensor kv = state(initial_kv, {N, H, D, M}, in.v.options());
  at::Tensor z = state(initial_z, {N, H, D}, in.v.options());
  causal_forward(in, seqs, normalize, out, kv, z);
  return {out.to(query.scalar_type()), kv, z};
}

ops::CausalGrads causal_backward_cpu(const at::Tensor& grad_out, const Optional& grad_final_kv,
                                     const Optional& grad_final_z, const at::Tensor& query, const at::Tensor& key,
                                     const at::Tensor& value, c10::string_view feature_map, bool normalize,
                                     double eps, const Optional& initial_kv, const Optional& initial_z,
                                     const Optional& cu_seqlens) {
  const char* op = ops::kCausalBackward;
  ops::check_causal_args(op, query, key, value, feature_map, eps, initial_kv, initial_z, cu_seqlens);
  ops::check_causal_grads(grad_out, grad_final_kv, grad_final_z, query, value, cu_seqlens);
  const Sequences seqs = sequences(op, query, cu_seqlens);
  if (emulate_cuda_requested()) {
    return emulated::causal_backward(portable::EmulatedExecutor{}, grad_out, grad_final_kv, grad_final_z, query, key,
                                     value, feature_map, normalize, eps, initial_kv, initial_z, seqs.cu,
                                     emulated_fused_build(), op);
  }
  const Inputs in = convert(op, query, key, value, feature_map, eps);
  const int64_t N = seqs.count, H = query.size(1), D = query.size(3), M = value.size(3);
  const auto options = in.v.options();
  const at::Tensor kv0 = state(initial_kv, {N, H, D, M}, options);
  const at::Tensor z0 = state(initial_z, {N, H, D}, options);
  at::Tensor grad_kv = state(grad_final_kv, {N, H, D, M}, options);
  at::Tensor grad_z = state(grad_final_z, {N, H, D}, options);
  const at::Tensor dout = grad_out.to(options.dtype()).contiguous();
  at::Tensor dq = new_output(in.q.sym_sizes(), options);
  at::Tensor dk = new_output(in.k.sym_sizes(), options);
  at::Tensor dv = new_output(in.v.sym_sizes(), options);
  causal_backward(in, seqs, normalize, kv0, z0, dout, dq, dk, dv, grad_kv, grad_z);
  return {dq.to(query.scalar_type()), dk.to(key.scalar_type()), dv.to(value.scalar_type()), grad_kv, grad_z};
}

// The non-causal inputs in the accumulation type, contiguous (batched products of strided (B, H) views
// would copy them at every product).
NoncausalInputs convert_noncausal(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  c10::string_view feature_map, double eps, const Optional& key_padding_mask) {
  NoncausalInputs in;
  in.feature_map = parse_feature_map(op, feature_map);
  in.eps = eps;
  const auto acc = accumulate_type(q.scalar_type());
  in.query = q.to(acc).contiguous();
  in.key = k.to(acc).contiguous();
  in.q = apply_feature_map(in.feature_map, in.query);
  in.k = apply_feature_map(in.feature_map, in.key);
  in.v = v.to(acc).contiguous();
  if (key_padding_mask.has_value()) {
    in.key_valid = key_padding_mask->logical_not().to(acc).unsqueeze(1).unsqueeze(-1);
  }
  return in;
}

at::Tensor noncausal_cpu(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                         c10::string_view feature_map, double eps, const Optional& key_padding_mask) {
  const char* op = ops::kNoncausal;
  ops::check_noncausal_args(op, query, key, value, feature_map, eps, key_padding_mask);
  if (emulate_cuda_requested()) {
    return emulated::noncausal(portable::EmulatedExecutor{}, query, key, value, feature_map, eps, key_padding_mask,
                              emulated_fused_build(), op);
  }
  return noncausal_forward(convert_noncausal(op, query, key, value, feature_map, eps, key_padding_mask))
      .to(query.scalar_type());
}

ops::Grads noncausal_backward_cpu(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
                                  const at::Tensor& value, c10::string_view feature_map, double eps,
                                  const Optional& key_padding_mask) {
  const char* op = ops::kNoncausalBackward;
  ops::check_noncausal_args(op, query, key, value, feature_map, eps, key_padding_mask);
  ops::check_noncausal_grad(grad_out, query, value);
  if (emulate_cuda_requested()) {
    return emulated::noncausal_backward(portable::EmulatedExecutor{}, grad_out, query, key, value, feature_map, eps,
                                        key_padding_mask, emulated_fused_build(), op);
  }
  const NoncausalInputs in = convert_noncausal(op, query, key, value, feature_map, eps, key_padding_mask);
  auto [dq, dk, dv] = noncausal_backward(in, grad_out.to(in.v.scalar_type()));
  return {dq.to(query.scalar_type()), dk.to(key.scalar_type()), dv.to(value.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(flowformer, CPU, m) {
  m.impl("causal_linear_attention", TORCH_FN(causal_cpu));
  m.impl("causal_linear_attention_backward", TORCH_FN(causal_backward_cpu));
  m.impl("linear_attention", TORCH_FN(noncausal_cpu));
  m.impl("linear_attention_backward", TORCH_FN(noncausal_backward_cpu));
}

}  // namespace flowformer::linear_attention_cpu
