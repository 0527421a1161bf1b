// Runs the generic items of kernels/common/chunk_items.h (and assemble_gradient.h) with an executor
// (CudaExecutor or EmulatedExecutor) on (B, H, n, width) inputs, each call returning a new workspace in the
// accumulation type (float, or double for double inputs) laid out (B * H, ...). Shared by the ops built
// on the chunked algorithm (Flow-Attention, linear attention).
#pragma once

#include "common/assemble_gradient.h"
#include "common/checks.h"
#include "common/chunk_items.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <initializer_list>

namespace flowformer::portable {

// x itself when its rows have a unit stride (what Rows reads), else a contiguous copy.
inline at::Tensor unit_row_stride(const at::Tensor& x) {
  return x.size(-1) <= 1 || x.stride(-1) == 1 ? x : x.contiguous();
}

template <typename Exec, typename T>
class ChunkLauncher {
 public:
  using A = at::opmath_type<T>;

  // inputs: the options (dtype, device) of the op's inputs; D, M: key and value widths.
  ChunkLauncher(const Exec& exec, int64_t B, int64_t H, int64_t D, int64_t M, FeatureMap feature_map,
                const at::TensorOptions& inputs)
      : exec_(exec), B_(B), H_(H), D_(D), M_(M), feature_map_(feature_map), inputs_(inputs),
        acc_(inputs.dtype(c10::CppTypeToScalarType<A>::value)) {}

  int64_t BH() const { return B_ * H_; }
  const at::TensorOptions& acc_options() const { return acc_; }

  // The rows of a (B, H, n, width) input with a unit stride along the row; feature: read through phi.
  Rows<T> rows(const at::Tensor& x, const at::Tensor& pad_a, const at::Tensor& pad_b, bool feature) const {
    return {x.const_data_ptr<T>(), x.stride(0), x.stride(1), x.stride(2), H_, x.size(2), x.size(3),
            bool_ptr(pad_a), bool_ptr(pad_b), feature, feature_map_};
  }

  at::Tensor workspace(at::IntArrayRef sizes) const { return new_output(c10::fromIntArrayRefSlow(sizes), acc_); }

  // (BH, n) 0/1 in the accumulation type: 1 where neither (B, n) mask marks the row.
  at::Tensor valid_rows(const at::Tensor& pad_a, const at::Tensor& pad_b, int64_t n) const {
    at::Tensor pad = at::zeros({B_, n}, inputs_.dtype(at::kBool));
    for (const at::Tensor* m : {&pad_a, &pad_b}) {
      if (m->defined()) {
        pad = pad | *m;
      }
    }
    return pad.logical_not().to(acc_.dtype()).unsqueeze(1).expand({B_, H_, n}).reshape({BH(), n}).contiguous();
  }

