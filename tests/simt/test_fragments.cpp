// The emulator's mma and ldmatrix fragments equal the PTX ISA's tables, written here element by element
// ("Matrix Fragments for mma.m16n8k16 with floating point type"; ldmatrix). On a GPU, gpu-check also
// compares the device's record of the same probe with the emulator's (simt_layout_probe).
#include "samples/layout_probe.cuh"

#include <catch2/catch.hpp>

#include <vector>

namespace samples = flowformer::simt_samples::emulated;
namespace simt = flowformer::simt;

namespace {

std::vector<uint32_t> emulated_probe() {
  std::vector<uint32_t> out(32 * samples::kProbeWordsPerLane, 0xdeadbeefu);
  samples::run_layout_probe(out.data());
  return out;
}

// The PTX tables, by element index i of the fragment (two per register).
struct Position {
  int row, col;
};
Position a_element(int lane, int i) {
  const int g = lane / 4, t = lane % 4;
  return {(i < 2 || (i >= 4 && i < 6)) ? g : g + 8, t * 2 + (i & 1) + (i >= 4 ? 8 : 0)};
}
Position b_element(int lane, int i) {
  const int g = lane / 4, t = lane % 4;
  return {t * 2 + (i & 1) + (i >= 2 ? 8 : 0), g};
}
Position c_element(int lane, int i) {
  const int g = lane / 4, t = lane % 4;
  return {i < 2 ? g : g + 8, t * 2 + (i & 1)};
}

}  // namespace

TEST_CASE("ldmatrix x1/x2/x4, plain and .trans, follow the PTX layout") {
  const auto out = emulated_probe();
  const int counts[3] = {1, 2, 4};
  for (int variant = 0; variant < 6; ++variant) {
    const int n = counts[variant / 2];
    const bool trans = variant % 2 == 1;
    for (int lane = 0; lane < 32; ++lane) {
      for (int j = 0; j < 4; ++j) {
        const uint32_t got = out[std::size_t(lane) * samples::kProbeWordsPerLane + variant * 4 + j];
        uint32_t expected = 0;
        if (j < n) {
          // register j of lane l: row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1 of matrix j (transposed:
          // the same of the transpose); element (r, c) of matrix j holds 64 j + 8 r + c
          const int r = lane / 4, c = 2 * (lane % 4);
          const uint32_t lo = trans ? 64 * j + 8 * c + r : 64 * j + 8 * r + c;
          const uint32_t hi = trans ? 64 * j + 8 * (c + 1) + r : 64 * j + 8 * r + c + 1;
          expected = lo | hi << 16;
        }
        INFO("variant " << variant << " lane " << lane << " register " << j);
        REQUIRE(got == expected);
      }
    }
  }
}

TEST_CASE("mma.m16n8k16 bf16 and half fragments follow the PTX layout") {
  const auto out = emulated_probe();
  double A[16][16] = {}, B[16][8] = {}, C[16][8] = {};
  for (int lane = 0; lane < 32; ++lane) {
    for (int i = 0; i < 8; ++i) {  // the probe's codes, by element index
      const Position p = a_element(lane, i);
      A[p.row][p.col] = lane * 8 + i;
    }
    for (int i = 0; i < 4; ++i) {
      const Position p = b_element(lane, i);
      B[p.row][p.col] = lane * 4 + i + 1;
      const Position q = c_element(lane, i);
      C[q.row][q.col] = 1000.0 * (lane * 4 + i);
    }
  }
  for (int type = 0; type < 2; ++type) {
    for (int lane = 0; lane < 32; ++lane) {
      for (int i = 0; i < 4; ++i) {
        const Position p = c_element(lane, i);
        double d = C[p.row][p.col];
        for (int k = 0; k < 16; ++k) {
          d += A[p.row][k] * B[k][p.col];
        }
        INFO((type == 0 ? "bf16" : "half") << " lane " << lane << " d[" << i << "]");
        REQUIRE(out[std::size_t(lane) * samples::kProbeWordsPerLane + samples::kProbeLdmatrixWords + 4 * type + i] ==
                uint32_t(d));
      }
    }
  }
}

TEST_CASE("mma.m16n8k8 tf32 fragments and tf32_round follow the PTX ISA") {
  const auto out = emulated_probe();
  double A[16][8] = {}, B[8][8] = {}, C[16][8] = {};
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    const Position a[4] = {{g, t}, {g + 8, t}, {g, t + 4}, {g + 8, t + 4}};  // "mma.m16n8k8, .tf32"
    for (int i = 0; i < 4; ++i) {
      A[a[i].row][a[i].col] = lane * 4 + i;
      const Position q = c_element(lane, i);
      C[q.row][q.col] = 1000.0 * (lane * 4 + i);
    }
    B[t][g] = lane * 2 + 1;
    B[t + 4][g] = lane * 2 + 2;
  }
  for (int lane = 0; lane < 32; ++lane) {
    const uint32_t* record = &out[std::size_t(lane) * samples::kProbeWordsPerLane + samples::kProbeTf32Words];
    for (int i = 0; i < 4; ++i) {
      const Position p = c_element(lane, i);
      double d = C[p.row][p.col];
      for (int k = 0; k < 8; ++k) {
        d += A[p.row][k] * B[k][p.col];
      }
      INFO("lane " << lane << " d[" << i << "]");
      REQUIRE(record[i] == uint32_t(d));
    }
    // +-(1 + lane / 16 units of 2^-10): to the nearest tf32, ties (lane % 16 == 8) away from zero
    const int units = lane / 16 + (lane % 16 >= 8 ? 1 : 0);
    const float magnitude = 1.f + float(units) * 0x1p-10f;
    const float expected = lane % 2 == 1 ? -magnitude : magnitude;
    uint32_t bits;
    std::memcpy(&bits, &expected, sizeof bits);
    INFO("tf32_round, lane " << lane);
    REQUIRE(record[4] == bits);
  }
}
