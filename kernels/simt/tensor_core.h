// Tensor-core instructions of one warp, with the per-lane fragment layouts of the PTX ISA. Lane l is
// l = 4 g + t (g = groupID, t = threadID_in_group); two 16-bit elements per 32-bit register, the lower
// index in the lower half.
//
// mma_m16n8k16<T>(d, a, b, c): D = A B + C, A 16x16 and B 16x8 of T (bf16 or half), C and D 16x8 float:
//   a[0] = A[g][2t, 2t+1]   a[1] = A[g+8][2t, 2t+1]   a[2] = A[g][2t+8, 2t+9]   a[3] = A[g+8][2t+8, 2t+9]
//   b[0] = B[2t, 2t+1][g]   b[1] = B[2t+8, 2t+9][g]
//   c[0], c[1] = C[g][2t, 2t+1]                       c[2], c[3] = C[g+8][2t, 2t+1]
// mma_m16n8k8_tf32(d, a, b, c): D = A B + C, A 16x8 and B 8x8 of tf32 (a float each, already rounded to
// tf32: tf32_round), C and D 16x8 float:
//   a[0] = A[g][t]   a[1] = A[g+8][t]   a[2] = A[g][t+4]   a[3] = A[g+8][t+4]   b[0] = B[t][g]   b[1] = B[t+4][g]
//   c as above. The emulator refuses a finite operand with any of the 13 bits below tf32's mantissa set
//   (what the hardware does with them is not specified).
// tf32_round(x): cvt.rna.tf32.f32, x to the nearest tf32 (10 mantissa bits; ties away from zero), as a float.
// ldmatrix<N, Trans>(r, row): N (1, 2, 4) 8x8 matrices of 16-bit elements from shared memory; lane
// 8 j + i gives the address of row i of matrix j (16 bytes, 16-byte aligned). r[j] = M_j[g][2t, 2t+1],
// or with Trans M_j[2t][g], M_j[2t+1][g].
#pragma once

#include "simt/shared_ptr.h"
#include "simt/types.h"

#include <cstdint>
#include <type_traits>

#if !defined(__CUDACC__)
#include <source_location>
#include <string>
#endif

namespace flowformer::simt {

#if defined(__CUDACC__)

template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                             const float (&c)[4]) {
  static_assert(std::is_same_v<T, bf16> || std::is_same_v<T, half>, "mma.m16n8k16 takes bf16 or half");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define FF_SIMT_MMA_M16N8K16(type)                                                                            \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." type "." type                                     \
               ".f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"                 \
               : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])                                              \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), \
                 "f"(c[2]), "f"(c[3]))
  if constexpr (std::is_same_v<T, bf16>) {
    FF_SIMT_MMA_M16N8K16("bf16");
  } else {
    FF_SIMT_MMA_M16N8K16("f16");
  }
#undef FF_SIMT_MMA_M16N8K16
#else
  __trap();  // tensor cores of this kind need sm_80 or later
#endif
}

// cvt.rna.tf32.f32: x rounded to tf32 (ties away from zero), its low 13 bits zero.
__device__ __forceinline__ float tf32_round(float x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return __uint_as_float(r);
#else
  __trap();  // tf32 needs sm_80 or later
  return x;
#endif
}

__device__ __forceinline__ void mma_m16n8k8_tf32(float (&d)[4], const float (&a)[4], const float (&b)[2],
                                                 const float (&c)[4]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
               "{%10, %11, %12, %13};\n"
               : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
               : "r"(__float_as_uint(a[0])), "r"(__float_as_uint(a[1])), "r"(__float_as_uint(a[2])),
                 "r"(__float_as_uint(a[3])), "r"(__float_as_uint(b[0])), "r"(__float_as_uint(b[1])), "f"(c[0]),
                 "f"(c[1]), "f"(c[2]), "f"(c[3]));
#else
  __trap();  // tensor cores of this kind need sm_80 or later
#endif
}