  // (BH, chunks, width): per-chunk sums of w x over the valid rows (w = 1 if undefined).
  at::Tensor column_sums(const Rows<T>& x, const at::Tensor& w, int64_t chunk) const {
    at::Tensor out = workspace({BH(), num_chunks(x.n, chunk), x.width});
    exec_(out.numel(), ChunkColumnSums<T, A>{x, data(w), chunk, out.mutable_data_ptr<A>()});
    return out;
  }
  // (BH, chunks, x.width * y.width): per-chunk sums of w x y^T over the valid rows.
  at::Tensor outer_sums(const Rows<T>& x, const Rows<T>& y, const at::Tensor& w, int64_t chunk) const {
    at::Tensor out = workspace({BH(), num_chunks(x.n, chunk), x.width * y.width});
    exec_(out.numel(), ChunkOuterSums<T, A>{x, y, data(w), chunk, out.mutable_data_ptr<A>()});
    return out;
  }
  // The sums over the earlier chunks (later ones when reverse) of per-chunk sums.
  at::Tensor exclusive(const at::Tensor& partial, bool reverse) const {
    at::Tensor out = workspace(partial.sizes());
    exec_(BH() * partial.size(2),
          ChunkExclusiveScan<A>{data(partial), partial.size(1), partial.size(2), reverse, out.mutable_data_ptr<A>()});
    return out;
  }
  // (BH, 1, width): the sums over all valid rows, as partial sums of `chunk` rows added in order.
  at::Tensor total(const Rows<T>& x, const at::Tensor& w, int64_t chunk) const {
    return column_sums(x, w, chunk).sum(1, /*keepdim=*/true);
  }
  at::Tensor total_outer(const Rows<T>& x, const Rows<T>& y, const at::Tensor& w, int64_t chunk) const {
    return outer_sums(x, y, w, chunk).sum(1, /*keepdim=*/true);
  }
  // (BH, n): <x_r, v> for v the (BH, groups, width) vector shared by `group` rows; row sums if v undefined.
  at::Tensor row_dot(const Rows<T>& x, const at::Tensor& v, int64_t group) const {
    at::Tensor out = workspace({BH(), x.n});
    const Shared<A> vec = v.defined() ? shared(v, group) : Shared<A>{nullptr, 1, 0};
    exec_(out.numel(), RowDot<T, A>{x, vec, out.mutable_data_ptr<A>()});
    return out;
  }
  at::Tensor row_sums(const Rows<T>& x) const { return row_dot(x, {}, 1); }
  // (BH, n, M) = x W, or (BH, n, D) = x W^T when transpose, for the D x M matrices W shared by `group` rows.
  at::Tensor row_times(const Rows<T>& x, const at::Tensor& W, int64_t group, bool transpose) const {
    at::Tensor out = workspace({BH(), x.n, transpose ? D_ : M_});
    exec_(out.numel(), RowTimesMatrix<T, A>{x, shared(W, group), D_, M_, transpose, out.mutable_data_ptr<A>()});
    return out;
  }
  // (BH, n, chunk): the scores <x_t, y_j> of each row with the rows of its chunk.
  at::Tensor scores(const Rows<T>& x, const Rows<T>& y, int64_t chunk) const {
    at::Tensor out = workspace({BH(), x.n, chunk});
    exec_(out.numel(), ChunkScores<T, A>{x, y, chunk, out.mutable_data_ptr<A>()});
    return out;
  }
  at::Tensor score_sums(const at::Tensor& G, const at::Tensor& w, ChunkSpan span) const {
    at::Tensor out = workspace({BH(), span.n});
    exec_(out.numel(), ChunkScoreSums<A>{data(G), data(w), span, out.mutable_data_ptr<A>()});
    return out;
  }
  void score_rows_add(at::Tensor& out, const at::Tensor& G, const at::Tensor& w, ChunkSpan span,
                      const Rows<T>& y) const {
    exec_(out.numel(), ChunkScoreRowsAdd<T, A>{data(G), data(w), span, y, out.mutable_data_ptr<A>()});
  }

  RunningTerm<A> term(const at::Tensor& start, int64_t group, const at::Tensor& w, bool suffix,
                      const at::Tensor& mult, double outer, const at::Tensor& outer_rows) const {
    return {shared(start, group), data(w), suffix, data(mult), static_cast<A>(outer), data(outer_rows)};
  }
  // The gradient (B, H, n, D) of x, in the input dtype: see kernels/common/assemble_gradient.h. `base` is
  // overwritten.
  at::Tensor assemble(const Rows<T>& x, const Rows<T>& src, at::Tensor& base, const at::Tensor& base_scale,
                      std::initializer_list<RunningTerm<A>> terms, int64_t chunk) const {
    const int64_t sizes[] = {B_, H_, x.n, D_};
    at::Tensor out = new_output(c10::fromIntArrayRefSlow(sizes), inputs_);
    using Item = AssembleGradient<T, A>;
    TORCH_INTERNAL_ASSERT(terms.size() <= Item::kMaxTerms);
    Item item{x, src, base.mutable_data_ptr<A>(), data(base_scale), {}, static_cast<int>(terms.size()),
              chunk, out.mutable_data_ptr<T>()};
    std::copy(terms.begin(), terms.end(), item.terms);
    exec_(BH() * num_chunks(x.n, chunk) * D_, item);
    return out;
  }

  static at::Tensor reverse_cumsum(const at::Tensor& x) { return x.flip(-1).cumsum(-1).flip(-1); }

  // The data of a workspace or per-row array (contiguous, accumulation type); nullptr if undefined.
  static const A* data(const at::Tensor& t) {
    if (!t.defined()) {
      return nullptr;
    }
    TORCH_INTERNAL_ASSERT(t.is_contiguous() && t.scalar_type() == c10::CppTypeToScalarType<A>::value);
    return t.const_data_ptr<A>();
  }

 private:
  static const bool* bool_ptr(const at::Tensor& pad) { return pad.defined() ? pad.const_data_ptr<bool>() : nullptr; }
  // A (BH, groups, size) tensor shared by `group` rows (group >= n: one per bh).
  static Shared<A> shared(const at::Tensor& t, int64_t group) {
    return {data(t), std::max<int64_t>(group, 1), t.size(-1)};
  }

  const Exec& exec_;
  int64_t B_, H_, D_, M_;
  FeatureMap feature_map_;
  at::TensorOptions inputs_, acc_;
};

}  // namespace flowformer::portable
