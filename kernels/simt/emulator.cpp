// The SIMT emulator's scheduler: blocks of fibers, barriers, warp collectives, launches (emulator.h).
#include "simt/detail/state.h"
#include "simt/host_api.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <numeric>
#include <sstream>
#include <string>
#include <thread>

namespace flowformer::simt {
namespace detail {
namespace {

thread_local Thread* current_thread = nullptr;
thread_local const Options* options_override = nullptr;

bool same_site(Site a, Site b) {
  return a.line == b.line && (a.file == b.file || std::strcmp(a.file, b.file) == 0);
}

std::string dim_text(unsigned x, unsigned y, unsigned z) {
  return "(" + std::to_string(x) + ", " + std::to_string(y) + ", " + std::to_string(z) + ")";
}

Options options_from_environment() {
  Options options;
  if (const char* schedule = std::getenv("FLOWFORMER_SIMT_SCHEDULE")) {
    const std::string text = schedule;
    if (text == "reverse") {
      options.schedule = Schedule::Reverse;
    } else if (text.rfind("random", 0) == 0) {
      options.schedule = Schedule::Random;
      if (text.size() > 7 && text[6] == ':') {
        options.seed = std::strtoull(text.c_str() + 7, nullptr, 10);
      }
    }
  }
  if (const char* threads = std::getenv("FLOWFORMER_SIMT_HOST_THREADS")) {
    options.host_threads = std::max(1, std::atoi(threads));
  }
  return options;
}

const AsyncCopy* first_pending_copy(const Thread& t) {
  for (const auto& group : t.async_committed) {
    if (!group.empty()) {
      return &group.front();
    }
  }
  return t.async_open.empty() ? nullptr : &t.async_open.front();
}

void thread_main(void* arg) {
  Thread& t = *static_cast<Thread*>(arg);
  Block& b = *t.block;
  try {
    b.body(b.body_context);
    const AsyncCopy* unwaited = first_pending_copy(t);
    if (unwaited != nullptr) {
      record_hazard(b, Hazard::Kind::AsyncCopyInFlight,
                    b.where(t) + ": exited with cp.async copies never waited for (cp.async.wait_group), the first at " +
                        site_text(unwaited->site),
                    unwaited->site, Site{});
    }
    t.status = Status::Exited;
    ++b.exited;
    if (b.at_barrier > 0) {
      fail("exited while " + std::to_string(b.at_barrier) + " threads wait at the barrier at " +
           site_text(b.barrier_site) + ": a barrier must be reached by every thread of the block");
    }
    const Warp& w = b.warps[t.warp];
    for (const Collective& c : w.waiting) {
      if (c.mask >> t.lane & 1u) {
        fail("exited while lanes of its warp wait for it at " + std::string(c.op) + " (mask " +
             mask_text(c.mask) + ") at " + site_text(c.site));
      }
    }
  } catch (...) {
    if (!b.error) {
      b.error = std::current_exception();
    }
    t.status = Status::Exited;
  }
}

std::string describe_deadlock(const Block& b) {
  std::ostringstream s;
  s << "kernel " << b.kernel << ", block " << dim_text(b.block_idx.x, b.block_idx.y, b.block_idx.z)
    << ": no thread can go on (a hang on a GPU).";
  if (b.at_barrier > 0) {
    s << " " << b.at_barrier << " of " << b.threads_count << " threads wait at the barrier at "
      << site_text(b.barrier_site) << ";";
  }
  for (std::size_t w = 0; w < b.warps.size(); ++w) {
    for (const Collective& c : b.warps[w].waiting) {
      s << " warp " << w << ": " << c.op << " at " << site_text(c.site) << " reached by lanes "
        << mask_text(c.arrived) << " of mask " << mask_text(c.mask) << ";";
    }
  }
  return s.str();
}

void run_block(Block& b) {
  for (unsigned tid = 0; tid < b.threads_count; ++tid) {
    Thread& t = *b.threads[tid];
    t.status = Status::Runnable;
    t.async_open.clear();
    t.async_committed.clear();
    t.occurrences.clear();
    t.fiber->start(thread_main, &t);
  }
  for (Warp& w : b.warps) {
    w.sync_epoch = 0;
    w.waiting.clear();
    w.pending.clear();
  }
  b.barrier_epoch = 0;
  b.at_barrier = 0;
  b.exited = 0;
  std::vector<unsigned> order(b.threads_count);
  std::iota(order.begin(), order.end(), 0u);
  if (b.options->schedule == Schedule::Reverse) {
    std::reverse(order.begin(), order.end());
  }
  while (b.exited < b.threads_count) {
    if (b.options->schedule == Schedule::Random) {
      std::shuffle(order.begin(), order.end(), b.rng);
    }
    bool progressed = false;
    for (unsigned tid : order) {
      Thread& t = *b.threads[tid];
      if (t.status != Status::Runnable) {
        continue;
      }
      current_thread = &t;
      t.fiber->resume();
      current_thread = nullptr;
      ++b.switches;
      progressed = true;
      if (b.error) {
        std::rethrow_exception(b.error);
      }
    }
    if (!progressed) {
      throw KernelError(describe_deadlock(b));
    }
  }
  if (b.counting) {
    close_accesses(b);
  }
}

// Fibers outlive launches: mapping 256 stacks for every launch of a small kernel would cost more than
// running it. Workers take theirs from this pool and give them back.
class FiberPool {
 public:
  std::unique_ptr<Fiber> take(std::size_t stack_bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto& free = free_[stack_bytes];
      if (!free.empty()) {
        auto fiber = std::move(free.back());
        free.pop_back();
        return fiber;
      }
    }
    return std::make_unique<Fiber>(stack_bytes);
  }
  void give(std::size_t stack_bytes, std::unique_ptr<Fiber> fiber) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto& free = free_[stack_bytes];
    if (free.size() < kKept) {
      free.push_back(std::move(fiber));
    }
  }