template <int N, bool Trans, typename T>
__device__ __forceinline__ void ldmatrix(uint32_t (&r)[N], const T* row) {
  static_assert(sizeof(T) == 2, "ldmatrix loads 16-bit elements");
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(row));
  if constexpr (N == 1 && !Trans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(address));
  } else if constexpr (N == 1) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(address));
  } else if constexpr (N == 2 && !Trans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(address));
  } else if constexpr (N == 2) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(address));
  } else if constexpr (N == 4 && !Trans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
  } else {
    static_assert(N == 4, "ldmatrix loads 1, 2 or 4 matrices");
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
  }
}

#else

namespace detail {

template <typename T>
float fragment_element(uint32_t reg, int high) {
  const uint16_t bits = static_cast<uint16_t>(high ? reg >> 16 : reg & 0xffffu);
  T value;
  std::memcpy(&value, &bits, 2);
  return static_cast<float>(value);
}

inline Site site_of(const std::source_location& at) {
  return Site{at.file_name(), static_cast<int>(at.line())};
}

// D = A B + C of a 16 x 8 tile, K deep: d(lane, q, value) for element q of each lane's accumulator fragment.
// Products of 16-bit or tf32 values are exact in float; the sums go in k order.
template <int K, typename Store>
void accumulate(const float (&A)[16][K], const float (&B)[K][8], const float (&C)[16][8], const Store& d) {
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    for (int q = 0; q < 4; ++q) {
      const int row = g + (q >= 2 ? 8 : 0), col = 2 * t + (q & 1);
      float sum = C[row][col];
      for (int k = 0; k < K; ++k) {
        sum += A[row][k] * B[k][col];
      }
      d(lane, q, sum);
    }
  }
}

}  // namespace detail

template <typename T>
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4],
                  std::source_location at = std::source_location::current()) {
  static_assert(std::is_same_v<T, bf16> || std::is_same_v<T, half>, "mma.m16n8k16 takes bf16 or half");
  struct In {
    uint32_t a[4], b[2];
    float c[4];
  };
  struct Out {
    float d[4];
  };
  const In in{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}, {c[0], c[1], c[2], c[3]}};
  const Out out = warp_collective<In, Out>(
      std::is_same_v<T, bf16> ? "mma.sync.m16n8k16.bf16" : "mma.sync.m16n8k16.f16", detail::site_of(at), 0xffffffffu,
      in, [](unsigned, const In* const* ins, Out* const* outs) {
        float A[16][16], B[16][8], C[16][8];
        for (int lane = 0; lane < 32; ++lane) {
          const In& f = *ins[lane];
          const int g = lane / 4, t = lane % 4;
          for (int e = 0; e < 2; ++e) {
            A[g][2 * t + e] = detail::fragment_element<T>(f.a[0], e);
            A[g + 8][2 * t + e] = detail::fragment_element<T>(f.a[1], e);
            A[g][2 * t + 8 + e] = detail::fragment_element<T>(f.a[2], e);
            A[g + 8][2 * t + 8 + e] = detail::fragment_element<T>(f.a[3], e);
            B[2 * t + e][g] = detail::fragment_element<T>(f.b[0], e);
            B[2 * t + 8 + e][g] = detail::fragment_element<T>(f.b[1], e);
            C[g][2 * t + e] = f.c[e];
            C[g + 8][2 * t + e] = f.c[2 + e];
          }
        }
        detail::accumulate(A, B, C, [&](int lane, int q, float sum) { outs[lane]->d[q] = sum; });
      });
  for (int q = 0; q < 4; ++q) {
    d[q] = out.d[q];
  }
}

inline float tf32_round(float x) {
  const uint32_t u = bits_from_float(x);
  if ((u & 0x7f800000u) == 0x7f800000u) {
    return x;  // infinity and NaN pass
  }
  return float_from_bits((u + 0x1000u) & 0xffffe000u);  // the magnitude rounds half up: ties away from zero
}

