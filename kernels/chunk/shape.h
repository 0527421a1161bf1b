// The shape of the chunked kernels (kernels/chunk): a block of kThreads threads (kWarps warps) walks a sequence in
// chunks of kChunkRows rows, warp w owning the chunk rows 16 w .. 16 w + 15 (one m16 tile). Host and device code.
#pragma once

namespace flowformer::chunk {

constexpr int kChunkRows = 64;
constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
static_assert(kChunkRows == 16 * kWarps, "one m16 row tile per warp");

}  // namespace flowformer::chunk
