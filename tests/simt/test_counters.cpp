// The emulator's counters (simt/counters.h) on planted access patterns, with the counts the hardware's rules
// give: bank conflicts of word, 8- and 16-byte accesses and of ldmatrix, broadcasts, global sectors of
// coalesced and strided rows, and the tensor-core work of the mma GEMM sample.
#include "samples/mma_gemm.cuh"
#include "simt/simt.h"

#include <catch2/catch.hpp>

#include <cstdint>
#include <string>
#include <vector>

namespace simt = flowformer::simt;
namespace samples = flowformer::simt_samples::emulated;

namespace {

struct alignas(8) Pair {
  float x[2];
};
struct alignas(16) Quad {
  float x[4];
};

// Fills `count` floats of shared memory (counted as stores), then a barrier.
FF_DEVICE void fill(simt::shared_ptr<float> s, int count) {
  for (int i = int(threadIdx.x); i < count; i += int(blockDim.x)) {
    s[i] = float(i);
  }
  __syncthreads();
}

// Lane l reads word l * Stride (mod 1024) of shared memory.
template <int Stride>
__global__ void word_reads(float* out) {
  FF_SHARED(float, s, 1024);
  fill(s, 1024);
  const float x = s[int(threadIdx.x) * Stride % 1024];
  out[threadIdx.x] = x;
}

// Lane l reads the Width-byte vector l * Stride.
template <typename Vector, int Stride>
__global__ void vector_reads(float* out) {
  FF_SHARED(float, s, 1024);
  fill(s, 1024);
  const Vector v = s.as<Vector>()[int(threadIdx.x) * Stride];
  out[threadIdx.x] = v.x[0];
}

// ldmatrix.x4 of a 16 x 16 bf16 block of a tile whose rows are Ld elements apart.
template <int Ld>
__global__ void ldmatrix_rows(uint32_t* out) {
  FF_SHARED(simt::bf16, tile, 16 * Ld);
  fill(tile.as<float>(), 16 * Ld / 2);
  const int lane = int(threadIdx.x), row = lane % 8 + lane / 8 % 2 * 8, col = lane / 16 * 8;
  uint32_t r[4];
  simt::ldmatrix<4, false>(r, tile + row * Ld + col);
  for (int j = 0; j < 4; ++j) {
    out[4 * lane + j] = r[j];
  }
}

// Lane l loads float l * Stride of `in` and stores it to out[l] (both through the counted wrappers).
template <int Stride>
__global__ void global_rows(const float* in, float* out) {
  const float x = simt::load_global(in + threadIdx.x * Stride);
  simt::store_global(out + threadIdx.x, x);
}

// Each lane writes 4 bytes of each of 8 rows of 32 bytes, first their halves [0, 16), then [16, 32) (as
// store_rows writes an accumulator tile's column pairs): two instructions of 8 sectors, 8 sectors in all.
__global__ void half_sector_rows(float* out) {
  const int lane = int(threadIdx.x), row = lane / 4, col = lane % 4;
  simt::store_global(out + 8 * row + col, 1.f);
  simt::store_global(out + 8 * row + 4 + col, 2.f);
}

template <typename... Params, typename... Args>
simt::LaunchRecord counted(void (*kernel)(Params...), simt::Dim3 grid, simt::Dim3 block, Args... args) {
  std::vector<simt::LaunchRecord> records;
  simt::Options options;
  options.count_into = &records;
  simt::OptionsScope scope(options);
  simt::launch("counted", kernel, {grid, block, 0, {}}, args...);
  REQUIRE(records.size() == 1);
  return records.front();
}

template <typename... Params>
simt::SharedTraffic shared_loads_of(void (*kernel)(Params...)) {
  std::vector<float> out(128);
  return counted(kernel, simt::Dim3(1), simt::Dim3(32), out.data()).stats.counters.shared_loads;
}

struct alignas(256) GlobalBuffer {
  float x[32 * 32];
};

}  // namespace

