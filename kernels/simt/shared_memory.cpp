// The SIMT emulator's shared memory: static and dynamic regions per block, poisoned at block start, with
// per-byte shadow state for the hazard checks (what compute-sanitizer's initcheck and racecheck report),
// and cp.async copies that land when their group is waited for.
#include "simt/async_copy.h"
#include "simt/detail/state.h"
#include "simt/host_api.h"

#include <algorithm>
#include <cstring>
#include <string>

namespace flowformer::simt {
using detail::Block;
using detail::Thread;

namespace detail {
namespace {

constexpr std::size_t kStaticLimit = 48 * 1024;  // static __shared__ per block, as nvcc enforces
constexpr unsigned char kPoison = 0xff;           // NaN as a float, -1 as an integer

// Accesses by threads a and b are ordered when a barrier separates them, or when both are in one warp and
// a __syncwarp separates them.
bool ordered(const Block& b, uint32_t epoch, unsigned other, uint32_t other_warp_epoch, const Thread& t) {
  if (epoch != b.barrier_epoch + 1) {
    return true;
  }
  return other / 32 == t.warp && other_warp_epoch != b.warps[t.warp].sync_epoch;
}

void check_access(const Region* region, std::size_t begin, std::size_t end, std::size_t offset,
                  std::size_t bytes, std::size_t align, Site site, const char* what) {
  if (region == nullptr) {
    fail(std::string(what) + " through a null shared-memory pointer at " + site_text(site));
  }
  if (offset < begin || offset + bytes > end || offset + bytes > region->used) {
    fail(std::string("out-of-bounds ") + what + " of " + std::to_string(bytes) + " bytes at offset " +
         std::to_string(offset) + " of " + region->name + " shared memory (the allocation is [" +
         std::to_string(begin) + ", " + std::to_string(end) + ")) at " + site_text(site));
  }
  if (offset % align != 0) {
    fail(std::string("misaligned ") + what + " of " + std::to_string(bytes) + " bytes at offset " +
         std::to_string(offset) + " of " + region->name + " shared memory (needs " + std::to_string(align) +
         "-byte alignment) at " + site_text(site));
  }
}

std::string hazard_text(const Block& b, const Thread& t, const char* kind_text, std::size_t offset,
                        const Region& region, Site site, unsigned other, Site other_site) {
  return b.where(t) + " at " + site_text(site) + ", " + kind_text + " thread " + std::to_string(other) + " at " +
         site_text(other_site) + ", byte " + std::to_string(offset) + " of " + region.name + " shared memory";
}

// Each access reports at most one hazard (at its first byte with one), as a sanitizer reports an access.
class AccessReport {
 public:
  AccessReport(Block& b, Thread& t, const Region& region, Site site) : b_(b), t_(t), region_(region), site_(site) {}
  void conflict(Hazard::Kind kind, const char* relation, std::size_t byte, unsigned other, Site other_site) {
    if (!done_) {
      record_hazard(b_, kind, hazard_text(b_, t_, relation, byte, region_, site_, other, other_site), site_,
                    other_site);
    }
    done_ = true;
  }
  void uninitialised(std::size_t byte) {
    if (!done_) {
      record_hazard(b_, Hazard::Kind::UninitializedRead,
                    b_.where(t_) + " at " + site_text(site_) + " reads byte " + std::to_string(byte) + " of " +
                        region_.name + " shared memory, never written in this block",
                    site_, Site{});
    }
    done_ = true;
  }

