// What an emulated launch did, counted as the hardware would (host builds only; on when Options::count_into is
// set, free when not). Each count is per warp-level instruction: the lanes of one warp at the same call site and
// the same dynamic occurrence (the k-th time each lane passes that site) form one instruction.
//
// Shared memory, in wavefronts (cycles of the shared-memory pipe): 32 banks of 4 bytes. An access of up to 4
// bytes a lane is one phase of the whole warp; 8-byte accesses two phases (half warps), 16-byte ones four
// (quarter warps); ldmatrix one phase per 8 x 16-byte matrix; cp.async writes its 16 bytes a lane as a 16-byte
// store. A phase takes as many wavefronts as the most distinct 4-byte words any one bank is asked for (one
// word to many lanes is a broadcast): `wavefronts` counts one per phase (conflict-free), `extra_wavefronts`
// the rest. Global memory: bytes requested, and the 32-byte sectors a warp-level access touches (a coalesced
// row of 128 bytes is 4; the same bytes strided one a row, 32). Tensor cores: mma instructions by shape and
// type and their FLOPs, also per warp scheduler (warp w issues on scheduler w % 4).
#pragma once

#include "simt/types.h"

#include <cstdint>
#include <string>
#include <vector>

namespace flowformer::simt {

struct SharedTraffic {
  uint64_t instructions = 0, wavefronts = 0, extra_wavefronts = 0;
  SharedTraffic& operator+=(const SharedTraffic& o);
};

struct GlobalTraffic {
  uint64_t instructions = 0, bytes = 0, sectors = 0;
  GlobalTraffic& operator+=(const GlobalTraffic& o);
};

constexpr int kSchedulers = 4;  // warp schedulers (and tensor cores) per multiprocessor

struct Counters {
  SharedTraffic shared_loads, shared_stores, ldmatrix, cp_async_stores;
  GlobalTraffic global_loads, global_stores, cp_async_loads;  // cp_async_loads: the global side of cp.async
  uint64_t ldmatrix_matrices = 0;
  uint64_t mma_m16n8k16_bf16 = 0, mma_m16n8k16_f16 = 0, mma_m16n8k8_tf32 = 0;
  uint64_t tensor_flops_by_scheduler[kSchedulers] = {};
  // The distinct 32-byte sectors the block reads and writes: what reaches DRAM if the caches keep a sector while
  // the block uses it and blocks share none.
  uint64_t dram_read_sectors = 0, dram_write_sectors = 0;
  uint64_t barriers = 0;                           // __syncthreads released
  uint64_t shuffles = 0, votes = 0, warp_syncs = 0;  // warp collectives

  Counters& operator+=(const Counters& o);
  uint64_t tensor_flops() const;
};

// The kinds of counted access, and their counts per call site (where the wavefronts go).
enum class Access { SharedLoad, SharedStore, Ldmatrix, AsyncCopyStore, GlobalLoad, GlobalStore, AsyncCopyLoad };
const char* to_string(Access access);

struct SiteTraffic {
  std::string site;  // "file:line"
  Access access;
  SharedTraffic shared;  // shared kinds (ldmatrix, cp.async stores)
  GlobalTraffic global;  // global kinds (cp.async loads)
  uint64_t instructions() const { return shared.instructions + global.instructions; }  // one kind is counted
  SiteTraffic& operator+=(const SiteTraffic& o);
};

}  // namespace flowformer::simt