 private:
  static constexpr std::size_t kKept = 4 * 1024;
  std::mutex mutex_;
  std::map<std::size_t, std::vector<std::unique_ptr<Fiber>>> free_;
};

FiberPool& fiber_pool() {
  static FiberPool* pool = new FiberPool();  // never destroyed: fibers may be given back during exit
  return *pool;
}

struct Worker {
  Block block;
  std::vector<std::pair<uint64_t, Counters>> block_counters;  // counting: (linear block, its counts)

  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;
  ~Worker() {
    for (auto& t : block.threads) {
      fiber_pool().give(block.options->stack_bytes, std::move(t->fiber));
    }
  }

  Worker(const char* kernel, const Options& options, Dim3 grid, Dim3 dim, ThreadBody body, const void* context) {
    Block& b = block;
    b.kernel = kernel;
    b.options = &options;
    b.grid_dim = grid;
    b.block_dim = dim;
    b.body = body;
    b.body_context = context;
    b.counting = options.count_into != nullptr;
    b.threads_count = dim.x * dim.y * dim.z;
    b.warps.resize((b.threads_count + 31) / 32);
    for (unsigned w = 0; w < b.warps.size(); ++w) {
      b.warps[w].lanes = std::min(32u, b.threads_count - 32 * w);
    }
    for (unsigned tid = 0; tid < b.threads_count; ++tid) {
      auto t = std::make_unique<Thread>();
      t->thread_idx = Uint3{tid % dim.x, tid / dim.x % dim.y, tid / (dim.x * dim.y)};
      t->tid = tid;
      t->lane = tid % 32;
      t->warp = tid / 32;
      t->block = &b;
      t->fiber = fiber_pool().take(options.stack_bytes);
      b.threads.push_back(std::move(t));
    }
  }

  void run(uint64_t linear_block, std::size_t dynamic_bytes) {
    Block& b = block;
    const Dim3 g = b.grid_dim;
    b.block_idx = Uint3{unsigned(linear_block % g.x), unsigned(linear_block / g.x % g.y),
                        unsigned(linear_block / (uint64_t(g.x) * g.y))};
    b.rng.seed(b.options->seed * 0x9e3779b97f4a7c15ull + linear_block);
    reset_shared(b, dynamic_bytes);
    b.counters = Counters{};
    b.read_sectors.clear();
    b.written_sectors.clear();
    run_block(b);
    if (b.counting) {
      block_counters.emplace_back(linear_block, b.counters);
    }
  }
};

void check_launch(const char* kernel, Dim3 grid, Dim3 block, std::size_t dynamic_bytes, const Options& options) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  std::string problem;
  if (threads == 0 || grid.x == 0 || grid.y == 0 || grid.z == 0) {
    problem = "an empty grid or block";
  } else if (threads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64) {
    problem = "block " + dim_text(block.x, block.y, block.z) + ": at most 1024 threads, (1024, 1024, 64)";
  } else if (grid.y > 65535 || grid.z > 65535 || grid.x > 2147483647u) {
    problem = "grid " + dim_text(grid.x, grid.y, grid.z) + ": at most (2^31 - 1, 65535, 65535)";
  } else if (dynamic_bytes > shared_memory_limit(options.arch)) {
    problem = std::to_string(dynamic_bytes) + " bytes of dynamic shared memory; sm_" + std::to_string(options.arch) +
              " allows " + std::to_string(shared_memory_limit(options.arch));
  }
  if (!problem.empty()) {
    throw KernelError(std::string("launch of kernel ") + kernel + ": " + problem);
  }
}