inline void mma_m16n8k8_tf32(float (&d)[4], const float (&a)[4], const float (&b)[2], const float (&c)[4],
                             std::source_location at = std::source_location::current()) {
  struct In {
    float a[4], b[2], c[4];
  };
  struct Out {
    float d[4];
  };
  const Site site = detail::site_of(at);
  for (const float x : {a[0], a[1], a[2], a[3], b[0], b[1]}) {
    const uint32_t u = bits_from_float(x);
    if ((u & 0x7f800000u) != 0x7f800000u && (u & 0x1fffu) != 0) {  // infinity and NaN pass
      detail::fail("mma.sync.m16n8k8.tf32 at " + std::string(site.file) + ":" + std::to_string(site.line) +
                   ": an operand is not rounded to tf32 (tf32_round)");
    }
  }
  const In in{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}, {c[0], c[1], c[2], c[3]}};
  const auto compute = [](unsigned, const In* const* ins, Out* const* outs) {
    float A[16][8], B[8][8], C[16][8];
    for (int lane = 0; lane < 32; ++lane) {
      const In& f = *ins[lane];
      const int g = lane / 4, t = lane % 4;
      A[g][t] = f.a[0];
      A[g + 8][t] = f.a[1];
      A[g][t + 4] = f.a[2];
      A[g + 8][t + 4] = f.a[3];
      B[t][g] = f.b[0];
      B[t + 4][g] = f.b[1];
      for (int e = 0; e < 2; ++e) {
        C[g][2 * t + e] = f.c[e];
        C[g + 8][2 * t + e] = f.c[2 + e];
      }
    }
    detail::accumulate(A, B, C, [&](int lane, int q, float sum) { outs[lane]->d[q] = sum; });
  };
  const Out out = warp_collective<In, Out>("mma.sync.m16n8k8.tf32", site, 0xffffffffu, in, compute);
  for (int q = 0; q < 4; ++q) {
    d[q] = out.d[q];
  }
}

template <int N, bool Trans, typename T>
void ldmatrix(uint32_t (&r)[N], SharedPtr<T> row, std::source_location at = std::source_location::current()) {
  static_assert(sizeof(T) == 2, "ldmatrix loads 16-bit elements");
  static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
  struct In {
    SharedPtr<unsigned char> row;
    unsigned thread;
  };
  struct Out {
    uint32_t r[N];
  };
  const Site site = detail::site_of(at);
  const In in{row.template as<unsigned char>(), thread_rank()};
  const char* op = Trans ? "ldmatrix.sync.m8n8.trans" : "ldmatrix.sync.m8n8";
  const auto gather = [site](unsigned, const In* const* ins, Out* const* outs) {
    uint16_t m[N][8][8];
    if (detail::counting()) {
      uint64_t rows[8 * N];
      for (int i = 0; i < 8 * N; ++i) {
        rows[i] = ins[i]->row.offset();
      }
      detail::note_ldmatrix(site, rows, N);
    }
    for (int j = 0; j < N; ++j) {
      for (int i = 0; i < 8; ++i) {
        const SharedPtr<unsigned char>& p = ins[8 * j + i]->row;
        detail::shared_read(p.region(), p.begin(), p.end(), p.offset(), 16, 16, site, m[j][i],
                            static_cast<int>(ins[8 * j + i]->thread));
      }
    }
    for (int lane = 0; lane < 32; ++lane) {
      const int g = lane / 4, t = lane % 4;
      for (int j = 0; j < N; ++j) {
        const uint16_t lo = Trans ? m[j][2 * t][g] : m[j][g][2 * t];
        const uint16_t hi = Trans ? m[j][2 * t + 1][g] : m[j][g][2 * t + 1];
        outs[lane]->r[j] = uint32_t(lo) | (uint32_t(hi) << 16);
      }
    }
  };
  const Out out = warp_collective<In, Out>(op, site, 0xffffffffu, in, gather);
  for (int j = 0; j < N; ++j) {
    r[j] = out.r[j];
  }
}

#endif

}  // namespace flowformer::simt
