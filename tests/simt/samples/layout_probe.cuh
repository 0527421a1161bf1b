// One warp records what each lane holds after every ldmatrix variant, after mma.m16n8k16 (bf16 and half)
// and mma.m16n8k8 (tf32) on inputs that make every lane -> element map visible, and after tf32_round: the
// device's record and the emulator's must be equal (gpu-check compares them). Every value is a small integer, so the sums are exact in any
// order.
#pragma once

#include "simt/simt.h"

namespace flowformer::simt_samples::FF_SIMT_BUILD {

// Per lane: 6 ldmatrix variants x 4 registers (x1, x2, x4, each plain and .trans; unused registers 0),
// then D of the bf16, the half and the tf32 mma, then the bits of tf32_round(x_lane).
constexpr int kProbeLdmatrixWords = 6 * 4, kProbeTf32Words = kProbeLdmatrixWords + 2 * 4;
constexpr int kProbeWordsPerLane = kProbeTf32Words + 4 + 1;

// The value lane l rounds to tf32: +-(1 + l 2^-14), l / 16 of a tf32 unit in the last place past 1 (odd lanes
// negative): below, at (ties: away from zero) and above half a unit.
FF_DEVICE float probe_round_input(int lane) {
  const float x = 1.f + float(lane) * 0x1p-14f;
  return lane % 2 == 1 ? -x : x;
}

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

FF_DEVICE void probe_tf32(uint32_t* out, int lane) {
  float a[4], b[2], c[4], d[4];
  for (int i = 0; i < 4; ++i) {  // A: codes 0..127, one per (lane, register); B: codes 1..64
    a[i] = float(lane * 4 + i);
    c[i] = float(1000 * (lane * 4 + i));
  }
  for (int i = 0; i < 2; ++i) {
    b[i] = float(lane * 2 + i + 1);
  }
  simt::mma_m16n8k8_tf32(d, a, b, c);
  for (int i = 0; i < 4; ++i) {
    out[i] = uint32_t(d[i]);
  }
  const float rounded = simt::tf32_round(probe_round_input(lane));
  uint32_t bits;
  std::memcpy(&bits, &rounded, sizeof bits);
  out[4] = bits;
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
  probe_tf32(mine + kProbeTf32Words, lane);
}

inline auto run_layout_probe(uint32_t* out, simt::Stream stream = {}) {
  return simt::launch("layout_probe", layout_probe, {simt::Dim3(1), simt::Dim3(32), 0, stream}, out);
}

}  // namespace flowformer::simt_samples::FF_SIMT_BUILD