TEST_CASE("counters: a warp's word reads take the most distinct words one bank is asked for", "[counters]") {
  const auto check = [](const simt::SharedTraffic& got, uint64_t extra) {
    CHECK(got.instructions == 1);
    CHECK(got.wavefronts == 1);
    CHECK(got.extra_wavefronts == extra);
  };
  SECTION("conflict-free: consecutive words") { check(shared_loads_of(word_reads<1>), 0); }
  SECTION("2-way: every other word (lanes l and l + 16 share a bank)") { check(shared_loads_of(word_reads<2>), 1); }
  SECTION("32-way: a column of a 32-word-wide array") { check(shared_loads_of(word_reads<32>), 31); }
  SECTION("broadcast: one word to every lane") { check(shared_loads_of(word_reads<0>), 0); }
}

TEST_CASE("counters: 8- and 16-byte accesses go in half- and quarter-warp phases", "[counters]") {
  const simt::SharedTraffic pairs = shared_loads_of(vector_reads<Pair, 1>);
  CHECK(pairs.wavefronts == 2);
  CHECK(pairs.extra_wavefronts == 0);
  const simt::SharedTraffic quads = shared_loads_of(vector_reads<Quad, 1>);
  CHECK(quads.instructions == 1);
  CHECK(quads.wavefronts == 4);
  CHECK(quads.extra_wavefronts == 0);
  // Every other 16-byte vector: a quarter warp spans 256 bytes, two words in each bank.
  const simt::SharedTraffic strided = shared_loads_of(vector_reads<Quad, 2>);
  CHECK(strided.wavefronts == 4);
  CHECK(strided.extra_wavefronts == 4);
}

TEST_CASE("counters: ldmatrix takes a phase per matrix, conflict-free on padded rows", "[counters]") {
  std::vector<uint32_t> out(128);
  const simt::Counters padded = counted(ldmatrix_rows<72>, simt::Dim3(1), simt::Dim3(32), out.data()).stats.counters;
  CHECK(padded.ldmatrix.instructions == 1);
  CHECK(padded.ldmatrix_matrices == 4);
  CHECK(padded.ldmatrix.wavefronts == 4);
  CHECK(padded.ldmatrix.extra_wavefronts == 0);
  CHECK(padded.shared_loads.instructions == 0);  // ldmatrix's reads are not word loads too
  // Rows of 128 bytes: a matrix's 8 rows start in the same bank, 8 words each bank.
  const simt::Counters unpadded = counted(ldmatrix_rows<64>, simt::Dim3(1), simt::Dim3(32), out.data()).stats.counters;
  CHECK(unpadded.ldmatrix.wavefronts == 4);
  CHECK(unpadded.ldmatrix.extra_wavefronts == 4 * 7);
}

TEST_CASE("counters: global sectors of coalesced and strided rows", "[counters]") {
  static GlobalBuffer in, out;
  const simt::Counters coalesced =
      counted(global_rows<1>, simt::Dim3(1), simt::Dim3(32), in.x, out.x).stats.counters;
  CHECK(coalesced.global_loads.instructions == 1);
  CHECK(coalesced.global_loads.bytes == 128);
  CHECK(coalesced.global_loads.sectors == 4);
  CHECK(coalesced.global_stores.bytes == 128);
  CHECK(coalesced.global_stores.sectors == 4);
  CHECK(coalesced.dram_read_sectors == 4);
  CHECK(coalesced.dram_write_sectors == 4);
  const simt::Counters halves = counted(half_sector_rows, simt::Dim3(1), simt::Dim3(32), out.x).stats.counters;
  CHECK(halves.global_stores.instructions == 2);
  CHECK(halves.global_stores.bytes == 256);
  CHECK(halves.global_stores.sectors == 16);  // each instruction's
  CHECK(halves.dram_write_sectors == 8);      // the block's distinct ones
  const simt::Counters strided = counted(global_rows<32>, simt::Dim3(1), simt::Dim3(32), in.x, out.x).stats.counters;
  CHECK(strided.global_loads.bytes == 128);
  CHECK(strided.global_loads.sectors == 32);
  // Two warps make two instructions: the lanes of different warps never join one.
  const simt::Counters two_warps =
      counted(global_rows<1>, simt::Dim3(1), simt::Dim3(64), in.x, out.x).stats.counters;
  CHECK(two_warps.global_loads.instructions == 2);
  CHECK(two_warps.global_loads.sectors == 8);
}