// The launch's counts: each block's in its place, their sum, and the sites' (in site order).
void gather_counters(const std::vector<std::unique_ptr<Worker>>& workers, LaunchStats& stats) {
  stats.block_counters.assign(stats.blocks, Counters{});
  std::map<std::tuple<std::string, int>, SiteTraffic> sites;
  for (const auto& w : workers) {
    for (const auto& [block, counters] : w->block_counters) {
      stats.block_counters[block] = counters;
      stats.counters += counters;
    }
    for (const auto& [key, traffic] : w->block.sites) {
      auto [it, added] = sites.try_emplace({traffic.site, int(traffic.access)}, traffic);
      if (!added) {
        it->second += traffic;
      }
    }
  }
  for (auto& entry : sites) {
    stats.sites.push_back(entry.second);
  }
}

}  // namespace

std::string site_text(Site s) {
  return std::string(s.file) + ":" + std::to_string(s.line);
}

std::string mask_text(unsigned mask) {
  std::ostringstream s;
  s << "0x" << std::hex << mask;
  return s.str();
}

std::string Block::where(const Thread& t) const {
  return std::string("kernel ") + kernel + ", block " + dim_text(block_idx.x, block_idx.y, block_idx.z) +
         ", thread " + dim_text(t.thread_idx.x, t.thread_idx.y, t.thread_idx.z);
}

Thread& current() {
  if (current_thread == nullptr) {
    throw KernelError("flowformer::simt: a device function was called outside an emulated kernel");
  }
  return *current_thread;
}

void fail(const std::string& message) {
  const Thread& t = current();
  throw KernelError(t.block->where(t) + ": " + message);
}

void maybe_yield() {
  Thread& t = current();
  Block& b = *t.block;
  if (b.options->schedule == Schedule::Random && (b.rng() & 7u) == 0) {
    t.fiber->suspend();
  }
}

void record_hazard(Block& block, Hazard::Kind kind, const std::string& message, Site a, Site b) {
  auto [it, added] = block.hazards.try_emplace({int(kind), a.file, a.line, b.file, b.line});
  if (added) {
    it->second.kind = kind;
    it->second.message = message;
  }
  ++it->second.count;
}

int shuffle_source(ShuffleKind kind, unsigned lane, int operand, int width) {
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0) {
    fail("shuffle width " + std::to_string(width) + " is not a power of two up to 32");
  }
  const int self = int(lane), segment = self & ~(width - 1), in_segment = self & (width - 1);
  switch (kind) {
    case ShuffleKind::Index:
      return segment + (operand & (width - 1));
    case ShuffleKind::Up:
      return in_segment >= operand ? self - operand : self;
    case ShuffleKind::Down:
      return in_segment + operand < width ? self + operand : self;
    case ShuffleKind::Xor: {
      const int source = self ^ operand;
      return (source & 31) < segment + width && source >= 0 && source < 32 ? source : self;
    }
  }
  return self;
}

}  // namespace detail

using detail::Block;
using detail::Collective;
using detail::current;
using detail::fail;
using detail::Status;
using detail::Thread;

const Options& current_options() {
  static const Options from_environment = detail::options_from_environment();
  return detail::options_override != nullptr ? *detail::options_override : from_environment;
}

OptionsScope::OptionsScope(const Options& options) : previous_(detail::options_override), options_(options) {
  detail::options_override = &options_;
}

OptionsScope::~OptionsScope() {
  detail::options_override = previous_;
}