 private:
  Block& b_;
  Thread& t_;
  const Region& region_;
  Site site_;
  bool done_ = false;
};

void note_read(Block& b, Thread& t, Region& region, std::size_t offset, std::size_t bytes, Site site) {
  const uint32_t epoch = b.barrier_epoch + 1, warp_epoch = b.warps[t.warp].sync_epoch;
  AccessReport report(b, t, region, site);
  for (std::size_t i = offset; i < offset + bytes; ++i) {
    Shadow& s = region.shadow[i];
    if (s.async_pending) {
      report.conflict(Hazard::Kind::AsyncCopyInFlight, "reads a byte that a cp.async (not yet waited for) by", i,
                      s.writer, s.write_site);
    } else if (s.write_epoch == 0) {
      report.uninitialised(i);
    } else if (s.writer != t.tid && !ordered(b, s.write_epoch, s.writer, s.write_warp_epoch, t)) {
      report.conflict(Hazard::Kind::ReadAfterWrite, "reads with no barrier since the write by", i, s.writer,
                      s.write_site);
    }
    if (s.read_epoch != epoch) {
      s.has_previous_reader = false;
      s.readers_in_two_warps = false;
    } else if (s.reader != t.tid) {
      s.previous_reader = s.reader;
      s.previous_read_warp_epoch = s.read_warp_epoch;
      s.has_previous_reader = true;
      s.readers_in_two_warps |= s.reader / 32 != t.warp;
    }
    s.read_epoch = epoch;
    s.read_warp_epoch = warp_epoch;
    s.reader = uint16_t(t.tid);
    s.read_site = site;
  }
}

void note_write(Block& b, Thread& t, Region& region, std::size_t offset, std::size_t bytes, Site site,
                bool async) {
  const uint32_t epoch = b.barrier_epoch + 1, warp_epoch = b.warps[t.warp].sync_epoch;
  AccessReport report(b, t, region, site);
  for (std::size_t i = offset; i < offset + bytes; ++i) {
    Shadow& s = region.shadow[i];
    if (s.async_pending) {
      report.conflict(Hazard::Kind::AsyncCopyInFlight, "writes a byte that a cp.async (not yet waited for) by", i,
                      s.writer, s.write_site);
    } else if (s.write_epoch != 0 && s.writer != t.tid && !ordered(b, s.write_epoch, s.writer, s.write_warp_epoch, t)) {
      report.conflict(Hazard::Kind::WriteAfterWrite, "writes with no barrier since the write by", i, s.writer,
                      s.write_site);
    }
    // The last two distinct readers of this interval are tracked, and whether its readers span two warps.
    if (s.read_epoch == epoch) {
      const bool last_unordered = s.reader != t.tid && !ordered(b, epoch, s.reader, s.read_warp_epoch, t);
      const bool previous_unordered = s.has_previous_reader && s.previous_reader != t.tid &&
                                      !ordered(b, epoch, s.previous_reader, s.previous_read_warp_epoch, t);
      if (last_unordered || previous_unordered || s.readers_in_two_warps) {
        report.conflict(Hazard::Kind::WriteAfterRead, "writes with no barrier since the read by", i,
                        s.reader != t.tid ? s.reader : s.previous_reader, s.read_site);
      }
    }
    s.write_epoch = epoch;
    s.write_warp_epoch = warp_epoch;
    s.writer = uint16_t(t.tid);
    s.write_site = site;
    s.read_epoch = 0;  // later write-after-read checks look at reads after this write only
    s.async_pending = async;
  }
}

void reset_region(Region& region, std::size_t used) {
  if (region.bytes.size() < used) {
    region.bytes.resize(used);
    region.shadow.resize(used);
  }
  std::fill(region.bytes.begin(), region.bytes.begin() + std::max(used, region.used), kPoison);
  std::fill(region.shadow.begin(), region.shadow.begin() + std::max(used, region.used), Shadow{});
  region.used = used;
}

}  // namespace

void reset_shared(Block& b, std::size_t dynamic_bytes) {
  reset_region(b.static_shared, 0);
  b.static_allocations.clear();
  reset_region(b.dynamic_shared, dynamic_bytes);
}

Region* static_shared(Site site, std::size_t bytes, std::size_t type_id, std::size_t* offset) {
  Block& b = *current().block;
  auto [it, added] = b.static_allocations.try_emplace({site.file, site.line, bytes, type_id});
  if (added) {
    const std::size_t start = (b.static_shared.used + 15) / 16 * 16;  // __align__(16), as simt.h declares them
    const std::size_t used = start + bytes;
    if (used > kStaticLimit) {
      fail("static shared memory at " + site_text(site) + " brings the block to " + std::to_string(used) +
           " bytes; at most 48 KiB is static (use dynamic shared memory beyond)");
    }
    if (used + b.dynamic_shared.used > shared_memory_limit(b.options->arch)) {
      fail("shared memory at " + site_text(site) + " brings the block to " + std::to_string(used + b.dynamic_shared.used) +
           " bytes; sm_" + std::to_string(b.options->arch) + " allows " +
           std::to_string(shared_memory_limit(b.options->arch)));
    }
    if (b.static_shared.bytes.size() < used) {
      b.static_shared.bytes.resize(used, kPoison);
      b.static_shared.shadow.resize(used);
    }
    b.static_shared.used = used;
    it->second = StaticAllocation{start, bytes};
  }
  *offset = it->second.offset;
  return &b.static_shared;
}

Region* dynamic_shared(std::size_t* bytes) {
  Block& b = *current().block;
  *bytes = b.dynamic_shared.used;
  return &b.dynamic_shared;
}

void shared_read(Region* region, std::size_t begin, std::size_t end, std::size_t offset, std::size_t bytes,
                 std::size_t align, Site site, void* destination, int as_thread) {
  maybe_yield();
  Thread& self = current();
  Block& b = *self.block;
  check_access(region, begin, end, offset, bytes, align, site, "shared-memory read");
  Thread& t = as_thread < 0 ? self : *b.threads[unsigned(as_thread)];
  note_read(b, t, *region, offset, bytes, site);
  if (b.counting && as_thread < 0) {  // ldmatrix counts its reads whole
    count_access(t, Access::SharedLoad, site, offset, unsigned(bytes));
  }
  std::memcpy(destination, region->bytes.data() + offset, bytes);
}

void shared_write(Region* region, std::size_t begin, std::size_t end, std::size_t offset, std::size_t bytes,
                  std::size_t align, Site site, const void* source) {
  maybe_yield();
  Thread& t = current();
  Block& b = *t.block;
  check_access(region, begin, end, offset, bytes, align, site, "shared-memory write");
  note_write(b, t, *region, offset, bytes, site, false);
  if (b.counting) {
    count_access(t, Access::SharedStore, site, offset, unsigned(bytes));
  }
  std::memcpy(region->bytes.data() + offset, source, bytes);
}

void finish_async(Thread& t, std::size_t keep_groups) {
  Block& b = *t.block;
  while (t.async_committed.size() > keep_groups) {
    for (const AsyncCopy& copy : t.async_committed.front()) {
      unsigned char* target = copy.region->bytes.data() + copy.offset;
      if (copy.source != nullptr) {
        std::memcpy(target, copy.source, copy.bytes);
      } else {
        std::memset(target, 0, copy.bytes);
      }
      for (std::size_t i = copy.offset; i < copy.offset + copy.bytes; ++i) {
        Shadow& s = copy.region->shadow[i];
        s.async_pending = false;
        s.write_epoch = b.barrier_epoch + 1;  // written, as far as other threads know, now
        s.write_warp_epoch = b.warps[t.warp].sync_epoch;
      }
    }
    t.async_committed.erase(t.async_committed.begin());
  }
}

bool counting() {
  return current().block->counting;
}

void note_ldmatrix(Site site, const uint64_t* rows, int matrices) {
  count_ldmatrix(*current().block, site, rows, matrices);
}

void count_global(Site site, const void* address, std::size_t bytes, bool store) {
  Thread& t = current();
  if (t.block->counting) {
    count_access(t, store ? Access::GlobalStore : Access::GlobalLoad, site, reinterpret_cast<uintptr_t>(address),
                 unsigned(bytes));
  }
}

void cp_async_issue(Site site, SharedPtr<unsigned char> destination, const void* source, bool fill) {
  Thread& t = detail::current();
  Block& b = *t.block;
  detail::check_access(destination.region(), destination.begin(), destination.end(), destination.offset(), 16, 16,
                       site, "cp.async destination");
  if (fill && reinterpret_cast<uintptr_t>(source) % 16 != 0) {
    detail::fail("cp.async source " + std::to_string(reinterpret_cast<uintptr_t>(source)) +
                 " is not 16-byte aligned at " + detail::site_text(site));
  }
  detail::note_write(b, t, *destination.region(), destination.offset(), 16, site, true);
  if (b.counting) {
    count_access(t, Access::AsyncCopyStore, site, destination.offset(), 16);
    if (fill) {
      count_access(t, Access::AsyncCopyLoad, site, reinterpret_cast<uintptr_t>(source), 16);
    }
  }
  t.async_open.push_back(
      detail::AsyncCopy{destination.region(), destination.offset(), fill ? source : nullptr, 16, site});
}

void cp_async_wait_groups(std::size_t pending_groups) {
  maybe_yield();
  finish_async(current(), pending_groups);
}

}  // namespace detail

void cp_async_commit() {
  Thread& t = detail::current();
  t.async_committed.push_back(std::move(t.async_open));
  t.async_open.clear();
}

}  // namespace flowformer::simt