TEST_CASE("counters: the mma GEMM sample's tensor-core work, copies and barriers", "[counters]") {
  constexpr int m = 64, n = 128, k = 64;  // two blocks of 64 x 64, two K steps of 32
  struct alignas(256) Inputs {
    simt::bf16 a[m * k], b[k * n];
  };
  static Inputs in;
  for (int i = 0; i < m * k; ++i) {
    in.a[i] = simt::bf16(float(i % 7) - 3);
  }
  for (int i = 0; i < k * n; ++i) {
    in.b[i] = simt::bf16(float(i % 5) - 2);
  }
  std::vector<float> c(m * n);
  std::vector<simt::LaunchRecord> records;
  simt::Options options;
  options.count_into = &records;
  {
    simt::OptionsScope scope(options);
    samples::run_mma_gemm<simt::bf16>({in.a, in.b, c.data(), m, n, k});
  }
  REQUIRE(records.size() == 1);
  const simt::LaunchStats& stats = records.front().stats;
  REQUIRE(stats.block_counters.size() == 2);
  const simt::Counters& block = stats.block_counters[0];
  // A block's 64 x 64 x 64: 4 x 8 m16n8 tiles, 4 k16 steps; each warp a quarter, on its own scheduler.
  CHECK(block.mma_m16n8k16_bf16 == 4 * 8 * 4);
  CHECK(block.tensor_flops() == 2ull * 64 * 64 * 64);
  for (uint64_t flops : block.tensor_flops_by_scheduler) {
    CHECK(flops == 2ull * 64 * 64 * 64 / 4);
  }
  // Per warp and k16 step, two A fragments and two pairs of B fragments, all conflict-free (padded rows).
  CHECK(block.ldmatrix.instructions == 4 * 4 * 4);
  CHECK(block.ldmatrix.extra_wavefronts == 0);
  // cp.async: each K step stages 64 x 32 of A and 32 x 64 of B in bf16, rows of 64 or 128 bytes.
  CHECK(block.cp_async_loads.bytes == 2 * (64 * 32 + 32 * 64) * 2);
  CHECK(block.cp_async_loads.sectors == block.cp_async_loads.bytes / 32);
  CHECK(block.cp_async_stores.wavefronts == 4 * block.cp_async_stores.instructions);
  CHECK(block.barriers == 2 * 2);  // two per K step
  CHECK(stats.block_counters[1].mma_m16n8k16_bf16 == block.mma_m16n8k16_bf16);
  CHECK(stats.counters.mma_m16n8k16_bf16 == 2 * block.mma_m16n8k16_bf16);
  bool ldmatrix_site = false;
  for (const simt::SiteTraffic& site : stats.sites) {
    ldmatrix_site |= site.access == simt::Access::Ldmatrix && site.site.find("mma_gemm.cuh") != std::string::npos;
  }
  CHECK(ldmatrix_site);
}

TEST_CASE("counters: nothing is counted unless asked", "[counters]") {
  std::vector<float> out(128);
  const simt::LaunchStats stats = simt::launch("uncounted", word_reads<2>, {simt::Dim3(1), simt::Dim3(32), 0, {}},
                                               out.data());
  CHECK(stats.counters.shared_loads.instructions == 0);
  CHECK(stats.block_counters.empty());
  CHECK(stats.sites.empty());
}
