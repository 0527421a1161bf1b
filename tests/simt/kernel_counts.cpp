// What the fused kernels do, counted by the emulator (simt/counters.h), for the bounds report
// (benchmarks/kernel_bounds.py): one (sequence, head) of `chunks` chunks of 64 rows, one block per launch
// (M within one value tile), every kernel of linear attention's causal forward and backward and of its
// non-causal forward, and Flow-Attention's causal forward (its split schedule's passes too), its backward's three
// passes and the non-causal passes.
// Prints JSON: each launch's kernel, grid, block, dynamic shared bytes and its first block's counters.
//
//   kernel_counts --dtype bf16 --head-dim 64 --chunks 4
//   kernel_counts --plan BLOCKS LONGEST MULTIPROCESSORS   (plan_segments of each schedule)
#include "flow_attention/causal_chain.cuh"
#include "flow_attention/causal_forward.cuh"
#include "flow_attention/causal_key_grads.cuh"
#include "flow_attention/causal_query_grads.cuh"
#include "flow_attention/noncausal_backward.cuh"
#include "flow_attention/noncausal_keys.cuh"
#include "flow_attention/noncausal_output.cuh"
#include "flow_attention/noncausal_sums.cuh"
#include "fused_problem.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace simt = flowformer::simt;
namespace kernels = flowformer::linear_attention_kernels;
namespace flow_kernels = flowformer::flow_attention_kernels;
using flowformer::simt_tests::Case;
using flowformer::simt_tests::Problem;

