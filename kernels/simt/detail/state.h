// Internal state of the SIMT emulator, shared by its .cpp files: threads, warps, blocks, shared memory.
#pragma once

#include "simt/emulator.h"
#include "simt/fiber.h"

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <tuple>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace flowformer::simt::detail {

enum class Status : uint8_t { Runnable, AtBarrier, AtCollective, Exited };

// Per byte of shared memory. Epochs are stored plus one, so that 0 means "never".
struct Shadow {
  uint32_t write_epoch, read_epoch;            // barrier interval of the last write / read
  uint32_t write_warp_epoch, read_warp_epoch;  // __syncwarp epoch of the writer's / reader's warp then
  uint32_t previous_read_warp_epoch;
  uint16_t writer, reader;                     // thread index in the block
  uint16_t previous_reader;                    // the reader before `reader` in read_epoch, if any
  bool has_previous_reader;
  bool readers_in_two_warps;                   // read_epoch's readers span more than one warp
  bool async_pending;                          // a cp.async to this byte has not completed
  Site write_site, read_site;
};

struct Region {
  const char* name;  // "static" or "dynamic"
  std::vector<unsigned char> bytes;
  std::vector<Shadow> shadow;
  std::size_t used = 0;  // bytes in use in this block (shadow reset up to here)
};

struct AsyncCopy {
  Region* region;
  std::size_t offset;
  const void* source;  // nullptr: zero fill
  std::size_t bytes;
  Site site;
};

struct Collective {
  const char* op;
  Site site;
  unsigned mask, arrived;
  const void* in[32];
  void* out[32];
};

// One warp-level instruction being counted (counters.h): its site, kind and dynamic occurrence; the lanes that
// reached it so far, each with its address (a byte offset in shared memory, or a global address) and size.
struct AccessKey {
  const char* file;
  int line;
  Access access;
  uint32_t occurrence;
  bool operator==(const AccessKey& o) const {
    return file == o.file && line == o.line && access == o.access && occurrence == o.occurrence;
  }
};
struct AccessKeyHash {
  std::size_t operator()(const AccessKey& k) const {
    return std::hash<const void*>()(k.file) ^ (std::size_t(k.line) * 0x9e3779b97f4a7c15ull) ^
           (std::size_t(k.access) << 56) ^ (std::size_t(k.occurrence) * 0xc2b2ae3d27d4eb4full);
  }
};
struct PendingAccess {
  Site site;
  unsigned bytes = 0, lanes = 0;  // lanes: a mask
  uint64_t address[32];
};

struct Warp {
  unsigned lanes;       // threads of the block in this warp
  uint32_t sync_epoch;  // completed __syncwarp calls
  std::vector<Collective> waiting;
  std::unordered_map<AccessKey, PendingAccess, AccessKeyHash> pending;  // counted accesses not yet closed
};

struct Block;

struct Thread {
  Uint3 thread_idx;
  unsigned tid, lane, warp;
  Status status;
  Block* block;
  std::unique_ptr<Fiber> fiber;
  std::vector<std::vector<AsyncCopy>> async_committed;  // oldest group first
  std::vector<AsyncCopy> async_open;
  std::unordered_map<AccessKey, uint32_t, AccessKeyHash> occurrences;  // counting: passes of each site so far
};

struct StaticAllocation {
  std::size_t offset, bytes;
};

// One host thread's block: reused for every block that host thread runs.
struct Block {
  const char* kernel = "";
  const Options* options = nullptr;
  Uint3 block_idx{};
  Dim3 block_dim, grid_dim;
  unsigned threads_count = 0;
  std::vector<std::unique_ptr<Thread>> threads;
  std::vector<Warp> warps;
  ThreadBody body = nullptr;
  const void* body_context = nullptr;

  uint32_t barrier_epoch = 0;
  unsigned at_barrier = 0, exited = 0;
  Site barrier_site;
  unsigned barrier_first = 0;  // the thread that reached the current barrier first

  Region static_shared{"static", {}, {}, 0}, dynamic_shared{"dynamic", {}, {}, 0};
  std::map<std::tuple<const char*, int, std::size_t, std::size_t>, StaticAllocation> static_allocations;

  std::mt19937_64 rng;
  uint64_t switches = 0;
  std::map<std::tuple<int, const char*, int, const char*, int>, Hazard> hazards;
  std::exception_ptr error;

  bool counting = false;  // Options::count_into set
  Counters counters;      // this block's
  std::unordered_set<uint64_t> read_sectors, written_sectors;  // the global sectors it touched
  std::map<std::tuple<const char*, int, Access>, SiteTraffic> sites;  // this host thread's blocks', per site

  std::string where(const Thread& t) const;  // "kernel K, block (x, y, z), thread (x, y, z)"
};

std::string site_text(Site site);  // "file:line"
std::string mask_text(unsigned mask);  // "0x..."

Thread& current();
void maybe_yield();  // a random suspension point (Schedule::Random)
[[noreturn]] void fail(const std::string& message);  // KernelError naming the current thread
void record_hazard(Block& block, Hazard::Kind kind, const std::string& message, Site a, Site b);
void reset_shared(Block& block, std::size_t dynamic_bytes);
void finish_async(Thread& t, std::size_t keep_groups);  // completes all but the newest keep_groups

// Counting (counters.cpp), for blocks with `counting` set: a lane's access joins its warp-level instruction;
// closing counts every instruction still open (at each barrier and at the block's end); ldmatrix (rows: the
// byte offsets of its 8 N rows) and warp collectives are counted whole.
void count_access(Thread& t, Access access, Site site, uint64_t address, unsigned bytes);
void close_accesses(Block& b);
void count_ldmatrix(Block& b, Site site, const uint64_t* rows, int matrices);
void count_collective(Block& b, unsigned warp, const char* op);

}  // namespace flowformer::simt::detail
