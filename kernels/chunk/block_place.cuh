// Where a block of a forward-like grid works (BlockPlace: a segment of a sequence, a head, a tile of value
// columns) and the launch of such a grid (launch_value_tiles), for the kernel families on the chunk layer.
#pragma once

#include "chunk/inputs.h"
#include "chunk/sequence.cuh"

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

namespace flowformer::chunk::FF_SIMT_BUILD {

// Where a block of a forward-like grid (x: N G units of M / BM value tiles, y: H heads) works: unit n G + g is
// segment g of sequence n; the block takes the value columns value_col .. value_col + BM - 1 of one head. A grid
// without value tiles (BM = M) has a block a unit.
struct BlockPlace {
  int unit, sequence, head, value_col;
  SequenceSpan span;

  template <int BM>
  FF_DEVICE static BlockPlace of(const Inputs& p, const Segments& s) {
    const int tiles_per_head = p.M / BM;
    const int unit = int(blockIdx.x) / tiles_per_head, n = unit / s.segments;
    return {unit, n, int(blockIdx.y), int(blockIdx.x) % tiles_per_head * BM,
            SequenceSpan::of(p.cu_seqlens, n, p.L).segment(unit % s.segments, s.segment_rows)};
  }
  FF_DEVICE static BlockPlace of_unit(const Inputs& p, const Segments& s) {
    const int unit = int(blockIdx.x), n = unit / s.segments;
    return {unit, n, int(blockIdx.y), 0,
            SequenceSpan::of(p.cu_seqlens, n, p.L).segment(unit % s.segments, s.segment_rows)};
  }
  // Offset of the (index, head) state in (., H, D, M) states.
  FF_DEVICE int64_t state_at(const Inputs& p, int index) const { return (int64_t(index) * p.H + head) * p.D * p.M; }
  // Offset of the span's first row in (B, H, L, ...) row arrays, in rows.
  FF_DEVICE int64_t rows_at(const Inputs& p) const { return (span.batch * p.H + head) * p.L + span.first; }
  // The block's first output row of a (B, H, L, M) contiguous output, at its value columns.
  template <typename T>
  FF_DEVICE T* output_rows(const Inputs& p, void* out) const {
    return static_cast<T*>(out) + ((span.batch * p.H + head) * p.L + span.first) * p.M + value_col;
  }
};

// Launches the kernel of kernel_of() = {kernel, dynamic shared bytes} on a grid of `blocks` x H blocks of
// kThreads threads (none if empty). `name` names the kernel, `op` the op in the errors.
template <typename Params, typename KernelOf>
void launch_grid(const Params& p, int64_t blocks, const char* name, const char* op, void* stream,
                 const KernelOf& kernel_of) {
  if (blocks > 0x7fffffff || p.H > 65535) {
    throw std::length_error(std::string("flowformer::") + op + ": " + std::to_string(p.N) + " sequences x " +
                            std::to_string(p.H) + " heads exceed one CUDA launch");
  }
  if (blocks > 0 && p.H > 0) {
    const auto [kernel, shared_bytes] = kernel_of();
    simt::launch(name, kernel,
                 {simt::Dim3(unsigned(blocks), unsigned(p.H)), simt::Dim3(kThreads), shared_bytes, stream_of(stream)},
                 p);
  }
}

// fn(T{}) for the inputs' type T: bf16, half, or float where float_inputs (a compile-time choice).
template <bool float_inputs, typename Fn>
void with_element_type(Element element, const char* name, const Fn& fn) {
  switch (element) {
    case Element::half:
      return fn(simt::half{});
    case Element::bf16:
      return fn(simt::bf16{});
    case Element::float32:
      if constexpr (float_inputs) {
        return fn(float{});
      }
  }
  throw std::invalid_argument(std::string("flowformer: no fused ") + name + " kernel for these inputs' dtype");
}

// Launches a grid without value tiles (BlockPlace::of_unit: x N G units, y H heads) of the kernel that
// kernel_of(T{}) returns with its dynamic shared bytes, for the inputs' type T (float for D <= kMaxFloatD).
template <int D, typename Params, typename KernelOf>
void launch_units(const Params& p, const char* name, const char* op, void* stream, const KernelOf& kernel_of) {
  with_element_type<D <= kMaxFloatD>(p.element, name, [&](auto type) {
    launch_grid(p, int64_t(p.N) * p.segments, name, op, stream, [&] { return kernel_of(type); });
  });
}

// Launches a forward-like grid (BlockPlace) of the kernel that kernel_of(T{}, std::integral_constant<int, BM>{})
// returns with its dynamic shared bytes, {kernel, bytes}, for the inputs' type T (bf16, half; float for
// D <= Tiles::kMaxFloatD) and the value tile BM = Tiles::of(D, M, sizeof(T)) (16, 32 or 64) of head dim D.
// `name` names the kernel, `op` the op in the errors.
template <int D, typename Tiles, typename Params, typename KernelOf>
void launch_value_tiles(const Params& p, const char* name, const char* op, void* stream, const KernelOf& kernel_of) {
  const auto with_tile = [&](auto type, auto tile) {
    launch_grid(p, int64_t(p.N) * p.segments * (p.M / decltype(tile)::value), name, op, stream,
                [&] { return kernel_of(type, tile); });
  };
  const auto with_type = [&](auto type) {
    constexpr std::size_t bytes = sizeof(decltype(type));
    switch (Tiles::of(p.M, bytes)) {
      case 16:
        return with_tile(type, std::integral_constant<int, 16>{});
      case 32:
        if constexpr (Tiles::of(256, bytes) >= 32) {
          return with_tile(type, std::integral_constant<int, 32>{});
        }
        break;
      default:
        if constexpr (Tiles::of(256, bytes) == 64) {
          return with_tile(type, std::integral_constant<int, 64>{});
        }
    }
    throw std::invalid_argument(std::string("flowformer: no fused ") + name + " kernel for D = " + std::to_string(D) +
                                ", M = " + std::to_string(p.M));
  };
  with_element_type<D <= Tiles::kMaxFloatD>(p.element, name, with_type);
}

}  // namespace flowformer::chunk::FF_SIMT_BUILD
