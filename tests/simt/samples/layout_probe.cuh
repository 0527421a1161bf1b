// One warp records what each lane holds after every ldmatrix variant and after mma.m16n8k16 (bf16 and
// half) on inputs that make every lane -> element map visible: the device's record and the emulator's
// must be equal (gpu-check compares them). Every value is a small integer, so the sums are exact in any
// order.
#pragma once

#include "simt/simt.h"

namespace flowformer::simt_samples::FF_SIMT_BUILD {

// Per lane: 6 ldmatrix variants x 4 registers (x1, x2, x4, each plain and .trans; unused registers 0),
// then D of the bf16 and of the half mma.
constexpr int kProbeLdmatrixWords = 6 * 4, kProbeWordsPerLane = kProbeLdmatrixWords + 2 * 4;

template <typename T>
FF_DEVICE void probe_mma(uint32_t* out, int lane) {
  uint32_t a[4], b[2];
  float c[4], d[4];
  for (int i = 0; i < 4; ++i) {  // A: codes 0..255, one per (lane, register, half)
    a[i] = simt::pack2(T(float(lane * 8 + 2 * i)), T(float(lane * 8 + 2 * i + 1)));
    c[i] = float(1000 * (lane * 4 + i));
  }
  for (int i = 0; i < 2; ++i) {  // B: codes 1..128
    b[i] = simt::pack2(T(float(lane * 4 + 2 * i + 1)), T(float(lane * 4 + 2 * i + 2)));
  }
  simt::mma_m16n8k16<T>(d, a, b, c);
  for (int i = 0; i < 4; ++i) {
    out[i] = uint32_t(d[i]);
  }
}

template <int N, bool Trans>
FF_DEVICE void probe_ldmatrix(simt::shared_ptr<uint16_t> matrices, uint32_t* out, int lane) {
  uint32_t r[N];
  simt::ldmatrix<N, Trans>(r, matrices + lane * 8);  // lane 8 j + i: row i of matrix j
  for (int j = 0; j < 4; ++j) {
    out[j] = j < N ? r[j] : 0u;
  }
}

__global__ void layout_probe(uint32_t* out) {
  FF_SHARED(uint16_t, matrices, 4 * 64);
  const int lane = int(threadIdx.x);
  for (int i = lane; i < 4 * 64; i += 32) {
    matrices[i] = uint16_t(i);  // matrix j, row r, column c holds 64 j + 8 r + c
  }
  __syncthreads();
  uint32_t* mine = out + lane * kProbeWordsPerLane;
  probe_ldmatrix<1, false>(matrices, mine, lane);
  probe_ldmatrix<1, true>(matrices, mine + 4, lane);
  probe_ldmatrix<2, false>(matrices, mine + 8, lane);
  probe_ldmatrix<2, true>(matrices, mine + 12, lane);
  probe_ldmatrix<4, false>(matrices, mine + 16, lane);
  probe_ldmatrix<4, true>(matrices, mine + 20, lane);
  probe_mma<simt::bf16>(mine + kProbeLdmatrixWords, lane);
  probe_mma<simt::half>(mine + kProbeLdmatrixWords + 4, lane);
}

inline auto run_layout_probe(uint32_t* out, simt::Stream stream = {}) {
  return simt::launch("layout_probe", layout_probe, {simt::Dim3(1), simt::Dim3(32), 0, stream}, out);
}

}  // namespace flowformer::simt_samples::FF_SIMT_BUILD