namespace {

std::string shared_json(const simt::SharedTraffic& s) {
  std::ostringstream o;
  o << "{\"instructions\": " << s.instructions << ", \"wavefronts\": " << s.wavefronts
    << ", \"extra_wavefronts\": " << s.extra_wavefronts << "}";
  return o.str();
}

std::string global_json(const simt::GlobalTraffic& g) {
  std::ostringstream o;
  o << "{\"instructions\": " << g.instructions << ", \"bytes\": " << g.bytes << ", \"sectors\": " << g.sectors << "}";
  return o.str();
}

std::string counters_json(const simt::Counters& c) {
  std::ostringstream o;
  o << "{\"shared_loads\": " << shared_json(c.shared_loads) << ", \"shared_stores\": " << shared_json(c.shared_stores)
    << ", \"ldmatrix\": " << shared_json(c.ldmatrix) << ", \"cp_async_stores\": " << shared_json(c.cp_async_stores)
    << ", \"global_loads\": " << global_json(c.global_loads) << ", \"global_stores\": " << global_json(c.global_stores)
    << ", \"cp_async_loads\": " << global_json(c.cp_async_loads) << ", \"ldmatrix_matrices\": " << c.ldmatrix_matrices
    << ", \"mma_m16n8k16_bf16\": " << c.mma_m16n8k16_bf16 << ", \"mma_m16n8k16_f16\": " << c.mma_m16n8k16_f16
    << ", \"mma_m16n8k8_tf32\": " << c.mma_m16n8k8_tf32 << ", \"tensor_flops_by_scheduler\": [";
  for (int s = 0; s < simt::kSchedulers; ++s) {
    o << (s ? ", " : "") << c.tensor_flops_by_scheduler[s];
  }
  o << "], \"dram_read_sectors\": " << c.dram_read_sectors << ", \"dram_write_sectors\": " << c.dram_write_sectors
    << ", \"barriers\": " << c.barriers << ", \"shuffles\": " << c.shuffles << ", \"votes\": " << c.votes
    << ", \"warp_syncs\": " << c.warp_syncs << "}";
  return o.str();
}

std::string sites_json(const std::vector<simt::SiteTraffic>& sites) {
  std::ostringstream o;
  o << "[";
  for (std::size_t i = 0; i < sites.size(); ++i) {
    const simt::SiteTraffic& s = sites[i];
    o << (i ? ", " : "") << "{\"site\": \"" << s.site << "\", \"access\": \"" << simt::to_string(s.access)
      << "\", \"instructions\": " << s.instructions() << ", \"wavefronts\": " << s.shared.wavefronts
      << ", \"extra_wavefronts\": " << s.shared.extra_wavefronts << ", \"bytes\": " << s.global.bytes
      << ", \"sectors\": " << s.global.sectors
      << "}";
  }
  o << "]";
  return o.str();
}

void print_launches(const std::vector<simt::LaunchRecord>& records) {
  std::cout << "{\"launches\": [\n";
  for (std::size_t i = 0; i < records.size(); ++i) {
    const simt::LaunchRecord& r = records[i];
    std::cout << (i ? ",\n" : "") << "{\"kernel\": \"" << r.kernel << "\", \"grid\": [" << r.grid.x << ", " << r.grid.y
              << ", " << r.grid.z << "], \"block\": [" << r.block.x << ", " << r.block.y << ", " << r.block.z
              << "], \"dynamic_shared_bytes\": " << r.dynamic_shared_bytes
              << ", \"block0\": " << counters_json(r.stats.block_counters.at(0))
              << ", \"sites\": " << sites_json(r.stats.sites) << "}";
  }
  std::cout << "\n]}\n";
}

template <typename T>
std::vector<simt::LaunchRecord> count_kernels(int head_dim, int64_t chunks) {
  Case c{{chunks * kernels::kChunkRows}, /*packed=*/false, /*H=*/1, head_dim, head_dim};
  const Problem<T> problem(c);
  std::vector<simt::LaunchRecord> records;
  simt::Options options;
  options.count_into = &records;
  simt::OptionsScope scope(options);
  problem.forward();
  problem.backward();
  // The non-causal forward: the keys' sums, then every row's output from them.
  std::vector<float> kv(problem.kv0.size()), z(problem.z0.size());
  kernels::SegmentSumsParams sums{};
  problem.inputs(sums);
  sums.segments = 1;
  sums.kv = kv.data();
  sums.z = z.data();
  kernels::run_for_head_dim<kernels::emulated::SegmentSums>(sums, nullptr);
  std::vector<T> out(problem.v.size());
  kernels::StateOutputParams output{};
  problem.inputs(output);
  output.segments = 1;
  output.out = out.data();
  output.kv = kv.data();
  output.z = z.data();
  kernels::run_for_head_dim<kernels::emulated::StateOutput>(output, nullptr);
  // Causal Flow-Attention's forward on the same rows.
  flow_kernels::CausalForwardParams flow{};
  problem.inputs(flow);
  flow.segments = 1;
  flow.clamp = 1.f;
  flow.out = out.data();
  flow_kernels::run_for_head_dim<flow_kernels::emulated::CausalForward>(flow, nullptr);
  // Its split schedule's other passes (the first three alike: counted once).
  flow.out = nullptr;
  for (const auto pass : {flow_kernels::CausalPass::counts, flow_kernels::CausalPass::state}) {
    flow.pass = pass;
    flow_kernels::run_for_head_dim<flow_kernels::emulated::CausalForward>(flow, nullptr);
  }
  // Its backward's three passes on the same rows.
  flow_kernels::CausalQueryGradsParams flow_grads{};
  flow.pass = flow_kernels::CausalPass::output;
  static_cast<flow_kernels::CausalForwardParams&>(flow_grads) = flow;
  const std::size_t flow_rows = std::size_t(c.H) * std::size_t(flow.L);
  std::vector<float> dq_share(flow_rows * std::size_t(head_dim)), dg_share(flow_rows),
      row_scalars(flow_kernels::kCausalRowScalars * flow_rows),
      chunk_starts(std::size_t(c.H * flow_kernels::causal_chunk_slots(flow.L, 1, false) * 4 * head_dim));
  flow_grads.dout = problem.dout.data();
  std::copy(flow.v_stride, flow.v_stride + 3, flow_grads.dout_stride);
  flow_grads.dq_parts = dq_share.data();
  flow_grads.dg_parts = dg_share.data();
  flow_grads.rows = row_scalars.data();
  flow_grads.chunk_starts = chunk_starts.data();
  flow_kernels::run_for_head_dim<flow_kernels::emulated::CausalQueryGrads>(flow_grads, nullptr);
  flow_kernels::CausalKeyGradsParams flow_keys{};
  static_cast<flowformer::chunk::Inputs&>(flow_keys) = flow;
  static_cast<flowformer::chunk::Segments&>(flow_keys) = flow;
  flow_keys.pad = nullptr;
  flow_keys.dout = problem.dout.data();
  std::copy(flow.v_stride, flow.v_stride + 3, flow_keys.dout_stride);
  flow_keys.rows = row_scalars.data();
  std::vector<T> flow_dv(problem.v.size());
  flow_keys.dv = flow_dv.data();
  flow_keys.dk_parts = dq_share.data();
  flow_keys.dc_parts = dg_share.data();
  flow_kernels::run_for_head_dim<flow_kernels::emulated::CausalKeyGrads>(flow_keys, nullptr);
  flow_keys.sums = true;  // the split schedule's sums walk
  flow_kernels::run_for_head_dim<flow_kernels::emulated::CausalKeyGrads>(flow_keys, nullptr);
  flow_kernels::CausalChainParams flow_chain{};
  static_cast<flowformer::chunk::Inputs&>(flow_chain) = flow;
  static_cast<flowformer::chunk::Segments&>(flow_chain) = flow;
  flow_chain.pad = nullptr;
  flow_chain.clamp = 1.f;
  flow_chain.rows = row_scalars.data();
  flow_chain.chunk_starts = chunk_starts.data();
  flow_chain.dg_shares = flow_chain.dc_shares = dg_share.data();
  flow_chain.dq_shares = flow_chain.dk_shares = dq_share.data();
  std::vector<T> flow_dq(problem.q.size()), flow_dk(problem.k.size());
  flow_chain.dq = flow_dq.data();
  flow_chain.dk = flow_dk.data();
  flow_kernels::run_for_head_dim<flow_kernels::emulated::CausalChain>(flow_chain, nullptr);
  for (const auto level : {flow_kernels::ChainPass::competition, flow_kernels::ChainPass::vectors}) {
    flow_chain.pass = level;  // the split schedule's levels
    flow_kernels::run_for_head_dim<flow_kernels::emulated::CausalChain>(flow_chain, nullptr);
  }
  // Non-causal Flow-Attention's passes on the same rows (queries and keys alike): the column sums (pass 1's
  // kernel: pass 2's launch does its work and a row dot more), the keys' pass, the queries' pass.
  const auto side = [&](auto params, bool keys) {
    problem.inputs(params);
    params.segments = 1;
    params.keys = keys;
    params.pad = nullptr;
    return params;
  };
  std::vector<float> flow_sums(std::size_t(c.H * head_dim)), A(flow_sums.size()), W(problem.kv0.size()), top(c.H),
      E(c.H), ones(c.H, 1.f);
  flow_kernels::VectorSumsParams vector_sums = side(flow_kernels::VectorSumsParams{}, true);
  vector_sums.other = nullptr;
  vector_sums.sums = flow_sums.data();
  flow_kernels::run_for_head_dim<flow_kernels::emulated::VectorSums>(vector_sums, nullptr);
  flow_kernels::KeySumsParams keys = side(flow_kernels::KeySumsParams{}, true);
  keys.clamp = 1.f;
  keys.Q = keys.B = flow_sums.data();
  keys.A = A.data();
  keys.W = W.data();
  keys.max = top.data();
  keys.E = E.data();
  flow_kernels::run_for_head_dim<flow_kernels::emulated::KeySums>(keys, nullptr);
  flow_kernels::QueryOutputParams queries = side(flow_kernels::QueryOutputParams{}, false);
  queries.K = queries.A = flow_sums.data();
  queries.W = W.data();
  queries.allocation = queries.scale = ones.data();
  queries.out = out.data();
  flow_kernels::run_for_head_dim<flow_kernels::emulated::QueryOutput>(queries, nullptr);
  // Its backward's four passes (queries, keys, queries, keys) on the same rows, one value tile.
  std::vector<T> dq(problem.q.size()), dk(problem.k.size()), dv(problem.v.size());
  std::vector<float> dW(W.size()), shares(flow_sums.size()), dQ(flow_sums.size());
  for (const bool second : {false, true}) {
    for (const bool keys_side : {false, true}) {
      flow_kernels::NoncausalBackwardParams grads = side(flow_kernels::NoncausalBackwardParams{}, keys_side);
      grads.second = second;
      grads.clamp = 1.f;
      grads.dout = problem.dout.data();
      std::copy(grads.v_stride, grads.v_stride + 3, grads.dout_stride);
      grads.dq = dq.data();
      grads.dk = dk.data();
      grads.dv = dv.data();
      grads.state = keys_side ? dW.data() : W.data();
      grads.K = grads.Q = grads.A = grads.B = grads.dA = grads.dB = grads.dQ = grads.dK = flow_sums.data();
      grads.allocation = grads.scale = grads.total = ones.data();
      grads.max = top.data();
      grads.dW = dW.data();
      grads.shares = shares.data();
      grads.dQ_sums = dQ.data();
      if (keys_side) {
        flow_kernels::run_for_head_dim<flow_kernels::emulated::KeyGrads>(grads, nullptr);
      } else {
        flow_kernels::run_for_head_dim<flow_kernels::emulated::QueryGrads>(grads, nullptr);
      }
    }
  }
  return records;
}

[[noreturn]] void usage() {
  std::cerr << "usage: kernel_counts --dtype bf16|half|float32 --head-dim D --chunks C\n"
               "       kernel_counts --plan BLOCKS LONGEST MULTIPROCESSORS\n";
  std::exit(2);
}

}  // namespace

