// The causal forward's split schedule (causal_forward.cuh, CausalPass): after each pass but the output, every
// segment's incoming state in the columns that pass finished, from the initial state s0 and the states the pass
// left after the earlier segments (which it started from zeros in those columns, or from no competition):
//   start_g[c] = s0[c] + end_0[c] + ... + end_{g-1}[c]       counts: n, K, Q; flows: A, B; state: S
//   (m, E)_g   = s0's (m, E), then end_0's, ..., end_{g-1}'s   competition: a running log-sum-exp, each term
//                                                              rescaled once to the running maximum (factor <= 1)
// A thread walks one (sequence, head, column) through its sequence's segments in order: the sums' order is fixed
// (deterministic), the reads of a segment coalesced over the columns. No shared memory. The causal backward's keys
// pass scans S's columns (its gradient R) in reverse: start_g = dS_L + end_{G-1} + ... + end_{g+1}, and the total
// R before the first segment (the incoming state's dS). The chain (causal_chain.cuh) scans its competition's P in
// reverse (in E's column, against the m in m's): each segment walked from no P after it left (P_g, m_g) at its
// first row, so P before it = P_g + exp(m_g - m after it) P after it (0 where m_g = -inf: no competition yet;
// a segment with m_g = +inf is empty); its vectors RA, RB, RK, RQ as sums (flows: A, B; counts: K, Q).
#pragma once

#include "flow_attention/blocks.cuh"

#include <stdexcept>
#include <string>

namespace flowformer::flow_attention_kernels::FF_SIMT_BUILD {

// The state column of a pass's i-th scan column (not the competition's).
FF_DEVICE int64_t scanned_column(CausalPass pass, const RecurrentState& s, int64_t i) {
  switch (pass) {
    case CausalPass::counts:
      return i == 0 ? s.n() : s.K() + i - 1;  // n, then K and Q
    case CausalPass::flows:
      return s.A() + i;  // A and B
    default:
      return s.S() + i;
  }
}

__global__ void __launch_bounds__(kThreads) flow_segment_scan_kernel(SegmentScanParams p) {
  const RecurrentState layout{p.D, p.M};
  const int64_t columns = segment_scan_columns(p.pass, p.D, p.M);
  const int64_t item = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (item >= int64_t(p.N) * p.H * columns) {
    return;
  }
  const int64_t i = item % columns, sequence_head = item / columns;
  const int64_t n = sequence_head / p.H, h = sequence_head % p.H;
  const float* s0 = p.initial != nullptr ? p.initial + sequence_head * layout.size() : nullptr;
  const auto row = [&](int g) { return ((n * p.G + g) * p.H + h) * layout.size(); };  // segment g's state
  if (p.pass == CausalPass::competition && p.reverse) {  // the chain's P
    float P = 0.f, m = INFINITY;
    for (int g = p.G - 1; g >= 0; --g) {
      simt::store_global(p.starts + row(g) + layout.E(), P);
      simt::store_global(p.starts + row(g) + layout.m(), m);
      const float m_g = simt::load_global(p.ends + row(g) + layout.m());
      if (m_g != INFINITY) {
        P = simt::load_global(p.ends + row(g) + layout.E()) + (m_g == -INFINITY ? 0.f : expf(m_g - m)) * P;
        m = m_g;
      }
    }
    return;
  }
  if (p.pass == CausalPass::competition) {
    const float E0 = s0 != nullptr ? simt::load_global(s0 + layout.E()) : 0.f;
    RunningSum running = E0 > 0.f ? RunningSum{simt::load_global(s0 + layout.m()), E0} : RunningSum::empty();
    for (int g = 0; g < p.G; ++g) {
      simt::store_global(p.starts + row(g) + layout.m(), running.E > 0.f ? running.m : 0.f);
      simt::store_global(p.starts + row(g) + layout.E(), running.E);
      const float E = simt::load_global(p.ends + row(g) + layout.E());
      if (E > 0.f) {
        running = running.then(RunningSum{simt::load_global(p.ends + row(g) + layout.m()), E},
                               [](float x) { return expf(x); });
      }
    }
    return;
  }
  const int64_t c = scanned_column(p.pass, layout, i);
  float sum = s0 != nullptr ? simt::load_global(s0 + c) : 0.f;
  for (int j = 0; j < p.G; ++j) {
    const int g = p.reverse ? p.G - 1 - j : j;
    simt::store_global(p.starts + row(g) + c, sum);
    sum += simt::load_global(p.ends + row(g) + c);
  }
  if (p.total != nullptr) {
    simt::store_global(p.total + sequence_head * layout.size() + c, sum);
  }
}

void SegmentScan::run(const SegmentScanParams& p, void* stream) {
  const int64_t items = int64_t(p.N) * p.H * segment_scan_columns(p.pass, p.D, p.M);
  const int64_t blocks = (items + kThreads - 1) / kThreads;
  if (blocks > 0x7fffffff) {
    throw std::length_error("flowformer::causal_flow_attention: " + std::to_string(items) +
                            " state columns exceed one CUDA launch");
  }
  if (blocks > 0) {
    simt::launch("flow_segment_scan", &flow_segment_scan_kernel,
                 {simt::Dim3(unsigned(blocks)), simt::Dim3(kThreads), 0, stream_of(stream)}, p);
  }
}

}  // namespace flowformer::flow_attention_kernels::FF_SIMT_BUILD
