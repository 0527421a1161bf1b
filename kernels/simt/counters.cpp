// The SIMT emulator's counters (counters.h): lanes' accesses grouped into warp-level instructions, and the
// wavefronts, sectors and tensor-core work they cost.
#include "simt/counters.h"

#include "simt/detail/state.h"

#include <algorithm>
#include <cstring>
#include <set>

namespace flowformer::simt {

SharedTraffic& SharedTraffic::operator+=(const SharedTraffic& o) {
  instructions += o.instructions;
  wavefronts += o.wavefronts;
  extra_wavefronts += o.extra_wavefronts;
  return *this;
}

GlobalTraffic& GlobalTraffic::operator+=(const GlobalTraffic& o) {
  instructions += o.instructions;
  bytes += o.bytes;
  sectors += o.sectors;
  return *this;
}

Counters& Counters::operator+=(const Counters& o) {
  shared_loads += o.shared_loads;
  shared_stores += o.shared_stores;
  ldmatrix += o.ldmatrix;
  cp_async_stores += o.cp_async_stores;
  global_loads += o.global_loads;
  global_stores += o.global_stores;
  cp_async_loads += o.cp_async_loads;
  ldmatrix_matrices += o.ldmatrix_matrices;
  mma_m16n8k16_bf16 += o.mma_m16n8k16_bf16;
  mma_m16n8k16_f16 += o.mma_m16n8k16_f16;
  mma_m16n8k8_tf32 += o.mma_m16n8k8_tf32;
  for (int s = 0; s < kSchedulers; ++s) {
    tensor_flops_by_scheduler[s] += o.tensor_flops_by_scheduler[s];
  }
  dram_read_sectors += o.dram_read_sectors;
  dram_write_sectors += o.dram_write_sectors;
  barriers += o.barriers;
  shuffles += o.shuffles;
  votes += o.votes;
  warp_syncs += o.warp_syncs;
  return *this;
}

uint64_t Counters::tensor_flops() const {
  uint64_t flops = 0;
  for (uint64_t f : tensor_flops_by_scheduler) {
    flops += f;
  }
  return flops;
}

SiteTraffic& SiteTraffic::operator+=(const SiteTraffic& o) {
  shared += o.shared;
  global += o.global;
  return *this;
}

const char* to_string(Access access) {
  switch (access) {
    case Access::SharedLoad:
      return "shared load";
    case Access::SharedStore:
      return "shared store";
    case Access::Ldmatrix:
      return "ldmatrix";
    case Access::AsyncCopyStore:
      return "cp.async (shared)";
    case Access::GlobalLoad:
      return "global load";
    case Access::GlobalStore:
      return "global store";
    case Access::AsyncCopyLoad:
      return "cp.async (global)";
  }
  return "access";
}

namespace detail {
namespace {

constexpr int kBanks = 32;

// Wavefronts of one phase: the most distinct 4-byte words any bank is asked for (0 for an empty phase).
// words: each lane's [first word, last word] of the phase.
uint64_t phase_wavefronts(const std::vector<std::pair<uint64_t, uint64_t>>& words) {
  std::set<uint64_t> per_bank[kBanks];
  for (const auto& [first, last] : words) {
    for (uint64_t w = first; w <= last; ++w) {
      per_bank[w % kBanks].insert(w);
    }
  }
  uint64_t most = 0;
  for (const auto& bank : per_bank) {
    most = std::max<uint64_t>(most, bank.size());
  }
  return most;
}

SharedTraffic shared_instruction(const PendingAccess& a) {
  const unsigned lanes_per_phase = a.bytes <= 4 ? 32 : a.bytes == 8 ? 16 : 8;
  SharedTraffic traffic;
  traffic.instructions = 1;
  for (unsigned phase = 0; phase < 32 / lanes_per_phase; ++phase) {
    std::vector<std::pair<uint64_t, uint64_t>> words;
    for (unsigned lane = phase * lanes_per_phase; lane < (phase + 1) * lanes_per_phase; ++lane) {
      if (a.lanes >> lane & 1u) {
        words.emplace_back(a.address[lane] / 4, (a.address[lane] + a.bytes - 1) / 4);
      }
    }
    if (!words.empty()) {
      const uint64_t wavefronts = phase_wavefronts(words);
      traffic.wavefronts += 1;
      traffic.extra_wavefronts += wavefronts - 1;
    }
  }
  return traffic;
}

GlobalTraffic global_instruction(const PendingAccess& a, std::unordered_set<uint64_t>& block_sectors) {
  std::set<uint64_t> sectors;
  GlobalTraffic traffic;
  traffic.instructions = 1;
  for (unsigned lane = 0; lane < 32; ++lane) {
    if (a.lanes >> lane & 1u) {
      traffic.bytes += a.bytes;
      for (uint64_t s = a.address[lane] / 32; s <= (a.address[lane] + a.bytes - 1) / 32; ++s) {
        sectors.insert(s);
      }
    }
  }
  traffic.sectors = sectors.size();
  block_sectors.insert(sectors.begin(), sectors.end());
  return traffic;
}

SiteTraffic& site_of(Block& b, Site site, Access access) {
  auto [it, added] = b.sites.try_emplace({site.file, site.line, access});
  if (added) {
    it->second.site = site_text(site);
    it->second.access = access;
  }
  return it->second;
}

void add_shared(Block& b, Site site, Access access, const SharedTraffic& traffic) {
  SharedTraffic* total = access == Access::SharedLoad    ? &b.counters.shared_loads
                         : access == Access::SharedStore ? &b.counters.shared_stores
                         : access == Access::Ldmatrix    ? &b.counters.ldmatrix
                                                         : &b.counters.cp_async_stores;
  *total += traffic;
  site_of(b, site, access).shared += traffic;
}

void add_global(Block& b, Site site, Access access, const GlobalTraffic& traffic) {
  GlobalTraffic* total = access == Access::GlobalLoad    ? &b.counters.global_loads
                         : access == Access::GlobalStore ? &b.counters.global_stores
                                                         : &b.counters.cp_async_loads;
  *total += traffic;
  site_of(b, site, access).global += traffic;
}

bool is_global(Access access) {
  return access == Access::GlobalLoad || access == Access::GlobalStore || access == Access::AsyncCopyLoad;
}

bool starts_with(const char* text, const char* prefix) {
  return std::strncmp(text, prefix, std::strlen(prefix)) == 0;
}

}  // namespace

void count_access(Thread& t, Access access, Site site, uint64_t address, unsigned bytes) {
  const uint32_t occurrence = t.occurrences[AccessKey{site.file, site.line, access, 0}]++;
  PendingAccess& a = t.block->warps[t.warp].pending[AccessKey{site.file, site.line, access, occurrence}];
  a.site = site;
  a.bytes = bytes;
  a.lanes |= 1u << t.lane;
  a.address[t.lane] = address;
}

void close_accesses(Block& b) {
  for (Warp& w : b.warps) {
    for (const auto& [key, access] : w.pending) {
      if (is_global(key.access)) {
        auto& sectors = key.access == Access::GlobalStore ? b.written_sectors : b.read_sectors;
        add_global(b, access.site, key.access, global_instruction(access, sectors));
      } else {
        add_shared(b, access.site, key.access, shared_instruction(access));
      }
    }
    w.pending.clear();
  }
  b.counters.dram_read_sectors = b.read_sectors.size();
  b.counters.dram_write_sectors = b.written_sectors.size();
}

void count_ldmatrix(Block& b, Site site, const uint64_t* rows, int matrices) {
  SharedTraffic traffic;
  traffic.instructions = 1;
  for (int j = 0; j < matrices; ++j) {
    std::vector<std::pair<uint64_t, uint64_t>> words;
    for (int i = 0; i < 8; ++i) {
      words.emplace_back(rows[8 * j + i] / 4, (rows[8 * j + i] + 15) / 4);
    }
    traffic.wavefronts += 1;
    traffic.extra_wavefronts += phase_wavefronts(words) - 1;
  }
  b.counters.ldmatrix_matrices += uint64_t(matrices);
  add_shared(b, site, Access::Ldmatrix, traffic);
}

void count_collective(Block& b, unsigned warp, const char* op) {
  Counters& c = b.counters;
  uint64_t flops = 0;
  if (starts_with(op, "mma.sync.m16n8k16.bf16")) {
    ++c.mma_m16n8k16_bf16;
    flops = 2 * 16 * 8 * 16;
  } else if (starts_with(op, "mma.sync.m16n8k16.f16")) {
    ++c.mma_m16n8k16_f16;
    flops = 2 * 16 * 8 * 16;
  } else if (starts_with(op, "mma.sync.m16n8k8.tf32")) {
    ++c.mma_m16n8k8_tf32;
    flops = 2 * 16 * 8 * 8;
  } else if (starts_with(op, "__shfl")) {
    ++c.shuffles;
  } else if (starts_with(op, "__ballot")) {
    ++c.votes;
  } else if (starts_with(op, "__syncwarp")) {
    ++c.warp_syncs;
  }
  c.tensor_flops_by_scheduler[warp % kSchedulers] += flops;
}

}  // namespace detail
}  // namespace flowformer::simt
