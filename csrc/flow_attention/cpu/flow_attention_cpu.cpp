// CPU backend of flowformer::flow_attention and its backward: converts the inputs to contiguous
// rows in the accumulation type (float32, or float64 for float64) and runs the per-(batch, head)
// kernels of noncausal.cpp and causal.cpp in parallel over batch x heads.
#include "flow_attention/cpu/flow_attention_cpu.h"

#include "common/checks.h"
#include "flow_attention/flow_attention_ops.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

namespace flowformer::flow_attention_cpu {
namespace {

using flow_attention_ops::Mask;

// The inputs of one call, converted: contiguous, in the accumulation type.
struct Inputs {
  at::Tensor query, key, value, query_pad, key_pad;
  int64_t B, H, L, S, D, M;
  Params params;

  Inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, c10::string_view feature_map, double eps, double clamp, const Mask& query_padding_mask,
         const Mask& key_padding_mask)
      : B(q.size(0)), H(q.size(1)), L(q.size(2)), S(k.size(2)), D(q.size(3)), M(v.size(3)),
        params{parse_feature_map(op, feature_map), eps, clamp} {
    const auto acc = accumulate_type(q.scalar_type());
    query = q.to(acc).contiguous();
    key = k.to(acc).contiguous();
    value = v.to(acc).contiguous();
    if (query_padding_mask.has_value()) {
      query_pad = query_padding_mask->contiguous();
    }
    if (key_padding_mask.has_value()) {
      key_pad = key_padding_mask->contiguous();
    }
  }

  template <typename T>
  Slice<T> slice(int64_t bh) const {
    const int64_t b = bh / H;
    return Slice<T>{query.const_data_ptr<T>() + bh * L * D,
                    key.const_data_ptr<T>() + bh * S * D,
                    value.const_data_ptr<T>() + bh * S * M,
                    query_pad.defined() ? query_pad.const_data_ptr<bool>() + b * L : nullptr,
                    key_pad.defined() ? key_pad.const_data_ptr<bool>() + b * S : nullptr,
                    L, S, D, M};
  }

  // Calls fn(bh) for every (batch, head), in parallel.
  template <typename Fn>
  void for_each_slice(const Fn& fn) const {
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        fn(bh);
      }
    });
  }
};

at::Tensor forward_cpu(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, bool causal,
                       c10::string_view feature_map, double eps, double clamp, const Mask& query_padding_mask,
                       const Mask& key_padding_mask) {
  const char* op = flow_attention_ops::kForward;
  flow_attention_ops::check_args(op, query, key, value, causal, feature_map, eps, clamp, query_padding_mask,
                                 key_padding_mask);
  const Inputs in(op, query, key, value, feature_map, eps, clamp, query_padding_mask, key_padding_mask);
  at::Tensor out = new_output({in.B, in.H, in.L, in.M}, in.query.options());
  AT_DISPATCH_FLOATING_TYPES(in.query.scalar_type(), "flow_attention_cpu", [&] {
    scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
    in.for_each_slice([&](int64_t bh) {
      const Slice<scalar_t> s = in.slice<scalar_t>(bh);
      scalar_t* o = out_ptr + bh * in.L * in.M;
      causal ? causal_forward(s, in.params, o) : noncausal_forward(s, in.params, o);
    });
  });
  return out.to(query.scalar_type());
}

flow_attention_ops::Grads backward_cpu(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
                                       const at::Tensor& value, bool causal, c10::string_view feature_map,
                                       double eps, double clamp, const Mask& query_padding_mask,
                                       const Mask& key_padding_mask) {
  const char* op = flow_attention_ops::kBackward;
  flow_attention_ops::check_args(op, query, key, value, causal, feature_map, eps, clamp, query_padding_mask,
                                 key_padding_mask);
  flow_attention_ops::check_grad_out(grad_out, query, value);
  const Inputs in(op, query, key, value, feature_map, eps, clamp, query_padding_mask, key_padding_mask);
  const at::Tensor dout = grad_out.to(in.query.scalar_type()).contiguous();
  at::Tensor dq = new_output(in.query.sym_sizes(), in.query.options());
  at::Tensor dk = new_output(in.key.sym_sizes(), in.key.options());
  at::Tensor dv = new_output(in.value.sym_sizes(), in.value.options());
  AT_DISPATCH_FLOATING_TYPES(in.query.scalar_type(), "flow_attention_backward_cpu", [&] {
    in.for_each_slice([&](int64_t bh) {
      const Slice<scalar_t> s = in.slice<scalar_t>(bh);
      const scalar_t* g = dout.const_data_ptr<scalar_t>() + bh * in.L * in.M;
      scalar_t* gq = dq.mutable_data_ptr<scalar_t>() + bh * in.L * in.D;
      scalar_t* gk = dk.mutable_data_ptr<scalar_t>() + bh * in.S * in.D;
      scalar_t* gv = dv.mutable_data_ptr<scalar_t>() + bh * in.S * in.M;
      causal ? causal_backward(s, in.params, g, gq, gk, gv) : noncausal_backward(s, in.params, g, gq, gk, gv);
    });
  });
  return {dq.to(query.scalar_type()), dk.to(key.scalar_type()), dv.to(value.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(flowformer, CPU, m) {
  m.impl("flow_attention", TORCH_FN(forward_cpu));
  m.impl("flow_attention_backward", TORCH_FN(backward_cpu));
}

}  // namespace flowformer::flow_attention_cpu
