// The SIMT emulator's public side (host builds only): launching a kernel's host build on a grid of
// emulated threads, the options of a launch, and what it reports.
//
// Each CUDA thread of a block is a fiber (fiber.h); a block's threads run on one host thread, switched at
// barriers, warp collectives and (with Schedule::Random) at random shared-memory accesses. Blocks run one
// after another, or on several host threads. Shared memory is bounds-checked and poisoned at block start,
// and every byte carries shadow state (last writer and reader, their barrier interval and warp-sync
// epoch): a read before any write, and read-after-write, write-after-read and write-after-write pairs of
// different threads with no barrier (or __syncwarp, within a warp) between them are reported as hazards.
// Fatal errors (a barrier reached by part of the block or at different call sites, a warp collective
// reached by part of its mask, an out-of-bounds or misaligned shared access, a bad launch) throw
// KernelError naming the kernel, block, thread, file and line.
#pragma once

#include "simt/counters.h"
#include "simt/types.h"

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace flowformer::simt {

struct Site {
  const char* file = "?";
  int line = 0;
};
#define FF_SIMT_SITE (::flowformer::simt::Site{__FILE__, __LINE__})

// The order in which a block's runnable threads are resumed: thread 0 first, last first, or a seeded
// random order that is reshuffled every round, with threads also suspended at random shared accesses.
enum class Schedule { Forward, Reverse, Random };

struct LaunchRecord;

struct Options {
  Schedule schedule = Schedule::Forward;
  uint64_t seed = 1;
  int arch = 90;                        // the shared-memory limit per block: sm_80 or sm_90
  int host_threads = 1;                 // blocks run on this many host threads
  std::size_t stack_bytes = 256 << 10;  // per emulated thread
  bool hazards_are_errors = true;       // launch throws HazardError when any hazard was seen
  // Set: every launch counts what it does (counters.h) and appends its record here; null: nothing counted.
  std::vector<LaunchRecord>* count_into = nullptr;
};

// The options of launches from this host thread: FLOWFORMER_SIMT_SCHEDULE (forward, reverse, random or
// random:SEED) and FLOWFORMER_SIMT_HOST_THREADS set the defaults; an OptionsScope replaces them while
// it lives.
const Options& current_options();
class OptionsScope {
 public:
  explicit OptionsScope(const Options& options);
  ~OptionsScope();
  OptionsScope(const OptionsScope&) = delete;
  OptionsScope& operator=(const OptionsScope&) = delete;

 private:
  const Options* previous_;
  Options options_;
};

class KernelError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct Hazard {
  enum class Kind { UninitializedRead, ReadAfterWrite, WriteAfterRead, WriteAfterWrite, AsyncCopyInFlight };
  Kind kind;
  std::string message;  // the first occurrence: kernel, block, threads, offset, both sites
  uint64_t count = 0;   // occurrences with the same kind and sites
};
const char* to_string(Hazard::Kind kind);

class HazardError : public std::runtime_error {
 public:
  explicit HazardError(std::vector<Hazard> hazards);
  std::vector<Hazard> hazards;
};

struct LaunchStats {
  uint64_t blocks = 0, threads = 0;
  uint64_t switches = 0;  // fiber resumptions
  std::vector<Hazard> hazards;
  // With Options::count_into: the launch's counts, each block's (by linear block index), and per call site.
  Counters counters;
  std::vector<Counters> block_counters;
  std::vector<SiteTraffic> sites;
};

struct LaunchRecord {
  std::string kernel;
  Dim3 grid, block;
  std::size_t dynamic_shared_bytes;
  LaunchStats stats;
};

// How the emulated threads switch: "x86-64 assembly" or "ucontext" (FLOWFORMER_SIMT_UCONTEXT, or not x86-64).
const char* fiber_implementation();

// Bytes of shared memory one block may use (static and dynamic together) on sm_80 or sm_90.
std::size_t shared_memory_limit(int arch);

// Runs body() as every thread of every block of the grid (what launch.h's launch does on the host).
// Throws KernelError for a fatal error, HazardError for hazards (when options.hazards_are_errors).
using ThreadBody = void (*)(const void* context);
LaunchStats launch_emulated(const char* kernel, Dim3 grid, Dim3 block, std::size_t dynamic_shared_bytes,
                            ThreadBody body, const void* context);

}  // namespace flowformer::simt
