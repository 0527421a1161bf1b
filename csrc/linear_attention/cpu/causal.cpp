// Causal linear attention on one sequence (a batch element, or one of the packed sequences) in one head,
// from its own state, q and k the features; parallel over the (sequence, head) pairs:
//   S_t = S_0 + sum_{j<=t} k_j v_j^T     z_t = z_0 + sum_{j<=t} k_j
//   out_t = q_t^T S_t / (q_t^T z_t + eps)   (or q_t^T S_t without normalisation)
// Forward: one scan with the D x M state. Backward: a forward scan gives dq_t = S_t dnum_t + dden_t z_t
// (dnum_t = dout_t / den_t, dden_t = -<dout_t, out_t> / den_t); a reverse scan carries
// R_t = dS_L + sum_{t'>=t} q_t' dnum_t'^T and r_t = dz_L + sum_{t'>=t} dden_t' q_t', giving
// dk_t = R_t v_t + r_t, dv_t = R_t^T k_t, and the initial state's gradients R_1, r_1.
#include "linear_attention/cpu/linear_attention_cpu.h"

#include "common/cpu_vec.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace flowformer::linear_attention_cpu {
namespace {

template <typename T>
struct Slice {
  const T *q, *k, *v, *query, *key;
  int64_t L, D, M;
};

// The rows [row, row + L) of the inputs: one sequence in one head.
template <typename T>
Slice<T> slice(const Inputs& in, int64_t row, int64_t L) {
  const int64_t D = in.q.size(3), M = in.v.size(3);
  return {in.q.const_data_ptr<T>() + row * D, in.k.const_data_ptr<T>() + row * D,
          in.v.const_data_ptr<T>() + row * M, in.query.const_data_ptr<T>() + row * D,
          in.key.const_data_ptr<T>() + row * D, L, D, M};
}

template <typename T>
FLOWFORMER_CPU_CLONES void forward_slice(const Slice<T>& in, bool normalize, T eps, T* S, T* z, T* out) {
  const int64_t D = in.D, M = in.M;
  for (int64_t t = 0; t < in.L; ++t) {
    const T* q = in.q + t * D;
    const T* k = in.k + t * D;
    T* o = out + t * M;
    cpu::rank1_update(D, M, T(1), k, in.v + t * M, S);
    cpu::axpy(D, T(1), k, z);
    cpu::vec_mat(D, M, T(1), q, S, o);
    if (normalize) {
      cpu::scale_(M, T(1) / (cpu::dot(D, q, z) + eps), o);
    }
  }
}

template <typename T>
FLOWFORMER_CPU_CLONES void backward_slice(const Slice<T>& in, bool normalize, T eps, FeatureMap fm, const T* S0,
                                          const T* z0, const T* grad_out, T* grad_q, T* grad_k, T* grad_v, T* R,
                                          T* r, std::vector<T>& scratch) {
  const int64_t L = in.L, D = in.D, M = in.M;
  scratch.resize(D * M + D + M + L * M + L);
  T* S = scratch.data();
  T* z = S + D * M;
  T* y = z + D;
  T* dnum = y + M;  // L x M
  T* dden = dnum + L * M;
  std::copy(S0, S0 + D * M, S);
  std::copy(z0, z0 + D, z);
  for (int64_t t = 0; t < L; ++t) {
    const T* q = in.q + t * D;
    const T* k = in.k + t * D;
    const T* dout = grad_out + t * M;
    T* dn = dnum + t * M;
    T* dq = grad_q + t * D;
    cpu::rank1_update(D, M, T(1), k, in.v + t * M, S);
    cpu::axpy(D, T(1), k, z);
    if (normalize) {
      const T den = cpu::dot(D, q, z) + eps;
      cpu::vec_mat(D, M, T(1) / den, q, S, y);  // out_t
      cpu::scale(M, T(1) / den, dout, dn);
      dden[t] = -cpu::dot(M, dout, y) / den;
    } else {
      std::copy(dout, dout + M, dn);
      dden[t] = 0;
    }
    std::fill(dq, dq + D, T(0));
    cpu::mat_vec_acc(D, M, T(1), S, dn, dq);
    cpu::axpy(D, dden[t], z, dq);
    feature_map_backward_row(fm, D, in.query + t * D, q, dq);
  }
  for (int64_t t = L - 1; t >= 0; --t) {
    const T* q = in.q + t * D;
    const T* k = in.k + t * D;
    const T* v = in.v + t * M;
    T* dk = grad_k + t * D;
    cpu::rank1_update(D, M, T(1), q, dnum + t * M, R);
    cpu::axpy(D, dden[t], q, r);
    std::copy(r, r + D, dk);
    cpu::mat_vec_acc(D, M, T(1), R, v, dk);
    feature_map_backward_row(fm, D, in.key + t * D, k, dk);
    cpu::vec_mat(D, M, T(1), k, R, grad_v + t * M);
  }
}

}  // namespace

