// Generic items of the chunked linear-attention algorithms (portable.h: one item = one CUDA thread).
// Rows are cut into chunks; a quantity that sums over a prefix (or suffix) of the sequence is the sum
// over earlier (later) chunks, passed between chunks as per-chunk partial sums and an exclusive scan,
// plus the sum inside the chunk, taken through the chunk's score matrix G[t, j] = <x_t, y_j>.
// Weights `w` given per row must be zero at padded rows: items do not test padding for them.
// All sums run in a fixed order: results do not depend on how the items are scheduled.
#pragma once

#include "common/portable.h"

namespace flowformer::portable {

FF_HD int64_t min_(int64_t a, int64_t b) { return a < b ? a : b; }

// Vectors (or matrices) shared by groups of `group` consecutive rows: one per (bh, chunk) for
// group = chunk, one per bh for group >= n, one per row for group = 1. Stored (BH, groups, size).
template <typename A>
struct Shared {
  const A* data;
  int64_t group;
  int64_t size;

  FF_HD const A* at(int64_t bh, int64_t r, int64_t n) const {
    return data + (bh * num_chunks(n, group) + r / group) * size;
  }
};

// partial[bh, c, j] = sum over the valid rows r of chunk c of w[bh, r] x[bh, r, j] (w = 1 if null).
// Items: BH * chunks * width.
template <typename T, typename A>
struct ChunkColumnSums {
  Rows<T> x;
  const A* w;
  int64_t chunk;
  A* partial;

  FF_HD void operator()(int64_t item) const {
    const int64_t nc = num_chunks(x.n, chunk);
    const int64_t j = item % x.width;
    const int64_t c = (item / x.width) % nc;
    const int64_t bh = item / (x.width * nc);
    A sum = 0;
    for (int64_t r = c * chunk; r < min_(x.n, (c + 1) * chunk); ++r) {
      if (x.valid(bh, r)) {
        sum += (w != nullptr ? w[bh * x.n + r] : A(1)) * x.template get<A>(bh, r, j);
      }
    }
    partial[item] = sum;
  }
};

// partial[bh, c, d, m] = sum over the valid rows r of chunk c of w[bh, r] x[bh, r, d] y[bh, r, m].
// Items: BH * chunks * x.width * y.width.
template <typename T, typename A>
struct ChunkOuterSums {
  Rows<T> x, y;
  const A* w;
  int64_t chunk;
  A* partial;

  FF_HD void operator()(int64_t item) const {
    const int64_t nc = num_chunks(x.n, chunk);
    const int64_t m = item % y.width;
    const int64_t d = (item / y.width) % x.width;
    const int64_t c = (item / (y.width * x.width)) % nc;
    const int64_t bh = item / (y.width * x.width * nc);
    A sum = 0;
    for (int64_t r = c * chunk; r < min_(x.n, (c + 1) * chunk); ++r) {
      if (x.valid(bh, r)) {
        sum += (w != nullptr ? w[bh * x.n + r] : A(1)) * x.template get<A>(bh, r, d) * y.template get<A>(bh, r, m);
      }
    }
    partial[item] = sum;
  }
};

// out[bh, c, j] = sum of partial[bh, c', j] over the chunks c' < c (or c' > c when reverse).
// Items: BH * width.
template <typename A>
struct ChunkExclusiveScan {
  const A* partial;
  int64_t chunks, width;
  bool reverse;
  A* out;

  FF_HD void operator()(int64_t item) const {
    const int64_t j = item % width;
    const int64_t bh = item / width;
    A running = 0;
    for (int64_t s = 0; s < chunks; ++s) {
      const int64_t at = (bh * chunks + (reverse ? chunks - 1 - s : s)) * width + j;
      out[at] = running;
      running += partial[at];
    }
  }
};

// out[bh, r] = <x[bh, r], v> for v the shared vector of row r (all ones when v.data is null);
// 0 at padded rows. Items: BH * n.
template <typename T, typename A>
struct RowDot {
  Rows<T> x;
  Shared<A> v;
  A* out;