const char* to_string(Hazard::Kind kind) {
  switch (kind) {
    case Hazard::Kind::UninitializedRead:
      return "read of uninitialised shared memory";
    case Hazard::Kind::ReadAfterWrite:
      return "read-after-write hazard";
    case Hazard::Kind::WriteAfterRead:
      return "write-after-read hazard";
    case Hazard::Kind::WriteAfterWrite:
      return "write-after-write hazard";
    case Hazard::Kind::AsyncCopyInFlight:
      return "access to shared memory with a cp.async in flight";
  }
  return "hazard";
}

namespace {
std::string hazards_text(const std::vector<Hazard>& hazards) {
  std::string text = std::to_string(hazards.size()) + " shared-memory hazard kind(s):";
  for (const Hazard& h : hazards) {
    text += "\n  " + std::string(to_string(h.kind)) + " (" + std::to_string(h.count) + "x): " + h.message;
  }
  return text;
}
}  // namespace

HazardError::HazardError(std::vector<Hazard> found)
    : std::runtime_error(hazards_text(found)), hazards(std::move(found)) {}

const char* fiber_implementation() {
  return Fiber::implementation();
}

std::size_t shared_memory_limit(int arch) {
  return arch >= 90 ? 227u * 1024u : 163u * 1024u;
}

const Uint3& thread_idx() {
  return current().thread_idx;
}
const Uint3& block_idx() {
  return current().block->block_idx;
}
const Dim3& block_dim() {
  return current().block->block_dim;
}
const Dim3& grid_dim() {
  return current().block->grid_dim;
}
unsigned lane_id() {
  return current().lane;
}
unsigned thread_rank() {
  return current().tid;
}

void syncthreads(Site site) {
  Thread& t = current();
  Block& b = *t.block;
  if (b.exited > 0) {
    fail("__syncthreads at " + detail::site_text(site) + " reached after " + std::to_string(b.exited) +
         " threads of the block exited: a barrier must be reached by every thread of the block");
  }
  if (b.at_barrier > 0 && !detail::same_site(site, b.barrier_site)) {
    fail("divergent barrier: __syncthreads at " + detail::site_text(site) + " while thread " +
         std::to_string(b.barrier_first) + " (and " + std::to_string(b.at_barrier - 1) +
         " more) waits at the one at " + detail::site_text(b.barrier_site));
  }
  if (b.at_barrier == 0) {
    b.barrier_site = site;
    b.barrier_first = t.tid;
  }
  if (++b.at_barrier < b.threads_count) {
    t.status = Status::AtBarrier;
    t.fiber->suspend();
    return;
  }
  b.at_barrier = 0;
  ++b.barrier_epoch;
  if (b.counting) {  // every lane has passed its accesses before the barrier
    ++b.counters.barriers;
    detail::close_accesses(b);
  }
  for (auto& other : b.threads) {
    if (other->status == Status::AtBarrier) {
      other->status = Status::Runnable;
    }
  }
}

void collective(const char* op, Site site, unsigned mask, const void* in, void* out, CollectiveRun run,
                const void* context) {
  Thread& t = current();
  Block& b = *t.block;
  detail::Warp& w = b.warps[t.warp];
  if (!(mask >> t.lane & 1u)) {
    fail(std::string(op) + " at " + detail::site_text(site) + ": the calling lane " + std::to_string(t.lane) +
         " is not in its mask " + detail::mask_text(mask));
  }
  const unsigned existing = w.lanes == 32 ? 0xffffffffu : (1u << w.lanes) - 1u;
  if (mask & ~existing) {
    fail(std::string(op) + " at " + detail::site_text(site) + ": mask " + detail::mask_text(mask) + " names lanes beyond the " +
         std::to_string(w.lanes) + " threads of the warp");
  }
  auto found =
      std::find_if(w.waiting.begin(), w.waiting.end(), [&](const Collective& c) { return (c.mask & mask) != 0; });
  if (found != w.waiting.end() &&
      (found->mask != mask || std::strcmp(found->op, op) != 0 || !detail::same_site(found->site, site))) {
    fail("divergent warp collective: " + std::string(op) + " at " + detail::site_text(site) + " with mask " +
         detail::mask_text(mask) + " while lanes " + detail::mask_text(found->arrived) + " wait at " + found->op + " at " +
         detail::site_text(found->site) + " with mask " + detail::mask_text(found->mask));
  }
  for (unsigned lane = 0; lane < 32; ++lane) {
    if ((mask >> lane & 1u) && b.threads[t.warp * 32 + lane]->status == Status::Exited) {
      fail(std::string(op) + " at " + detail::site_text(site) + ": lane " + std::to_string(lane) +
           " of its mask has exited");
    }
  }
  if (found == w.waiting.end()) {
    w.waiting.push_back(Collective{op, site, mask, 0u, {}, {}});
    found = w.waiting.end() - 1;
  }
  found->in[t.lane] = in;
  found->out[t.lane] = out;
  found->arrived |= 1u << t.lane;
  if (found->arrived != mask) {
    t.status = Status::AtCollective;
    t.fiber->suspend();
    return;
  }
  const Collective done = *found;
  w.waiting.erase(found);
  if (b.counting) {
    detail::count_collective(b, t.warp, op);
  }
  run(CollectiveView{mask, done.in, done.out}, context);
  for (unsigned lane = 0; lane < 32; ++lane) {
    if ((mask >> lane & 1u) && lane != t.lane) {
      b.threads[t.warp * 32 + lane]->status = Status::Runnable;
    }
  }
}