void causal_forward(const Inputs& in, const Sequences& seqs, bool normalize, at::Tensor& out, at::Tensor& kv,
                    at::Tensor& z) {
  const int64_t H = seqs.heads, D = in.q.size(3), M = in.v.size(3);
  AT_DISPATCH_FLOATING_TYPES(in.q.scalar_type(), "causal_linear_attention_forward", [&] {
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    scalar_t* S = kv.mutable_data_ptr<scalar_t>();
    scalar_t* zs = z.mutable_data_ptr<scalar_t>();
    const auto eps = static_cast<scalar_t>(in.eps);
    at::parallel_for(0, seqs.count * H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t nh = begin; nh < end; ++nh) {  // sequence n = nh / H, head h = nh % H: the state's index
        const int64_t row = seqs.first_row(nh / H, nh % H);
        forward_slice(slice<scalar_t>(in, row, seqs.size(nh / H)), normalize, eps, S + nh * D * M, zs + nh * D,
                      o + row * M);
      }
    });
  });
}

void causal_backward(const Inputs& in, const Sequences& seqs, bool normalize, const at::Tensor& kv0,
                     const at::Tensor& z0, const at::Tensor& grad_out, at::Tensor& grad_q, at::Tensor& grad_k,
                     at::Tensor& grad_v, at::Tensor& grad_kv, at::Tensor& grad_z) {
  const int64_t H = seqs.heads, D = in.q.size(3), M = in.v.size(3);
  AT_DISPATCH_FLOATING_TYPES(in.q.scalar_type(), "causal_linear_attention_backward", [&] {
    const auto eps = static_cast<scalar_t>(in.eps);
    const scalar_t* S0 = kv0.const_data_ptr<scalar_t>();
    const scalar_t* zs0 = z0.const_data_ptr<scalar_t>();
    const scalar_t* g = grad_out.const_data_ptr<scalar_t>();
    scalar_t* gq = grad_q.mutable_data_ptr<scalar_t>();
    scalar_t* gk = grad_k.mutable_data_ptr<scalar_t>();
    scalar_t* gv = grad_v.mutable_data_ptr<scalar_t>();
    scalar_t* R = grad_kv.mutable_data_ptr<scalar_t>();
    scalar_t* r = grad_z.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, seqs.count * H, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> scratch;
      for (int64_t nh = begin; nh < end; ++nh) {
        const int64_t row = seqs.first_row(nh / H, nh % H);
        backward_slice(slice<scalar_t>(in, row, seqs.size(nh / H)), normalize, eps, in.feature_map,
                       S0 + nh * D * M, zs0 + nh * D, g + row * M, gq + row * D, gk + row * D, gv + row * M,
                       R + nh * D * M, r + nh * D, scratch);
      }
    });
  });
}

}  // namespace flowformer::linear_attention_cpu