  FF_HD void operator()(int64_t item) const {
    const int64_t r = item % x.n;
    const int64_t bh = item / x.n;
    A sum = 0;
    if (x.valid(bh, r)) {
      const A* vec = v.data != nullptr ? v.at(bh, r, x.n) : nullptr;
      for (int64_t j = 0; j < x.width; ++j) {
        sum += x.template get<A>(bh, r, j) * (vec != nullptr ? vec[j] : A(1));
      }
    }
    out[item] = sum;
  }
};

// out[bh, r, :] = x[bh, r, :] W, or x[bh, r, :] W^T when transpose, for W the shared rows x cols
// matrix of row r; 0 at padded rows. Items: BH * n * (cols, or rows when transpose).
template <typename T, typename A>
struct RowTimesMatrix {
  Rows<T> x;
  Shared<A> W;
  int64_t rows, cols;
  bool transpose;
  A* out;

  FF_HD void operator()(int64_t item) const {
    const int64_t width = transpose ? rows : cols;
    const int64_t o = item % width;
    const int64_t r = (item / width) % x.n;
    const int64_t bh = item / (width * x.n);
    A sum = 0;
    if (x.valid(bh, r)) {
      const A* mat = W.at(bh, r, x.n);
      for (int64_t j = 0; j < x.width; ++j) {
        sum += x.template get<A>(bh, r, j) * (transpose ? mat[o * cols + j] : mat[j * cols + o]);
      }
    }
    out[item] = sum;
  }
};

// G[bh, t, i] = <x[bh, t], y[bh, c0 + i]> for the rows c0 + i of t's chunk (0 past the end), padded
// rows included. Items: BH * n * chunk.
template <typename T, typename A>
struct ChunkScores {
  Rows<T> x, y;
  int64_t chunk;
  A* G;

  FF_HD void operator()(int64_t item) const {
    const int64_t i = item % chunk;
    const int64_t t = (item / chunk) % x.n;
    const int64_t bh = item / (chunk * x.n);
    const int64_t j = (t / chunk) * chunk + i;
    A sum = 0;
    if (j < x.n) {
      for (int64_t d = 0; d < x.width; ++d) {
        sum += x.template get<A>(bh, t, d) * y.template get<A>(bh, j, d);
      }
    }
    G[item] = sum;
  }
};

// Which part of a chunk's score matrix a row t sums: the rows j <= t (prefix) or j >= t (suffix) of
// its chunk, with the scores G[t, j] or, transposed, G[j, t].
struct ChunkSpan {
  int64_t n, chunk;
  bool suffix, transpose;

  FF_HD int64_t begin(int64_t t) const { return suffix ? t : (t / chunk) * chunk; }
  FF_HD int64_t end(int64_t t) const { return suffix ? min_(n, (t / chunk + 1) * chunk) : t + 1; }
  // Offset of the score of the pair (t, j) in G (BH, n, chunk), relative to bh's block.
  FF_HD int64_t score(int64_t t, int64_t j) const {
    return transpose ? j * chunk + t % chunk : t * chunk + j % chunk;
  }
};

// out[bh, t] = sum over j in t's span of w[bh, j] G(t, j). Items: BH * n.
template <typename A>
struct ChunkScoreSums {
  const A* G;
  const A* w;
  ChunkSpan span;
  A* out;

  FF_HD void operator()(int64_t item) const {
    const int64_t t = item % span.n;
    const int64_t bh = item / span.n;
    const A* g = G + bh * span.n * span.chunk;
    A sum = 0;
    for (int64_t j = span.begin(t); j < span.end(t); ++j) {
      const A wj = w[bh * span.n + j];
      if (wj != A(0)) {  // padded rows may hold any value, NaN included
        sum += wj * g[span.score(t, j)];
      }
    }
    out[item] = sum;
  }
};

// out[bh, t, m] += sum over j in t's span of w[bh, j] G(t, j) y[bh, j, m]. Items: BH * n * y.width.
template <typename T, typename A>
struct ChunkScoreRowsAdd {
  const A* G;
  const A* w;
  ChunkSpan span;
  Rows<T> y;
  A* out;

  FF_HD void operator()(int64_t item) const {
    const int64_t m = item % y.width;
    const int64_t t = (item / y.width) % span.n;
    const int64_t bh = item / (y.width * span.n);
    const A* g = G + bh * span.n * span.chunk;
    A sum = 0;
    for (int64_t j = span.begin(t); j < span.end(t); ++j) {
      const A wj = w[bh * span.n + j];
      if (wj != A(0)) {
        sum += wj * g[span.score(t, j)] * y.template get<A>(bh, j, m);
      }
    }
    out[item] += sum;
  }
};

}  // namespace flowformer::portable
