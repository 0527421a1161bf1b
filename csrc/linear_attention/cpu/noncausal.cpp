// Non-causal linear attention over the valid keys (q, k the features, padded keys zeroed):
//   S = k^T v (D x M)   z = sum_j k_j   out_i = q_i^T S / (q_i^T z + eps)
// as batched matrix products. Backward, with dnum_i = dout_i / den_i and P = dnum S^T (so that
// dden_i = -<dout_i, out_i> / den_i = -<q_i, P_i> / den_i needs no second q S product):
//   dq = P + dden z^T   dS = q^T dnum   dz = sum_i dden_i q_i   dk = v dS^T + dz   dv = k dS
#include "linear_attention/cpu/linear_attention_cpu.h"

#include <ATen/ATen.h>

namespace flowformer::linear_attention_cpu {
namespace {

struct Sums {
  at::Tensor padded, k, v, S, z, den;  // k, v with padded keys zeroed (whatever they held: NaN too)
};

Sums sums(const NoncausalInputs& in) {
  Sums s;
  s.padded = in.key_valid.defined() ? in.key_valid.eq(0) : at::Tensor();
  s.k = s.padded.defined() ? in.k.masked_fill(s.padded, 0) : in.k;
  s.v = s.padded.defined() ? in.v.masked_fill(s.padded, 0) : in.v;
  s.S = at::matmul(s.k.transpose(2, 3), s.v);  // (B, H, D, M)
  s.z = s.k.sum(2, /*keepdim=*/true);          // (B, H, 1, D)
  s.den = at::matmul(in.q, s.z.transpose(2, 3)) + in.eps;  // (B, H, L, 1)
  return s;
}

}  // namespace

at::Tensor noncausal_forward(const NoncausalInputs& in) {
  const Sums s = sums(in);
  return at::matmul(in.q, s.S).div_(s.den);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> noncausal_backward(const NoncausalInputs& in,
                                                                  const at::Tensor& grad_out) {
  const Sums s = sums(in);
  const at::Tensor dnum = grad_out / s.den;
  at::Tensor dq = at::matmul(dnum, s.S.transpose(2, 3));
  const at::Tensor dden = -(in.q * dq).sum(-1, true) / s.den;
  dq.add_(dden * s.z);
  const at::Tensor dS = at::matmul(in.q.transpose(2, 3), dnum);
  const at::Tensor dz = (dden * in.q).sum(2, true);
  const at::Tensor dk_features = at::matmul(s.v, dS.transpose(2, 3)).add_(dz);
  at::Tensor dk = apply_feature_map_backward(in.feature_map, in.key, in.k, dk_features);
  if (s.padded.defined()) {  // padded keys get no gradient (phi' of a NaN key would make it NaN)
    dk.masked_fill_(s.padded, 0);
  }
  return {apply_feature_map_backward(in.feature_map, in.query, in.q, dq), dk, at::matmul(s.k, dS)};
}

}  // namespace flowformer::linear_attention_cpu
