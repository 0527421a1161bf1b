// Non-causal linear attention over the valid keys (q, k the features, padded keys zeroed):
//   S = k^T v (D x M)   z = sum_j k_j   out_i = q_i^T S / (q_i^T z + eps)
// as batched matrix products. Backward, with dnum_i = dout_i / den_i, dden_i = -<dout_i, out_i> / den_i:
//   dq = dnum S^T + dden z^T   dS = q^T dnum   dz = sum_i dden_i q_i   dk = v dS^T + dz   dv = k dS
#include "linear_attention/cpu/linear_attention_cpu.h"

#include <ATen/ATen.h>

namespace flowformer::linear_attention_cpu {
namespace {

struct Forward {
  at::Tensor k, v, S, z, den, out;  // k, v with padded keys zeroed
};

Forward forward(const Inputs& in, const at::Tensor& key_valid) {
  Forward f;
  f.k = in.k * key_valid;
  f.v = in.v * key_valid;
  f.S = at::matmul(f.k.transpose(2, 3), f.v);      // (B, H, D, M)
  f.z = f.k.sum(2, /*keepdim=*/true);                // (B, H, 1, D)
  f.den = (in.q * f.z).sum(-1, true) + in.eps;       // (B, H, L, 1)
  f.out = at::matmul(in.q, f.S) / f.den;
  return f;
}

}  // namespace

at::Tensor noncausal_forward(const Inputs& in, const at::Tensor& key_valid) {
  return forward(in, key_valid).out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> noncausal_backward(const Inputs& in, const at::Tensor& key_valid,
                                                                  const at::Tensor& grad_out) {
  const Forward f = forward(in, key_valid);
  const at::Tensor dnum = grad_out / f.den;
  const at::Tensor dden = -(grad_out * f.out).sum(-1, true) / f.den;
  const at::Tensor dq = at::matmul(dnum, f.S.transpose(2, 3)) + dden * f.z;
  const at::Tensor dS = at::matmul(in.q.transpose(2, 3), dnum);
  const at::Tensor dz = (dden * in.q).sum(2, true);
  const at::Tensor dk = (at::matmul(f.v, dS.transpose(2, 3)) + dz) * key_valid;
  const at::Tensor dv = at::matmul(f.k, dS);
  return {apply_feature_map_backward(in.feature_map, in.query, in.q, dq),
          apply_feature_map_backward(in.feature_map, in.key, in.k, dk), dv};
}

}  // namespace flowformer::linear_attention_cpu