void syncwarp(Site site, unsigned mask) {
  struct None {};
  warp_collective<None, None>("__syncwarp", site, mask, None{}, [](unsigned, const None* const*, None* const*) {});
  ++current().block->warps[current().warp].sync_epoch;
}

unsigned ballot_sync(Site site, unsigned mask, int predicate) {
  return warp_collective<int, unsigned>("__ballot_sync", site, mask, predicate,
                                        [](unsigned m, const int* const* ins, unsigned* const* outs) {
                                          unsigned bits = 0;
                                          for (unsigned lane = 0; lane < 32; ++lane) {
                                            if ((m >> lane & 1u) && *ins[lane] != 0) {
                                              bits |= 1u << lane;
                                            }
                                          }
                                          for (unsigned lane = 0; lane < 32; ++lane) {
                                            if (m >> lane & 1u) {
                                              *outs[lane] = bits;
                                            }
                                          }
                                        });
}

int any_sync(Site site, unsigned mask, int predicate) {
  return ballot_sync(site, mask, predicate) != 0;
}

int all_sync(Site site, unsigned mask, int predicate) {
  return ballot_sync(site, mask, predicate) == mask;
}

LaunchStats launch_emulated(const char* kernel, Dim3 grid, Dim3 block, std::size_t dynamic_shared_bytes,
                            ThreadBody body, const void* context) {
  const Options options = current_options();
  detail::check_launch(kernel, grid, block, dynamic_shared_bytes, options);
  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
  const unsigned workers_count = unsigned(std::min<uint64_t>(std::max(1, options.host_threads), blocks));
  std::vector<std::unique_ptr<detail::Worker>> workers;
  for (unsigned i = 0; i < workers_count; ++i) {
    workers.push_back(std::make_unique<detail::Worker>(kernel, options, grid, block, body, context));
  }
  std::atomic<uint64_t> next{0};
  std::atomic<bool> failed{false};
  std::vector<std::exception_ptr> errors(workers_count);
  auto work = [&](unsigned i) {
    try {
      for (uint64_t id = next++; id < blocks && !failed; id = next++) {
        workers[i]->run(id, dynamic_shared_bytes);
      }
    } catch (...) {
      errors[i] = std::current_exception();
      failed = true;
    }
  };
  if (workers_count == 1) {
    work(0);
  } else {
    std::vector<std::thread> pool;
    for (unsigned i = 0; i < workers_count; ++i) {
      pool.emplace_back(work, i);
    }
    for (auto& thread : pool) {
      thread.join();
    }
  }
  for (auto& error : errors) {
    if (error) {
      std::rethrow_exception(error);
    }
  }
  LaunchStats stats;
  stats.blocks = blocks;
  stats.threads = blocks * block.x * block.y * block.z;
  decltype(detail::Block::hazards) hazards;
  for (auto& w : workers) {
    stats.switches += w->block.switches;
    for (auto& [key, hazard] : w->block.hazards) {
      auto [it, added] = hazards.try_emplace(key, hazard);
      if (!added) {
        it->second.count += hazard.count;
      }
    }
  }
  for (auto& entry : hazards) {
    stats.hazards.push_back(entry.second);
  }
  if (options.count_into != nullptr) {
    detail::gather_counters(workers, stats);
    options.count_into->push_back(LaunchRecord{kernel, grid, block, dynamic_shared_bytes, stats});
  }
  if (options.hazards_are_errors && !stats.hazards.empty()) {
    throw HazardError(stats.hazards);
  }
  return stats;
}

}  // namespace flowformer::simt