int main(int argc, char** argv) {
  std::string dtype = "bf16";
  int head_dim = 64;
  int64_t chunks = 2;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--plan" && i + 3 < argc) {
      const int64_t blocks = std::atoll(argv[i + 1]), longest = std::atoll(argv[i + 2]), sms = std::atoll(argv[i + 3]);
      const auto forward = kernels::plan_segments(blocks, longest, sms, kernels::kCausalForwardBytes);
      const auto backward = kernels::plan_segments(blocks, longest, sms, kernels::kCausalBackwardBytes);
      const auto noncausal = kernels::plan_segments(blocks, longest, sms, kernels::kNoncausalBytes);
      const auto flow = kernels::plan_segments(blocks, longest, sms, flow_kernels::kNoncausalBytes);
      const auto flow_causal = kernels::plan_segments(blocks, longest, sms, flow_kernels::kCausalForwardBytes);
      const auto flow_queries = kernels::plan_segments(blocks, longest, sms, flow_kernels::kCausalQueryGradsBytes);
      const auto flow_keys = kernels::plan_segments(blocks, longest, sms, flow_kernels::kCausalKeyGradsBytes);
      const auto flow_chain = kernels::plan_segments(blocks, longest, sms, flow_kernels::kCausalChainBytes);
      std::cout << "{\"causal_forward\": [" << forward.segments << ", " << forward.segment_rows
                << "], \"causal_backward\": [" << backward.segments << ", " << backward.segment_rows
                << "], \"noncausal\": [" << noncausal.segments << ", " << noncausal.segment_rows
                << "], \"flow_noncausal\": [" << flow.segments << ", " << flow.segment_rows
                << "], \"flow_causal\": [" << flow_causal.segments << ", " << flow_causal.segment_rows
                << "], \"flow_causal_query_grads\": [" << flow_queries.segments << ", " << flow_queries.segment_rows
                << "], \"flow_causal_key_grads\": [" << flow_keys.segments << ", " << flow_keys.segment_rows
                << "], \"flow_causal_chain\": [" << flow_chain.segments << ", " << flow_chain.segment_rows << "]}\n";
      return 0;
    } else if (arg == "--dtype" && i + 1 < argc) {
      dtype = argv[++i];
    } else if (arg == "--head-dim" && i + 1 < argc) {
      head_dim = std::atoi(argv[++i]);
    } else if (arg == "--chunks" && i + 1 < argc) {
      chunks = std::atoll(argv[++i]);
    } else {
      usage();
    }
  }
  if (chunks < 1 || !kernels::fused_head_dim(head_dim)) {
    usage();
  }
  if (dtype == "bf16") {
    print_launches(count_kernels<simt::bf16>(head_dim, chunks));
  } else if (dtype == "half") {
    print_launches(count_kernels<simt::half>(head_dim, chunks));
  } else if (dtype == "float32") {
    print_launches(count_kernels<float>(head_dim, chunks));
  } else {
    usage();
  }
  return 0;
}
